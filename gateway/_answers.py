"""Reading a worker's answers, which are untrusted input (RELIABILITY §7.7): every shape is checked, and anything
unexpected becomes an :class:`~gateway.errors.UpstreamError` (502, or the final event of a stream), never a 500."""

from __future__ import annotations

import json
from typing import Any, Final

from gateway.errors import UpstreamError
from gateway.translate import workers_ai_tool_calls

MALFORMED: Final = "The inference worker sent a malformed answer"


def parse_object(raw: bytes | str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise UpstreamError(MALFORMED)
    return data


def first_choice(data: dict[str, Any], *, required: bool) -> dict[str, Any] | None:
    choices = data.get("choices")
    if choices is None or choices == []:
        if required:
            raise UpstreamError("The inference worker sent an answer without choices")
        return None
    if not isinstance(choices, list) or not isinstance(choices[0], dict):
        raise UpstreamError(MALFORMED)
    return choices[0]


def stream_delta(chunk: dict[str, Any]) -> tuple[str, list[Any]]:
    """The text and tool-call fragments of one streamed chunk (chat ``delta`` or completions ``text``)."""
    choice = first_choice(chunk, required=False)
    if choice is None:
        return "", []
    if "delta" in choice:
        delta = _as_dict(choice["delta"])
        return _as_text(delta.get("content")), _as_list(delta.get("tool_calls"))
    return _as_text(choice.get("text")), []


def whole_answer(data: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """The text and Workers-AI-shaped tool calls of a non-streaming answer."""
    choice = first_choice(data, required=True)
    assert choice is not None
    if "message" not in choice:
        return _as_text(choice.get("text")), []
    message = _as_dict(choice["message"])
    calls = []
    for call in _as_list(message.get("tool_calls")):
        function = _as_dict(_as_dict(call).get("function"))
        calls.append({"function": {"name": _as_text(function.get("name")), "arguments": function.get("arguments")}})
    return _as_text(message.get("content")), workers_ai_tool_calls(calls)


def error_text(data: dict[str, Any]) -> str:
    """The message of a vLLM error body or in-band error frame, shortened."""
    error = data.get("error")
    message = error.get("message") if isinstance(error, dict) else error
    return str(message)[:300] if message else "unknown error"


class ToolCallBuffer:
    """Joins streamed OpenAI tool-call fragments by index until the stream ends."""

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, str]] = {}

    def add(self, fragments: list[Any]) -> None:
        for fragment in fragments:
            fragment = _as_dict(fragment)
            index = fragment.get("index", 0)
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < 128:
                raise UpstreamError(MALFORMED)
            call = self._calls.setdefault(index, {"name": "", "arguments": ""})
            function = _as_dict(fragment.get("function"))
            call["name"] += _as_text(function.get("name"))
            call["arguments"] += _as_text(function.get("arguments"))

    def __bool__(self) -> bool:
        return bool(self._calls)

    def as_workers_ai(self) -> list[dict[str, Any]]:
        ordered = [self._calls[index] for index in sorted(self._calls)]
        return workers_ai_tool_calls([{"function": call} for call in ordered])


def tool_calls_text(calls: list[dict[str, Any]]) -> str:
    """Tool calls as the text the model generated, for counting when the worker reports no usage."""
    return "".join(json.dumps({"name": call["name"], "parameters": call["arguments"]}) for call in calls)


def _as_dict(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UpstreamError(MALFORMED)
    return value


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise UpstreamError(MALFORMED)
    return value


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UpstreamError(MALFORMED)
    return value
