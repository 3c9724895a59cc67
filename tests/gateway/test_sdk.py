"""The official ``cloudflare`` Python SDK against a real Tollgate server, as a tenant would use it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import cloudflare
import pytest
from cloudflare import AsyncCloudflare, Cloudflare
from redis.asyncio import Redis

from billing import Tokenizer
from tests.conftest import MODEL, TENANT, Gateway, SimWorker, gateway_for

pytestmark = pytest.mark.server


@pytest.fixture
async def live(redis: Redis, redis_url: str, tokenizer: Tokenizer, worker: SimWorker) -> AsyncIterator[Gateway]:
    async with gateway_for(redis_url, tokenizer, [worker.url], live=True) as gateway:
        yield gateway


def sdk_base_url(gateway: Gateway) -> str:
    return str(gateway.client.base_url).rstrip("/") + "/client/v4"


def sdk(gateway: Gateway, key: str | None = None) -> AsyncCloudflare:
    return AsyncCloudflare(api_token=key or gateway.key.secret_key, base_url=sdk_base_url(gateway), max_retries=0)


async def test_sdk_run_returns_the_result(live: Gateway, worker: SimWorker) -> None:
    async with sdk(live) as client:
        result = await client.ai.run(MODEL, account_id=TENANT, prompt="Hello there", max_tokens=12)
    assert isinstance(result, dict)
    assert isinstance(result["response"], str) and result["response"]
    assert result["tool_calls"] == []
    [served] = worker.served
    assert result["usage"]["completion_tokens"] == served["completion_tokens"]
    assert result["usage"]["prompt_tokens"] == served["prompt_tokens"]


async def test_sdk_messages_and_sync_client(live: Gateway) -> None:
    base_url = sdk_base_url(live)

    def call() -> object:
        with Cloudflare(api_token=live.key.secret_key, base_url=base_url, max_retries=0) as client:
            return client.ai.run(MODEL, account_id=TENANT, messages=[{"role": "user", "content": "Hi"}], max_tokens=5)

    result = await asyncio.to_thread(call)
    assert isinstance(result, dict) and result["usage"]["prompt_tokens"] == 36


async def test_sdk_with_streaming_response_reads_events(live: Gateway) -> None:
    async with (
        sdk(live) as client,
        client.ai.with_streaming_response.run(
            MODEL, account_id=TENANT, prompt="Stream please", stream=True, max_tokens=16
        ) as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line async for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    assert events[-1]["usage"]["completion_tokens"] == 12  # 11 text tokens and the end-of-turn token
    assert 1 <= len(events) - 1 <= 11  # fewer when a character spans tokens (the corpus has emoji)
    assert all(event["response"] for event in events[:-1])


async def test_sdk_errors_raise_the_sdk_error_types(live: Gateway) -> None:
    async with sdk(live) as client:
        with pytest.raises(cloudflare.BadRequestError) as bad:
            await client.ai.run(MODEL, account_id=TENANT, prompt="hi", max_tokens=0)
        assert bad.value.status_code == 400
        assert bad.value.errors[0].code == 5006 and "/max_tokens" in bad.value.errors[0].message
        with pytest.raises(cloudflare.NotFoundError):
            await client.ai.run(MODEL, account_id="someone-else", prompt="hi")
    async with sdk(live, key="tg_aaaaaaaaaaaa_" + "A" * 43) as client:
        with pytest.raises(cloudflare.AuthenticationError) as unauthorized:
            await client.ai.run(MODEL, account_id=TENANT, prompt="hi")
        assert unauthorized.value.errors[0].code == 10000
