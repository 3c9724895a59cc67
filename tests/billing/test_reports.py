"""Usage reports against a real Redis: what the ledger writes, read back bucket by bucket, with exact numbers."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import time
from typing import Any

import pytest
from redis.asyncio import Redis

from billing import Ledger, Price, UsageRecord, cost_nano_usd, tenant_key
from billing.reports import (
    ReportQueryError,
    UsageBucket,
    UsageCounters,
    UsageQuery,
    UsageReport,
    UsageResult,
    parse_query,
    usage_report,
)
from tests.conftest import USAGE_CSV_COLUMNS

PRICE = Price(280, 830)
MODEL = "@cf/meta/llama-3.1-8b-instruct"
FP8 = "@cf/meta/llama-3.1-8b-instruct-fp8"
MODELS = (MODEL, FP8)
HOUR = 3600
DAY = 86400
# A UTC midnight ten days ago: the ledger expires buckets a fixed time after their hour, so data stays recent.
MIDNIGHT = (int(time.time()) // DAY - 10) * DAY
# 2026-11-22T04:30:00Z, for parsing tests that need no Redis.
NOW = 1_795_321_800
ZERO = {
    "requests": 0,
    "prompt_tokens": 0,
    "completion_tokens": 0,
    "total_tokens": 0,
    "cost_nano_usd": 0,
    "cost_usd": "0.000000000",
    "errors": 0,
}


def iso(seconds: int) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def counters(requests: int, prompt: int, completion: int, errors: int = 0) -> dict[str, int | str]:
    cost = cost_nano_usd(PRICE, prompt, completion)
    return {
        "requests": requests,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "cost_nano_usd": cost,
        "cost_usd": f"0.{cost:09d}",
        "errors": errors,
    }


async def record(ledger: Ledger, request_id: str, at: float, prompt: int, completion: int, **changes: str) -> None:
    fields = {"tenant": "acct-a", "model": MODEL, "status": "ok", **changes}
    usage = UsageRecord(
        request_id=request_id,
        tenant=fields["tenant"],
        key_id="keyid",
        model=fields["model"],
        prompt_tokens=prompt,
        completion_tokens=completion,
        cost_nano_usd=cost_nano_usd(PRICE, prompt, completion),
        status=fields["status"],
        started_at=at,
        duration_seconds=0.5,
    )
    assert await ledger.record(usage)


@pytest.fixture
async def usage(redis: Redis) -> Redis:
    """acct-a: one request at 23:10 the day before MIDNIGHT, two at 01:xx (one failed, one on FP8);
    acct-b: one request at 00:05, the hour where acct-a used nothing."""
    ledger = Ledger(redis)
    await record(ledger, "a1", MIDNIGHT - HOUR + 600.25, 1234, 567)
    await record(ledger, "a2", MIDNIGHT + HOUR + 300, 100, 50, status="upstream_error")
    await record(ledger, "a3", MIDNIGHT + HOUR + 1800, 2000, 1000, model=FP8)
    await record(ledger, "b1", MIDNIGHT + 300, 999, 999, tenant="acct-b")
    return redis


def json_page(report: UsageReport) -> dict[str, Any]:
    """The report's page through a JSON round trip, so it is proven to be JSON."""
    page: dict[str, Any] = json.loads(json.dumps(report.as_dict()))
    return page


def hours(since: int, until: int, **params: str) -> dict[str, str]:
    return {"from": str(since), "to": str(until), **params}


async def report_of(redis: Redis, params: dict[str, str], tenants: tuple[str, ...] = ("acct-a",)) -> UsageReport:
    query = parse_query(params, tenants=tenants, now=time.time(), allow_group_by_tenant=len(tenants) > 1)
    return await usage_report(redis, query, models=MODELS)


async def test_usage_report_hours_cross_midnight_with_zero_gap_buckets(usage: Redis) -> None:
    report = await report_of(usage, hours(MIDNIGHT - 2 * HOUR, MIDNIGHT + 2 * HOUR))
    page = json_page(report)
    assert page["object"] == "page" and page["granularity"] == "hour"
    assert (page["from"], page["to"]) == (MIDNIGHT - 2 * HOUR, MIDNIGHT + 2 * HOUR)
    assert page["has_more"] is False and page["next_page"] is None
    starts = [MIDNIGHT - 2 * HOUR, MIDNIGHT - HOUR, MIDNIGHT, MIDNIGHT + HOUR]
    assert [bucket["start_time"] for bucket in page["data"]] == starts
    assert [bucket["end_time"] for bucket in page["data"]] == [start + HOUR for start in starts]
    assert [bucket["start"] for bucket in page["data"]] == [iso(start) for start in starts]
    assert iso(MIDNIGHT).endswith("T00:00:00Z")
    assert all(bucket["object"] == "bucket" and len(bucket["results"]) == 1 for bucket in page["data"])
    results = [bucket["results"][0] for bucket in page["data"]]
    assert results == [
        {"model": None, "tenant": None, **ZERO},
        {"model": None, "tenant": None, **counters(1, 1234, 567)},
        {"model": None, "tenant": None, **ZERO},  # acct-b's request at 00:05 is not acct-a's
        {"model": None, "tenant": None, **counters(2, 2100, 1050, errors=1)},
    ]


async def test_usage_report_totals_are_exact_integer_nano_dollars(usage: Redis) -> None:
    report = await report_of(usage, hours(MIDNIGHT - 2 * HOUR, MIDNIGHT + 2 * HOUR))
    assert report.totals == UsageCounters(3, 3334, 1617, 2_275_630, 1)
    assert json_page(report)["totals"] == {
        "requests": 3,
        "prompt_tokens": 3334,
        "completion_tokens": 1617,
        "total_tokens": 4951,
        "cost_nano_usd": 2_275_630,
        "cost_usd": "0.002275630",
        "errors": 1,
    }
    assert counters(1, 1234, 567)["cost_usd"] == "0.000816130"


async def test_usage_report_days_cross_midnight(usage: Redis) -> None:
    params = {"from": iso(MIDNIGHT - DAY + 7 * HOUR), "to": iso(MIDNIGHT + 5 * HOUR), "granularity": "day"}
    page = json_page(await report_of(usage, params))
    assert (page["from"], page["to"], page["granularity"]) == (MIDNIGHT - DAY, MIDNIGHT + DAY, "day")
    assert [(bucket["start_time"], bucket["end_time"]) for bucket in page["data"]] == [
        (MIDNIGHT - DAY, MIDNIGHT),
        (MIDNIGHT, MIDNIGHT + DAY),
    ]
    assert [bucket["results"][0]["requests"] for bucket in page["data"]] == [1, 2]
    assert page["data"][1]["results"][0] == {"model": None, "tenant": None, **counters(2, 2100, 1050, errors=1)}


async def test_usage_report_day_gaps_are_zero_buckets(usage: Redis) -> None:
    params = {"from": str(MIDNIGHT - 3 * DAY), "to": str(MIDNIGHT + DAY), "granularity": "day"}
    page = json_page(await report_of(usage, params))
    assert [bucket["results"][0]["requests"] for bucket in page["data"]] == [0, 0, 1, 2]


async def test_usage_report_model_filter_counts_that_model_only(usage: Redis) -> None:
    page = json_page(await report_of(usage, hours(MIDNIGHT - HOUR, MIDNIGHT + 2 * HOUR, model=FP8)))
    assert [bucket["results"] for bucket in page["data"]] == [
        [{"model": None, "tenant": None, **ZERO}],
        [{"model": None, "tenant": None, **ZERO}],
        [{"model": None, "tenant": None, **counters(1, 2000, 1000)}],
    ]
    assert page["totals"] == counters(1, 2000, 1000)


async def test_usage_report_group_by_model_shows_every_configured_model_in_every_bucket(usage: Redis) -> None:
    query = parse_query(
        hours(MIDNIGHT - HOUR, MIDNIGHT + 2 * HOUR, group_by="model"),
        tenants=["acct-a"],
        now=time.time(),
        allow_group_by_tenant=False,
    )
    unused = "@cf/meta/unused"
    page = json_page(await usage_report(usage, query, models=[*MODELS, unused]))
    assert [[(result["model"], result["requests"]) for result in bucket["results"]] for bucket in page["data"]] == [
        [(MODEL, 1), (FP8, 0), (unused, 0)],
        [(MODEL, 0), (FP8, 0), (unused, 0)],
        [(MODEL, 1), (FP8, 1), (unused, 0)],
    ]
    last = page["data"][2]["results"]
    assert last[0] == {"model": MODEL, "tenant": None, **counters(1, 100, 50, errors=1)}
    assert last[1] == {"model": FP8, "tenant": None, **counters(1, 2000, 1000)}
    assert last[2] == {"model": unused, "tenant": None, **ZERO}


async def test_usage_report_group_by_model_adds_unconfigured_models_found_in_data(usage: Redis) -> None:
    await record(Ledger(usage), "a4", MIDNIGHT + 60, 10, 10, model="@cf/acme/retired@v1")
    page = json_page(await report_of(usage, hours(MIDNIGHT, MIDNIGHT + 2 * HOUR, group_by="model")))
    assert [[(result["model"], result["requests"]) for result in bucket["results"]] for bucket in page["data"]] == [
        [("@cf/acme/retired@v1", 1), (MODEL, 0), (FP8, 0)],
        [("@cf/acme/retired@v1", 0), (MODEL, 1), (FP8, 1)],
    ]


async def test_usage_report_group_by_model_with_filter_shows_that_model_only(usage: Redis) -> None:
    page = json_page(await report_of(usage, hours(MIDNIGHT, MIDNIGHT + 2 * HOUR, group_by="model", model=MODEL)))
    assert [bucket["results"] for bucket in page["data"]] == [
        [{"model": MODEL, "tenant": None, **ZERO}],
        [{"model": MODEL, "tenant": None, **counters(1, 100, 50, errors=1)}],
    ]


async def test_usage_report_group_by_tenant_lists_only_tenants_with_usage_keeping_every_bucket(usage: Redis) -> None:
    since, until = MIDNIGHT - 2 * HOUR, MIDNIGHT + 3 * HOUR
    tenants = ("acct-c", "acct-b", "acct-a")  # acct-c never used anything
    page = json_page(await report_of(usage, hours(since, until, group_by="tenant"), tenants=tenants))
    assert [bucket["start_time"] for bucket in page["data"]] == list(range(since, until, HOUR))
    assert [[(result["tenant"], result["requests"]) for result in bucket["results"]] for bucket in page["data"]] == [
        [],  # nobody used this hour: the bucket is there, with no results
        [("acct-a", 1)],
        [("acct-b", 1)],
        [("acct-a", 2)],
        [],
    ]
    assert page["data"][2]["results"] == [{"model": None, "tenant": "acct-b", **counters(1, 999, 999)}]
    ungrouped = json_page(await report_of(usage, hours(since, until), tenants=tenants))
    everything = {**counters(4, 4333, 2616, errors=1), "cost_nano_usd": 3_384_520, "cost_usd": "0.003384520"}
    assert page["totals"] == ungrouped["totals"] == everything  # the zeros left out changed no total
    assert [len(bucket["results"]) for bucket in ungrouped["data"]] == [1, 1, 1, 1, 1]  # zeros when not by tenant


async def test_usage_report_group_by_model_and_tenant_sorts_by_model_then_tenant(usage: Redis) -> None:
    params = hours(MIDNIGHT - HOUR, MIDNIGHT + 2 * HOUR, group_by="tenant, model")
    page = json_page(await report_of(usage, params, tenants=("acct-b", "acct-a")))
    assert [[(r["model"], r["tenant"], r["requests"]) for r in bucket["results"]] for bucket in page["data"]] == [
        [(MODEL, "acct-a", 1)],
        [(MODEL, "acct-b", 1)],
        [(MODEL, "acct-a", 1), (FP8, "acct-a", 1)],  # only the models each tenant used
    ]
    assert page["totals"]["requests"] == 4


async def test_usage_report_group_by_tenant_csv_has_rows_for_usage_only(usage: Redis) -> None:
    params = hours(MIDNIGHT - 2 * HOUR, MIDNIGHT + 3 * HOUR, group_by="tenant,model")
    report = await report_of(usage, params, tenants=("acct-a", "acct-b", "acct-c"))
    rows = list(csv.DictReader(io.StringIO(report.to_csv())))
    assert [(row["start"], row["model"], row["tenant"], row["requests"]) for row in rows] == [
        (iso(MIDNIGHT - HOUR), MODEL, "acct-a", "1"),
        (iso(MIDNIGHT), MODEL, "acct-b", "1"),
        (iso(MIDNIGHT + HOUR), MODEL, "acct-a", "1"),
        (iso(MIDNIGHT + HOUR), FP8, "acct-a", "1"),
    ]
    assert report.result_count == len(rows) == 4


async def test_usage_report_for_one_tenant_never_includes_another(usage: Redis) -> None:
    params = hours(MIDNIGHT - 2 * HOUR, MIDNIGHT + 2 * HOUR, group_by="model")
    a_page = json_page(await report_of(usage, params))
    b_page = json_page(await report_of(usage, params, tenants=("acct-b",)))
    assert a_page["totals"] == counters(3, 3334, 1617, errors=1)
    assert b_page["totals"] == counters(1, 999, 999)
    assert {result["tenant"] for bucket in a_page["data"] for result in bucket["results"]} == {None}


async def test_usage_report_several_tenants_ungrouped_sums_them(usage: Redis) -> None:
    page = json_page(await report_of(usage, hours(MIDNIGHT, MIDNIGHT + HOUR), tenants=("acct-a", "acct-b")))
    assert page["data"][0]["results"] == [{"model": None, "tenant": None, **counters(1, 999, 999)}]


async def test_usage_report_splits_fields_on_the_last_bar_and_skips_unknown_counters(redis: Redis) -> None:
    key = tenant_key("acct-a", "usage", "h", dt.datetime.fromtimestamp(MIDNIGHT, dt.UTC).strftime("%Y%m%d%H"))
    fields = {f"{MODEL}|requests": 2, f"{MODEL}|cost_nano_usd": 7, f"{MODEL}|future": 9, "odd|name|errors": 1}
    for field, value in fields.items():
        await redis.hincrby(key, field, value)
    page = json_page(await report_of(redis, hours(MIDNIGHT, MIDNIGHT + HOUR, group_by="model")))
    assert page["data"][0]["results"] == [
        {"model": MODEL, "tenant": None, **ZERO, "requests": 2, "cost_nano_usd": 7, "cost_usd": "0.000000007"},
        {"model": FP8, "tenant": None, **ZERO},
        {"model": "odd|name", "tenant": None, **ZERO, "errors": 1},
    ]


async def test_usage_report_pages_walk_the_range_exactly_once(usage: Redis) -> None:
    since, until = MIDNIGHT - 5 * HOUR, MIDNIGHT + 5 * HOUR
    whole = await report_of(usage, hours(since, until))
    seen: list[int] = []
    totals = UsageCounters()
    cursors: list[str] = []
    params = hours(since, until, limit="3")
    while True:
        page = await report_of(usage, params)
        seen += [bucket.start_time for bucket in page.buckets]
        totals += page.totals
        if page.next_page is None:
            break
        assert json_page(page)["has_more"] is True and json_page(page)["next_page"] == page.next_page
        cursors.append(page.next_page)
        params = {**params, "page": page.next_page}
    assert seen == list(range(since, until, HOUR))
    assert cursors == [str(since + 3 * HOUR), str(since + 6 * HOUR), str(since + 9 * HOUR)]
    assert len(page.buckets) == 1 and json_page(page)["has_more"] is False
    assert totals == whole.totals == UsageCounters(3, 3334, 1617, 2_275_630, 1)


async def test_usage_report_page_totals_cover_the_page_only(usage: Redis) -> None:
    first = await report_of(usage, hours(MIDNIGHT - HOUR, MIDNIGHT + 2 * HOUR, limit="1"))
    assert first.totals == UsageCounters(1, 1234, 567, 816_130, 0)
    assert (json_page(first)["from"], json_page(first)["to"]) == (MIDNIGHT - HOUR, MIDNIGHT + 2 * HOUR)


async def test_usage_report_reads_the_longest_hourly_range(usage: Redis) -> None:
    until = MIDNIGHT + 2 * HOUR
    report = await report_of(usage, hours(until - 2232 * HOUR, until), tenants=("acct-a", "acct-b"))
    assert len(report.buckets) == 2232 and report.next_page is None
    assert report.totals.requests == 4


async def test_usage_report_reads_many_tenants_over_several_pipelines(redis: Redis) -> None:
    """A 93-day hourly page is 14 script calls per tenant (168 buckets each, the last 48) and a pipeline holds 29
    calls: 9 tenants take 5 pipelines, and each bill must land in its own bucket."""
    until = MIDNIGHT + 2 * HOUR
    ledger = Ledger(redis)
    tenants = tuple(f"acct-{number}" for number in range(9))
    for number, tenant in enumerate(tenants):  # spread over the range, the first at its very start
        await record(ledger, f"r{number}", until - 2232 * HOUR + number * 275 * HOUR, 10, number, tenant=tenant)
    report = await report_of(redis, hours(until - 2232 * HOUR, until, group_by="tenant"), tenants=tenants)
    assert len(report.buckets) == 2232 and report.result_count == 9
    used = [(bucket.start_time, result.tenant) for bucket in report.buckets for result in bucket.results]
    assert used == [(until - 2232 * HOUR + number * 275 * HOUR, tenant) for number, tenant in enumerate(tenants)]
    assert report.totals == UsageCounters(9, 90, 36, sum(cost_nano_usd(PRICE, 10, n) for n in range(9)), 0)


async def test_usage_report_with_over_a_thousand_buckets_of_data_sums_them_all(redis: Redis) -> None:
    """Past 1,000 buckets with data the sums are made in a worker thread: the same report."""
    until = MIDNIGHT + 2 * HOUR
    used = range(until - 1100 * HOUR, until, HOUR)
    async with redis.pipeline(transaction=False) as pipe:
        for number, start in enumerate(used):
            hour = dt.datetime.fromtimestamp(start, dt.UTC).strftime("%Y%m%d%H")
            tenant = ("acct-a", "acct-b")[number % 2]
            pipe.hset(tenant_key(tenant, "usage", "h", hour), mapping={f"{MODEL}|requests": 1, f"{FP8}|errors": 1})
        await pipe.execute()
    params = hours(until - 2232 * HOUR, until, group_by="tenant,model")
    report = await report_of(redis, params, tenants=("acct-a", "acct-b", "acct-c"))
    assert len(report.buckets) == 2232 and report.result_count == 2200
    assert report.totals == UsageCounters(requests=1100, errors=1100)
    rows = [(b.start_time, r.model, r.tenant, r.counters.requests) for b in report.buckets for r in b.results]
    assert rows == [
        (start, model, ("acct-a", "acct-b")[number % 2], int(model == MODEL))
        for number, start in enumerate(used)
        for model in (MODEL, FP8)
    ]


async def test_usage_report_csv_has_one_row_per_bucket_and_group(usage: Redis) -> None:
    report = await report_of(usage, hours(MIDNIGHT - HOUR, MIDNIGHT + 2 * HOUR, group_by="model"))
    reader = csv.DictReader(io.StringIO(report.to_csv()))
    assert reader.fieldnames == USAGE_CSV_COLUMNS
    rows = list(reader)
    assert [(row["start"], row["end"], row["model"], row["requests"]) for row in rows] == [
        (iso(MIDNIGHT - HOUR), iso(MIDNIGHT), MODEL, "1"),
        (iso(MIDNIGHT - HOUR), iso(MIDNIGHT), FP8, "0"),
        (iso(MIDNIGHT), iso(MIDNIGHT + HOUR), MODEL, "0"),
        (iso(MIDNIGHT), iso(MIDNIGHT + HOUR), FP8, "0"),
        (iso(MIDNIGHT + HOUR), iso(MIDNIGHT + 2 * HOUR), MODEL, "1"),
        (iso(MIDNIGHT + HOUR), iso(MIDNIGHT + 2 * HOUR), FP8, "1"),
    ]
    assert rows[0] == {
        "start": iso(MIDNIGHT - HOUR),
        "end": iso(MIDNIGHT),
        "model": MODEL,
        "tenant": "",
        **{name: str(value) for name, value in counters(1, 1234, 567).items()},
    }


def test_usage_report_table_aligns_columns_and_ends_with_total() -> None:
    query = UsageQuery(tenants=("acct-a",), start=1_795_312_800, end=1_795_320_000, granularity="hour")
    report = UsageReport(
        query,
        (
            UsageBucket(
                1_795_312_800, 1_795_316_400, (UsageResult(MODEL, None, UsageCounters(1, 1234, 567, 816_130)),)
            ),
            UsageBucket(1_795_316_400, 1_795_320_000, (UsageResult(MODEL, None, UsageCounters(12, 5, 0, 1400, 3)),)),
        ),
    )
    assert report.to_table() == (
        "start                 model                           tenant  requests  prompt_tokens  completion_tokens"
        "  total_tokens  cost_nano_usd     cost_usd  errors\n"
        "2026-11-22T02:00:00Z  @cf/meta/llama-3.1-8b-instruct  -              1           1234                567"
        "          1801         816130  0.000816130       0\n"
        "2026-11-22T03:00:00Z  @cf/meta/llama-3.1-8b-instruct  -             12              5                  0"
        "             5           1400  0.000001400       3\n"
        "TOTAL                                                               13           1239                567"
        "          1806         817530  0.000817530       3\n"
    )


def test_usage_report_as_dict_dates_buckets_in_utc() -> None:
    query = UsageQuery(tenants=("acct-a",), start=1_795_312_800, end=1_795_316_400, granularity="hour")
    report = UsageReport(
        query, (UsageBucket(1_795_312_800, 1_795_316_400, (UsageResult(None, None, UsageCounters()),)),)
    )
    assert json_page(report)["data"] == [
        {
            "object": "bucket",
            "start_time": 1_795_312_800,
            "end_time": 1_795_316_400,
            "start": "2026-11-22T02:00:00Z",
            "results": [{"model": None, "tenant": None, **ZERO}],
        }
    ]


def parse(params: dict[str, str], *, operator: bool = False) -> UsageQuery:
    return parse_query(params, tenants=["acct-a"], now=NOW, allow_group_by_tenant=operator)


@pytest.mark.parametrize(
    ("since", "start"),
    [
        ("2026-11-21T21:30:00Z", 1_795_294_800),
        ("2026-11-21T21:30:00+00:00", 1_795_294_800),
        ("2026-11-21T23:30:00+02:00", 1_795_294_800),
        ("2026-11-21T16:59:59.999-04:30", 1_795_294_800),
        ("2026-11-21T21:30", 1_795_294_800),
        ("1795296600", 1_795_294_800),
        ("2026-11-21T21:00:00Z", 1_795_294_800),
        ("2026-11-21", 1_795_219_200),
        ("2026-11-01", 1_793_491_200),
    ],
)
def test_parse_query_reads_iso_offsets_dates_and_unix_seconds(since: str, start: int) -> None:
    query = parse({"from": since, "to": "2026-11-22T02:00:00Z"})
    assert (query.start, query.end, query.granularity) == (start, 1_795_312_800, "hour")


@pytest.mark.parametrize(
    ("until", "end"),
    [
        ("2026-11-22T02:00:00Z", 1_795_312_800),
        ("2026-11-22T02:00:01Z", 1_795_316_400),
        ("2026-11-22T02:00:00.5Z", 1_795_316_400),
        ("1795312801", 1_795_316_400),
    ],
)
def test_parse_query_aligns_to_up_to_a_bucket_boundary(until: str, end: int) -> None:
    assert parse({"from": "2026-11-22", "to": until}).end == end


def test_parse_query_defaults_to_the_last_24_hours() -> None:
    query = parse({})
    assert query == UsageQuery(tenants=("acct-a",), start=1_795_237_200, end=1_795_323_600, granularity="hour")
    assert (query.end - query.start) // HOUR == 24


def test_parse_query_defaults_to_the_last_30_days_by_day() -> None:
    query = parse({"granularity": "day"})
    assert (query.start, query.end, query.granularity) == (1_792_800_000, 1_795_392_000, "day")
    assert (query.end - query.start) // DAY == 30


def test_parse_query_defaults_from_relative_to_a_given_to() -> None:
    query = parse({"to": "2026-11-22T02:00:00Z"})
    assert (query.start, query.end) == (1_795_312_800 - 24 * HOUR, 1_795_312_800)


def test_parse_query_default_from_never_goes_before_2000() -> None:
    query = parse({"to": "2000-01-01T05:00:00Z"})
    assert (query.start, query.end) == (946_684_800, 946_684_800 + 5 * HOUR)


def test_parse_query_reads_filters_grouping_and_paging() -> None:
    params = {"model": MODEL, "group_by": "tenant,model", "limit": "5", "page": "1795309200"}
    query = parse_query(params, tenants=["acct-b", "acct-a", "acct-b"], now=NOW, allow_group_by_tenant=True)
    assert query.tenants == ("acct-b", "acct-a")
    assert (query.model, query.group_by, query.limit, query.page) == (MODEL, ("model", "tenant"), 5, 1_795_309_200)
    assert (query.page_start, query.page_end) == (1_795_309_200, 1_795_323_600)


def test_parse_query_accepts_the_longest_ranges() -> None:
    hourly = parse({"from": "2026-08-21T05:00:00Z"})
    assert (hourly.end - hourly.start) // HOUR == 2232
    daily = parse({"from": "2023-11-21", "to": "2026-11-22T04:30:00Z", "granularity": "day"})
    assert (daily.end - daily.start) // DAY == 1098


async def test_usage_report_of_no_tenants_is_zeros(usage: Redis) -> None:
    query = parse_query({}, tenants=[], now=NOW, allow_group_by_tenant=True)
    report = await usage_report(usage, query, models=[MODEL])
    assert len(report.buckets) == 24 and report.totals.requests == 0


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"from": "abc"}, "'from': expected ISO 8601 or Unix seconds, got 'abc'"),
        ({"to": "2026-13-01"}, "'to': expected ISO 8601 or Unix seconds, got '2026-13-01'"),
        ({"from": "-5"}, "'from': expected ISO 8601 or Unix seconds, got '-5'"),
        ({"from": "1795296600.5"}, "'from': expected ISO 8601 or Unix seconds, got '1795296600.5'"),
        ({"from": "9" * 5000}, "'from': expected ISO 8601 or Unix seconds"),
        ({"from": "1999-12-31T23:59:59Z"}, "'from': '1999-12-31T23:59:59Z' is before 2000-01-01"),
        ({"to": "0"}, "'to': '0' is before 2000-01-01"),
        ({"to": "2026-11-23T04:30:01Z"}, "'to': '2026-11-23T04:30:01Z' is more than a day in the future"),
        (
            {"from": "2026-11-22T04:30:00Z"},
            "'from': '2026-11-22T04:30:00Z' is not before 'to' \\(2026-11-22T04:30:00Z\\)",
        ),
        ({"from": "2026-11-22T03:00Z", "to": "2026-11-22T02:00Z"}, "'from': '2026-11-22T03:00Z' is not before 'to'"),
        ({"from": "2026-08-21T04:59:59Z"}, "'from': the range spans 2233 hour buckets; the maximum is 2232"),
        ({"from": "2023-11-20", "granularity": "day"}, "'from': the range spans 1099 day buckets; the maximum is 1098"),
        ({"granularity": "week"}, "'granularity': expected 'hour' or 'day', got 'week'"),
        ({"granularity": "1h"}, "'granularity': expected 'hour' or 'day', got '1h'"),
        ({"group_by": "model,api_key_id"}, "'group_by': expected 'model' and/or 'tenant', got 'api_key_id'"),
        ({"group_by": "tenant"}, "'group_by': 'tenant' is only available in operator reports"),
        ({"bucket_width": "1h"}, "'bucket_width': unknown parameter; expected one of from, to, granularity, model"),
        ({"limit": "0"}, "'limit': expected an integer from 1 to 2232, got '0'"),
        ({"limit": "2233"}, "'limit': expected an integer from 1 to 2232, got '2233'"),
        ({"limit": "ten"}, "'limit': expected an integer from 1 to 2232, got 'ten'"),
        ({"limit": "1099", "granularity": "day"}, "'limit': expected an integer from 1 to 1098, got '1099'"),
        ({"page": "abc"}, "'page': 'abc' is not a page of this range"),
        ({"page": "1795320001"}, "'page': '1795320001' is not a page of this range"),
        ({"page": "1795323600"}, "'page': '1795323600' is not a page of this range"),
        ({"page": "1795233600"}, "'page': '1795233600' is not a page of this range"),
    ],
)
def test_parse_query_rejects_bad_parameters_naming_them(params: dict[str, str], message: str) -> None:
    with pytest.raises(ReportQueryError, match=f"^{message}"):
        parse(params)


def test_report_query_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="'from'"):
        parse({"from": "yesterday"})
