"""The usage dashboard in headless Chromium, against Tollgate as deployed: ``tollgate serve`` in front of a simulated
worker process, with real requests billed to two tenants.

The page must show exactly what the ledger holds, read here independently through the usage API: the summary cards,
the table's rows and total, the CSV it downloads, and for the operator the top spenders in order. Screenshots of
both views go to ``test-artifacts/`` under the repository root.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import shutil
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Locator, Page, Route, expect, sync_playwright

from billing import format_usd
from tests.conftest import FP8_MODEL, FP8_NAME, MODEL, REPO
from tests.processes import ADMIN_TOKEN, stack_in_tempdir

pytestmark = [pytest.mark.server, pytest.mark.timeout(120)]

TENANT_A = "acct-dash-a"
TENANT_B = "acct-dash-b"  # spends more than A: listed first among the top spenders
WRONG_KEY = "tg_aaaaaaaaaaaa_" + "A" * 43
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_HINT = "install it (Debian/Ubuntu: `sudo apt-get install chromium`) or set TOLLGATE_CHROMIUM to its path"
EXTRA_SCOPES = [("inference",), ("usage:read", "admin")]
COUNTERS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens")


@dataclasses.dataclass
class Deployment:
    url: str
    http: httpx.Client
    keys: dict[str, str]  # tenant → secret key
    requests: dict[str, int]  # tenant → requests billed
    extra_keys: dict[str, str]  # scopes → a secret key of tenant A with just those scopes

    def result(self, path: str, secret: str, **params: str) -> Any:
        response = self.http.get(path, params=params, headers={"Authorization": f"Bearer {secret}"})
        assert response.status_code == 200, response.text
        return response.json()["result"]

    def usage(self, tenant: str, **params: str) -> dict[str, Any]:
        report: dict[str, Any] = self.result(f"/client/v4/accounts/{tenant}/ai/usage", self.keys[tenant], **params)
        assert report["has_more"] is False
        return report

    def ledger_totals(self, tenant: str) -> dict[str, Any]:
        """The tenant's counters over yesterday and today (UTC), by day: everything this test billed."""
        yesterday = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
        return self.usage(tenant, granularity="day", **{"from": yesterday.isoformat()})["totals"]


def chromium_path() -> str:
    path = os.environ.get("TOLLGATE_CHROMIUM") or shutil.which("chromium")
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail(f"Chromium is not installed: {CHROMIUM_HINT}")
    pytest.skip(f"Chromium is not installed: {CHROMIUM_HINT}")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = chromium_path()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=["--no-proxy-server"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def deployment(browser: Browser) -> Iterator[Deployment]:
    """Redis, a simulated worker serving both models, and the gateway; tenants A and B with billed traffic.
    (It takes ``browser`` so that a missing Chromium skips before anything starts.)"""
    with stack_in_tempdir() as stack:
        stack.start_worker(
            "--tokens-per-second", "0", "--ttft-seconds", "0", "--completion-tokens", "12",
            "--served-model-name", FP8_NAME,
        )  # fmt: skip
        stack.start_gateway()
        with httpx.Client(base_url=stack.gateway, timeout=30, trust_env=False) as http:
            keys = {tenant: create_key(http, tenant) for tenant in (TENANT_A, TENANT_B)}
            requests = {TENANT_A: send_traffic(http, keys[TENANT_A], TENANT_A, rounds=1)}
            requests[TENANT_B] = send_traffic(http, keys[TENANT_B], TENANT_B, rounds=2)
            extra_keys = {",".join(scopes): create_key(http, TENANT_A, scopes) for scopes in EXTRA_SCOPES}
            deployment = Deployment(stack.gateway, http, keys, requests, extra_keys)
            wait_until_billed(deployment)
            yield deployment


def create_key(http: httpx.Client, tenant: str, scopes: tuple[str, ...] = ("inference", "usage:read")) -> str:
    response = http.post(
        "/admin/v1/keys",
        json={"tenant": tenant, "name": f"{tenant} dashboard", "scopes": list(scopes)},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    assert response.status_code == 201, response.text
    return str(response.json()["result"]["key"])


def send_traffic(http: httpx.Client, secret: str, tenant: str, rounds: int) -> int:
    """Native requests on both models, whole and streamed, and OpenAI chat completions; the number sent."""
    headers = {"Authorization": f"Bearer {secret}"}
    run = f"/client/v4/accounts/{tenant}/ai/run/"
    calls = [
        (run + MODEL, {"prompt": "Tell me a story about a lighthouse keeper", "max_tokens": 20}),
        (run + MODEL, {"messages": [{"role": "user", "content": "Hello there"}], "stream": True, "max_tokens": 24}),
        (run + FP8_MODEL, {"prompt": "Summarize the plot of Hamlet", "max_tokens": 16}),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 12}),
        (
            "/v1/chat/completions",
            {"model": FP8_MODEL, "messages": [{"role": "user", "content": "Hey"}], "stream": True},
        ),
    ]
    for _ in range(rounds):
        for path, body in calls:
            response = http.post(path, json=body, headers=headers)
            assert response.status_code == 200, response.text
    return rounds * len(calls)


def wait_until_billed(deployment: Deployment, timeout_seconds: float = 10.0) -> None:
    """A bill is written just after its answer: wait until the ledger holds every request."""
    deadline = time.monotonic() + timeout_seconds
    for tenant, count in deployment.requests.items():
        while deployment.ledger_totals(tenant)["requests"] < count:
            assert time.monotonic() < deadline, f"{tenant}: not every request was billed in time"
            time.sleep(0.05)
        assert deployment.ledger_totals(tenant)["requests"] == count


# -- how the page writes numbers --------------------------------------------------------------------------------


def integer(value: int) -> str:
    return f"{value:,}"


def usd(exact: str) -> str:
    whole, _, fraction = exact.partition(".")
    return f"${int(whole):,}.{fraction}"


def cells(row: dict[str, Any]) -> list[str]:
    """A table row's counter cells, as the page writes them."""
    return [*(integer(row[name]) for name in COUNTERS), usd(row["cost_usd"]), integer(row["errors"])]


def row_texts(page: Page, test_id: str) -> list[list[str]]:
    rows = page.get_by_test_id(test_id)
    return [
        [cell.strip() for cell in rows.nth(index).locator("th, td").all_inner_texts()] for index in range(rows.count())
    ]


# -- the browser session ------------------------------------------------------------------------------------------


def sign_in(page: Page, credential: str) -> None:
    page.get_by_label("API key or admin token").fill(credential)
    page.get_by_test_id("sign-in").click()


def session_storage_size(page: Page) -> int:
    return int(page.evaluate("sessionStorage.length"))


def screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    print(f"dashboard screenshot: {path}")  # noqa: T201 - where to look, for whoever runs the test
    return path


def assert_cards(view: Locator, totals: dict[str, Any]) -> None:
    """The summary cards show the range's counters, and its spend to the nano-dollar."""
    for name in COUNTERS:
        card = "card-" + name.replace("_", "-") + "-value"
        expect(view.get_by_test_id(card)).to_have_text(integer(totals[name]))
    expect(view.get_by_test_id("card-spend-value")).to_have_text(usd(totals["cost_usd"]))


def range_on_screen(view: Locator) -> dict[str, str]:
    """The usage query behind the view: its granularity and its UTC range."""
    return {name: str(view.get_attribute(f"data-{name}")) for name in ("granularity", "from", "to")}


def test_dashboard_browser_shows_the_ledger_to_a_tenant_and_the_operator(
    browser: Browser, deployment: Deployment
) -> None:
    a_totals, b_totals = deployment.ledger_totals(TENANT_A), deployment.ledger_totals(TENANT_B)
    assert int(b_totals["cost_nano_usd"]) > int(a_totals["cost_nano_usd"]) > 0
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda message: problems.extend(console_problem(message)))
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    try:
        page.goto(deployment.url + "/dashboard")
        check_tenant_view(page, deployment, a_totals)
        check_reload_sign_out_and_wrong_key(page, deployment, a_totals)
        check_scopes(page, deployment)
        assert context.cookies() == [] and page.evaluate("localStorage.length") == 0
        check_admin_view(page, deployment, a_totals, b_totals)
        check_narrow_window(page)
    finally:
        context.close()
    assert problems == []


def console_problem(message: ConsoleMessage) -> list[str]:
    """Console errors, but for the browser's own note of the 401 the wrong key gets on purpose."""
    if message.type != "error" or "status of 401" in message.text:
        return []
    return [f"console: {message.text} ({message.location.get('url')})"]


def check_tenant_view(page: Page, deployment: Deployment, totals: dict[str, Any]) -> None:
    sign_in(page, deployment.keys[TENANT_A])
    view = page.get_by_test_id("tenant-view")
    expect(view).to_have_attribute("data-state", "ready")
    expect(page.get_by_test_id("signin")).to_be_hidden()
    expect(view.get_by_test_id("account")).to_have_text(TENANT_A)
    assert_cards(view, totals)
    budget = deployment.result(f"/client/v4/accounts/{TENANT_A}/ai/budget", deployment.keys[TENANT_A])
    expect(view.get_by_test_id("card-month-value")).to_have_text(usd(budget["spent_usd"]))

    # the table: the hourly report of the range on screen, row by row, and the total
    query = range_on_screen(view)
    assert query["granularity"] == "hour"
    report = deployment.usage(TENANT_A, **query, group_by="model")
    expected = [
        [bucket["start"][:16].replace("T", " "), result["model"], *cells(result)]
        for bucket in reversed(report["data"])
        for result in bucket["results"]
        if result["requests"] > 0
    ]
    assert {row[1] for row in expected} == {MODEL, FP8_MODEL}
    assert row_texts(page, "usage-row") == expected
    assert row_texts(page, "usage-total-row") == [["Total", "", *cells(totals)]]

    check_charts(page, view, report)
    usage_path = f"/client/v4/accounts/{TENANT_A}/ai/usage"
    check_csv(page, view, deployment, usage_path, deployment.keys[TENANT_A], {**query, "group_by": "model"})
    assert screenshot(page, "dashboard-tenant.png").stat().st_size > 10_000

    # another range: daily buckets, the same totals (everything was billed today)
    view.get_by_label("Range").select_option(label="Last 30 days")
    expect(view).to_have_attribute("data-granularity", "day")
    expect(view).to_have_attribute("data-state", "ready")
    assert_cards(view, totals)
    expect(page.get_by_test_id("usage-row").first).to_contain_text(dt.datetime.now(dt.UTC).date().isoformat())
    view.get_by_label("Range").select_option(label="Last 24 hours")
    expect(view).to_have_attribute("data-granularity", "hour")


def check_charts(page: Page, view: Locator, report: dict[str, Any]) -> None:
    """Each chart is drawn; the spend chart's tooltip gives a bucket's exact spend per model."""
    for name in ("chart-spend", "chart-tokens", "chart-requests"):
        canvas = view.get_by_test_id(name)
        box = canvas.bounding_box()
        assert box is not None and box["width"] > 100 and box["height"] > 100, (name, box)
        assert chart_series(canvas), name
    spend = view.get_by_test_id("chart-spend")
    assert sorted(chart_series(spend)) == sorted([MODEL, FP8_MODEL])
    index, x, y = spend.evaluate(LAST_BAR)
    spend.hover(position={"x": x, "y": y})
    page.wait_for_function(f"() => Chart.getChart({CANVAS_OF_SPEND}).tooltip.opacity > 0")
    lines = spend.evaluate("canvas => Chart.getChart(canvas).tooltip.body.flatMap(part => part.lines)")
    costs = {result["model"]: result["cost_usd"] for result in report["data"][index]["results"]}
    assert lines == [f"{model}: {usd(costs[model])}" for model in chart_series(spend)]
    page.mouse.move(0, 0)


# The last bucket with any spend in the spend chart: its index and the middle of its bar, in canvas pixels.
LAST_BAR = """canvas => {
    const chart = Chart.getChart(canvas);
    const sums = chart.data.labels.map((_, i) => chart.data.datasets.reduce((sum, d) => sum + d.data[i], 0));
    const index = sums.findLastIndex(sum => sum > 0);
    const bar = chart.getDatasetMeta(0).data[index];
    return [index, bar.x, (chart.chartArea.top + chart.chartArea.bottom) / 2];
}"""
CANVAS_OF_SPEND = "document.querySelector('#tenant-view [data-testid=chart-spend]')"


def chart_series(canvas: Locator) -> list[str]:
    """The labels of the datasets Chart.js drew on ``canvas``."""
    return list(canvas.evaluate("canvas => Chart.getChart(canvas).data.datasets.map(dataset => dataset.label)"))


def check_csv(page: Page, view: Locator, deployment: Deployment, path: str, secret: str, query: dict[str, str]) -> None:
    """The downloaded file is byte for byte the API's CSV of the same query, under the API's file name."""
    response = deployment.http.get(
        path, params={**query, "format": "csv"}, headers={"Authorization": f"Bearer {secret}"}
    )
    assert response.status_code == 200, response.text
    with page.expect_download() as info:
        view.get_by_test_id("download-csv").click()
    download = info.value
    assert f'filename="{download.suggested_filename}"' in response.headers["content-disposition"]
    assert Path(download.path()).read_bytes() == response.content


def check_reload_sign_out_and_wrong_key(page: Page, deployment: Deployment, totals: dict[str, Any]) -> None:
    page.reload()
    view = page.get_by_test_id("tenant-view")
    expect(view).to_have_attribute("data-state", "ready")
    assert_cards(view, totals)
    assert session_storage_size(page) == 1

    page.get_by_test_id("sign-out").click()
    expect(page.get_by_test_id("signin")).to_be_visible()
    expect(view).to_be_hidden()
    assert session_storage_size(page) == 0

    sign_in(page, WRONG_KEY)
    expect(page.get_by_test_id("error")).to_contain_text("Authentication error")
    expect(page.get_by_test_id("signin")).to_be_visible()
    assert session_storage_size(page) == 0


def check_scopes(page: Page, deployment: Deployment) -> None:
    """A key without usage:read is told so; a key with usage:read and admin switches between both views."""
    sign_in(page, deployment.extra_keys["inference"])
    expect(page.get_by_test_id("notice")).to_contain_text("usage:read")
    expect(page.get_by_test_id("tenant-view")).to_be_hidden()
    expect(page.get_by_test_id("admin-view")).to_be_hidden()
    page.get_by_test_id("sign-out").click()

    sign_in(page, deployment.extra_keys["usage:read,admin"])
    expect(page.get_by_test_id("tenant-view")).to_have_attribute("data-state", "ready")
    page.get_by_test_id("tab-admin").click()
    expect(page.get_by_test_id("admin-view")).to_have_attribute("data-state", "ready")
    expect(page.get_by_test_id("tenant-view")).to_be_hidden()
    expect(page.get_by_test_id("tab-admin")).to_have_attribute("aria-pressed", "true")
    page.get_by_test_id("sign-out").click()
    expect(page.get_by_test_id("signin")).to_be_visible()
    assert session_storage_size(page) == 0


def check_admin_view(page: Page, deployment: Deployment, a_totals: dict[str, Any], b_totals: dict[str, Any]) -> None:
    sign_in(page, ADMIN_TOKEN)
    view = page.get_by_test_id("admin-view")
    expect(view).to_have_attribute("data-state", "ready")
    expect(page.get_by_test_id("error")).to_be_hidden()
    expect(page.get_by_test_id("identity")).to_contain_text("admin token")
    spenders = page.get_by_test_id("spender-row")
    expect(spenders).to_have_count(2)
    assert [spenders.nth(i).get_attribute("data-tenant") for i in range(2)] == [TENANT_B, TENANT_A]
    for index, totals in enumerate([b_totals, a_totals]):
        expect(spenders.nth(index).locator("[data-col=spent]")).to_have_text(usd(totals["cost_usd"]))
    both = {name: a_totals[name] + b_totals[name] for name in (*COUNTERS, "errors")}
    assert_cards(view, {**both, "cost_usd": format_usd(a_totals["cost_nano_usd"] + b_totals["cost_nano_usd"])})
    tenants = page.get_by_test_id("tenant-row")
    assert [tenants.nth(i).get_attribute("data-tenant") for i in range(tenants.count())] == [TENANT_B, TENANT_A]
    assert row_texts(page, "tenant-row") == [[TENANT_B, *cells(b_totals)], [TENANT_A, *cells(a_totals)]]
    assert chart_series(view.get_by_test_id("chart-spend")) == [TENANT_B, TENANT_A]
    query = {**range_on_screen(view), "group_by": "tenant"}
    check_csv(page, view, deployment, "/admin/v1/usage", ADMIN_TOKEN, query)
    screenshot(page, "dashboard-admin.png")


def check_narrow_window(page: Page) -> None:
    """On a phone-sized window nothing but the tables' own scroll areas is wider than the screen."""
    page.set_viewport_size({"width": 390, "height": 844})
    expect(page.get_by_test_id("admin-view")).to_be_visible()
    # the charts resize a frame later (a ResizeObserver): wait for the page to settle, then it must fit
    page.wait_for_function("() => document.documentElement.scrollWidth <= 390", timeout=5000)
    screenshot(page, "dashboard-admin-narrow.png")


# -- paging and the "other" tenants, on a report too large to build from real traffic -------------------------------

PAGED_TENANTS = [f"acct-t{number:02d}" for number in range(1, 13)]  # 12: the chart shows 10, the rest as "other"
CSV_HEADER = (
    "start,end,model,tenant,requests,prompt_tokens,completion_tokens,total_tokens,cost_nano_usd,cost_usd,errors"
)


def paged_result(tenant: str, bucket: int) -> dict[str, Any]:
    """Tenant acct-tNN in bucket b (from 0): NN * (b + 1) requests, each costing $1,234.567891234."""
    weight = int(tenant[-2:]) * (bucket + 1)
    cost = 1_234_567_891_234 * weight
    counters = {"requests": weight, "prompt_tokens": 100 * weight, "completion_tokens": 10 * weight}
    return {
        "model": None,
        "tenant": tenant,
        **counters,
        "total_tokens": 110 * weight,
        "cost_nano_usd": cost,
        "cost_usd": format_usd(cost),
        "errors": 0,
    }


def is_paged_use(tenant: str, bucket: int) -> bool:
    """Whether acct-tNN used anything in bucket b: not when NN + b is a multiple of 4, and nobody in bucket 5. The
    report is sparse, as the gateway's are when grouped by tenant: a tenant without usage has no result there."""
    return (int(tenant[-2:]) + bucket) % 4 != 0 and bucket != 5


def paged_results(bucket: int) -> list[dict[str, Any]]:
    return [paged_result(tenant, bucket) for tenant in PAGED_TENANTS if is_paged_use(tenant, bucket)]


def paged_report(query: dict[str, str], first: int, count: int, next_page: int | None) -> dict[str, Any]:
    """One page of an hourly report grouped by tenant: buckets ``first`` .. ``first + count - 1`` of the range."""
    start = int(dt.datetime.fromisoformat(query["from"]).timestamp())
    data = []
    for bucket in range(first, first + count):
        start_time = start + 3600 * bucket
        stamp = dt.datetime.fromtimestamp(start_time, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        results = paged_results(bucket)
        data.append({"object": "bucket", "start_time": start_time, "end_time": start_time + 3600, "start": stamp,
                     "results": results})  # fmt: skip
    totals = {name: sum(r[name] for b in data for r in b["results"]) for name in (*COUNTERS, "errors")}
    cost = sum(r["cost_nano_usd"] for b in data for r in b["results"])
    return {
        "object": "page",
        "data": data,
        "totals": {**totals, "cost_nano_usd": cost, "cost_usd": format_usd(cost)},
        "has_more": next_page is not None,
        "next_page": None if next_page is None else str(next_page),
    }


def test_dashboard_browser_follows_report_pages_and_charts_the_rest_as_other(
    browser: Browser, deployment: Deployment
) -> None:
    """The operator's report comes in two pages (faked in the browser: the gateway pages only with ``limit``): the
    page asks for the second with the first's cursor, sums both exactly, charts the top 10 tenants and the other
    two as "other" (zero where a tenant has no result), and its CSV is both pages' rows under one header."""
    asked: list[dict[str, str]] = []
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()

    def serve_usage(route: Route) -> None:
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(route.request.url).query))
        asked.append(query)
        cursor = int(dt.datetime.fromisoformat(query["from"]).timestamp()) + 3600 * 12
        second = query.get("page") == str(cursor)
        if query.get("format") == "csv":
            row = f"row of page {2 if second else 1}"
            route.fulfill(status=200, headers=CSV_HEADERS, body=f"{CSV_HEADER}\r\n{row}\r\n")
            return
        report = paged_report(query, 12, 12, None) if second else paged_report(query, 0, 12, cursor)
        route.fulfill(status=200, json={"result": report, "success": True, "errors": [], "messages": []})

    page.route("**/admin/v1/usage?*", serve_usage)
    try:
        page.goto(deployment.url + "/dashboard")
        sign_in(page, ADMIN_TOKEN)
        view = page.get_by_test_id("admin-view")
        expect(view).to_have_attribute("data-state", "ready")
        assert [query.get("page") for query in asked] == [None, asked[1]["page"]] and asked[1]["page"]
        assert asked[0]["from"] == asked[1]["from"] and asked[0]["to"] == asked[1]["to"]

        results = [result for bucket in range(24) for result in paged_results(bucket)]
        everything = {name: sum(result[name] for result in results) for name in (*COUNTERS, "errors")}
        cost = sum(result["cost_nano_usd"] for result in results)
        assert_cards(view, {**everything, "cost_usd": format_usd(cost)})
        assert cost > 2**53  # past a double's exact integers: only summing the exact strings gets this right

        spent_by = {t: sum(r["cost_nano_usd"] for r in results if r["tenant"] == t) for t in PAGED_TENANTS}
        ranked = sorted(PAGED_TENANTS, key=lambda tenant: -spent_by[tenant])
        assert len(set(spent_by.values())) == len(PAGED_TENANTS)  # no ties: one right order
        spend_chart = view.get_by_test_id("chart-spend")
        assert chart_series(spend_chart) == [*ranked[:10], "other"]
        exact = spend_chart.evaluate("canvas => Chart.getChart(canvas).data.datasets.map(dataset => dataset.exact)")
        for series, tenants_in in zip(exact, [*([tenant] for tenant in ranked[:10]), ranked[10:]], strict=True):
            by_bucket = [
                sum(r["cost_nano_usd"] for r in paged_results(b) if r["tenant"] in tenants_in) for b in range(24)
            ]
            assert series == [format_usd(nano) for nano in by_bucket]
        assert exact[-1][5] == "0.000000000"  # the bucket nobody used
        tenants = page.get_by_test_id("tenant-row")
        assert [tenants.nth(i).get_attribute("data-tenant") for i in range(tenants.count())] == ranked
        assert row_texts(page, "tenant-row")[0][1:] == cells(
            {
                **{name: sum(r[name] for r in results if r["tenant"] == ranked[0]) for name in (*COUNTERS, "errors")},
                "cost_usd": format_usd(spent_by[ranked[0]]),
            }
        )

        with page.expect_download() as info:
            view.get_by_test_id("download-csv").click()
        csv = Path(info.value.path()).read_bytes().decode()
        assert csv == f"{CSV_HEADER}\r\nrow of page 1\r\nrow of page 2\r\n"
        assert info.value.suggested_filename == "paged.csv"
    finally:
        context.close()


CSV_HEADERS = {"content-type": "text/csv; charset=utf-8", "content-disposition": 'attachment; filename="paged.csv"'}
