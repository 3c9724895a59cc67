"""Budgets: exact dollars, UTC months, and the admission check against a real Redis."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import pytest
from redis.asyncio import Redis

from billing import (
    AdmissionDecision,
    ApiKey,
    Budgets,
    InvalidBudgetError,
    KeyStore,
    Ledger,
    Limiter,
    Limits,
    UsageRecord,
    month_bounds,
    month_of,
    parse_usd,
)
from tests.conftest import usage_record


def utc(*args: int) -> float:
    return dt.datetime(*args, tzinfo=dt.UTC).timestamp()


def make_key(tenant: str = "acct-a", key_id: str = "aaaaaaaaaaaa", budget: int | None = None) -> ApiKey:
    return ApiKey(key_id, tenant, "", 0.0, False, monthly_budget_nano_usd=budget)


@pytest.mark.parametrize(
    ("text", "nano_usd"),
    [
        ("25", 25_000_000_000),
        ("25.00", 25_000_000_000),
        ("0.000000001", 1),
        ("0.50", 500_000_000),
        (" 12.345678901 ", 12_345_678_901),
        ("0", 0),
        ("9223372036.854775807", 9_223_372_036_854_775_807),  # the most a Redis counter holds, to the nano-dollar
    ],
)
def test_parse_usd_is_exact(text: str, nano_usd: int) -> None:
    assert parse_usd(text) == nano_usd


@pytest.mark.parametrize("text", ["-1", "-0.000000001", "1.0000000001", "abc", "", "NaN", "inf", "-Infinity", "1,5"])
def test_parse_usd_refuses_negative_unknown_and_sub_nano_amounts(text: str) -> None:
    with pytest.raises(InvalidBudgetError, match=repr(text)):
        parse_usd(text)


@pytest.mark.parametrize(
    ("text", "exact"),
    [
        ("12345678901234567890.123456789", 12_345_678_901_234_567_890_123_456_789),  # 29 digits
        ("1000000000000000000.0000000001", None),  # ten decimals
        ("1e-9999999", None),  # far below a nano-dollar
        ("1e999999", None),  # beyond any Decimal
    ],
)
def test_parse_usd_never_rounds(text: str, exact: int | None) -> None:
    try:
        value = parse_usd(text)
    except InvalidBudgetError:
        return  # refusing an amount is fine; rounding it is not
    assert value == exact


def test_month_bounds_are_utc_calendar_months() -> None:
    assert month_bounds("202611") == (utc(2026, 11, 1), utc(2026, 12, 1))
    assert month_bounds("202412") == (utc(2024, 12, 1), utc(2025, 1, 1))  # December rolls over into January
    start, end = month_bounds("202402")
    assert end - start == 29 * 86400  # a leap year
    start, end = month_bounds("202302")
    assert end - start == 28 * 86400


async def check(
    redis: Redis, key: ApiKey, *, cost: int = 0, now_hint: float | None = None, default: int | None = None
) -> AdmissionDecision:
    """The admission check with no rate limits: budgets only (it writes nothing)."""
    return await Limiter(redis, slot_ttl_seconds=60).admit(
        key,
        Limits(),
        request_id="probe",
        reserve_tokens=0,
        max_cost_nano_usd=cost,
        now_hint=time.time() if now_hint is None else now_hint,
        default_cap_nano_usd=default,
    )


async def test_budgets_check_reads_redis_time_and_the_current_month(redis: Redis) -> None:
    before = time.time()
    decision = await check(redis, make_key(budget=7), default=5_000)
    assert before - 1 <= decision.now <= time.time() + 1
    assert (decision.tenant_cap, decision.tenant_spent, decision.key_cap, decision.key_spent) == (5_000, 0, 7, 0)
    # a replica whose clock says another month reads this month's spend: Redis's clock decides
    await Ledger(redis).record(make_record("r1", "aaaaaaaaaaaa", 42))
    skewed = await check(redis, make_key(), now_hint=before - 40 * 86400)
    assert skewed.tenant_spent == 42 and skewed.admitted
    assert [key async for key in redis.scan_iter("tg:{acct-a}:rl:*")] == []  # no limits, nothing written


async def test_budgets_tenant_cap_default_explicit_none_and_reset(redis: Redis) -> None:
    budgets = Budgets(redis, default_monthly_nano_usd=5_000_000_000)
    key = make_key()
    assert await budgets.tenant_budget("acct-a") == (5_000_000_000, True)
    await budgets.set_tenant_budget("acct-a", 25_000_000_000)
    assert await budgets.tenant_budget("acct-a") == (25_000_000_000, False)
    assert (await check(redis, key, default=5_000_000_000)).tenant_cap == 25_000_000_000
    await budgets.set_tenant_budget("acct-a", None)  # no cap at all, not even the default
    assert await budgets.tenant_budget("acct-a") == (None, False)
    assert (await check(redis, key, default=5_000_000_000)).tenant_cap is None
    await budgets.reset_tenant_budget("acct-a")
    assert await budgets.tenant_budget("acct-a") == (5_000_000_000, True)
    assert (await check(redis, key, default=5_000_000_000)).tenant_cap == 5_000_000_000
    await budgets.set_tenant_budget("acct-a", 0)  # a cap of zero is a cap
    assert (await check(redis, key, cost=1)).verdict == "budget_tenant"
    assert (await check(redis, key, cost=0)).admitted
    assert await Budgets(redis, default_monthly_nano_usd=None).tenant_budget("acct-b") == (None, True)
    assert (await check(redis, make_key("acct-b"), default=5_000_000_000)).tenant_cap == 5_000_000_000  # A's cap only
    with pytest.raises(InvalidBudgetError):
        await budgets.set_tenant_budget("acct-a", -1)


async def test_budgets_of_many_tenants_read_at_once_equal_each_read_alone(redis: Redis) -> None:
    budgets = Budgets(redis, default_monthly_nano_usd=5_000_000_000)
    tenants = [f"acct-{number:04d}" for number in range(2500)]  # three pipelines of 1,000
    for number, tenant in enumerate(tenants):
        if number % 3 == 1:
            await budgets.set_tenant_budget(tenant, number)
        elif number % 3 == 2 and number % 2:
            await budgets.set_tenant_budget(tenant, None)
    many = await budgets.tenant_budgets(tenants)
    assert many == [await budgets.tenant_budget(tenant) for tenant in tenants]
    assert many[:6] == [(5_000_000_000, True), (1, False), (5_000_000_000, True), (5_000_000_000, True), (4, False),
                        (None, False)]  # fmt: skip
    assert await budgets.tenant_budgets([]) == []


async def test_budgets_check_sees_the_ledgers_spend_of_this_month_by_tenant_and_key(redis: Redis) -> None:
    keys = KeyStore(redis)
    mine = (await keys.create("acct-a", monthly_budget_nano_usd=1_000_000)).record
    other = (await keys.create("acct-a")).record
    ledger = Ledger(redis)
    await ledger.record(make_record("r1", mine.key_id, 816_130))
    await ledger.record(make_record("r2", mine.key_id, 100))
    await ledger.record(make_record("r2", mine.key_id, 100))  # a retried bill counts once
    await ledger.record(make_record("r3", other.key_id, 5_000))
    await ledger.record(make_record("r4", other.key_id, 7, tenant="acct-b"))
    last_month = month_bounds(month_of(time.time()))[0] - 1
    await ledger.record(make_record("r5", mine.key_id, 999_999, started_at=last_month))

    decision = await check(redis, mine)
    assert (decision.tenant_spent, decision.key_cap, decision.key_spent) == (821_230, 1_000_000, 816_230)
    assert (await check(redis, mine, cost=183_770)).admitted  # exactly at the key's cap
    assert (await check(redis, mine, cost=183_771)).verdict == "budget_key"
    decision = await check(redis, other)
    assert (decision.tenant_spent, decision.key_cap, decision.key_spent) == (821_230, None, 5_000)


def make_record(request_id: str, key_id: str, cost_nano_usd: int, **changes: Any) -> UsageRecord:
    """A bill of ``key_id``'s costing ``cost_nano_usd``, dated now (the budgets' current month) unless changed."""
    fields = {"key_id": key_id, "cost_nano_usd": cost_nano_usd, "started_at": time.time(), **changes}
    return usage_record(request_id, **fields)
