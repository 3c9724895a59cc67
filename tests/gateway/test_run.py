"""The native endpoint end to end, in process, against a simulated vLLM worker on a real socket."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from redis.asyncio import Redis

from billing import KeyStore, Tokenizer, count_chat_prompt_tokens, format_usd
from tests.conftest import (
    FP8_MODEL,
    TENANT,
    WEATHER_TOOL as TOOL,
    Gateway,
    SimWorker,
    content_tokens,
    gateway_for,
    sim_worker,
    sse_events,
    wait_for,
)

USER = [{"role": "user", "content": "Hello"}]


async def assert_billed(gateway: Gateway, request_id: str, prompt: int, completion: int, status: str = "ok") -> None:
    [event] = [e for e in await gateway.deps.ledger.events(TENANT) if e["request_id"] == request_id]
    model = gateway.deps.settings.models[event["model"]]
    assert (int(event["prompt_tokens"]), int(event["completion_tokens"])) == (prompt, completion)
    assert int(event["cost_nano_usd"]) == (
        prompt * model.prompt_nano_usd_per_token + completion * model.completion_nano_usd_per_token
    )
    assert event["status"] == status


async def test_run_prompt_returns_the_workers_ai_envelope_and_bills_it(gateway: Gateway, worker: SimWorker) -> None:
    response = await gateway.run({"prompt": "Tell me a story", "max_tokens": 20})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    payload = response.json()
    assert list(payload) == ["result", "success", "errors", "messages"]
    assert payload["success"] is True and payload["errors"] == [] and payload["messages"] == []
    result = payload["result"]
    assert isinstance(result["response"], str) and result["response"]
    assert result["tool_calls"] == []
    request_id = response.headers["x-request-id"]
    served = worker.record_for(request_id)
    usage = result["usage"]
    cost = 280 * served["prompt_tokens"] + 830 * served["completion_tokens"]
    assert usage == {
        "prompt_tokens": served["prompt_tokens"],
        "completion_tokens": served["completion_tokens"],
        "total_tokens": served["prompt_tokens"] + served["completion_tokens"],
        "cost_nano_usd": cost,
        "cost_usd": format_usd(cost),
    }
    assert response.headers["x-tollgate-prompt-tokens"] == str(served["prompt_tokens"])
    assert response.headers["x-tollgate-completion-tokens"] == str(served["completion_tokens"])
    assert response.headers["x-tollgate-total-tokens"] == str(usage["total_tokens"])
    assert response.headers["x-tollgate-cost-nano-usd"] == str(cost)
    assert response.headers["x-tollgate-cost-usd"] == format_usd(cost)
    assert served["prompt_tokens"] == count_chat_prompt_tokens(
        gateway.deps.tokenizer, [{"role": "user", "content": "Tell me a story"}]
    )
    await assert_billed(gateway, request_id, usage["prompt_tokens"], usage["completion_tokens"])


async def test_run_stream_relays_workers_ai_events_then_usage_then_done(gateway: Gateway, worker: SimWorker) -> None:
    response = await gateway.run({"messages": USER, "stream": True, "max_tokens": 24})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    usage_event = events[-2]
    assert set(usage_event) == {"response", "usage"} and usage_event["response"] == ""
    assert response.headers["x-tollgate-prompt-tokens"] == "36"
    content = events[:-2]
    assert content, "no content events"
    for event in content:
        assert list(event) == ["response", "tool_calls", "p"]
        assert event["response"] and event["tool_calls"] == []
        assert "abcdefghijklmnopqrstuvwxyz".startswith(event["p"][:26])
    served = worker.record_for(response.headers["x-request-id"])
    assert usage_event["usage"]["completion_tokens"] == served["completion_tokens"]
    assert usage_event["usage"]["prompt_tokens"] == served["prompt_tokens"] == 36
    cost = 36 * 280 + served["completion_tokens"] * 830
    assert usage_event["usage"]["cost_nano_usd"] == cost and usage_event["usage"]["cost_usd"] == format_usd(cost)
    joined = "".join(event["response"] for event in content)
    # 11 text tokens; re-tokenizing the text may differ by one where a character spans two tokens
    assert content_tokens(served) == 11 and abs(gateway.deps.tokenizer.count(joined) - 11) <= 1
    await assert_billed(gateway, response.headers["x-request-id"], 36, served["completion_tokens"])


async def test_run_prompt_stream_events_have_no_tool_calls_key(gateway: Gateway) -> None:
    response = await gateway.run({"prompt": "Hi", "stream": True, "max_tokens": 5})
    content = sse_events(response.text)[:-2]
    assert content and all(list(event) == ["response", "p"] for event in content)


@pytest.mark.parametrize(
    "path",
    [
        "/client/v4/accounts/{a}/ai/run/@cf%2Fmeta%2Fllama-3.1-8b-instruct",
        "/client/v4/accounts/{a}/ai/run/@cf/meta/llama-3.1-8b-instruct",
        "/accounts/{a}/ai/run/@cf/meta/llama-3.1-8b-instruct",
        "/accounts/{a}/ai/run/%40cf%2Fmeta%2Fllama-3.1-8b-instruct",
    ],
)
async def test_run_model_segment_may_be_percent_encoded(gateway: Gateway, path: str) -> None:
    response = await gateway.client.post(path.format(a=TENANT), json={"prompt": "hi"}, headers=gateway.auth)
    assert response.status_code == 200, response.text


async def test_run_fp8_model_goes_to_its_served_name_and_price(gateway: Gateway, worker: SimWorker) -> None:
    response = await gateway.run({"prompt": "hi", "max_tokens": 4}, model=FP8_MODEL)
    assert response.status_code == 200
    served = worker.record_for(response.headers["x-request-id"])
    assert served["model"] == "meta-llama/Llama-3.1-8B-Instruct-FP8"
    usage = response.json()["result"]["usage"]
    await assert_billed(gateway, response.headers["x-request-id"], usage["prompt_tokens"], usage["completion_tokens"])


async def test_run_default_max_tokens_is_sent_and_honoured(tokenizer: Tokenizer, redis: Redis, redis_url: str) -> None:
    async with (
        sim_worker(tokenizer, tokens_per_second=0, time_to_first_token_seconds=0, completion_tokens=10_000) as sim,
        gateway_for(redis_url, tokenizer, [sim.url]) as gateway,
    ):
        response = await gateway.run({"prompt": "Write at length"})
        assert response.json()["result"]["usage"]["completion_tokens"] == 256
        assert sim.record_for(response.headers["x-request-id"])["finish_reason"] == "length"


async def test_run_raw_prompt_goes_to_completions_with_bos_counted(gateway: Gateway, worker: SimWorker) -> None:
    response = await gateway.run({"prompt": "Hello", "raw": True, "max_tokens": 3})
    assert response.status_code == 200
    served = worker.record_for(response.headers["x-request-id"])
    assert served["endpoint"] == "/v1/completions" and served["prompt_tokens"] == 2
    prefixed = await gateway.run({"prompt": "<|begin_of_text|>Hello", "raw": True, "max_tokens": 3})
    assert worker.record_for(prefixed.headers["x-request-id"])["prompt_tokens"] == 2


async def test_run_tool_call_comes_back_in_workers_ai_shape(gateway: Gateway) -> None:
    body = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [TOOL]}
    result = (await gateway.run(body)).json()["result"]
    [call] = result["tool_calls"]
    assert call["name"] == "get_weather" and isinstance(call["arguments"], dict) and "city" in call["arguments"]
    assert result["response"] == ""
    streamed = sse_events((await gateway.run({**body, "stream": True})).text)
    [tool_event] = [event for event in streamed if isinstance(event, dict) and event.get("tool_calls")]
    assert list(tool_event) == ["response", "tool_calls"] and tool_event["response"] == ""
    [streamed_call] = tool_event["tool_calls"]
    assert streamed_call["name"] == "get_weather" and set(streamed_call["arguments"]) == {"city"}
    assert streamed[-2]["usage"]["completion_tokens"] > 0


async def test_run_json_mode_returns_an_object(gateway: Gateway) -> None:
    body = {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {"type": "object"}}}
    response = await gateway.run(body)
    assert response.status_code == 200
    assert isinstance(response.json()["result"]["response"], dict)


async def test_run_response_headers_carry_a_fresh_request_id(gateway: Gateway) -> None:
    headers = {**gateway.auth, "x-request-id": "client-chosen"}
    first = await gateway.client.post(gateway.run_path(), json={"prompt": "hi"}, headers=headers)
    second = await gateway.client.post(gateway.run_path(), json={"prompt": "hi"}, headers=headers)
    ids = {first.headers["x-request-id"], second.headers["x-request-id"], "client-chosen"}
    assert len(ids) == 3
    refused = await gateway.client.post(gateway.run_path(), json={}, headers=gateway.auth)
    assert len(refused.headers["x-request-id"]) == 32


# -- auth ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Bearer not-a-key",
        "Bearer tg_aaaaaaaaaaaa_" + "A" * 43,
        "bearer tg_bbbbbbbbbbbb_" + "B" * 43,
    ],
    ids=["missing", "empty", "no-token", "blank-token", "basic", "malformed", "unknown", "unknown-lowercase"],
)
async def test_auth_bad_key_is_10000_and_reaches_no_worker(
    gateway: Gateway, worker: SimWorker, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = await gateway.client.post(gateway.run_path(), json={"prompt": "hi"}, headers=headers)
    assert response.status_code == 401
    assert response.json() == {
        "result": None,
        "success": False,
        "errors": [{"code": 10000, "message": "Authentication error"}],
        "messages": [],
    }
    assert worker.served == []
    assert await gateway.deps.ledger.events(TENANT) == []


async def test_auth_key_only_works_on_its_own_account(gateway: Gateway, worker: SimWorker, redis: Redis) -> None:
    other = await KeyStore(redis).create("acct-other")
    path = gateway.run_path()  # TENANT's path
    response = await gateway.client.post(
        path, json={"prompt": "hi"}, headers={"Authorization": f"Bearer {other.secret_key}"}
    )
    assert response.status_code == 404
    [error] = response.json()["errors"]
    assert error["code"] == 7003 and path in error["message"]
    assert worker.served == []
    assert await gateway.deps.ledger.events("acct-other") == []


async def test_auth_revoked_key_stops_working_within_the_cache_ttl(
    tokenizer: Tokenizer, redis: Redis, redis_url: str, worker: SimWorker
) -> None:
    async with gateway_for(redis_url, tokenizer, [worker.url], TOLLGATE_AUTH__CACHE_TTL_SECONDS="0.2") as gateway:
        assert (await gateway.run({"prompt": "hi"})).status_code == 200
        assert await gateway.deps.keys.revoke(gateway.key.record.key_id)
        for _ in range(50):
            response = await gateway.run({"prompt": "hi"})
            if response.status_code == 401:
                break
            await asyncio.sleep(0.05)
        assert response.status_code == 401


async def test_auth_wrong_secret_for_a_real_key_id_is_refused(gateway: Gateway) -> None:
    forged = gateway.key.secret_key[:-4] + "AAAA"
    response = await gateway.client.post(
        gateway.run_path(), json={"prompt": "hi"}, headers={"Authorization": f"Bearer {forged}"}
    )
    assert response.status_code == 401


# -- routing and method errors ---------------------------------------------------------------------------------


async def test_unknown_route_and_wrong_method_use_the_envelope(gateway: Gateway) -> None:
    missing = await gateway.client.get("/client/v4/accounts/x/ai/nothing")
    assert missing.status_code == 404 and missing.json()["errors"][0]["code"] == 7003
    wrong = await gateway.client.get(gateway.run_path(), headers=gateway.auth)
    assert wrong.status_code == 405 and wrong.json()["errors"][0]["code"] == 7001


# -- worker failures -------------------------------------------------------------------------------------------


async def test_worker_error_before_any_byte_is_retried_on_another_worker(
    tokenizer: Tokenizer, redis: Redis, redis_url: str
) -> None:
    fast = {"tokens_per_second": 0, "time_to_first_token_seconds": 0}
    async with sim_worker(tokenizer, **fast) as broken, sim_worker(tokenizer, **fast) as healthy:
        broken.faults.error_rate = 1.0
        async with gateway_for(redis_url, tokenizer, [broken.url, healthy.url]) as gateway:
            for _ in range(20):  # the broken worker is drawn first about every other time until it is ejected
                response = await gateway.run({"prompt": "hi", "max_tokens": 5})
                assert response.status_code == 200
                request_id = response.headers["x-request-id"]
                usage = response.json()["result"]["usage"]
                assert healthy.record_for(request_id)["completion_tokens"] == usage["completion_tokens"]
                await assert_billed(gateway, request_id, usage["prompt_tokens"], usage["completion_tokens"])
            assert len(broken.served) >= 1  # it was tried, failed, and nothing of it was billed


async def test_worker_down_is_503_and_costs_nothing(tokenizer: Tokenizer, redis: Redis, redis_url: str) -> None:
    async with gateway_for(redis_url, tokenizer, ["http://127.0.0.1:9"]) as gateway:
        response = await gateway.run({"prompt": "hi"})
        assert response.status_code == 503
        assert response.json()["errors"][0]["code"] == 5503
        await assert_billed(gateway, response.headers["x-request-id"], 0, 0, status="upstream_unavailable")


async def test_worker_500_on_every_worker_is_502(gateway: Gateway, worker: SimWorker) -> None:
    worker.faults.error_rate = 1.0
    response = await gateway.run({"prompt": "hi", "stream": True})
    assert response.status_code == 502
    assert response.headers["content-type"] == "application/json"
    assert response.json()["errors"][0]["code"] == 5502
    await assert_billed(gateway, response.headers["x-request-id"], 0, 0, status="upstream_error")


def fault_fired_at(served_tokens: int, threshold: int) -> bool:
    """A token fault fires once at least ``threshold`` tokens went out; the frame that crossed it may carry two or
    three tokens where a character spans them (the simulated worker's corpus has emoji)."""
    return threshold <= served_tokens <= threshold + 2


async def test_worker_in_band_error_ends_the_stream_with_an_error_event(gateway: Gateway, worker: SimWorker) -> None:
    worker.faults.in_band_error_after_tokens = 3
    response = await gateway.run({"messages": USER, "stream": True, "max_tokens": 50})
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    error = events[-2]
    assert error["success"] is False and error["errors"][0]["code"] == 5502
    assert not any("usage" in event for event in events if isinstance(event, dict))
    delivered = "".join(event.get("response", "") for event in events[:-2])
    served = worker.record_for(response.headers["x-request-id"])["completion_tokens"]
    assert fault_fired_at(served, 3) and abs(gateway.deps.tokenizer.count(delivered) - served) <= 1
    await assert_billed(gateway, response.headers["x-request-id"], 36, served, status="upstream_error")


async def test_worker_death_mid_stream_bills_what_was_delivered(gateway: Gateway, worker: SimWorker) -> None:
    worker.faults.die_after_tokens = 5
    response = await gateway.run({"messages": USER, "stream": True, "max_tokens": 50})
    events = sse_events(response.text)
    assert events[-1] == "[DONE]" and events[-2]["errors"][0]["code"] == 5502
    served = worker.record_for(response.headers["x-request-id"])["completion_tokens"]
    assert fault_fired_at(served, 5)
    await assert_billed(gateway, response.headers["x-request-id"], 36, served, status="upstream_error")


async def test_worker_stall_mid_stream_times_out_and_bills_what_was_delivered(
    tokenizer: Tokenizer, redis: Redis, redis_url: str, worker: SimWorker
) -> None:
    worker.faults.stall_after_tokens = 4
    async with gateway_for(
        redis_url, tokenizer, [worker.url], TOLLGATE_UPSTREAM__BETWEEN_TOKENS_TIMEOUT_SECONDS="0.3"
    ) as gateway:
        response = await gateway.run({"messages": USER, "stream": True, "max_tokens": 50})
        events = sse_events(response.text)
        assert events[-2]["errors"][0]["code"] == 5504
        request_id = response.headers["x-request-id"]
        await wait_for(lambda: any(record["request_id"] == request_id for record in worker.served))  # sees the close
        served = worker.record_for(request_id)["completion_tokens"]
        assert fault_fired_at(served, 4)
        await assert_billed(gateway, response.headers["x-request-id"], 36, served, status="upstream_timeout")


async def test_worker_malformed_answer_is_502(redis: Redis, redis_url: str, tokenizer: Tokenizer) -> None:
    def garbage(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"not json")

    http = httpx.AsyncClient(transport=httpx.MockTransport(garbage))
    async with gateway_for(redis_url, tokenizer, ["http://worker.test"], http=http) as gateway:
        response = await gateway.run({"prompt": "hi"})
        assert response.status_code == 502 and response.json()["errors"][0]["code"] == 5502
        await assert_billed(gateway, response.headers["x-request-id"], 0, 0, status="upstream_error")


# -- untrusted worker answers ------------------------------------------------------------------------------------


def fake_worker(answer: bytes, content_type: str = "application/json") -> httpx.AsyncClient:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=answer, headers={"content-type": content_type})

    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


@pytest.mark.parametrize(
    "answer",
    [
        b'{"choices": [{"message": "hi"}]}',
        b'{"choices": ["x"]}',
        b'{"choices": {"message": {}}}',
        b'{"choices": []}',
        b'{"choices": [{"message": {"content": 5}}]}',
        b'{"choices": [{"message": {"content": null, "tool_calls": [{"function": "f"}]}}]}',
        b"[1, 2]",
    ],
)
async def test_worker_malformed_whole_answer_is_502_and_costs_nothing(
    redis: Redis, redis_url: str, tokenizer: Tokenizer, answer: bytes
) -> None:
    async with gateway_for(redis_url, tokenizer, ["http://worker.test"], http=fake_worker(answer)) as gateway:
        response = await gateway.run({"prompt": "hi"})
        assert response.status_code == 502
        assert response.json()["errors"][0]["code"] == 5502
        await assert_billed(gateway, response.headers["x-request-id"], 0, 0, status="upstream_error")


@pytest.mark.parametrize("stream", [False, True])
async def test_worker_tool_call_arguments_nested_too_deep_pass_as_its_string(
    redis: Redis, redis_url: str, tokenizer: Tokenizer, stream: bool
) -> None:
    """Arguments too deep to parse are not JSON to the gateway: passed on as the worker's string, and billed."""
    arguments = "[" * 5000 + "]" * 5000
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}
    usage = {"completion_tokens": 3}
    if stream:
        chunk = {"choices": [{"delta": {"tool_calls": [{"index": 0, **call}]}, "finish_reason": "tool_calls"}]}
        answer = b"data: " + json.dumps({**chunk, "usage": usage}).encode() + b"\n\ndata: [DONE]\n\n"
        http = fake_worker(answer, "text/event-stream")
    else:
        message = {"role": "assistant", "content": None, "tool_calls": [call]}
        answer = {"choices": [{"message": message, "finish_reason": "tool_calls"}], "usage": usage}
        http = fake_worker(json.dumps(answer).encode())
    async with gateway_for(redis_url, tokenizer, ["http://worker.test"], http=http) as gateway:
        response = await gateway.run({"messages": USER, "tools": [TOOL], "stream": stream})
        assert response.status_code == 200
        if stream:
            [result] = [
                event for event in sse_events(response.text) if isinstance(event, dict) and event.get("tool_calls")
            ]
        else:
            result = response.json()["result"]
        assert result["tool_calls"] == [{"name": "f", "arguments": arguments}]
        prompt_tokens = int(response.headers["x-tollgate-prompt-tokens"])  # the gateway's count (the tool included)
        await assert_billed(gateway, response.headers["x-request-id"], prompt_tokens, 3)


@pytest.mark.parametrize(
    "bad_chunk",
    [
        b'{"choices": ["x"]}',
        b'{"choices": [{"delta": "x"}]}',
        b'{"choices": [{"delta": {"content": 7}}]}',
        b'{"choices": [{"delta": {"tool_calls": [{"index": "a", "function": {"name": "f"}}]}}]}',
        b'{"choices": [{"delta": {"tool_calls": {"index": 0}}}]}',
        b"not json",
    ],
)
async def test_worker_malformed_stream_chunk_ends_the_stream_with_an_error_event(
    redis: Redis, redis_url: str, tokenizer: Tokenizer, bad_chunk: bytes
) -> None:
    good = b'{"choices": [{"delta": {"content": "Hello"}}], "usage": {"prompt_tokens": 36, "completion_tokens": 1}}'
    stream = b"data: " + good + b"\n\ndata: " + bad_chunk + b"\n\ndata: [DONE]\n\n"
    http = fake_worker(stream, "text/event-stream")
    async with gateway_for(redis_url, tokenizer, ["http://worker.test"], http=http) as gateway:
        response = await gateway.run({"messages": USER, "stream": True})
        assert response.status_code == 200
        events = sse_events(response.text)
        assert events[0]["response"] == "Hello"
        assert events[-1] == "[DONE]" and events[-2]["errors"][0]["code"] == 5502
        await assert_billed(gateway, response.headers["x-request-id"], 36, 1, status="upstream_error")


async def test_worker_unknown_lora_adapter_is_a_400_naming_the_field(gateway: Gateway, worker: SimWorker) -> None:
    response = await gateway.run({"prompt": "hi", "lora": "no-such-adapter"})
    assert response.status_code == 400
    [error] = response.json()["errors"]
    assert error["code"] == 5006 and "'/lora'" in error["message"] and "no-such-adapter" in error["message"]


async def test_worker_non_streaming_answer_may_take_longer_than_the_between_tokens_timeout(
    tokenizer: Tokenizer, redis: Redis, redis_url: str
) -> None:
    async with sim_worker(tokenizer, tokens_per_second=20, time_to_first_token_seconds=0, completion_tokens=12) as sim:
        slow_env = {
            "TOLLGATE_UPSTREAM__BETWEEN_TOKENS_TIMEOUT_SECONDS": "0.2",
            "TOLLGATE_UPSTREAM__TOTAL_TIMEOUT_SECONDS": "5",
        }
        async with gateway_for(redis_url, tokenizer, [sim.url], **slow_env) as gateway:
            response = await gateway.run({"prompt": "hi", "max_tokens": 20})
            assert response.status_code == 200, response.text
        too_slow = {**slow_env, "TOLLGATE_UPSTREAM__TOTAL_TIMEOUT_SECONDS": "0.2"}
        async with gateway_for(redis_url, tokenizer, [sim.url], **too_slow) as gateway:
            response = await gateway.run({"prompt": "hi", "max_tokens": 20})
            assert response.status_code == 504 and response.json()["errors"][0]["code"] == 5504


async def test_auth_redis_unreachable_is_a_503_not_a_500(tokenizer: Tokenizer, worker: SimWorker) -> None:
    dead_redis = "redis://127.0.0.1:9/0"
    async with gateway_for(dead_redis, tokenizer, [worker.url], skip_key=True) as gateway:
        response = await gateway.client.post(
            gateway.run_path(), json={"prompt": "hi"}, headers={"Authorization": "Bearer tg_aaaaaaaaaaaa_" + "A" * 43}
        )
        assert response.status_code == 503
        assert response.json()["errors"][0]["code"] == 5530
        assert worker.served == []
