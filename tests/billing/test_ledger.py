"""The ledger against a real Redis: exactly once per request id, counters by tenant, model, hour and day."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from billing import Ledger, Price, Retention, cost_nano_usd, format_usd, hour_bucket, tenant_key
from tests.conftest import usage_record

PRICE = Price(280, 830)


def test_pricing_is_exact_integer_nano_dollars() -> None:
    assert cost_nano_usd(PRICE, 1234, 567) == 816_130
    assert format_usd(816_130) == "0.000816130"
    assert format_usd(9_200_000_000_000_000_000) == "9200000000.000000000"


async def test_ledger_same_request_id_billed_1000_times_concurrently_counts_once(redis: Redis) -> None:
    ledger = Ledger(redis)
    record = usage_record()
    results = await asyncio.gather(*(ledger.record(record) for _ in range(1000)))
    assert results.count(True) == 1
    totals = await ledger.bucket_totals("acct-a", record.model, "2025112202")
    assert totals == {
        "requests": 1,
        "prompt_tokens": 1234,
        "completion_tokens": 567,
        "cost_nano_usd": 816_130,
        "errors": 0,
    }
    assert await ledger.bucket_totals("acct-a", record.model, "20251122") == totals
    [event] = await ledger.events("acct-a")
    assert event["request_id"] == "req-1" and event["cost_nano_usd"] == "816130" and event["status"] == "ok"


async def test_ledger_keeps_tenants_models_and_hours_apart(redis: Redis) -> None:
    ledger = Ledger(redis)
    await ledger.record(usage_record("r1"))
    await ledger.record(usage_record("r2", tenant="acct-b"))
    await ledger.record(usage_record("r3", model="@cf/meta/llama-3.1-8b-instruct-fp8"))
    await ledger.record(usage_record("r4", started_at=1_763_776_800.5 + 3600, status="upstream_error"))
    model = "@cf/meta/llama-3.1-8b-instruct"
    assert (await ledger.bucket_totals("acct-a", model, "2025112202"))["requests"] == 1
    later = await ledger.bucket_totals("acct-a", model, "2025112203")
    assert later["requests"] == 1 and later["errors"] == 1
    assert (await ledger.bucket_totals("acct-a", model, "20251122"))["requests"] == 2
    assert (await ledger.bucket_totals("acct-b", model, "2025112202"))["requests"] == 1
    assert len(await ledger.events("acct-a")) == 3 and len(await ledger.events("acct-b")) == 1
    # every key of a tenant carries its hash tag, so one tenant's script stays in one Cluster slot
    keys = {key.decode() async for key in redis.scan_iter("tg:*")}
    assert keys and all(key.startswith(("tg:{acct-a}:", "tg:{acct-b}:")) for key in keys)
    assert tenant_key("acct-a", "events") == "tg:{acct-a}:events"


async def test_a_tenants_event_stream_expires_when_its_newest_event_is_past_retention(redis: Redis) -> None:
    ledger = Ledger(redis, Retention(events_seconds=3600))
    await ledger.record(usage_record("r1"))
    events = tenant_key("acct-a", "events")
    assert 3590 < await redis.ttl(events) <= 3600  # trimming needs a next event; a tenant that stops needs this
    await redis.expire(events, 10)
    await ledger.record(usage_record("r2"))  # each event pushes it back
    assert 3590 < await redis.ttl(events) <= 3600


async def test_ledger_rejects_negative_numbers_before_writing(redis: Redis) -> None:
    ledger = Ledger(redis)
    with pytest.raises(ResponseError, match="bad usage"):
        await ledger.record(usage_record(prompt_tokens=-1))
    assert [key async for key in redis.scan_iter("tg:*")] == []


def test_hour_bucket_is_utc() -> None:
    assert hour_bucket(0) == "1970010100"


async def test_ledger_month_spends_of_many_tenants_equal_each_read_alone(redis: Redis) -> None:
    ledger = Ledger(redis)
    tenants = [f"acct-{number:04d}" for number in range(1500)]  # two pipelines of 1,000
    for number, tenant in enumerate(tenants[::7]):
        await ledger.record(usage_record(f"r{number}", tenant, cost_nano_usd=number + 1))
    await ledger.record(usage_record("other-month", tenants[0], started_at=1_760_000_000.0))  # October 2025
    spends = await ledger.month_spends(tenants, "202511")
    assert spends == [await ledger.month_spend(tenant, "202511") for tenant in tenants]
    assert spends[:8] == [1, 0, 0, 0, 0, 0, 0, 2] and sum(spends) == sum(range(1, len(tenants[::7]) + 1))
    assert await ledger.month_spends(tenants[:1], "202510") == [816_130]
