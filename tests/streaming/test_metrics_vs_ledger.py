"""After a mixed load on Tollgate as deployed (``tollgate serve --workers 2``: two processes behind one port), every
token and money counter on ``/metrics`` equals the ledger, whichever process answers the scrape, and so do the JSON
access log lines. The load mixes routes, models, streams, refusals, clients that leave mid-stream and a worker that
fails mid-stream."""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from collections.abc import Awaitable
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from billing import KeyLimits, KeyStore, Ledger, Retention
from tests.conftest import FP8_MODEL, FP8_NAME, MODEL
from tests.processes import ADMIN_TOKEN, Stack, stack_in_tempdir
from tests.promtext import Sample, samples, total

pytestmark = [pytest.mark.server, pytest.mark.timeout(120)]

LISTED, UNLISTED = "acct-listed", "acct-unlisted"
CHAT = {"messages": [{"role": "user", "content": "Tell me about the sea."}], "max_tokens": 40}


async def test_after_a_mixed_load_every_token_and_cost_counter_matches_the_ledger() -> None:
    with stack_in_tempdir() as stack:
        options = ("--served-model-name", FP8_NAME, "--tokens-per-second", "400", "--ttft-seconds", "0.005")
        stack.start_worker(*options)
        flaky = stack.start_worker(*options)
        metrics_dir = os.path.join(stack.workdir, "metrics")
        os.mkdir(metrics_dir)
        stack.start_gateway(
            "--workers",
            "2",
            PROMETHEUS_MULTIPROC_DIR=metrics_dir,
            TOLLGATE_METRICS__TENANT_LABELS=LISTED,
            TOLLGATE_LOGGING__FORMAT="json",
        )
        await _both_processes_up(metrics_dir)
        redis = Redis.from_url(stack.redis_url, decode_responses=True)
        try:
            keys = await _keys(KeyStore(redis))
            async with httpx.AsyncClient(base_url=stack.gateway, timeout=30, trust_env=False) as client:
                seen = await _mixed_load(client, keys, flaky)
                await _until_both_processes_billed(stack, keys[LISTED], seen)
                await _wait_until_billed(Ledger(redis, Retention()), seen)
                ledger = await _ledger_by_model(client)
            scrapes = [await _scrape_fresh(stack) for _ in range(8)]  # new connections: both processes answer
        finally:
            await redis.aclose()
        lines = _access_lines(stack)

    page = scrapes[0]
    assert {MODEL, FP8_MODEL} <= set(ledger)
    for model, counters in ledger.items():
        for scrape in scrapes:  # every process sums every process's counters
            assert total(scrape, "tollgate_prompt_tokens_total", model=model) == counters["prompt_tokens"]
            assert total(scrape, "tollgate_completion_tokens_total", model=model) == counters["completion_tokens"]
            assert total(scrape, "tollgate_cost_nano_usd_total", model=model) == counters["cost_nano_usd"]
            assert total(scrape, "tollgate_billed_requests_total", model=model) == counters["requests"]
    outcomes = {labels["outcome"] for name, labels, value in page if name == "tollgate_billed_requests_total" and value}
    assert {"ok", "client_disconnected", "upstream_error"} <= outcomes, outcomes
    assert total(page, "tollgate_cost_nano_usd_total", tenant=LISTED) > 0
    assert total(page, "tollgate_cost_nano_usd_total", tenant="other") > 0
    assert total(page, "tollgate_refusals_total", reason="requests_per_minute") == seen["rate_limited"]
    assert total(page, "tollgate_refusals_total", reason="budget_key") == seen["over_budget"]
    for route in ("native", "openai_chat", "openai_completions"):
        for status_class in ("2xx", "4xx"):
            expected = seen["statuses"][route, status_class]
            assert total(page, "tollgate_requests_total", route=route, status_class=status_class) == expected

    # The JSON access log: one line per inference request, from both processes, adding up to the ledger too.
    billed = [line for line in lines if line["route"] in ("native", "openai_chat", "openai_completions")]
    assert len({line["pid"] for line in billed}) == 2
    assert sum(line["cost_nano_usd"] or 0 for line in billed) == sum(c["cost_nano_usd"] for c in ledger.values())
    assert sum(line["prompt_tokens"] or 0 for line in billed) == sum(c["prompt_tokens"] for c in ledger.values())
    assert all("authorization" not in json.dumps(line).lower() for line in lines)


async def _both_processes_up(metrics_dir: str) -> None:
    """Each process publishes its live gauges into a file of its own once it has started."""
    for _ in range(300):
        if len([name for name in os.listdir(metrics_dir) if name.startswith("gauge_livesum_")]) == 2:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the two gateway processes did not both start: {os.listdir(metrics_dir)}")


async def _keys(store: KeyStore) -> dict[str, str]:
    listed = await store.create(LISTED, "listed")
    unlisted = await store.create(UNLISTED, "unlisted")
    limited = await store.create(UNLISTED, "limited", limits=KeyLimits(requests_per_minute=2))
    poor = await store.create(UNLISTED, "poor", monthly_budget_nano_usd=1)
    return {
        LISTED: listed.secret_key,
        UNLISTED: unlisted.secret_key,
        "limited": limited.secret_key,
        "poor": poor.secret_key,
    }


async def _mixed_load(client: httpx.AsyncClient, keys: dict[str, str], flaky: str) -> dict[str, Any]:
    """Send the load; returns what the client saw: statuses by route and status class, and refusals by kind."""
    statuses: Counter[tuple[str, str]] = Counter()

    async def call(route: str, tenant: str, path: str, body: dict[str, Any], *, leave_early: bool = False) -> int:
        headers = {"Authorization": f"Bearer {keys[tenant]}"}
        async with client.stream("POST", path, json=body, headers=headers) as response:
            if leave_early and response.status_code == 200:
                async for _ in response.aiter_bytes():
                    break  # the client hangs up after its first bytes
            else:
                await response.aread()
        statuses[route, f"{response.status_code // 100}xx"] += 1
        return response.status_code

    def native(tenant: str, model: str = MODEL) -> str:
        account = UNLISTED if tenant in ("limited", "poor") else tenant
        return f"/client/v4/accounts/{account}/ai/run/{model}"

    calls: list[Awaitable[int]] = []
    for tenant in (LISTED, UNLISTED):
        calls += [
            call("native", tenant, native(tenant), CHAT),
            call("native", tenant, native(tenant), {**CHAT, "stream": True}),
            call("native", tenant, native(tenant, FP8_MODEL), {**CHAT, "stream": True}),
            call("native", tenant, native(tenant), {"prompt": "Once upon a time", "max_tokens": 30}),
            call("openai_chat", tenant, "/v1/chat/completions", {"model": MODEL, **CHAT}),
            call(
                "openai_chat",
                tenant,
                "/v1/chat/completions",
                {"model": FP8_MODEL, **CHAT, "stream": True, "stream_options": {"include_usage": True}},
            ),
            call(
                "openai_completions", tenant, "/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 20}
            ),
            call("native", tenant, native(tenant), {**CHAT, "max_tokens": 400, "stream": True}, leave_early=True),
            call("native", tenant, native(tenant), {"messages": "not a list"}),  # 400, never billed
        ]
    for _ in range(4):
        calls += [call("native", UNLISTED, native(UNLISTED), {**CHAT, "stream": True}) for _ in range(3)]
    await asyncio.gather(*calls)

    # One worker fails mid-stream (an in-band error after 3 tokens): those streams end with an error event.
    async with httpx.AsyncClient(trust_env=False) as sim:
        await sim.put(flaky + "/sim/faults", json={"in_band_error_after_tokens": 3})
        await asyncio.gather(*[call("native", LISTED, native(LISTED), {**CHAT, "stream": True}) for _ in range(6)])
        await sim.put(flaky + "/sim/faults", json={"in_band_error_after_tokens": None})

    limited = [await call("native", "limited", native("limited"), CHAT) for _ in range(4)]
    poor = [await call("native", "poor", native("poor"), CHAT) for _ in range(2)]
    assert limited == [200, 200, 429, 429] and poor == [429, 429]
    return {"statuses": statuses, "rate_limited": 2, "over_budget": 2}


async def _wait_until_billed(ledger: Ledger, seen: dict[str, Any]) -> None:
    """Bills of clients that left are written a moment after they leave: wait until the ledger stops growing."""
    previous, stable_since = -1, asyncio.get_running_loop().time()
    deadline = stable_since + 15
    while asyncio.get_running_loop().time() < deadline:
        count = len(await ledger.events(LISTED)) + len(await ledger.events(UNLISTED))
        if count != previous:
            previous, stable_since = count, asyncio.get_running_loop().time()
        elif asyncio.get_running_loop().time() - stable_since > 3:  # past upstream.hang_up_drain_seconds
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the ledger kept growing")


async def _ledger_by_model(client: httpx.AsyncClient) -> dict[str, dict[str, int]]:
    """The ledger's counters per model (both tenants), read through the admin usage API."""
    response = await client.get(
        "/admin/v1/usage",
        params={"granularity": "day", "group_by": "model"},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    assert response.status_code == 200, response.text
    ledger: dict[str, dict[str, int]] = {}
    for bucket in response.json()["result"]["data"]:
        for result in bucket["results"]:
            if result["requests"]:
                counters = ledger.setdefault(result["model"], Counter())
                for name in ("requests", "prompt_tokens", "completion_tokens", "cost_nano_usd"):
                    counters[name] += result[name]
    return ledger


async def _scrape_fresh(stack: Stack) -> list[Sample]:
    async with httpx.AsyncClient(trust_env=False) as client:
        response = await client.get(stack.gateway + "/metrics", headers={"connection": "close"})
    assert response.status_code == 200
    return samples(response.text)


async def _until_both_processes_billed(stack: Stack, key: str, seen: dict[str, Any]) -> None:
    """The kernel hands connections to whichever process accepts first, and one may take them all: add requests, each
    on a connection of its own, until both processes have billed some."""
    path = f"/client/v4/accounts/{LISTED}/ai/run/{MODEL}"
    for _ in range(100):
        if len({line["pid"] for line in _access_lines(stack) if line["route"] == "native"}) == 2:
            return
        async with httpx.AsyncClient(base_url=stack.gateway, timeout=30, trust_env=False) as fresh:
            response = await fresh.post(path, json=CHAT, headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200
        seen["statuses"]["native", "2xx"] += 1
    raise AssertionError("one gateway process served every request")


def _access_lines(stack: Stack) -> list[dict[str, Any]]:
    lines = []
    with open(os.path.join(stack.workdir, "processes.log"), encoding="utf-8", errors="replace") as log:
        for line in log:
            if line.startswith('{"'):
                record = json.loads(line)
                if record.get("logger") == "tollgate.access":
                    lines.append(record)
    return lines
