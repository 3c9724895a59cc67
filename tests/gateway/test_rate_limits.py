"""Rate limits through the real routes: 429 / 5429 with Retry-After, x-ratelimit-* headers, concurrency slots that
are released on every path, and per-key limits set through the admin API."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from billing import KeyLimits, Tokenizer, count_chat_prompt_tokens, rate_keys
from tests.conftest import TENANT, Gateway, SimWorker, gateway_for, sim_worker, wait_for

PROMPT = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 20}
PROMPT_TOKENS = 36  # "Hello" in the Llama 3.1 chat template


def limits_env(rpm: int = 0, tpm: int = 0, streams: int = 0) -> dict[str, str]:
    return {
        "TOLLGATE_LIMITS__DEFAULT__REQUESTS_PER_MINUTE": str(rpm),
        "TOLLGATE_LIMITS__DEFAULT__TOKENS_PER_MINUTE": str(tpm),
        "TOLLGATE_LIMITS__DEFAULT__CONCURRENT_STREAMS": str(streams),
    }


async def slots_held(redis: Redis, gateway: Gateway) -> int:
    return int(await redis.zcard(rate_keys(TENANT, gateway.key.record.key_id)[2]))


async def test_requests_per_minute_refuse_with_429_retry_after_and_headers(
    redis: Redis, redis_url: str, tokenizer: Tokenizer, worker: SimWorker
) -> None:
    async with gateway_for(redis_url, tokenizer, [worker.url], **limits_env(rpm=3)) as gateway:
        answers = [await gateway.run(PROMPT) for _ in range(3)]
        assert [answer.status_code for answer in answers] == [200, 200, 200]
        assert [answer.headers["x-ratelimit-remaining-requests"] for answer in answers] == ["2", "1", "0"]
        assert answers[0].headers["x-ratelimit-limit-requests"] == "3"
        assert 59 < float(answers[2].headers["x-ratelimit-reset-requests"].rstrip("s")) <= 60
        served = len(worker.served)
        refused = await gateway.run(PROMPT)
        assert refused.status_code == 429
        assert refused.json()["errors"][0] == {
            "code": 5429,
            "message": "Rate limited: this key may make 3 requests per minute",
        }
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert refused.headers["x-tollgate-cost-nano-usd"] == "0"
        assert len(worker.served) == served, "a refused request reached a worker"
        events = await gateway.deps.ledger.events(TENANT)
        assert len(events) == 3 and refused.headers["x-request-id"] not in {e["request_id"] for e in events}


async def test_tokens_per_minute_reserve_prompt_and_max_tokens_then_keep_what_was_used(
    redis: Redis, redis_url: str, tokenizer: Tokenizer, worker: SimWorker
) -> None:
    reserve = PROMPT_TOKENS + 20
    async with gateway_for(redis_url, tokenizer, [worker.url], **limits_env(tpm=2 * reserve)) as gateway:
        first = await gateway.run(PROMPT)  # the worker answers 12 tokens: 36 + 12 are kept, 8 come back
        assert first.status_code == 200
        used = PROMPT_TOKENS + int(first.headers["x-tollgate-completion-tokens"])
        assert first.headers["x-ratelimit-limit-tokens"] == str(2 * reserve)
        assert first.headers["x-ratelimit-remaining-tokens"] == str(reserve)  # at admission: the reservation
        window_tokens = rate_keys(TENANT, gateway.key.record.key_id)[1]
        assert int(await redis.hget(window_tokens, "__total")) == used
        second = await gateway.run(PROMPT)
        assert second.status_code == 200
        assert second.headers["x-ratelimit-remaining-tokens"] == str(2 * reserve - used - reserve)
        refused = await gateway.run(PROMPT)  # 2 * used + reserve > 2 * reserve: wait for the window
        assert refused.status_code == 429 and refused.json()["errors"][0]["code"] == 5429
        assert "tokens per minute" in refused.json()["errors"][0]["message"]
        assert "retry-after" in refused.headers
        too_big = await gateway.run({**PROMPT, "max_tokens": 3 * reserve})
        assert too_big.status_code == 429 and too_big.headers["x-should-retry"] == "false"
        assert "lower max_tokens" in too_big.json()["errors"][0]["message"]


async def test_streams_limit_holds_under_100_concurrent_attempts_with_hang_ups_and_leaks_no_slot(
    redis: Redis, redis_url: str, tokenizer: Tokenizer
) -> None:
    async with (
        sim_worker(tokenizer, tokens_per_second=200, time_to_first_token_seconds=0.02, completion_tokens=30) as sim,
        gateway_for(redis_url, tokenizer, [sim.url], live=True, **limits_env(streams=5)) as gateway,
    ):
        running = 0
        most = 0
        statuses: list[int] = []
        rng = random.Random(7)

        async def attempt(client: httpx.AsyncClient) -> None:
            nonlocal running, most
            body = {**PROMPT, "stream": True}
            async with client.stream("POST", gateway.run_path(), json=body, headers=gateway.auth) as response:
                statuses.append(response.status_code)
                if response.status_code != 200:
                    await response.aread()
                    return
                running += 1
                most = max(most, running)
                try:
                    hang_up_after = rng.choice([None, 2, 5])
                    seen = 0
                    async for line in response.aiter_lines():
                        seen += line.startswith("data: ")
                        if hang_up_after is not None and seen >= hang_up_after:
                            break
                finally:
                    running -= 1

        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=str(gateway.client.base_url), limits=limits, timeout=30) as client:
            await asyncio.gather(*(attempt(client) for _ in range(100)))
        assert most <= 5, f"{most} streams ran at once"
        assert statuses.count(200) >= 5 and statuses.count(429) > 0 and set(statuses) == {200, 429}
        await wait_for(lambda: len(gateway.deps.bills._tasks) == 0)
        await asyncio.sleep(0.3)  # the last bills free their slots
        assert await slots_held(redis, gateway) == 0


async def test_no_slot_is_leaked_after_1000_requests_ending_every_way(
    redis: Redis, redis_url: str, tokenizer: Tokenizer, worker: SimWorker
) -> None:
    def failing_worker(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, json={"error": "boom"})

    async with gateway_for(redis_url, tokenizer, [worker.url], **limits_env(streams=50)) as gateway:
        bodies: list[dict[str, Any]] = [PROMPT, {**PROMPT, "stream": True}, {"prompt": "hi", "max_tokens": 3}]

        async def one(index: int) -> int:
            response = await gateway.run(bodies[index % len(bodies)])
            return response.status_code

        statuses = []
        for batch in range(10):
            statuses += await asyncio.gather(*(one(batch * 100 + i) for i in range(100)))
        assert statuses.count(200) + statuses.count(429) == 1000 and statuses.count(200) > 500
        await wait_for(lambda: len(gateway.deps.bills._tasks) == 0)
        assert await slots_held(redis, gateway) == 0
    http = httpx.AsyncClient(transport=httpx.MockTransport(failing_worker))
    async with gateway_for(redis_url, tokenizer, ["http://worker.test"], http=http, **limits_env(streams=2)) as gateway:
        # every attempt fails at the worker (502), which is ejected after three (503): each slot must come back
        assert [(await gateway.run(PROMPT)).status_code for _ in range(5)] == [502, 502, 502, 503, 503]
        assert await slots_held(redis, gateway) == 0


async def test_a_keys_own_limits_win_over_the_default_and_every_response_has_the_headers(
    redis: Redis, redis_url: str, tokenizer: Tokenizer, worker: SimWorker
) -> None:
    async with gateway_for(redis_url, tokenizer, [worker.url], **limits_env(rpm=100)) as gateway:
        record = await gateway.deps.keys.set_limits(gateway.key.record.key_id, KeyLimits(requests_per_minute=1))
        assert record is not None and record.limits.requests_per_minute == 1
        await asyncio.sleep(1.1)  # the auth cache
        streamed = await gateway.run({**PROMPT, "stream": True})
        assert streamed.status_code == 200 and streamed.headers["x-ratelimit-limit-requests"] == "1"
        assert (await gateway.run(PROMPT)).status_code == 429
        other = await gateway.deps.keys.create(TENANT, "other")  # the default applies to this one
        answer = await gateway.client.post(
            gateway.run_path(), json=PROMPT, headers={"Authorization": f"Bearer {other.secret_key}"}
        )
        assert answer.headers["x-ratelimit-limit-requests"] == "100"


@pytest.mark.parametrize(
    ("budgets", "limits", "status"), [("allow", "allow", 200), ("refuse", "allow", 503), ("allow", "refuse", 503)]
)
async def test_admission_without_redis_follows_the_configured_policy(
    redis: Redis,
    redis_url: str,
    tokenizer: Tokenizer,
    worker: SimWorker,
    monkeypatch: pytest.MonkeyPatch,
    budgets: str,
    limits: str,
    status: int,
) -> None:
    env = {**limits_env(rpm=1), "TOLLGATE_BUDGETS__ON_REDIS_ERROR": budgets, "TOLLGATE_LIMITS__ON_REDIS_ERROR": limits}
    async with gateway_for(redis_url, tokenizer, [worker.url], **env) as gateway:

        async def unreachable(*args: Any, **kwargs: Any) -> None:
            raise RedisConnectionError("Redis is down")

        monkeypatch.setattr(gateway.deps.limiter, "admit", unreachable)
        answer = await gateway.run(PROMPT)
        assert answer.status_code == status, answer.text
        outcome = "allowed" if status == 200 else "refused"
        metrics = (await gateway.client.get("/metrics")).text
        assert f'tollgate_admission_unchecked_total{{outcome="{outcome}"}} 1.0' in metrics
        if status == 503:
            assert answer.json()["errors"][0]["code"] == 5530


def test_prompt_tokens_constant_is_right(tokenizer: Tokenizer) -> None:
    assert count_chat_prompt_tokens(tokenizer, PROMPT["messages"]) == PROMPT_TOKENS


async def test_a_redis_outage_does_not_stop_a_known_key_of_a_tenant_without_budget(
    redis: Redis, redis_url: str, tokenizer: Tokenizer, worker: SimWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with gateway_for(redis_url, tokenizer, [worker.url], **limits_env(rpm=100)) as gateway:
        assert (await gateway.run(PROMPT)).status_code == 200  # the key is read, the tenant's cap (none) seen
        await asyncio.sleep(1.1)  # past the auth cache

        async def unreachable(*args: Any, **kwargs: Any) -> None:
            raise RedisConnectionError("Redis is down")

        monkeypatch.setattr(gateway.deps.keys, "find", unreachable)
        monkeypatch.setattr(gateway.deps.limiter, "admit", unreachable)
        answer = await gateway.run(PROMPT)  # budgets refuse on Redis errors, but none applies here
        assert answer.status_code == 200, answer.text
        other = await gateway.client.post(  # a key never seen cannot be checked: 503
            gateway.run_path(), json=PROMPT, headers={"Authorization": "Bearer tg_aaaaaaaaaaaa_" + "x" * 43}
        )
        assert other.status_code == 503 and other.json()["errors"][0]["code"] == 5530
        await gateway.deps.budgets.set_tenant_budget(TENANT, 10**12)  # now the tenant has a cap ...
        monkeypatch.undo()
        assert (await gateway.run(PROMPT)).status_code == 200  # ... which this process sees
        monkeypatch.setattr(gateway.deps.limiter, "admit", unreachable)
        refused = await gateway.run(PROMPT)
        assert refused.status_code == 503, "a budget applies and cannot be checked"
