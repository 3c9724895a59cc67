"""The web usage dashboard: one static page and its assets, served by the gateway itself.

The page lives in ``gateway/static/dashboard/``: plain HTML, CSS and JavaScript with a vendored Chart.js, so
nothing is built at install and nothing is fetched from the internet. It signs in with an API key or the operator's
admin token, keeps that in the browser tab's ``sessionStorage`` only, and reads the routes any client can call:
``/client/v4/user/tokens/verify``, a tenant's ``/ai/usage`` and ``/ai/budget``, and ``/admin/v1/usage`` and
``/admin/v1/tenants`` for operators. The server holds no session: every number on the page comes from those routes.

Every response here carries a strict Content-Security-Policy (the page has no inline script or style), and the page
itself is never cached.

Routes::

    GET  /dashboard, /dashboard/      the page
    GET  /dashboard/static/{path}     its script, style sheet and chart library
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import Final

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

STATIC_DIR: Final = Path(__file__).resolve().parent / "static" / "dashboard"

SECURITY_HEADERS: Final = MappingProxyType(
    {
        "content-security-policy": (
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; "
            "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
        ),
        "x-content-type-options": "nosniff",
        "referrer-policy": "no-referrer",
        "x-frame-options": "DENY",
    }
)


def routes() -> list[BaseRoute]:
    """The page at ``/dashboard`` (and ``/dashboard/``) and its assets under ``/dashboard/static/``."""
    assets = _SecurityHeaders(StaticFiles(directory=STATIC_DIR))  # an unknown asset raises 404: the error envelope
    return [
        Route("/dashboard", page, methods=["GET"]),
        Route("/dashboard/", page, methods=["GET"]),
        Mount("/dashboard/static", app=assets),
    ]


async def page(request: Request) -> Response:
    # no-store: the page is tiny, and a stale copy must never outlive an upgrade of its script's API calls
    headers = {**SECURITY_HEADERS, "cache-control": "no-store"}
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=headers)


class _SecurityHeaders:
    """Adds :data:`SECURITY_HEADERS` to every response of ``app``; assets are revalidated (ETag) before reuse."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.update({**SECURITY_HEADERS, "cache-control": "no-cache"})
            await send(message)

        await self.app(scope, receive, send_with_headers)
