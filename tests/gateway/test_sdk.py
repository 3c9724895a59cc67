"""The official ``cloudflare`` Python SDK against a real Tollgate server, as a tenant would use it."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import cloudflare
import pytest
from cloudflare import AsyncCloudflare, Cloudflare
from redis.asyncio import Redis
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import tests.conftest
from billing import KeyLimits, Tokenizer
from tests.conftest import MODEL, TENANT, WEATHER_TOOL, Gateway, SimWorker, gateway_for, sim_worker, wait_for

pytestmark = pytest.mark.server


@pytest.fixture
async def live(redis: Redis, redis_url: str, tokenizer: Tokenizer, worker: SimWorker) -> AsyncIterator[Gateway]:
    async with gateway_for(redis_url, tokenizer, [worker.url], live=True) as gateway:
        yield gateway


def sdk_base_url(gateway: Gateway) -> str:
    return str(gateway.client.base_url).rstrip("/") + "/client/v4"


def sdk(gateway: Gateway, key: str | None = None, max_retries: int = 0) -> AsyncCloudflare:
    return AsyncCloudflare(
        api_token=key or gateway.key.secret_key, base_url=sdk_base_url(gateway), max_retries=max_retries
    )


@dataclasses.dataclass
class Arrival:
    """One model request as the server saw it: when it came, the SDK's retry count, and how it was answered."""

    at: float
    retry_count: str | None  # x-stainless-retry-count; None for a request the SDK did not send
    status: int = 0
    headers: dict[str, str] = dataclasses.field(default_factory=dict)


@pytest.fixture
def arrivals(monkeypatch: pytest.MonkeyPatch) -> list[Arrival]:
    """Every /ai/run request the gateways built by ``gateway_for`` in this test receive, in arrival order."""
    seen: list[Arrival] = []
    create_app = tests.conftest.create_app

    def create_recording_app(*args: Any, **kwargs: Any) -> ASGIApp:
        app = create_app(*args, **kwargs)

        async def recording(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http" or "/ai/run/" not in scope["path"]:
                return await app(scope, receive, send)
            headers = {name.decode(): value.decode() for name, value in scope["headers"]}
            arrival = Arrival(time.monotonic(), headers.get("x-stainless-retry-count"))
            seen.append(arrival)

            async def recording_send(message: Message) -> None:
                if message["type"] == "http.response.start":
                    arrival.status = message["status"]
                    arrival.headers = {name.decode(): value.decode() for name, value in message["headers"]}
                await send(message)

            await app(scope, receive, recording_send)

        return recording

    monkeypatch.setattr(tests.conftest, "create_app", create_recording_app)
    return seen


def sse_events(lines: list[str]) -> list[Any]:
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: ") :]) for line in lines[:-1]]


WEATHER_QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
FORECAST_SCHEMA = {
    "type": "object",
    "required": ["city", "temperature", "sunny"],
    "properties": {"city": {"type": "string"}, "temperature": {"type": "integer"}, "sunny": {"type": "boolean"}},
}


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


async def test_sdk_retries_a_capacity_refusal_after_retry_after_then_succeeds(
    redis: Redis, redis_url: str, tokenizer: Tokenizer, arrivals: list[Arrival]
) -> None:
    env = {"TOLLGATE_ROUTING__MAX_IN_FLIGHT_PER_WORKER": "1"}
    async with (
        sim_worker(tokenizer, tokens_per_second=40, time_to_first_token_seconds=0, completion_tokens=12) as slow,
        gateway_for(redis_url, tokenizer, [slow.url], live=True, **env) as gateway,
        sdk(gateway, max_retries=2) as client,
    ):
        holder = asyncio.create_task(gateway.run({"prompt": "Hold the slot", "max_tokens": 12}))  # about 0.3 s
        await wait_for(lambda: gateway.deps.pools["bf16"].workers[0].in_flight == 1)
        raw = await client.ai.with_raw_response.run(
            MODEL, account_id=TENANT, prompt="Let me in", max_tokens=12, extra_body={"options": {"rejectIfBusy": True}}
        )
        result = await raw.parse()
        assert (await holder).status_code == 200
        refusals = gateway.deps.metrics.registry.get_sample_value(
            "tollgate_routing_refusals_total", {"pool": "bf16", "reason": "capacity"}
        )
    sent = [arrival for arrival in arrivals if arrival.retry_count is not None]
    assert [(arrival.retry_count, arrival.status) for arrival in sent] == [("0", 429), ("1", 200)]
    assert sent[0].headers["retry-after"] == "1" and "x-should-retry" not in sent[0].headers
    assert sent[1].at - sent[0].at >= 0.95  # the SDK waited retry-after (1 s), not its own 0.5 s backoff
    assert refusals == 1
    served = slow.record_for(raw.headers["x-request-id"])
    assert isinstance(result, dict) and result["response"]
    assert result["usage"]["prompt_tokens"] == served["prompt_tokens"]
    assert result["usage"]["completion_tokens"] == served["completion_tokens"] == 12
    assert len(slow.served) == 2  # the holder and the retry: the refused attempt never reached the worker


async def test_sdk_does_not_retry_a_monthly_budget_refusal(
    redis: Redis, redis_url: str, tokenizer: Tokenizer, worker: SimWorker, arrivals: list[Arrival]
) -> None:
    async with gateway_for(redis_url, tokenizer, [worker.url], live=True) as gateway:
        capped = await gateway.deps.keys.create(TENANT, "capped", monthly_budget_nano_usd=1)
        async with sdk(gateway, key=capped.secret_key, max_retries=2) as client:
            with pytest.raises(cloudflare.RateLimitError) as refused:
                await client.ai.run(MODEL, account_id=TENANT, prompt="hi", max_tokens=12)
        await wait_for(lambda: not gateway.deps.bills._tasks)
        events = await gateway.deps.ledger.events(TENANT)
    assert refused.value.status_code == 429
    assert refused.value.errors[0].code == 3036 and "monthly budget" in refused.value.errors[0].message
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert [(arrival.retry_count, arrival.status) for arrival in arrivals] == [("0", 429)]
    assert worker.served == [] and events == []


async def test_sdk_error_types_for_context_window_rate_limit_and_unknown_model(live: Gateway) -> None:
    limited = await live.deps.keys.create(TENANT, "one-a-minute", limits=KeyLimits(requests_per_minute=1))
    async with sdk(live) as client:
        with pytest.raises(cloudflare.APIStatusError) as too_long:
            await client.ai.run(MODEL, account_id=TENANT, prompt="hi", max_tokens=7950)  # 36 + 7950 > 7968
        assert type(too_long.value) is cloudflare.APIStatusError and too_long.value.status_code == 413
        assert too_long.value.errors[0].code == 5021 and "(7986)" in too_long.value.errors[0].message
        with pytest.raises(cloudflare.BadRequestError) as unknown:
            await client.ai.run("@cf/meta/llama-9-unknown", account_id=TENANT, prompt="hi")
        assert unknown.value.errors[0].code == 5007 and "@cf/meta/llama-9-unknown" in unknown.value.errors[0].message
        with pytest.raises(cloudflare.NotFoundError) as elsewhere:
            await client.ai.run(MODEL, account_id="someone-else", prompt="hi")
        assert elsewhere.value.status_code == 404 and elsewhere.value.errors[0].code == 7003
    async with sdk(live, key=limited.secret_key) as client:
        await client.ai.run(MODEL, account_id=TENANT, prompt="hi", max_tokens=5)
        with pytest.raises(cloudflare.RateLimitError) as limited_out:
            await client.ai.run(MODEL, account_id=TENANT, prompt="hi", max_tokens=5)
    assert limited_out.value.status_code == 429 and limited_out.value.errors[0].code == 5429
    assert 1 <= int(limited_out.value.response.headers["retry-after"]) <= 60
    assert limited_out.value.response.headers["x-ratelimit-remaining-requests"] == "0"


async def test_sdk_streamed_tool_call_is_one_event_before_usage(live: Gateway, worker: SimWorker) -> None:
    async with (
        sdk(live) as client,
        client.ai.with_streaming_response.run(
            MODEL, account_id=TENANT, messages=WEATHER_QUESTION, tools=[WEATHER_TOOL], stream=True, max_tokens=64
        ) as response,
    ):
        lines = [line async for line in response.iter_lines() if line]
        request_id = response.headers["x-request-id"]
    tool_event, usage_event = sse_events(lines)
    assert list(tool_event) == ["response", "tool_calls"] and tool_event["response"] == ""
    [call] = tool_event["tool_calls"]
    assert call["name"] == "get_weather" and list(call["arguments"]) == ["city"]
    assert isinstance(call["arguments"]["city"], str) and call["arguments"]["city"]
    served = worker.record_for(request_id)
    assert served["finish_reason"] == "tool_calls" and served["stream"] is True
    assert usage_event["usage"]["prompt_tokens"] == served["prompt_tokens"]
    assert usage_event["usage"]["completion_tokens"] == served["completion_tokens"] > 0


async def test_sdk_run_with_tools_returns_workers_ai_tool_calls(live: Gateway, worker: SimWorker) -> None:
    async with sdk(live) as client:
        result = await client.ai.run(
            MODEL, account_id=TENANT, messages=WEATHER_QUESTION, tools=[WEATHER_TOOL], max_tokens=64
        )
    assert isinstance(result, dict) and result["response"] == ""
    [call] = result["tool_calls"]
    assert call["name"] == "get_weather" and list(call["arguments"]) == ["city"]
    assert isinstance(call["arguments"]["city"], str) and call["arguments"]["city"]
    [served] = worker.served
    assert served["finish_reason"] == "tool_calls" and served["stream"] is False
    assert result["usage"]["prompt_tokens"] == served["prompt_tokens"]
    assert result["usage"]["completion_tokens"] == served["completion_tokens"] > 0


async def test_sdk_json_mode_returns_an_object_and_refuses_streaming(live: Gateway, worker: SimWorker) -> None:
    response_format = {"type": "json_schema", "json_schema": FORECAST_SCHEMA}
    async with sdk(live) as client:
        result = await client.ai.run(
            MODEL, account_id=TENANT, messages=WEATHER_QUESTION, response_format=response_format, max_tokens=64
        )
        with pytest.raises(cloudflare.BadRequestError) as streamed:
            await client.ai.run(
                MODEL, account_id=TENANT, messages=WEATHER_QUESTION, response_format=response_format, stream=True
            )
    assert isinstance(result, dict)
    forecast = result["response"]
    assert isinstance(forecast, dict) and list(forecast) == ["city", "temperature", "sunny"]
    assert isinstance(forecast["city"], str) and type(forecast["temperature"]) is int and forecast["sunny"] is True
    [served] = worker.served  # the refused stream never reached the worker
    assert result["usage"]["prompt_tokens"] == served["prompt_tokens"]
    assert result["usage"]["completion_tokens"] == served["completion_tokens"]
    assert streamed.value.status_code == 400 and streamed.value.errors[0].code == 5006
    assert "/response_format" in streamed.value.errors[0].message and "stream" in streamed.value.errors[0].message
