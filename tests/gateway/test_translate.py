"""The Workers AI → vLLM request mapping (README "Parameter mapping")."""

from __future__ import annotations

from typing import Any

from gateway.translate import to_vllm_request, workers_ai_tool_calls
from gateway.validate import InferenceJob

SERVED = "meta-llama/Llama-3.1-8B-Instruct"


def job(**fields: Any) -> InferenceJob:
    base: dict[str, Any] = {
        "model": "m",
        "form": "prompt",
        "stream": False,
        "max_tokens": 256,
        "temperature": 0.6,
        "prompt": "Hello",
    }
    return InferenceJob(**{**base, **fields})


def test_translate_prompt_becomes_one_user_message_with_defaults_sent() -> None:
    path, body = to_vllm_request(job(), SERVED)
    assert path == "/v1/chat/completions"
    assert body == {
        "model": SERVED,
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 256,
        "temperature": 0.6,
    }


def test_translate_raw_prompt_goes_to_completions_and_avoids_a_second_bos() -> None:
    path, body = to_vllm_request(job(raw=True), SERVED)
    assert path == "/v1/completions" and body["prompt"] == "Hello" and "add_special_tokens" not in body
    _, prefixed = to_vllm_request(job(raw=True, prompt="<|begin_of_text|>Hi"), SERVED)
    assert prefixed["add_special_tokens"] is False


def test_translate_narrows_ranges_vllm_refuses() -> None:
    _, body = to_vllm_request(job(temperature=4.5, sampling={"top_p": 1.7, "repetition_penalty": 0}), SERVED)
    assert body["temperature"] == 2.0 and body["top_p"] == 1.0 and "repetition_penalty" not in body
    _, greedy = to_vllm_request(job(temperature=0.9, sampling={"top_p": 0}), SERVED)
    assert greedy["temperature"] == 0.0 and "top_p" not in greedy
    sampling = {"top_k": 5, "seed": 9, "frequency_penalty": 1.5, "presence_penalty": 0.5, "repetition_penalty": 1.2}
    _, passed = to_vllm_request(job(sampling=sampling), SERVED)
    assert {name: passed[name] for name in sampling} == sampling


def test_translate_stream_asks_for_continuous_usage() -> None:
    _, body = to_vllm_request(job(stream=True), SERVED)
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert "stream_options" not in to_vllm_request(job(), SERVED)[1]


def test_translate_tools_flat_become_openai_shape_and_empty_is_dropped() -> None:
    flat = {"name": "f", "description": "d", "parameters": {"type": "object", "properties": {}}}
    messages = ({"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": []})
    _, body = to_vllm_request(job(form="messages", prompt=None, messages=messages, tools=(flat,)), SERVED)
    assert body["tools"] == [{"type": "function", "function": flat}]
    assert body["messages"][1] == {"role": "assistant", "content": ""}
    _, none = to_vllm_request(job(form="messages", prompt=None, messages=messages[:1], tools=()), SERVED)
    assert "tools" not in none


def test_translate_lora_and_response_format() -> None:
    assert to_vllm_request(job(lora="my-adapter"), SERVED)[1]["model"] == "my-adapter"
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    _, wrapped = to_vllm_request(job(response_format={"type": "json_schema", "json_schema": schema}), SERVED)
    assert wrapped["response_format"] == {"type": "json_schema", "json_schema": {"name": "response", "schema": schema}}
    openai_shape = {"name": "x", "schema": schema}
    _, kept = to_vllm_request(job(response_format={"type": "json_schema", "json_schema": openai_shape}), SERVED)
    assert kept["response_format"]["json_schema"] == openai_shape
    _, plain = to_vllm_request(job(response_format={"type": "json_object"}), SERVED)
    assert plain["response_format"] == {"type": "json_object"}


def test_translate_tool_calls_back_to_workers_ai_shape() -> None:
    calls = [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
        {"id": "2", "type": "function", "function": {"name": "g", "arguments": "not json"}},
    ]
    assert workers_ai_tool_calls(calls) == [
        {"name": "f", "arguments": {"a": 1}},
        {"name": "g", "arguments": "not json"},
    ]
