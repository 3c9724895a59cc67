"""The official ``openai`` Python SDK against a real Tollgate server, and the same conversation billed identically
through the OpenAI and the native routes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from redis.asyncio import Redis

from billing import Tokenizer
from tests.conftest import FP8_MODEL, FP8_NAME, MODEL, OPENAI_WEATHER_TOOL, TENANT, Gateway, SimWorker, gateway_for

pytestmark = pytest.mark.server

USER = [{"role": "user", "content": "Tell me about the sea."}]
# A conversation with a tool call and its result: the model's next turn is text.
TOOL_CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call-1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "call-1", "content": "18C and sunny"},
]


@pytest.fixture
async def live(redis: Redis, redis_url: str, tokenizer: Tokenizer, worker: SimWorker) -> AsyncIterator[Gateway]:
    async with gateway_for(redis_url, tokenizer, [worker.url], live=True) as gateway:
        yield gateway


def base_url(gateway: Gateway, *, with_account: bool = True) -> str:
    root = str(gateway.client.base_url).rstrip("/")
    return f"{root}/client/v4/accounts/{TENANT}/ai/v1" if with_account else f"{root}/v1"


def client(gateway: Gateway, *, key: str | None = None, with_account: bool = True, **options: Any) -> AsyncOpenAI:
    options.setdefault("max_retries", 0)
    return AsyncOpenAI(
        api_key=key or gateway.key.secret_key, base_url=base_url(gateway, with_account=with_account), **options
    )


async def bill_of(gateway: Gateway, request_id: str) -> dict[str, Any]:
    """The ledger's usage event of ``request_id``, with its numbers as integers."""
    await gateway.deps.bills.drain(timeout_seconds=5)
    [event] = [event for event in await gateway.deps.ledger.events(TENANT) if event["request_id"] == request_id]
    numbers = ("prompt_tokens", "completion_tokens", "cost_nano_usd")
    return {**event, **{name: int(event[name]) for name in numbers}}


def served_by_id(worker: SimWorker) -> dict[str, dict[str, Any]]:
    return {record["request_id"]: record for record in worker.served}


async def test_async_chat_completion_is_billed_as_the_worker_served(live: Gateway, worker: SimWorker) -> None:
    async with client(live) as sdk:
        raw = await sdk.chat.completions.with_raw_response.create(model=MODEL, messages=USER, max_tokens=20)
    completion = raw.parse()
    request_id = raw.headers["x-request-id"]
    [served] = worker.served
    assert completion.id == f"chatcmpl-{request_id}" and completion.object == "chat.completion"
    assert completion.model == MODEL
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content and choice.finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (
        served["prompt_tokens"],
        served["completion_tokens"],
    )
    bill = await bill_of(live, request_id)
    cost = 280 * served["prompt_tokens"] + 830 * served["completion_tokens"]
    assert bill["cost_nano_usd"] == cost == completion.usage.model_extra["cost_nano_usd"]
    assert raw.headers["x-tollgate-cost-nano-usd"] == str(cost)


async def test_sync_client_with_a_plain_v1_base_url(live: Gateway, worker: SimWorker) -> None:
    url = base_url(live, with_account=False)

    def call() -> Any:
        with OpenAI(api_key=live.key.secret_key, base_url=url, max_retries=0) as sdk:
            return sdk.chat.completions.create(model=FP8_MODEL, messages=USER, max_tokens=8)

    completion = await asyncio.to_thread(call)
    [served] = worker.served
    assert completion.model == FP8_MODEL and served["model"] == FP8_NAME
    assert completion.usage.prompt_tokens == served["prompt_tokens"]
    assert (
        completion.usage.model_extra["cost_nano_usd"]
        == 152 * served["prompt_tokens"] + 287 * served["completion_tokens"]
    )


async def test_stream_ends_with_a_usage_chunk_when_asked(live: Gateway, worker: SimWorker) -> None:
    async with client(live) as sdk:
        stream = await sdk.chat.completions.create(
            model=MODEL, messages=USER, max_tokens=20, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
        plain = await sdk.chat.completions.create(model=MODEL, messages=USER, max_tokens=20, stream=True)
        plain_chunks = [chunk async for chunk in plain]
    served = worker.served[0]
    *content, finish, usage = chunks
    assert content[0].choices[0].delta.role == "assistant"
    assert all(chunk.object == "chat.completion.chunk" and chunk.model == MODEL for chunk in chunks)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in content)
    assert finish.choices[0].finish_reason == "stop"
    assert usage.choices == [] and usage.usage is not None
    assert (usage.usage.prompt_tokens, usage.usage.completion_tokens) == (
        served["prompt_tokens"],
        served["completion_tokens"],
    )
    assert all(chunk.choices and chunk.usage is None for chunk in plain_chunks)
    assert plain_chunks[-1].choices[0].finish_reason == "stop"


async def test_tools_round_trip_in_openai_shape(live: Gateway, worker: SimWorker) -> None:
    tool = {**OPENAI_WEATHER_TOOL, "function": {**OPENAI_WEATHER_TOOL["function"]}}
    tool["function"]["parameters"] = {**tool["function"]["parameters"], "required": ["city"]}
    async with client(live) as sdk:
        asked = await sdk.chat.completions.create(
            model=MODEL, messages=[TOOL_CONVERSATION[1]], tools=[tool], max_tokens=64
        )
        [call] = asked.choices[0].message.tool_calls or []
        assert asked.choices[0].finish_reason == "tool_calls" and asked.choices[0].message.content is None
        assert call.type == "function" and call.function.name == "get_weather" and call.id
        assert set(json.loads(call.function.arguments)) == {"city"}
        history = [
            TOOL_CONVERSATION[1],
            asked.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "18C and sunny"},
        ]
        answered = await sdk.chat.completions.create(model=MODEL, messages=history, tools=[tool], max_tokens=20)
        stream = await sdk.chat.completions.create(
            model=MODEL, messages=[TOOL_CONVERSATION[1]], tools=[tool], max_tokens=64, stream=True
        )
        fragments = [chunk.choices[0].delta.tool_calls for chunk in [c async for c in stream] if chunk.choices]
    assert answered.choices[0].message.content and not answered.choices[0].message.tool_calls
    asked_served, answered_served, streamed_served = worker.served
    assert asked.usage.completion_tokens == asked_served["completion_tokens"]
    assert answered.usage.prompt_tokens == answered_served["prompt_tokens"] > asked_served["prompt_tokens"]
    name = "".join(part.function.name or "" for parts in fragments if parts for part in parts if part.function)
    arguments = "".join(
        part.function.arguments or "" for parts in fragments if parts for part in parts if part.function
    )
    assert name == "get_weather" and set(json.loads(arguments)) == {"city"}
    assert streamed_served["finish_reason"] == "tool_calls"


async def test_json_schema_response_format(live: Gateway) -> None:
    schema = {
        "type": "object",
        "required": ["name", "year"],
        "properties": {"name": {"type": "string"}, "year": {"type": "integer"}},
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "book", "schema": schema}}
    async with client(live) as sdk:
        completion = await sdk.chat.completions.create(
            model=MODEL,
            messages=USER,
            max_tokens=64,
            response_format=response_format,  # type: ignore[arg-type]
        )
    answer = json.loads(completion.choices[0].message.content or "")
    assert isinstance(answer["name"], str) and isinstance(answer["year"], int)


async def test_text_completions_sync_and_streamed(live: Gateway, worker: SimWorker) -> None:
    url = base_url(live)

    def call() -> tuple[Any, list[Any]]:
        with OpenAI(api_key=live.key.secret_key, base_url=url, max_retries=0) as sdk:
            whole = sdk.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10)
            streamed = list(sdk.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, stream=True))
            return whole, streamed

    whole, streamed = await asyncio.to_thread(call)
    first, second = worker.served
    assert whole.object == "text_completion" and whole.choices[0].text
    assert whole.usage.prompt_tokens == first["prompt_tokens"] == 5  # BOS + 4 tokens
    assert "".join(chunk.choices[0].text for chunk in streamed)
    assert streamed[-1].choices[0].finish_reason == "length" == second["finish_reason"]


async def test_models_list(live: Gateway) -> None:
    async with client(live, with_account=False) as sdk:
        models = {model.id: model for model in (await sdk.models.list()).data}
        one = await sdk.models.retrieve(MODEL)
    assert set(models) == {MODEL, FP8_MODEL}
    assert (
        models[MODEL].model_extra["context_window"] == 7968 and models[FP8_MODEL].model_extra["context_window"] == 32000
    )
    assert one.id == MODEL


async def test_errors_raise_the_sdk_error_types(live: Gateway, worker: SimWorker) -> None:
    async with client(live) as sdk:
        with pytest.raises(openai.BadRequestError) as bad:
            await sdk.chat.completions.create(model=MODEL, messages=USER, temperature=3)
        assert bad.value.code == "5006" and "/temperature" in bad.value.message and bad.value.param == "temperature"
        with pytest.raises(openai.NotFoundError) as unknown:
            await sdk.chat.completions.create(model="gpt-4o", messages=USER)
        assert unknown.value.code == "5007" and unknown.value.param == "model"
        with pytest.raises(openai.APIStatusError) as too_long:
            await sdk.chat.completions.create(model=MODEL, messages=USER, max_tokens=7950)
        assert too_long.value.status_code == 413 and too_long.value.code == "5021"
    async with client(live, key="tg_aaaaaaaaaaaa_" + "A" * 43) as sdk:
        with pytest.raises(openai.AuthenticationError) as unauthorized:
            await sdk.models.list()
        assert unauthorized.value.code == "10000"
    assert worker.served == []


async def test_a_stream_failing_mid_way_raises_in_the_sdk(live: Gateway, worker: SimWorker) -> None:
    worker.faults.die_after_tokens = 3
    async with client(live) as sdk:
        stream = await sdk.chat.completions.create(model=MODEL, messages=USER, max_tokens=20, stream=True)
        received = []
        with pytest.raises(openai.APIError) as failed:
            async for chunk in stream:
                received.append(chunk)
    assert received and failed.value.message == "The inference worker failed to answer"


async def test_the_same_conversation_is_billed_identically_on_both_routes(live: Gateway, worker: SimWorker) -> None:
    """The native messages form and OpenAI chat send the worker the same request, so both bills are equal."""
    tools = [OPENAI_WEATHER_TOOL]
    native_messages = [{**message, "content": message["content"] or ""} for message in TOOL_CONVERSATION]
    request_ids = []
    for stream in (False, True):
        native = await live.run({"messages": native_messages, "tools": tools, "max_tokens": 40, "stream": stream})
        assert native.status_code == 200
        request_ids.append(native.headers["x-request-id"])
        async with client(live) as sdk:
            body = {"model": MODEL, "messages": TOOL_CONVERSATION, "tools": tools, "max_tokens": 40, "stream": stream}
            raw = await sdk.chat.completions.with_raw_response.create(**body)
            if stream:
                [chunk async for chunk in raw.parse()]
        request_ids.append(raw.headers["x-request-id"])
    bills = [await bill_of(live, request_id) for request_id in request_ids]
    served = served_by_id(worker)
    for bill in bills:
        assert (bill["prompt_tokens"], bill["completion_tokens"]) == (
            served[bill["request_id"]]["prompt_tokens"],
            served[bill["request_id"]]["completion_tokens"],
        )
    figures = {(bill["prompt_tokens"], bill["completion_tokens"], bill["cost_nano_usd"]) for bill in bills}
    assert len(figures) == 1, bills
    [(prompt_tokens, completion_tokens, cost)] = figures
    assert completion_tokens == 12 and cost == 280 * prompt_tokens + 830 * completion_tokens
