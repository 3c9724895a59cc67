"""The simulated vLLM worker, served by a real uvicorn on a free port and driven over HTTP with httpx."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette

from billing.tokens import Tokenizer, count_chat_prompt_tokens, count_raw_prompt_tokens
from gateway.sim import Faults, SimConfig, create_sim_app
from gateway.sim._corpus import CORPUS
from gateway.sim.cli import add_arguments, build_config

pytestmark = pytest.mark.server

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
HELLO = [{"role": "user", "content": "Hello"}]
GOLDEN = Path(__file__).resolve().parents[1] / "data" / "prompt-tokens.jsonl"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
FAST: dict[str, Any] = {"tokens_per_second": 0.0, "time_to_first_token_seconds": 0.0}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.default()


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def live_sim(
    tokenizer: Tokenizer, faults: Faults | None = None, **config: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, Starlette]]:
    app = create_sim_app(SimConfig(**config), tokenizer, faults)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, lifespan="on", log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():  # it failed to start: surface the reason
            task.result()
            raise RuntimeError("uvicorn exited before starting")
        await asyncio.sleep(0.01)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            yield client, app
    finally:
        server.should_exit = True
        await task


async def served_record(app: Starlette, request_id: str, deadline_seconds: float = 2.0) -> dict[str, Any]:
    deadline = time.monotonic() + deadline_seconds
    while time.monotonic() < deadline:
        for record in app.state.served:
            if record["request_id"] == request_id:
                return dict(record)
        await asyncio.sleep(0.01)
    raise AssertionError(f"no served record for {request_id}: {app.state.served}")


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": HELLO, **fields}


async def sse_events(response: httpx.Response) -> list[Any]:
    """The decoded ``data:`` payloads of a stream, ``"[DONE]"`` kept as a string."""
    events = []
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            payload = line.removeprefix("data: ")
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


async def stream_chat(client: httpx.AsyncClient, body: dict[str, Any], request_id: str) -> list[Any]:
    headers = {"x-request-id": request_id}
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        return await sse_events(response)


def golden_sample() -> list[dict[str, Any]]:
    records = [json.loads(line) for line in GOLDEN.read_text(encoding="utf-8").splitlines()]
    picked: dict[str, dict[str, Any]] = {}
    for record in records:  # the first record of each kind, plus the longest
        picked.setdefault(record["kind"], record)
    return [*picked.values(), max(records, key=lambda record: record["prompt_tokens"])]


async def test_sim_chat_usage_equals_counter_for_golden_sample(tokenizer):
    async with live_sim(tokenizer, completion_tokens=7, **FAST) as (client, app):
        for index, record in enumerate(golden_sample()):
            messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
            body = {"model": MODEL, "messages": messages, "max_tokens": 64}
            if "tools" in record:
                body["tools"] = record["tools"]
            response = await client.post("/v1/chat/completions", json=body, headers={"x-request-id": f"g{index}"})
            assert response.status_code == 200, response.text
            usage = response.json()["usage"]
            assert usage["prompt_tokens"] == record["prompt_tokens"]
            assert usage["prompt_tokens"] == count_chat_prompt_tokens(tokenizer, messages, record.get("tools"))
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
            record_served = await served_record(app, f"g{index}")
            assert record_served["prompt_tokens"] == record["prompt_tokens"]
            assert record_served["completion_tokens"] == usage["completion_tokens"]


async def test_sim_chat_non_streaming_body_has_vllm_shape(tokenizer):
    async with live_sim(tokenizer, completion_tokens=6, **FAST) as (client, app):
        response = await client.post("/v1/chat/completions", json=chat(), headers={"x-request-id": "r1"})
    body = response.json()
    assert body["id"] == "chatcmpl-r1"
    assert body["object"] == "chat.completion"
    assert body["model"] == MODEL
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["tool_calls"] == []
    assert body["usage"] == {
        "prompt_tokens": 36,
        "total_tokens": 42,
        "completion_tokens": 6,
        "prompt_tokens_details": None,
    }
    # 5 visible tokens and the stop token
    assert len(tokenizer.encode(choice["message"]["content"])) == 5
    assert app.state.served == [
        {
            "request_id": "r1",
            "endpoint": "/v1/chat/completions",
            "model": MODEL,
            "stream": False,
            "prompt_tokens": 36,
            "completion_tokens": 6,
            "finish_reason": "stop",
            "client_disconnected": False,
            "status": 200,
        }
    ]


async def test_sim_chat_stream_frames_follow_vllm_with_continuous_usage(tokenizer):
    options = {"include_usage": True, "continuous_usage_stats": True}
    async with live_sim(tokenizer, completion_tokens=9, **FAST) as (client, app):
        events = await stream_chat(client, chat(stream=True, stream_options=options), "s1")
        whole = await client.post("/v1/chat/completions", json=chat(), headers={"x-request-id": "s1"})
        record = await served_record(app, "s1")
    assert events[-1] == "[DONE]"
    chunks, usage_chunk = events[:-2], events[-2]
    assert all(chunk["id"] == "chatcmpl-s1" and chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[0]["usage"] == {"prompt_tokens": 36, "total_tokens": 36, "completion_tokens": 0}
    completions = [chunk["usage"]["completion_tokens"] for chunk in chunks]
    assert completions == [0, 1, 2, 3, 4, 5, 6, 7, 9]  # the stop token rides with the last visible token
    assert [list(chunk["usage"]) for chunk in chunks] == [["prompt_tokens", "total_tokens", "completion_tokens"]] * 9
    assert [chunk["choices"][0]["finish_reason"] for chunk in chunks] == [None] * 8 + ["stop"]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 36, "total_tokens": 45, "completion_tokens": 9}
    streamed = "".join(chunk["choices"][0]["delta"]["content"] for chunk in chunks)
    assert streamed == whole.json()["choices"][0]["message"]["content"]  # same request id, same answer
    assert record["stream"] is True
    assert record["completion_tokens"] == 9
    assert record["finish_reason"] == "stop"


async def test_sim_chat_stream_without_stream_options_has_no_usage(tokenizer):
    async with live_sim(tokenizer, completion_tokens=3, **FAST) as (client, _):
        events = await stream_chat(client, chat(stream=True), "s2")
    assert events[-1] == "[DONE]"
    assert all("usage" not in event for event in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


async def test_sim_stream_options_without_stream_is_rejected(tokenizer):
    async with live_sim(tokenizer, **FAST) as (client, _):
        response = await client.post("/v1/chat/completions", json=chat(stream_options={"include_usage": True}))
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "Stream options can only be defined when `stream=True`."


async def test_sim_stream_multibyte_tokens_are_held_back_until_complete(tokenizer):
    # Longer than the corpus, so the answer contains its emoji, which are split over several tokens.
    async with live_sim(tokenizer, completion_tokens=600, **FAST) as (client, _):
        events = await stream_chat(client, chat(stream=True, max_tokens=1000), "utf8")
    deltas = [event["choices"][0]["delta"]["content"] for event in events[1:-1]]
    assert len(deltas) == 599
    assert "🦉" in "".join(deltas)
    assert "" in deltas  # a token that ends mid-character shows nothing ...
    assert all("\ufffd" not in delta for delta in deltas)  # ... and no delta carries half a character


async def test_sim_max_tokens_smaller_than_answer_finishes_with_length(tokenizer):
    options = {"include_usage": True}
    async with live_sim(tokenizer, completion_tokens=50, **FAST) as (client, app):
        whole = await client.post("/v1/chat/completions", json=chat(max_tokens=5), headers={"x-request-id": "l1"})
        events = await stream_chat(client, chat(max_tokens=5, stream=True, stream_options=options), "l2")
        records = [await served_record(app, "l1"), await served_record(app, "l2")]
    assert whole.json()["choices"][0]["finish_reason"] == "length"
    assert whole.json()["usage"]["completion_tokens"] == 5
    assert events[-3]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["usage"]["completion_tokens"] == 5
    assert [(r["completion_tokens"], r["finish_reason"]) for r in records] == [(5, "length"), (5, "length")]


async def test_sim_random_answer_length_stays_within_max_tokens(tokenizer):
    async with live_sim(tokenizer, **FAST) as (client, _):
        lengths = []
        for index in range(8):
            response = await client.post(
                "/v1/chat/completions", json=chat(max_tokens=12), headers={"x-request-id": f"rand-{index}"}
            )
            assert response.json()["choices"][0]["finish_reason"] == "stop"
            lengths.append(response.json()["usage"]["completion_tokens"])
        again = await client.post("/v1/chat/completions", json=chat(max_tokens=12), headers={"x-request-id": "rand-0"})
    assert all(1 <= length <= 12 for length in lengths)
    assert len(set(lengths)) > 1
    assert again.json()["usage"]["completion_tokens"] == lengths[0]


async def test_sim_context_window_and_model_checks_answer_like_vllm(tokenizer):
    async with live_sim(tokenizer, max_model_len=64, lora_adapters=("support-bot",), **FAST) as (client, app):
        too_long = await client.post("/v1/chat/completions", json=chat(max_tokens=100), headers={"x-request-id": "c1"})
        unknown = await client.post("/v1/chat/completions", json=chat(model="nope"))
        adapter = await client.post("/v1/chat/completions", json=chat(model="support-bot"))
        default = await client.post("/v1/chat/completions", json=chat(max_tokens=None))
        zero = await client.post("/v1/chat/completions", json=chat(max_tokens=0))
        models = (await client.get("/v1/models")).json()
        record = await served_record(app, "c1")
    assert too_long.status_code == 400
    assert too_long.json() == {
        "error": {
            "message": "'max_tokens' or 'max_completion_tokens' is too large: 100. This model's maximum context length "
            "is 64 tokens and your request has 36 input tokens (100 > 64 - 36). None",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        }
    }
    assert record == {
        "request_id": "c1",
        "endpoint": "/v1/chat/completions",
        "model": MODEL,
        "stream": False,
        "prompt_tokens": 36,
        "completion_tokens": 0,
        "finish_reason": "error",
        "client_disconnected": False,
        "status": 400,
    }
    assert unknown.status_code == 404
    assert unknown.json()["error"] == {
        "message": "The model `nope` does not exist.",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }
    assert adapter.status_code == 200
    assert adapter.json()["model"] == "support-bot"
    assert default.status_code == 200
    assert default.json()["usage"]["completion_tokens"] <= 64 - 36
    assert zero.status_code == 400
    assert zero.json()["error"]["message"] == "max_tokens must be at least 1, got 0."
    assert [(card["id"], card["parent"], card["max_model_len"]) for card in models["data"]] == [
        (MODEL, None, 64),
        ("support-bot", MODEL, None),
    ]
    assert models["object"] == "list"
    assert models["data"][0]["owned_by"] == "vllm"


async def test_sim_tool_call_answers_in_both_modes(tokenizer):
    body = chat(messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER_TOOL])
    options = {"include_usage": True, "continuous_usage_stats": True}
    async with live_sim(tokenizer, **FAST) as (client, app):
        whole = await client.post("/v1/chat/completions", json=body, headers={"x-request-id": "t1"})
        events = await stream_chat(client, {**body, "stream": True, "stream_options": options}, "t1")
        record = await served_record(app, "t1")
    choice = whole.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function"
    assert call["id"].startswith("chatcmpl-tool-")
    assert call["function"]["name"] == "get_weather"
    arguments = json.loads(call["function"]["arguments"])
    assert list(arguments) == ["city"]
    assert isinstance(arguments["city"], str)
    model_text = '{"name": "get_weather", "parameters": ' + call["function"]["arguments"] + "}"
    assert whole.json()["usage"]["completion_tokens"] == tokenizer.count(model_text) + 1  # + the stop token
    assert whole.json()["usage"]["prompt_tokens"] == count_chat_prompt_tokens(
        tokenizer, body["messages"], body["tools"]
    )

    chunks = events[1:-2]
    announced = chunks[0]["choices"][0]["delta"]["tool_calls"][0]
    assert announced == {"id": call["id"], "type": "function", "index": 0, "function": {"name": "get_weather"}}
    fragments = [chunk["choices"][0]["delta"].get("tool_calls", [{}])[0] for chunk in chunks[1:]]
    assert all(fragment.get("index", 0) == 0 for fragment in fragments)
    streamed = "".join(fragment.get("function", {}).get("arguments", "") for fragment in fragments)
    assert streamed == call["function"]["arguments"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    whole_usage = {key: value for key, value in whole.json()["usage"].items() if key != "prompt_tokens_details"}
    assert events[-2]["usage"] == whole_usage
    assert [chunk["usage"]["completion_tokens"] for chunk in chunks][-1] == whole_usage["completion_tokens"]
    assert record["finish_reason"] == "tool_calls"
    assert record["completion_tokens"] == whole.json()["usage"]["completion_tokens"]


async def test_sim_tool_choice_none_or_tool_result_last_answers_with_text(tokenizer):
    tool_result: list[dict[str, Any]] = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"id": "x", "type": "function", "function": {"name": "get_weather"}}]},
        {"role": "tool", "tool_call_id": "x", "content": "18C sunny"},
    ]
    async with live_sim(tokenizer, completion_tokens=4, **FAST) as (client, _):
        declined = await client.post("/v1/chat/completions", json=chat(tools=[WEATHER_TOOL], tool_choice="none"))
        answered = await client.post("/v1/chat/completions", json=chat(messages=tool_result, tools=[WEATHER_TOOL]))
    for response in (declined, answered):
        assert response.json()["choices"][0]["finish_reason"] == "stop"
        assert response.json()["choices"][0]["message"]["tool_calls"] == []
    assert answered.json()["usage"]["prompt_tokens"] == count_chat_prompt_tokens(tokenizer, tool_result, [WEATHER_TOOL])


async def test_sim_json_response_format_answers_with_a_json_object(tokenizer):
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    formats: list[dict[str, Any]] = [
        {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}},
    ]
    async with live_sim(tokenizer, **FAST) as (client, _):
        for response_format in formats:
            response = await client.post(
                "/v1/chat/completions", json=chat(max_tokens=200, response_format=response_format)
            )
            content = json.loads(response.json()["choices"][0]["message"]["content"])
            assert isinstance(content, dict)
            if response_format["type"] == "json_schema":
                assert list(content) == ["answer"]


async def test_sim_completions_count_raw_prompt_and_stream_text_chunks(tokenizer):
    options = {"include_usage": True, "continuous_usage_stats": True}
    async with live_sim(tokenizer, completion_tokens=4, **FAST) as (client, app):
        whole = await client.post("/v1/completions", json={"model": MODEL, "prompt": "Hello"})
        no_bos = await client.post("/v1/completions", json={"prompt": "Hello", "add_special_tokens": False})
        body = {"prompt": "<|begin_of_text|>Hello", "stream": True, "stream_options": options}
        async with client.stream("POST", "/v1/completions", json=body, headers={"x-request-id": "p1"}) as response:
            events = await sse_events(response)
        record = await served_record(app, "p1")
    assert whole.json()["object"] == "text_completion"
    assert whole.json()["id"].startswith("cmpl-")
    assert whole.json()["usage"]["prompt_tokens"] == count_raw_prompt_tokens(tokenizer, "Hello") == 2
    assert no_bos.json()["usage"]["prompt_tokens"] == 1
    assert events[-1] == "[DONE]"
    assert all(event["object"] == "text_completion" and event["id"] == "cmpl-p1" for event in events[:-1])
    assert [event["usage"]["completion_tokens"] for event in events[:-1]] == [1, 2, 4, 4]
    assert events[-3]["choices"][0]["finish_reason"] == "stop"
    assert events[-2]["choices"] == []
    assert record["prompt_tokens"] == 3  # add_special_tokens defaults to true: a second BOS
    assert record["endpoint"] == "/v1/completions"


async def test_sim_completions_default_max_tokens_is_16(tokenizer):
    async with live_sim(tokenizer, completion_tokens=100, **FAST) as (client, _):
        response = await client.post("/v1/completions", json={"prompt": "Once upon a time"})
    assert response.json()["usage"]["completion_tokens"] == 16
    assert response.json()["choices"][0]["finish_reason"] == "length"


async def test_sim_error_rate_one_answers_500_before_streaming(tokenizer):
    async with live_sim(tokenizer, Faults(error_rate=1.0), **FAST) as (client, app):
        response = await client.post("/v1/chat/completions", json=chat(stream=True), headers={"x-request-id": "e1"})
        record = await served_record(app, "e1")
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "InternalServerError"
    assert response.json()["error"]["code"] == 500
    assert response.json()["error"]["param"] is None
    assert (record["status"], record["finish_reason"], record["completion_tokens"]) == (500, "error", 0)


async def test_sim_die_after_tokens_drops_the_connection(tokenizer):
    received = []
    async with live_sim(tokenizer, Faults(die_after_tokens=3), completion_tokens=10, **FAST) as (client, app):
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            headers = {"x-request-id": "d1"}
            async with client.stream("POST", "/v1/chat/completions", json=chat(stream=True), headers=headers) as r:
                async for line in r.aiter_lines():
                    received.append(line)
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            await client.post("/v1/chat/completions", json=chat(), headers={"x-request-id": "d2"})
        streamed, whole = await served_record(app, "d1"), await served_record(app, "d2")
    content_frames = [line for line in received if line.startswith("data: ") and '"content":"' in line]
    assert len(content_frames) == 4  # the role chunk and 3 tokens
    assert not any("[DONE]" in line or 'finish_reason":"stop' in line for line in received)
    assert (streamed["finish_reason"], streamed["completion_tokens"], streamed["status"]) == ("died", 3, 200)
    assert (whole["finish_reason"], whole["completion_tokens"], whole["status"]) == ("died", 0, 0)
    assert streamed["client_disconnected"] is False


async def test_sim_in_band_error_after_tokens_sends_error_frame_then_done(tokenizer):
    faults = Faults(in_band_error_after_tokens=2)
    async with live_sim(tokenizer, faults, completion_tokens=10, **FAST) as (client, app):
        events = await stream_chat(client, chat(stream=True), "i1")
        whole = await client.post("/v1/chat/completions", json=chat(), headers={"x-request-id": "i2"})
        streamed, record_whole = await served_record(app, "i1"), await served_record(app, "i2")
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [list(event["choices"][0]["delta"]) for event in events[1:3]] == [["content"], ["content"]]
    assert [event["choices"][0]["finish_reason"] for event in events[:3]] == [None, None, None]
    assert events[3]["error"]["type"] == "InternalServerError"
    assert events[3]["error"]["code"] == 500
    assert events[4:] == ["[DONE]"]
    assert (streamed["finish_reason"], streamed["completion_tokens"], streamed["status"]) == ("error", 2, 200)
    assert whole.status_code == 500
    assert (record_whole["finish_reason"], record_whole["status"]) == ("error", 500)


async def test_sim_stall_keeps_connection_open_until_client_leaves(tokenizer):
    async with live_sim(tokenizer, Faults(stall_after_tokens=2), completion_tokens=10, **FAST) as (client, app):
        body = chat(stream=True)
        async with client.stream("POST", "/v1/chat/completions", json=body, headers={"x-request-id": "st"}) as response:
            lines = response.aiter_lines()
            frames: list[str] = []
            while len(frames) < 3:
                line = await anext(lines)
                if line.startswith("data: "):
                    frames.append(line)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    while not (await anext(lines)).startswith("data: "):
                        pass
            assert app.state.served == []  # still open
        record = await served_record(app, "st")
    assert (record["finish_reason"], record["completion_tokens"], record["client_disconnected"]) == ("stalled", 2, True)


async def test_sim_client_disconnect_mid_stream_records_tokens_sent(tokenizer):
    body = chat(stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True})
    async with live_sim(tokenizer, tokens_per_second=20, completion_tokens=100) as (client, app):
        seen = 0
        async with client.stream("POST", "/v1/chat/completions", json=body, headers={"x-request-id": "gone"}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    seen = json.loads(line.removeprefix("data: "))["usage"]["completion_tokens"]
                    if seen == 5:
                        break
        record = await served_record(app, "gone")
    assert record["client_disconnected"] is True
    assert record["finish_reason"] == "abort"
    assert record["completion_tokens"] == seen == 5


async def test_sim_client_disconnect_while_waiting_for_whole_answer_records_abort(tokenizer):
    async with live_sim(tokenizer, tokens_per_second=20, completion_tokens=100) as (client, app):
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/v1/chat/completions", json=chat(), headers={"x-request-id": "w1"}, timeout=0.2)
        record = await served_record(app, "w1")
    assert (record["finish_reason"], record["completion_tokens"], record["status"]) == ("abort", 0, 0)
    assert record["client_disconnected"] is True


async def test_sim_slow_start_delays_the_response_headers(tokenizer):
    async with live_sim(tokenizer, Faults(slow_start_seconds=0.2), completion_tokens=2, **FAST) as (client, _):
        started = time.monotonic()
        response = await client.post("/v1/chat/completions", json=chat())
        elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert elapsed >= 0.2


async def test_sim_faults_endpoint_changes_knobs_at_runtime(tokenizer):
    async with live_sim(tokenizer, **FAST) as (client, app):
        assert (await client.get("/health")).status_code == 200
        changed = await client.put("/sim/faults", json={"unhealthy": True, "error_rate": 0.25})
        health = await client.get("/health")
        rejected = await client.put("/sim/faults", json={"error_rate": 2})
        unknown = await client.put("/sim/faults", json={"explode": True})
        current = (await client.get("/sim/faults")).json()
    assert changed.json()["unhealthy"] is True
    assert health.status_code == 503
    assert health.content == b""
    assert rejected.status_code == 400
    assert unknown.status_code == 400
    assert current == {
        "error_rate": 0.25,
        "die_after_tokens": None,
        "stall_after_tokens": None,
        "slow_start_seconds": 0.0,
        "in_band_error_after_tokens": None,
        "unhealthy": True,
    }
    assert app.state.faults.error_rate == 0.25


async def test_sim_served_endpoint_lists_and_clears_records(tokenizer):
    async with live_sim(tokenizer, completion_tokens=2, **FAST) as (client, _):
        await client.post("/v1/chat/completions", json=chat(), headers={"x-request-id": "a"})
        listed = (await client.get("/sim/served")).json()
        cleared = await client.delete("/sim/served")
        after = (await client.get("/sim/served")).json()
    assert [record["request_id"] for record in listed] == ["a"]
    assert cleared.status_code == 204
    assert after == []


async def test_sim_tokenize_equals_the_counter(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
    async with live_sim(tokenizer, **FAST) as (client, _):
        chat_tokens = (await client.post("/tokenize", json={"model": MODEL, "messages": messages})).json()
        tool_tokens = (await client.post("/tokenize", json={"messages": messages, "tools": [WEATHER_TOOL]})).json()
        prompt_tokens = (await client.post("/tokenize", json={"prompt": "Hello"})).json()
        unknown = await client.post("/tokenize", json={"model": "nope", "prompt": "Hello"})
    assert chat_tokens["count"] == len(chat_tokens["tokens"]) == count_chat_prompt_tokens(tokenizer, messages)
    assert chat_tokens["max_model_len"] == 32768
    assert tool_tokens["count"] == count_chat_prompt_tokens(tokenizer, messages, [WEATHER_TOOL])
    assert prompt_tokens["tokens"] == [128000, 9906]
    assert unknown.status_code == 404


async def test_sim_metrics_expose_vllm_load_and_token_counters(tokenizer):
    async with live_sim(tokenizer, completion_tokens=3, **FAST) as (client, _):
        await client.post("/v1/chat/completions", json=chat())
        await client.post("/v1/completions", json={"prompt": "Hello"})
        text = (await client.get("/metrics")).text
    samples = {
        sample.name: sample
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("vllm:")
    }
    assert samples["vllm:prompt_tokens_total"].value == 36 + 2
    assert samples["vllm:generation_tokens_total"].value == 6
    assert samples["vllm:num_requests_running"].value == 0
    assert samples["vllm:num_requests_waiting"].value == 0
    assert samples["vllm:kv_cache_usage_perc"].value == 0
    assert samples["vllm:num_requests_running"].labels == {"model_name": MODEL, "engine": "0"}


async def test_sim_two_apps_in_one_process_do_not_share_state(tokenizer):
    first = create_sim_app(SimConfig(**FAST), tokenizer, Faults(unhealthy=True))
    second = create_sim_app(SimConfig(**FAST), tokenizer)
    assert first.state.faults is not second.state.faults
    assert first.state.served is not second.state.served
    assert first.state.registry is not second.state.registry


async def batch_load(client: httpx.AsyncClient) -> tuple[float, float]:
    """``(vllm:num_requests_running, vllm:num_requests_waiting)`` as ``/metrics`` reports them now."""
    text = (await client.get("/metrics")).text
    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.labels == {"model_name": MODEL, "engine": "0"}
    }
    return values["vllm:num_requests_running"], values["vllm:num_requests_waiting"]


async def wait_for_load(client: httpx.AsyncClient, running: int, waiting: int, deadline_seconds: float = 3.0) -> None:
    deadline = time.monotonic() + deadline_seconds
    while (load := await batch_load(client)) != (running, waiting):
        assert time.monotonic() < deadline, f"load {load}, expected {(running, waiting)}"
        await asyncio.sleep(0.01)


async def test_sim_max_num_seqs_runs_that_many_and_queues_the_rest_in_order(tokenizer):
    # 10 tokens at 20/s: about half a second per request, time enough to queue the others behind the first two.
    async with live_sim(tokenizer, max_num_seqs=2, tokens_per_second=20, completion_tokens=10) as (client, app):
        streams = []
        for index in range(5):  # one at a time, so the arrival order is known
            streams.append(asyncio.create_task(stream_chat(client, chat(stream=True), f"q{index}")))
            await wait_for_load(client, min(index + 1, 2), max(index - 1, 0))
        assert await batch_load(client) == (2, 3)
        answers = await asyncio.gather(*streams)
        await wait_for_load(client, 0, 0)
        records = list(app.state.served)
    assert all(events[-1] == "[DONE]" for events in answers)
    assert [(record["finish_reason"], record["completion_tokens"]) for record in records] == [("stop", 10)] * 5
    finished = [record["request_id"] for record in records]
    assert set(finished[:2]) == {"q0", "q1"}
    assert set(finished[2:4]) == {"q2", "q3"}
    assert finished[4] == "q4"


async def test_sim_max_num_seqs_waiting_client_that_leaves_gives_up_its_place(tokenizer):
    async with live_sim(tokenizer, max_num_seqs=1, tokens_per_second=20, completion_tokens=10) as (client, app):
        first = asyncio.create_task(stream_chat(client, chat(stream=True), "runs"))
        await wait_for_load(client, 1, 0)
        headers = {"x-request-id": "leaves"}
        leaver = asyncio.create_task(client.post("/v1/chat/completions", json=chat(), headers=headers))
        await wait_for_load(client, 1, 1)
        last = asyncio.create_task(stream_chat(client, chat(stream=True), "last"))
        await wait_for_load(client, 1, 2)
        leaver.cancel()  # httpx closes the connection
        left = await served_record(app, "leaves")
        assert await batch_load(client) == (1, 1)
        assert not first.done()
        answers = await asyncio.gather(first, last)
        await wait_for_load(client, 0, 0)
        records = list(app.state.served)
    assert (left["finish_reason"], left["completion_tokens"], left["status"]) == ("abort", 0, 0)
    assert left["client_disconnected"] is True
    assert left["prompt_tokens"] == 36
    assert all(events[-1] == "[DONE]" for events in answers)
    assert [record["request_id"] for record in records] == ["leaves", "runs", "last"]
    assert [record["finish_reason"] for record in records] == ["abort", "stop", "stop"]


async def test_sim_max_num_seqs_zero_means_no_limit_and_negative_is_rejected(tokenizer):
    async with live_sim(tokenizer, tokens_per_second=20, completion_tokens=10) as (client, _):
        streams = [asyncio.create_task(stream_chat(client, chat(stream=True), f"u{index}")) for index in range(4)]
        await wait_for_load(client, 4, 0)
        await asyncio.gather(*streams)
    with pytest.raises(ValueError, match="max_num_seqs"):
        SimConfig(max_num_seqs=-1)


def test_sim_cli_passes_max_num_seqs():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config, _ = build_config(parser.parse_args(["--max-num-seqs", "4"]))
    default, _ = build_config(parser.parse_args([]))
    assert (config.max_num_seqs, default.max_num_seqs) == (4, 0)


async def test_sim_stops_at_the_stop_string_completed_first(tokenizer):
    """As vLLM: the answer ends before the stop string that is complete first, even if another began earlier;
    ``stop_reason`` names it, and its tokens are counted though not shown."""
    words = CORPUS.split(" ")
    middle = len(words) // 2
    begins_first, ends_first = " ".join(words[middle : middle + 6]), " ".join(words[middle + 2 : middle + 4])
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 1000, "stop": [begins_first, ends_first]}
    async with live_sim(tokenizer, completion_tokens=1000, **FAST) as (client, _):
        choice = (await client.post("/v1/chat/completions", json=body)).json()["choices"][0]
        record = (await client.get("/sim/served")).json()[0]
    text = choice["message"]["content"]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == ends_first
    assert ends_first not in text and text + ends_first in CORPUS + CORPUS  # the window wraps around the corpus
    assert tokenizer.count(text) < record["completion_tokens"] <= tokenizer.count(text + ends_first) + 1
