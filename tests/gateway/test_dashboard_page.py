"""The dashboard's page and assets, in process: types, security headers, no inline code, errors in the envelope.

The page's behaviour in a browser is tests/streaming/test_dashboard_browser.py; the verify route it signs in with is
tested in test_admin.py.
"""

from __future__ import annotations

import html.parser
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from billing import Tokenizer
from gateway.dashboard import STATIC_DIR
from tests.conftest import Gateway, gateway_for

CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}
ASSETS = {
    "/dashboard/static/dashboard.js": "text/javascript",
    "/dashboard/static/dashboard.css": "text/css",
    "/dashboard/static/vendor/chart.umd.min.js": "text/javascript",
    "/dashboard/static/favicon.svg": "image/svg+xml",
}
JAVASCRIPT_TYPES = {"text/javascript", "application/javascript"}


@pytest.fixture
async def gw(tokenizer: Tokenizer) -> AsyncIterator[Gateway]:
    """The gateway in process. The page needs no Redis and no worker, so neither is reachable."""
    async with gateway_for("redis://127.0.0.1:9/0", tokenizer, [], skip_key=True) as gateway:
        yield gateway


def assert_secured(response: httpx.Response) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, (response.url, name)


def media_type(response: httpx.Response) -> str:
    return response.headers["content-type"].split(";")[0].strip()


class _PageParser(html.parser.HTMLParser):
    """Collects what a strict CSP forbids or needs: script bodies, style attributes and elements, event handlers,
    and every URL the page loads."""

    def __init__(self) -> None:
        super().__init__()
        self.inline_scripts: list[str] = []
        self.forbidden: list[str] = []
        self.urls: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self._in_script = tag == "script"
        if tag == "style":
            self.forbidden.append("<style>")
        self.forbidden += [f"{tag}[{name}]" for name in attributes if name == "style" or name.startswith("on")]
        for name in ("src", "href"):
            if attributes.get(name):
                self.urls.append(str(attributes[name]))

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline_scripts.append(data)


@pytest.mark.parametrize("path", ["/dashboard", "/dashboard/"])
async def test_dashboard_page_is_html_with_security_headers_and_never_cached(gw: Gateway, path: str) -> None:
    response = await gw.client.get(path)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["cache-control"] == "no-store"
    assert_secured(response)
    assert "<title>Tollgate · Usage</title>" in response.text
    assert response.text == (STATIC_DIR / "index.html").read_text(encoding="utf-8")


async def test_dashboard_page_has_no_inline_script_or_style_and_loads_only_its_own_assets(gw: Gateway) -> None:
    parser = _PageParser()
    parser.feed((await gw.client.get("/dashboard")).text)
    assert parser.inline_scripts == [] and parser.forbidden == []
    assert sorted(parser.urls) == sorted(ASSETS)  # no CDN, nothing from another origin
    for url in parser.urls:
        assert (await gw.client.get(url)).status_code == 200, url


@pytest.mark.parametrize(("path", "kind"), ASSETS.items())
async def test_dashboard_assets_have_their_types_and_security_headers(gw: Gateway, path: str, kind: str) -> None:
    response = await gw.client.get(path)
    assert response.status_code == 200, response.text
    assert media_type(response) in (JAVASCRIPT_TYPES if kind == "text/javascript" else {kind})
    assert response.headers["cache-control"] == "no-cache" and response.headers["etag"]
    assert_secured(response)
    assert response.content == (STATIC_DIR / path.removeprefix("/dashboard/static/")).read_bytes()


async def test_dashboard_vendored_chart_library_is_chart_js_4_with_its_license(gw: Gateway) -> None:
    library = (await gw.client.get("/dashboard/static/vendor/chart.umd.min.js")).text
    assert library.startswith("/*!\n * Chart.js v4.")
    license_text = (await gw.client.get("/dashboard/static/vendor/chart.js.LICENSE.md")).text
    assert "The MIT License" in license_text and "Chart.js Contributors" in license_text


def test_dashboard_script_keeps_the_credential_in_session_storage_only_and_writes_no_markup() -> None:
    script = (STATIC_DIR / "dashboard.js").read_text(encoding="utf-8")
    assert "sessionStorage.setItem" in script
    for forbidden in ("localStorage", "document.cookie", "innerHTML", "outerHTML", "insertAdjacentHTML", "eval("):
        assert forbidden not in script, forbidden
    assert 'setAttribute("style"' not in script and ".style." not in script  # CSP: style-src 'self'


@pytest.mark.parametrize(
    "path",
    [
        "/dashboard/static/nope.js",
        "/dashboard/static/vendor/",
        "/dashboard/static/..%2F..%2Fdashboard.py",
        "/dashboard/static/%2e%2e/%2e%2e/dashboard.py",
        "/dashboard/nope",
    ],
)
async def test_dashboard_unknown_asset_is_404_in_the_error_envelope(gw: Gateway, path: str) -> None:
    response = await gw.client.get(path)
    assert response.status_code == 404, response.text
    assert response.json() == {
        "result": None,
        "success": False,
        "errors": [{"code": 7003, "message": response.json()["errors"][0]["message"]}],
        "messages": [],
    }
    assert "Could not route to" in response.json()["errors"][0]["message"]
    assert "import" not in response.text  # no source code leaked


@pytest.mark.parametrize("path", ["/dashboard", "/dashboard/static/dashboard.js"])
async def test_dashboard_post_is_405_in_the_error_envelope(gw: Gateway, path: str) -> None:
    response = await gw.client.post(path)
    assert response.status_code == 405, response.text
    assert response.json()["errors"][0]["code"] == 7001


async def test_dashboard_is_found_whatever_the_working_directory(
    tokenizer: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    async with gateway_for("redis://127.0.0.1:9/0", tokenizer, [], skip_key=True) as gateway:
        assert (await gateway.client.get("/dashboard")).status_code == 200
        assert (await gateway.client.get("/dashboard/static/dashboard.css")).status_code == 200
