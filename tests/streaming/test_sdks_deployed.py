"""Both official SDKs against Tollgate as deployed: ``tollgate serve`` with two uvicorn processes on a free port, in
front of a simulated worker process. Every answer is billed exactly as the worker served it, and the same
conversation costs the same through the native and the OpenAI routes."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from cloudflare import Cloudflare
from redis.asyncio import Redis

from billing import KeyStore, Ledger, Retention
from tests.conftest import MODEL, OPENAI_WEATHER_TOOL
from tests.processes import Stack, stack_in_tempdir

pytestmark = [pytest.mark.server, pytest.mark.timeout(120)]

TENANT = "acct-sdk"
CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What should I pack for Oslo?"},
]


@contextlib.asynccontextmanager
async def deployed() -> AsyncIterator[tuple[Stack, str, Ledger]]:
    with stack_in_tempdir() as stack:
        stack.start_worker("--tokens-per-second", "0", "--ttft-seconds", "0", "--completion-tokens", "12")
        stack.start_gateway("--workers", "2")
        redis = Redis.from_url(stack.redis_url, decode_responses=True)
        try:
            issued = await KeyStore(redis).create(TENANT, "sdk")
            yield stack, issued.secret_key, Ledger(redis, Retention())
        finally:
            await redis.aclose()


async def billed(ledger: Ledger, count: int, timeout_seconds: float = 5.0) -> dict[str, dict[str, Any]]:
    """The tenant's usage events by request id, once there are ``count`` (a bill is written just after its answer)."""
    deadline = asyncio.get_running_loop().time() + timeout_seconds
    while len(events := {event["request_id"]: event for event in await ledger.events(TENANT)}) < count:
        assert asyncio.get_running_loop().time() < deadline, f"{len(events)} of {count} requests billed"
        await asyncio.sleep(0.05)
    return events


def use_both_sdks(gateway: str, key: str) -> dict[str, str]:
    """A tenant's session with each SDK; returns each call's request id by name."""
    ids: dict[str, str] = {}
    with openai.OpenAI(api_key=key, base_url=gateway + "/v1", max_retries=0) as sdk:
        raw = sdk.chat.completions.with_raw_response.create(model=MODEL, messages=CONVERSATION, max_tokens=30)
        ids["openai"] = raw.headers["x-request-id"]
        raw_stream = sdk.chat.completions.with_raw_response.create(
            model=MODEL, messages=CONVERSATION, max_tokens=30, stream=True, stream_options={"include_usage": True}
        )
        *_, usage_chunk = list(raw_stream.parse())
        assert usage_chunk.usage is not None and usage_chunk.choices == []
        ids["openai_stream"] = raw_stream.headers["x-request-id"]
        raw_tool = sdk.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=CONVERSATION[1:],
            tools=[OPENAI_WEATHER_TOOL],
            max_tokens=64,  # type: ignore[list-item]
        )
        [call] = raw_tool.parse().choices[0].message.tool_calls or []
        assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments), dict)
        ids["openai_tool"] = raw_tool.headers["x-request-id"]
    with Cloudflare(api_token=key, base_url=gateway + "/client/v4", max_retries=0) as cloudflare:
        raw_run = cloudflare.ai.with_raw_response.run(MODEL, account_id=TENANT, messages=CONVERSATION, max_tokens=30)
        assert raw_run.json()["result"]["response"]
        ids["native"] = raw_run.headers["x-request-id"]
        with cloudflare.ai.with_streaming_response.run(
            MODEL, account_id=TENANT, messages=CONVERSATION, max_tokens=30, stream=True
        ) as streamed:
            lines = [line for line in streamed.iter_lines() if line]
            ids["native_stream"] = streamed.headers["x-request-id"]
        assert lines[-1] == "data: [DONE]" and '"usage"' in lines[-2]
    return ids


async def test_both_sdks_against_tollgate_serve_are_billed_as_served() -> None:
    async with deployed() as (stack, key, ledger), httpx.AsyncClient(trust_env=False) as client:
        ids = await asyncio.to_thread(use_both_sdks, stack.gateway, key)
        served_records = (await client.get(stack.workers[0] + "/sim/served")).json()
        served = {record["request_id"]: record for record in served_records}
        events = await billed(ledger, len(ids))
    assert set(ids.values()) == set(served) == set(events)
    bills: dict[str, tuple[int, int, int]] = {}
    for name, request_id in ids.items():
        event: dict[str, Any] = events[request_id]
        prompt, completion = served[request_id]["prompt_tokens"], served[request_id]["completion_tokens"]
        assert (int(event["prompt_tokens"]), int(event["completion_tokens"])) == (prompt, completion), name
        assert int(event["cost_nano_usd"]) == 280 * prompt + 830 * completion and event["status"] == "ok"
        bills[name] = (prompt, completion, int(event["cost_nano_usd"]))
    same_conversation = {bills[name] for name in ("openai", "openai_stream", "native", "native_stream")}
    assert len(same_conversation) == 1, bills
