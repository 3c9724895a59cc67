"""Budgets: exact dollars, UTC months, and the admission check against a real Redis."""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from typing import Any

import pytest
from redis.asyncio import Redis

from billing import (
    ApiKey,
    BudgetCheck,
    Budgets,
    InvalidBudgetError,
    KeyStore,
    Ledger,
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


def test_budget_check_refuses_only_past_the_cap_and_names_the_key_first() -> None:
    check = BudgetCheck(now=0, month="202611", tenant_cap=100, tenant_spent=60, key_cap=50, key_spent=10)
    assert check.exceeded_by(40) is None  # 10 + 40 == 50 and 60 + 40 == 100: exactly at both caps
    assert check.exceeded_by(41) == "key"  # both passed: the key's budget is named
    assert dataclasses.replace(check, key_cap=None).exceeded_by(40) is None
    assert dataclasses.replace(check, key_cap=None).exceeded_by(41) == "tenant"
    assert dataclasses.replace(check, key_cap=1000).exceeded_by(41) == "tenant"
    no_caps = dataclasses.replace(check, key_cap=None, tenant_cap=None)
    assert no_caps.exceeded_by(10**18) is None
    assert check.resets_at == utc(2026, 12, 1)


async def test_budgets_check_reads_redis_time_and_the_current_month(redis: Redis) -> None:
    budgets = Budgets(redis, default_monthly_nano_usd=5_000)
    before = time.time()
    check = await budgets.check(make_key(budget=7), before)
    assert before - 1 <= check.now <= time.time() + 1
    assert check.month == month_of(check.now)
    assert (check.tenant_cap, check.tenant_spent, check.key_cap, check.key_spent) == (5_000, 0, 7, 0)
    # a replica whose clock says another month is corrected by Redis's clock
    skewed = await budgets.check(make_key(), before - 40 * 86400)
    assert skewed.month == month_of(skewed.now)


async def test_budgets_tenant_cap_default_explicit_none_and_reset(redis: Redis) -> None:
    budgets = Budgets(redis, default_monthly_nano_usd=5_000_000_000)
    key = make_key()
    assert await budgets.tenant_budget("acct-a") == (5_000_000_000, True)
    await budgets.set_tenant_budget("acct-a", 25_000_000_000)
    assert await budgets.tenant_budget("acct-a") == (25_000_000_000, False)
    assert (await budgets.check(key, time.time())).tenant_cap == 25_000_000_000
    await budgets.set_tenant_budget("acct-a", None)  # no cap at all, not even the default
    assert await budgets.tenant_budget("acct-a") == (None, False)
    assert (await budgets.check(key, time.time())).tenant_cap is None
    await budgets.reset_tenant_budget("acct-a")
    assert await budgets.tenant_budget("acct-a") == (5_000_000_000, True)
    assert (await budgets.check(key, time.time())).tenant_cap == 5_000_000_000
    await budgets.set_tenant_budget("acct-a", 0)  # a cap of zero is a cap
    assert (await budgets.check(key, time.time())).exceeded_by(1) == "tenant"
    assert await Budgets(redis, default_monthly_nano_usd=None).tenant_budget("acct-b") == (None, True)
    assert (await budgets.check(make_key("acct-b"), time.time())).tenant_cap == 5_000_000_000  # one tenant's cap only
    with pytest.raises(InvalidBudgetError):
        await budgets.set_tenant_budget("acct-a", -1)


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

    check = await Budgets(redis, default_monthly_nano_usd=None).check(mine, time.time())
    assert (check.tenant_spent, check.key_cap, check.key_spent) == (821_230, 1_000_000, 816_230)
    assert check.exceeded_by(183_770) is None and check.exceeded_by(183_771) == "key"
    check = await Budgets(redis, default_monthly_nano_usd=None).check(other, time.time())
    assert (check.tenant_spent, check.key_cap, check.key_spent) == (821_230, None, 5_000)


def make_record(request_id: str, key_id: str, cost_nano_usd: int, **changes: Any) -> UsageRecord:
    """A bill of ``key_id``'s costing ``cost_nano_usd``, dated now (the budgets' current month) unless changed."""
    fields = {"key_id": key_id, "cost_nano_usd": cost_nano_usd, "started_at": time.time(), **changes}
    return usage_record(request_id, **fields)
