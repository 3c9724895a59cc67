"""Translation between the Workers AI contract and the vLLM (OpenAI-compatible) worker API.

Request mapping (../shared/spec/upstream-vllm.md §2); README "Parameter mapping" documents it for users:

=====================  ==========================================================================================
Workers AI             sent to the worker
=====================  ==========================================================================================
messages               ``/v1/chat/completions`` ``messages`` as given (empty ``tool_calls`` lists removed)
prompt, raw false      ``/v1/chat/completions`` with one user message
prompt, raw true       ``/v1/completions`` ``prompt`` as is; ``add_special_tokens: false`` when it already starts
                       with ``<|begin_of_text|>`` (otherwise the worker adds a second BOS)
max_tokens             always sent (default 256)
temperature            always sent (default 0.6); clipped to vLLM's [0, 2]
top_p                  omitted when absent; (1, 2] → 1.0; 0 → greedy (``temperature: 0``, no ``top_p``)
repetition_penalty     0 → omitted (vLLM requires > 0; 1.0 means off), otherwise as is
top_k, seed,           as is
frequency_penalty,
presence_penalty
response_format        ``json_object`` as is; ``json_schema`` holding the schema itself is wrapped as
                       ``{"name": "response", "schema": <schema>}`` (an OpenAI-shaped one passes unchanged)
tools                  flat tools converted to ``{"type": "function", "function": {...}}``; an empty list dropped
tool_choice, stop      (OpenAI routes only) as given; ``tool_choice`` only with tools
lora                   ``model: <adapter>``; otherwise ``model: <served name>``
stream                 as is, with ``stream_options: {include_usage, continuous_usage_stats}`` so that every
                       chunk carries the running usage and a cut stream can still be metered
options                not forwarded (gateway-side only)
=====================  ==========================================================================================
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

from gateway.validate import InferenceJob

BOS_TEXT: Final = "<|begin_of_text|>"
VLLM_MAX_TEMPERATURE: Final = 2.0


def upstream_messages(job: InferenceJob) -> list[dict[str, Any]]:
    """The chat messages the worker will render (the prompt form is one user message)."""
    if job.form == "prompt":
        return [{"role": "user", "content": job.prompt}]
    messages = []
    for message in job.messages:
        if "tool_calls" in message and not message["tool_calls"]:
            message = {key: value for key, value in message.items() if key != "tool_calls"}
        messages.append(dict(message))
    return messages


def upstream_tools(job: InferenceJob) -> list[dict[str, Any]]:
    """Tools in the OpenAI shape vLLM expects, key order ``type, function{name, description, parameters}``."""
    tools = []
    for tool in job.tools:
        function = tool.get("function", tool)
        tools.append(
            {
                "type": "function",
                "function": {
                    "name": function["name"],
                    "description": function.get("description"),
                    "parameters": function.get("parameters"),
                },
            }
        )
    return tools


def is_bos_prefixed(job: InferenceJob) -> bool:
    return job.raw and (job.prompt or "").startswith(BOS_TEXT)


def to_vllm_request(job: InferenceJob, served_name: str) -> tuple[str, dict[str, Any]]:
    """The worker path and JSON body for ``job``."""
    body: dict[str, Any] = {"model": job.lora or served_name}
    if job.raw:
        path = "/v1/completions"
        body["prompt"] = job.prompt
        if is_bos_prefixed(job):
            body["add_special_tokens"] = False
    else:
        path = "/v1/chat/completions"
        body["messages"] = upstream_messages(job)
        tools = upstream_tools(job)
        if tools:
            body["tools"] = tools
            if job.tool_choice is not None:
                body["tool_choice"] = job.tool_choice
    body["max_tokens"] = job.max_tokens
    body["temperature"] = min(float(job.temperature), VLLM_MAX_TEMPERATURE)
    _map_sampling(job.sampling, body)
    if job.response_format is not None:
        body["response_format"] = _map_response_format(job.response_format)
    if job.stop:
        body["stop"] = list(job.stop)
    if job.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    return path, body


def _map_sampling(sampling: Mapping[str, Any], body: dict[str, Any]) -> None:
    for name in ("top_k", "seed", "frequency_penalty", "presence_penalty"):
        if name in sampling:
            body[name] = sampling[name]
    if sampling.get("repetition_penalty"):
        body["repetition_penalty"] = sampling["repetition_penalty"]
    if "top_p" in sampling:
        top_p = float(sampling["top_p"])
        if top_p == 0:
            body["temperature"] = 0.0  # vLLM refuses top_p 0; the limit of nucleus sampling is greedy
        else:
            body["top_p"] = min(top_p, 1.0)


def _map_response_format(response_format: Mapping[str, Any]) -> dict[str, Any]:
    if response_format.get("type") != "json_schema":
        return {"type": response_format["type"]}
    schema = response_format["json_schema"]
    if "schema" in schema and "type" not in schema and "properties" not in schema:
        return {"type": "json_schema", "json_schema": dict(schema)}  # already OpenAI-shaped
    return {"type": "json_schema", "json_schema": {"name": "response", "schema": schema}}


def workers_ai_tool_calls(openai_tool_calls: Any) -> list[dict[str, Any]]:
    """OpenAI-shaped tool calls → Workers AI ``[{"name", "arguments": <object>}]``.

    Arguments that are not valid JSON are passed on as the worker's string (upstream-vllm.md §3).
    """
    calls = []
    for call in openai_tool_calls or ():
        function = call.get("function") or {}
        calls.append({"name": function.get("name") or "", "arguments": _parse_arguments(function.get("arguments"))})
    return calls


def _parse_arguments(arguments: Any) -> Any:
    if not isinstance(arguments, str):
        return arguments if arguments is not None else {}
    try:
        return json.loads(arguments)
    except (ValueError, RecursionError):  # not JSON, or nested too deep to parse: the worker's string as is
        return arguments
