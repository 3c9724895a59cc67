"""Admission (billing/limits.py) against a real Redis: monthly budgets, requests and tokens per minute over a sliding
60 s window, concurrent-stream slots, and their reconciliation by the ledger script (billing/ledger.py).

Waiting a minute is avoided by rewriting window scores (admission times, µs) in Redis to age entries."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import pytest
from redis.asyncio import Redis

from billing.budgets import Budgets
from billing.keys import ApiKey
from billing.ledger import Ledger, rate_keys
from billing.limits import AdmissionDecision, Limiter, Limits
from tests.conftest import usage_record

TENANT = "acct-a"
KEY = ApiKey(key_id="abcdefghijkl", tenant=TENANT, name="", created_at=0.0, revoked=False, monthly_budget_nano_usd=None)
WINDOW, TOKENS, SLOTS = rate_keys(TENANT, KEY.key_id)


async def admit(
    limiter: Limiter,
    limits: Limits,
    request_id: str,
    reserve: int = 0,
    *,
    cost: int = 0,
    key: ApiKey = KEY,
    default_cap: int | None = None,
) -> AdmissionDecision:
    return await limiter.admit(
        key,
        limits,
        request_id=request_id,
        reserve_tokens=reserve,
        max_cost_nano_usd=cost,
        now_hint=time.time(),
        default_cap_nano_usd=default_cap,
    )


async def bill(redis: Redis, request_id: str, prompt: int = 0, completion: int = 0, cost: int = 0) -> bool:
    record = usage_record(
        request_id,
        TENANT,
        key_id=KEY.key_id,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cost_nano_usd=cost,
        started_at=time.time(),
    )
    return await Ledger(redis).record(record)


async def redis_us(redis: Redis) -> int:
    seconds, micros = await redis.time()
    return seconds * 1_000_000 + micros


def us_of(decision: AdmissionDecision) -> int:
    """The script's own ``now`` (µs) behind ``decision.now``."""
    return round(decision.now * 1_000_000)


async def window(redis: Redis) -> dict[str, int]:
    return {member.decode(): int(score) for member, score in await redis.zrange(WINDOW, 0, -1, withscores=True)}


async def tokens(redis: Redis) -> dict[str, int]:
    return {field.decode(): int(value) for field, value in (await redis.hgetall(TOKENS)).items()}


async def slots(redis: Redis) -> dict[str, int]:
    return {member.decode(): int(score) for member, score in await redis.zrange(SLOTS, 0, -1, withscores=True)}


async def age(redis: Redis, key: str, member: str, score_us: int) -> None:
    assert await redis.zadd(key, {member: score_us}, xx=True, ch=True) == 1


async def snapshot(redis: Redis) -> dict[str, Any]:
    """Every key's contents (not its TTL)."""
    dump: dict[str, Any] = {}
    async for key in redis.scan_iter():
        kind = (await redis.type(key)).decode()
        if kind == "string":
            dump[key] = await redis.get(key)
        elif kind == "hash":
            dump[key] = await redis.hgetall(key)
        elif kind == "zset":
            dump[key] = await redis.zrange(key, 0, -1, withscores=True)
        elif kind == "stream":
            dump[key] = await redis.xrange(key)
        else:
            dump[key] = (kind, "unexpected")
    return dump


# --- requests per minute


async def test_requests_per_minute_refuses_the_sixth_and_writes_nothing(redis: Redis) -> None:
    limiter = Limiter(redis, slot_ttl_seconds=600)
    limits = Limits(requests_per_minute=5)
    for i in range(5):
        decision = await admit(limiter, limits, f"r{i}", 10)
        assert (decision.verdict, decision.admitted, decision.requests_in_window) == ("ok", True, i + 1)
    assert list(await window(redis)) == ["r0", "r1", "r2", "r3", "r4"]
    assert await tokens(redis) == {"r0": 10, "r1": 10, "r2": 10, "r3": 10, "r4": 10, "__total": 50}

    first = (await window(redis))["r0"]
    before = await snapshot(redis)
    refused = await admit(limiter, limits, "r5", 10)
    assert (refused.verdict, refused.admitted) == ("requests", False)
    assert refused.requests_in_window == 5
    assert refused.tokens_in_window == 50
    assert 0 < refused.retry_after_seconds <= 60
    expected = (first + 60_000_000 - us_of(refused)) / 1_000_000
    assert refused.retry_after_seconds == pytest.approx(expected, abs=0.002)
    assert refused.requests_reset_seconds == refused.retry_after_seconds
    assert await snapshot(redis) == before


async def test_requests_retry_after_is_when_the_oldest_leaves_the_window(redis: Redis) -> None:
    limiter = Limiter(redis, slot_ttl_seconds=600)
    limits = Limits(requests_per_minute=2)
    await admit(limiter, limits, "r0")
    await admit(limiter, limits, "r1")
    now = await redis_us(redis)
    await age(redis, WINDOW, "r0", now - 50_000_000)  # admitted 50 s ago: leaves in 10 s
    await age(redis, WINDOW, "r1", now - 20_000_000)
    refused = await admit(limiter, limits, "r2")
    assert refused.verdict == "requests"
    expected = (now - 50_000_000 + 60_000_000 - us_of(refused)) / 1_000_000
    assert refused.retry_after_seconds == pytest.approx(expected, abs=0.002)
    assert 9.5 < refused.retry_after_seconds <= 10


async def test_requests_window_slides(redis: Redis) -> None:
    limiter = Limiter(redis, slot_ttl_seconds=600)
    limits = Limits(requests_per_minute=5)
    for i in range(5):
        assert (await admit(limiter, limits, f"r{i}", 10 + i)).admitted
    assert (await tokens(redis))["__total"] == 10 + 11 + 12 + 13 + 14
    await age(redis, WINDOW, "r0", await redis_us(redis) - 61_000_000)

    decision = await admit(limiter, limits, "r5", 20)
    assert decision.verdict == "ok"
    assert decision.requests_in_window == 5
    assert decision.tokens_in_window == 11 + 12 + 13 + 14 + 20
    assert list(await window(redis)) == ["r1", "r2", "r3", "r4", "r5"]
    assert await tokens(redis) == {"r1": 11, "r2": 12, "r3": 13, "r4": 14, "r5": 20, "__total": 70}
    assert (await admit(limiter, limits, "r6", 1)).verdict == "requests"


# --- tokens per minute, reserved then reconciled by the ledger


async def test_tokens_per_minute_reservations(redis: Redis) -> None:
    limiter = Limiter(redis, slot_ttl_seconds=600)
    limits = Limits(tokens_per_minute=1000)
    first = await admit(limiter, limits, "a", 600)
    assert (first.verdict, first.tokens_in_window) == ("ok", 600)

    before = await snapshot(redis)
    refused = await admit(limiter, limits, "b", 500)
    assert (refused.verdict, refused.tokens_in_window) == ("tokens", 600)
    assert 0 < refused.retry_after_seconds <= 60
    expected = ((await window(redis))["a"] + 60_000_000 - us_of(refused)) / 1_000_000
    assert refused.retry_after_seconds == pytest.approx(expected, abs=0.002)
    assert refused.tokens_reset_seconds == refused.retry_after_seconds
    assert await snapshot(redis) == before

    third = await admit(limiter, limits, "c", 400)
    assert (third.verdict, third.tokens_in_window, third.requests_in_window) == ("ok", 1000, 2)

    too_large = await admit(limiter, limits, "d", 1001)
    assert (too_large.verdict, too_large.admitted) == ("tokens_too_large", False)
    assert await tokens(redis) == {"a": 600, "c": 400, "__total": 1000}


async def test_tokens_too_large_even_on_an_empty_window(redis: Redis) -> None:
    limiter = Limiter(redis, slot_ttl_seconds=600)
    decision = await admit(limiter, Limits(tokens_per_minute=1000), "big", 1001)
    assert decision.verdict == "tokens_too_large"
    assert await redis.keys("*") == []
    assert (await admit(limiter, Limits(tokens_per_minute=1000), "fits", 1000)).verdict == "ok"


async def test_tokens_retry_after_waits_for_enough_tokens_to_leave(redis: Redis) -> None:
    limiter = Limiter(redis, slot_ttl_seconds=600)
    limits = Limits(tokens_per_minute=1000)
    for request_id, reserve in (("a", 300), ("b", 300), ("c", 400)):
        assert (await admit(limiter, limits, request_id, reserve)).admitted
    now = await redis_us(redis)
    await age(redis, WINDOW, "a", now - 50_000_000)  # leaves in 10 s: not enough for 500
    await age(redis, WINDOW, "b", now - 30_000_000)  # leaves in 30 s: then 400 are left, 500 fit
    refused = await admit(limiter, limits, "d", 500)
    assert refused.verdict == "tokens"
    expected = (now - 30_000_000 + 60_000_000 - us_of(refused)) / 1_000_000
    assert refused.tokens_reset_seconds == pytest.approx(expected, abs=0.002)
    assert refused.retry_after_seconds == refused.tokens_reset_seconds
    assert refused.requests_reset_seconds == pytest.approx(expected - 20, abs=0.002)  # the oldest, "a"


async def test_billing_reconciles_the_reservation_once(redis: Redis) -> None:
    limiter = Limiter(redis, slot_ttl_seconds=600)
    limits = Limits(tokens_per_minute=1000)
    assert (await admit(limiter, limits, "a", 600)).admitted
    assert (await admit(limiter, limits, "c", 400)).admitted
    assert (await admit(limiter, limits, "e", 450)).verdict == "tokens"

    assert await bill(redis, "a", prompt=100, completion=50) is True
    assert await tokens(redis) == {"a": 150, "c": 400, "__total": 550}
    assert await bill(redis, "a", prompt=100, completion=50) is False  # a duplicate changes nothing
    assert await bill(redis, "a", prompt=999, completion=999) is False
    assert await tokens(redis) == {"a": 150, "c": 400, "__total": 550}

    fits = await admit(limiter, limits, "e", 450)
    assert (fits.verdict, fits.tokens_in_window) == ("ok", 1000)
    assert (await admit(limiter, limits, "f", 1)).verdict == "tokens"


async def test_billing_after_the_entry_left_the_window_changes_nothing(redis: Redis) -> None:
    limiter = Limiter(redis, slot_ttl_seconds=600)
    limits = Limits(tokens_per_minute=1000)
    assert (await admit(limiter, limits, "old", 600)).admitted
    await age(redis, WINDOW, "old", await redis_us(redis) - 61_000_000)
    assert (await admit(limiter, limits, "new", 700)).tokens_in_window == 700  # "old" forgotten
    before = (await window(redis), await tokens(redis), await slots(redis))
    assert await bill(redis, "old", prompt=100, completion=50) is True
    assert (await window(redis), await tokens(redis), await slots(redis)) == before
    assert await tokens(redis) == {"new": 700, "__total": 700}


async def test_billing_before_pruning_still_balances(redis: Redis) -> None:
    """Billed after leaving the window but before an admission pruned it: the total comes out right all the same."""
    limiter = Limiter(redis, slot_ttl_seconds=600)
    limits = Limits(tokens_per_minute=1000)
    assert (await admit(limiter, limits, "old", 600)).admitted
    assert (await admit(limiter, limits, "kept", 100)).admitted
    await age(redis, WINDOW, "old", await redis_us(redis) - 61_000_000)
    assert await bill(redis, "old", prompt=10, completion=5) is True
    decision = await admit(limiter, limits, "new", 200)
    assert decision.tokens_in_window == 300
    assert await tokens(redis) == {"kept": 100, "new": 200, "__total": 300}


# --- concurrent streams


async def test_concurrent_streams(redis: Redis) -> None:
    limiter = Limiter(redis, slot_ttl_seconds=600)
    limits = Limits(concurrent_streams=2)
    one = await admit(limiter, limits, "s1")
    two = await admit(limiter, limits, "s2")
    assert [(d.verdict, d.streams_running) for d in (one, two)] == [("ok", 1), ("ok", 2)]
    assert await slots(redis) == {"s1": us_of(one) + 600_000_000, "s2": us_of(two) + 600_000_000}
    assert not await redis.exists(WINDOW, TOKENS)  # no rate limits: no window

    before = await snapshot(redis)
    refused = await admit(limiter, limits, "s3")
    assert (refused.verdict, refused.streams_running, refused.retry_after_seconds) == ("streams", 2, 1.0)
    assert await snapshot(redis) == before

    assert await bill(redis, "s1") is True
    assert set(await slots(redis)) == {"s2"}
    again = await admit(limiter, limits, "s3")
    assert (again.verdict, again.streams_running) == ("ok", 2)
    assert (await admit(limiter, limits, "s4")).verdict == "streams"


async def test_expired_slot_is_dropped_at_the_next_admission(redis: Redis) -> None:
    limiter = Limiter(redis, slot_ttl_seconds=600)
    limits = Limits(concurrent_streams=2)
    assert (await admit(limiter, limits, "s1")).admitted
    assert (await admit(limiter, limits, "s2")).admitted
    await age(redis, SLOTS, "s1", await redis_us(redis) - 1)  # its gateway died: the slot expired
    decision = await admit(limiter, limits, "s3")
    assert (decision.verdict, decision.streams_running) == ("ok", 2)
    assert set(await slots(redis)) == {"s2", "s3"}


async def test_short_slot_ttl_expires(redis: Redis) -> None:
    limiter = Limiter(redis, slot_ttl_seconds=0.2)
    limits = Limits(concurrent_streams=1)
    assert (await admit(limiter, limits, "s1")).admitted
    assert 0 < await redis.pttl(SLOTS) <= 200
    assert (await admit(limiter, limits, "s2")).verdict == "streams"
    await asyncio.sleep(0.25)
    decision = await admit(limiter, limits, "s2")
    assert (decision.verdict, decision.streams_running) == ("ok", 1)
    assert set(await slots(redis)) == {"s2"}


async def test_no_slot_without_a_stream_limit(redis: Redis) -> None:
    limiter = Limiter(redis, slot_ttl_seconds=600)
    decision = await admit(limiter, Limits(requests_per_minute=5, tokens_per_minute=1000), "r1", 10)
    assert (decision.verdict, decision.streams_running) == ("ok", 0)
    assert not await redis.exists(SLOTS)
    assert await redis.exists(WINDOW, TOKENS) == 2
    assert 0 < await redis.pttl(WINDOW) <= 120_000


async def test_no_limits_write_nothing(redis: Redis) -> None:
    decision = await admit(Limiter(redis, slot_ttl_seconds=600), Limits(), "r1", 10)
    assert decision.verdict == "ok"
    assert (decision.requests_in_window, decision.tokens_in_window, decision.streams_running) == (0, 0, 0)
    assert await redis.keys("*") == []


# --- budgets, in the same call


async def test_tenant_budget_boundary(redis: Redis) -> None:
    limiter = Limiter(redis, slot_ttl_seconds=600)
    await Budgets(redis, default_monthly_nano_usd=None).set_tenant_budget(TENANT, 1000)
    assert await bill(redis, "spent", cost=400) is True
    exact = await admit(limiter, Limits(), "r1", cost=600)
    assert (exact.verdict, exact.tenant_cap, exact.tenant_spent, exact.key_cap, exact.key_spent) == (
        "ok",
        1000,
        400,
        None,
        400,
    )
    over = await admit(limiter, Limits(), "r2", cost=601)
    assert (over.verdict, over.admitted, over.tenant_cap, over.tenant_spent) == ("budget_tenant", False, 1000, 400)


async def test_key_budget_refuses_first(redis: Redis) -> None:
    limiter = Limiter(redis, slot_ttl_seconds=600)
    key = dataclasses.replace(KEY, monthly_budget_nano_usd=500)
    await Budgets(redis, default_monthly_nano_usd=None).set_tenant_budget(TENANT, 1000)
    assert await bill(redis, "spent", cost=400) is True
    assert (await admit(limiter, Limits(), "r1", cost=100, key=key)).verdict == "ok"
    refused = await admit(limiter, Limits(), "r2", cost=101, key=key)
    assert (refused.verdict, refused.key_cap, refused.key_spent) == ("budget_key", 500, 400)
    both = await admit(limiter, Limits(), "r3", cost=10_000, key=key)  # over both caps: the key's is named
    assert both.verdict == "budget_key"


async def test_default_cap_applies_without_a_tenant_budget(redis: Redis) -> None:
    limiter = Limiter(redis, slot_ttl_seconds=600)
    assert await bill(redis, "spent", cost=400) is True
    ok = await admit(limiter, Limits(), "r1", cost=600, default_cap=1000)
    assert (ok.verdict, ok.tenant_cap, ok.tenant_spent) == ("ok", 1000, 400)
    over = await admit(limiter, Limits(), "r2", cost=601, default_cap=1000)
    assert (over.verdict, over.tenant_cap) == ("budget_tenant", 1000)
    uncapped = await admit(limiter, Limits(), "r3", cost=10**15, default_cap=None)
    assert (uncapped.verdict, uncapped.tenant_cap) == ("ok", None)


async def test_explicit_no_cap_beats_the_default(redis: Redis) -> None:
    limiter = Limiter(redis, slot_ttl_seconds=600)
    await Budgets(redis, default_monthly_nano_usd=None).set_tenant_budget(TENANT, None)
    assert await bill(redis, "spent", cost=400) is True
    decision = await admit(limiter, Limits(), "r1", cost=10**12, default_cap=1000)
    assert (decision.verdict, decision.tenant_cap, decision.tenant_spent) == ("ok", None, 400)
    capped = await admit(limiter, Limits(), "r2", cost=0, default_cap=0)  # spent 400 > 0, but no cap
    assert capped.verdict == "ok"


@pytest.mark.parametrize("which", ["tenant", "key"])
async def test_budget_refusal_writes_nothing(redis: Redis, which: str) -> None:
    limiter = Limiter(redis, slot_ttl_seconds=600)
    key = dataclasses.replace(KEY, monthly_budget_nano_usd=1000 if which == "key" else None)
    limits = Limits(requests_per_minute=5, tokens_per_minute=1000, concurrent_streams=2)
    await Budgets(redis, default_monthly_nano_usd=None).set_tenant_budget(TENANT, 1000 if which == "tenant" else None)
    assert (await admit(limiter, limits, "r1", 100, cost=10, key=key)).admitted
    assert (await admit(limiter, limits, "old", 100, cost=10, key=key)).admitted
    assert await bill(redis, "spent", cost=900) is True
    # an expired entry and an expired slot: even they are not pruned by a refused request
    now = await redis_us(redis)
    await age(redis, WINDOW, "old", now - 61_000_000)
    await age(redis, SLOTS, "old", now - 1)
    before = await snapshot(redis)
    assert any(key_name.startswith(b"tg:{acct-a}:rl:") for key_name in before)
    refused = await admit(limiter, limits, "r2", 100, cost=101, key=key)
    assert refused.verdict == f"budget_{which}"
    assert (refused.requests_in_window, refused.tokens_in_window, refused.streams_running) == (0, 0, 0)
    assert await snapshot(redis) == before


# --- several gateway replicas at once


async def replicas(redis_url: str, limits: Limits, reserve: int, count: int = 300) -> list[AdmissionDecision]:
    clients = [Redis.from_url(redis_url) for _ in range(3)]
    try:
        limiters = [Limiter(client, slot_ttl_seconds=600) for client in clients]
        return await asyncio.gather(
            *(admit(limiters[i % 3], limits, f"req-{i}", reserve) for i in range(count)),
        )
    finally:
        for client in clients:
            await client.aclose()


async def test_concurrent_replicas_never_pass_requests_per_minute(redis: Redis, redis_url: str) -> None:
    decisions = await replicas(redis_url, Limits(requests_per_minute=100), reserve=1)
    verdicts = [decision.verdict for decision in decisions]
    assert verdicts.count("ok") == 100
    assert verdicts.count("requests") == 200
    assert await redis.zcard(WINDOW) == 100
    assert (await tokens(redis))["__total"] == 100


async def test_concurrent_replicas_never_pass_tokens_per_minute(redis: Redis, redis_url: str) -> None:
    decisions = await replicas(redis_url, Limits(tokens_per_minute=10_000), reserve=300)
    admitted = [decision for decision in decisions if decision.admitted]
    reserved = 300 * len(admitted)
    assert 10_000 - 300 < reserved <= 10_000
    assert len(admitted) == 33
    assert {decision.verdict for decision in decisions if not decision.admitted} == {"tokens"}
    assert (await tokens(redis))["__total"] == reserved
    assert max(decision.tokens_in_window for decision in admitted) == reserved


# --- Redis's clock


async def test_decision_now_is_redis_time(redis: Redis) -> None:
    decision = await admit(Limiter(redis, slot_ttl_seconds=600), Limits(requests_per_minute=5), "r1")
    assert abs(decision.now - time.time()) < 1
    assert decision.budget_resets_at > decision.now
    assert (await window(redis))["r1"] == us_of(decision)


# --- bugs


async def test_large_spend_is_reported_exactly(redis: Redis) -> None:
    spent = 123_456_789_012_345  # about $123,457: well under 2^53
    assert await bill(redis, "spent", cost=spent) is True
    decision = await admit(Limiter(redis, slot_ttl_seconds=600), Limits(), "r1", cost=1)
    assert (decision.verdict, decision.tenant_spent, decision.key_spent) == ("ok", spent, spent)


async def test_retried_admission_does_not_reserve_twice(redis: Redis) -> None:
    limiter = Limiter(redis, slot_ttl_seconds=600)
    limits = Limits(tokens_per_minute=1000)
    assert (await admit(limiter, limits, "a", 400)).admitted
    await admit(limiter, limits, "a", 400)  # the same script run again after a lost reply
    await age(redis, WINDOW, "a", await redis_us(redis) - 61_000_000)
    decision = await admit(limiter, limits, "b", 0)
    assert decision.tokens_in_window == 0
    assert await tokens(redis) == {"b": 0, "__total": 0}


async def test_retried_admission_keeps_its_slot(redis: Redis) -> None:
    limiter = Limiter(redis, slot_ttl_seconds=600)
    limits = Limits(concurrent_streams=1)
    assert (await admit(limiter, limits, "s1")).admitted
    assert (await admit(limiter, limits, "s1")).verdict == "ok"
