"""Step 2 for the OpenAI-compatible routes: an OpenAI chat or completions body → an :class:`InferenceJob`.

Bodies are checked against config/schemas/openai-*.json (every range, OpenAI's own where they are narrower than
Workers AI's), then against rules a schema states badly: known top-level keys only (a typo such as ``max_token``
is a 400, not silently ignored), text-only content parts, content where a role needs it, finite numbers, tool-call
arguments that are JSON, and no special-token text anywhere the template renders (the native route's check,
gateway/validate.py). The conversation is then put in the form every worker renders identically:

- content given as a list of text parts is joined with ``"\\n"`` (as vLLM does before its chat template), so the
  worker only ever receives strings and the gateway's prompt count is the worker's;
- ``developer`` messages become ``system`` (vLLM v0.33 does this itself; v0.11 would render the role verbatim);
- tools keep only the keys the template renders (``strict`` is dropped: vLLM releases differ on it); messages keep
  ``role``, ``content``, ``name``, ``tool_calls`` (``id``, ``type``, ``function``) and ``tool_call_id``; the keys
  OpenAI's SDKs echo back on an assistant message (``refusal``, ``annotations``, ``audio``, ``function_call``, all
  empty) are accepted and dropped.

The job is the native route's: the same admission, routing, relay and bill. Only the answer's shape differs
(gateway/shapes.py).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any, Final

from config import SCHEMA_DIR
from gateway.errors import InvalidRequestError
from gateway.validate import DEFAULT_TEMPERATURE, InferenceJob, JsonSchema, check_chat_text, check_number_kinds

_SAMPLING: Final = ("top_p", "top_k", "seed", "repetition_penalty", "frequency_penalty", "presence_penalty")
_WHOLE: Final = ("max_tokens", "max_completion_tokens", "top_k", "seed", "n", "best_of")
_FINITE: Final = ("temperature", *_SAMPLING)
_CHAT_ROLES_NEEDING_CONTENT: Final = frozenset({"system", "developer", "user", "tool"})


@dataclasses.dataclass(frozen=True, slots=True)
class OpenAiSchemas:
    """The compiled request schemas of the OpenAI routes, and the top-level keys each accepts."""

    chat: JsonSchema
    completions: JsonSchema
    chat_keys: frozenset[str]
    completions_keys: frozenset[str]

    @classmethod
    def load(cls) -> OpenAiSchemas:
        chat = json.loads((SCHEMA_DIR / "openai-chat-completions.json").read_text(encoding="utf-8"))
        completions = json.loads((SCHEMA_DIR / "openai-completions.json").read_text(encoding="utf-8"))
        return cls(
            chat=JsonSchema(chat),
            completions=JsonSchema(completions),
            chat_keys=frozenset(chat["properties"]),
            completions_keys=frozenset(completions["properties"]),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class OpenAiRequest:
    """A checked OpenAI request: the job, and what only the answer's shape needs."""

    job: InferenceJob
    include_usage: bool  # stream: end with a usage chunk (``stream_options.include_usage``)


def parse_chat(
    body: Mapping[str, Any],
    schemas: OpenAiSchemas,
    default_max_tokens: int,
    *,
    forbidden_text: re.Pattern[str] | None = None,
) -> OpenAiRequest:
    """Check a ``/chat/completions`` body (its ``model`` already known to exist) and build its job."""
    _check_keys(body, schemas.chat_keys)
    schemas.chat.check(body)
    check_number_kinds(body, whole=_WHOLE, finite=_FINITE)
    messages = tuple(_message(index, message) for index, message in enumerate(body["messages"]))
    tools = tuple(_tool(tool) for tool in body.get("tools") or ())
    tool_choice = body.get("tool_choice")
    if tool_choice is not None and not tools:
        raise InvalidRequestError("'/tool_choice' is only allowed when '/tools' are given")
    if isinstance(tool_choice, Mapping):
        name = tool_choice["function"]["name"]
        if all(tool["function"]["name"] != name for tool in tools):
            raise InvalidRequestError(f"'/tool_choice/function/name': no tool named '{name}' in '/tools'")
    if forbidden_text is not None:
        check_chat_text(messages, tools, forbidden_text)
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or default_max_tokens
    job = _job(
        body,
        form="messages",
        max_tokens=max_tokens,
        messages=messages,
        tools=tools,
        tool_choice=tool_choice if tools else None,
        response_format=_response_format(body.get("response_format")),
    )
    return OpenAiRequest(job, _include_usage(body))


def parse_completion(
    body: Mapping[str, Any],
    schemas: OpenAiSchemas,
    default_max_tokens: int,
    *,
    forbidden_text: re.Pattern[str] | None = None,
) -> OpenAiRequest:
    """Check a ``/completions`` body: one raw prompt, sent to the worker as written (no chat template). Special-token
    text is allowed (``forbidden_text`` is not used): a raw prompt's author writes the control tokens on purpose."""
    _check_keys(body, schemas.completions_keys)
    schemas.completions.check(body)
    check_number_kinds(body, whole=_WHOLE, finite=_FINITE)
    prompt = body["prompt"]
    job = _job(
        body,
        form="prompt",
        raw=True,
        prompt=prompt[0] if isinstance(prompt, list) else prompt,
        max_tokens=body.get("max_tokens") or default_max_tokens,
    )
    return OpenAiRequest(job, _include_usage(body))


def _job(body: Mapping[str, Any], **fields: Any) -> InferenceJob:
    stop = body.get("stop")
    options = body.get("options") or {}
    temperature = body.get("temperature")
    return InferenceJob(
        model=body["model"],
        stream=bool(body.get("stream")),
        temperature=DEFAULT_TEMPERATURE if temperature is None else temperature,
        sampling={name: body[name] for name in _SAMPLING if body.get(name) is not None},
        stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),
        reject_if_busy=options.get("rejectIfBusy") is True or body.get("rejectIfBusy") is True,
        **fields,
    )


def _include_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    if options is not None and not body.get("stream"):
        raise InvalidRequestError("'/stream_options' is only allowed when '/stream' is true")
    return bool(options and options.get("include_usage"))


def _check_keys(body: Mapping[str, Any], known: frozenset[str]) -> None:
    unknown = sorted(key for key in body if key not in known)
    if unknown:
        raise InvalidRequestError(
            f"'/{unknown[0]}': unsupported parameter (this endpoint takes: {', '.join(sorted(known))})"
        )


def _message(index: int, message: Mapping[str, Any]) -> dict[str, Any]:
    """One message as every worker renders it: string content, ``system`` for ``developer``, calls as the template
    reads them."""
    role = message["role"]
    content = _content_text(index, message.get("content"))
    tool_calls = message.get("tool_calls") or []
    if role != "assistant" and tool_calls:
        raise InvalidRequestError(f"'/messages/{index}/tool_calls' is only allowed in assistant messages")
    if content is None and (role in _CHAT_ROLES_NEEDING_CONTENT or not tool_calls):
        raise InvalidRequestError(f"'/messages/{index}/content' is required (a '{role}' message without tool calls)")
    normalized: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": content}
    if "name" in message:
        normalized["name"] = message["name"]
    if tool_calls:
        normalized["tool_calls"] = [_tool_call(index, position, call) for position, call in enumerate(tool_calls)]
    if role == "tool" and "tool_call_id" in message:
        normalized["tool_call_id"] = message["tool_call_id"]
    return normalized


def _content_text(index: int, content: Any) -> str | None:
    if not isinstance(content, list):
        return content
    texts = []
    for position, part in enumerate(content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise InvalidRequestError(
                f"'/messages/{index}/content/{position}': only text parts are supported "
                f"(this model reads text), got type '{part.get('type')}'"
            )
        texts.append(part["text"])
    return "\n".join(texts)


def _tool_call(index: int, position: int, call: Mapping[str, Any]) -> dict[str, Any]:
    function = call["function"]
    try:
        json.loads(function["arguments"] or "{}")
    except (ValueError, RecursionError):
        raise InvalidRequestError(
            f"'/messages/{index}/tool_calls/{position}/function/arguments' must be a JSON string"
        ) from None
    normalized = {"type": "function", "function": {"name": function["name"], "arguments": function["arguments"]}}
    if "id" in call:
        normalized = {"id": call["id"], **normalized}
    return normalized


def _tool(tool: Mapping[str, Any]) -> dict[str, Any]:
    function = tool["function"]
    return {
        "type": "function",
        "function": {
            "name": function["name"],
            "description": function.get("description"),
            "parameters": function.get("parameters"),
        },
    }


def _response_format(response_format: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """OpenAI's ``response_format`` as the job carries it (the worker's shape; ``text`` is no format at all)."""
    if response_format is None or response_format["type"] == "text":
        return None
    if response_format["type"] == "json_object":
        return {"type": "json_object"}
    spec = response_format["json_schema"]
    if "schema" not in spec:  # a name alone constrains nothing beyond valid JSON
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": dict(spec)}
