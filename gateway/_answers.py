"""Reading a worker's answers, which are untrusted input (RELIABILITY §7.7): every shape is checked, and anything
unexpected becomes an :class:`~gateway.errors.UpstreamError` (502, or the final event of a stream), never a 500."""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True, slots=True)
class Delta:
    """What one streamed chunk adds: text, tool-call fragments, and the finish reason on the last one."""

    text: str = ""
    fragments: tuple[dict[str, Any], ...] = ()
    finish_reason: str | None = None
    stop_reason: str | None = None  # the stop string that ended the answer (vLLM's ``stop_reason``), if one did


@dataclasses.dataclass(frozen=True, slots=True)
class WholeAnswer:
    """A non-streaming answer: its text, its tool calls in OpenAI shape, and why it ended."""

    text: str
    tool_calls: list[dict[str, Any]]
    finish_reason: str
    stop_reason: str | None = None


def stream_delta(chunk: dict[str, Any]) -> Delta:
    """The text, tool-call fragments and finish reason of one streamed chunk (chat ``delta`` or completions
    ``text``)."""
    choice = first_choice(chunk, required=False)
    if choice is None:
        return Delta()
    finish_reason, stop_reason = _finish_reason(choice), _stop_reason(choice)
    if "delta" in choice:
        delta = _as_dict(choice["delta"])
        fragments = tuple(_fragment(fragment) for fragment in _as_list(delta.get("tool_calls")))
        return Delta(_as_text(delta.get("content")), fragments, finish_reason, stop_reason)
    return Delta(_as_text(choice.get("text")), (), finish_reason, stop_reason)


def whole_answer(data: dict[str, Any]) -> WholeAnswer:
    """The text, OpenAI-shaped tool calls and finish reason of a non-streaming answer."""
    choice = first_choice(data, required=True)
    assert choice is not None
    finish_reason, stop_reason = _finish_reason(choice) or "stop", _stop_reason(choice)
    if "message" not in choice:
        return WholeAnswer(_as_text(choice.get("text")), [], finish_reason, stop_reason)
    message = _as_dict(choice["message"])
    calls = []
    for call in _as_list(message.get("tool_calls")):
        call = _as_dict(call)
        function = _as_dict(call.get("function"))
        calls.append(_openai_call(_as_text(call.get("id")), _as_text(function.get("name")), function.get("arguments")))
    return WholeAnswer(_as_text(message.get("content")), calls, finish_reason, stop_reason)


def error_text(data: dict[str, Any]) -> str:
    """The message of a vLLM error body or in-band error frame, shortened."""
    error = data.get("error")
    message = error.get("message") if isinstance(error, dict) else error
    return str(message)[:300] if message else "unknown error"


class ToolCallBuffer:
    """Joins streamed OpenAI tool-call fragments by index until the stream ends."""

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, str]] = {}

    def add(self, fragments: tuple[dict[str, Any], ...]) -> None:
        for fragment in fragments:
            call = self._calls.setdefault(fragment["index"], {"id": "", "name": "", "arguments": ""})
            call["id"] = call["id"] or fragment.get("id", "")
            function = fragment.get("function", {})
            call["name"] += function.get("name", "")
            call["arguments"] += function.get("arguments", "")

    def __bool__(self) -> bool:
        return bool(self._calls)

    def as_openai(self) -> list[dict[str, Any]]:
        ordered = [self._calls[index] for index in sorted(self._calls)]
        return [_openai_call(call["id"], call["name"], call["arguments"]) for call in ordered]


def tool_calls_text(openai_calls: list[dict[str, Any]]) -> str:
    """Tool calls as the text the model generated, for counting when the worker reports no usage."""
    calls = workers_ai_tool_calls(openai_calls)
    return "".join(json.dumps({"name": call["name"], "parameters": call["arguments"]}) for call in calls)


def _openai_call(call_id: str, name: str, arguments: Any) -> dict[str, Any]:
    if not isinstance(arguments, str):  # an object where OpenAI has a JSON string
        arguments = json.dumps(arguments if arguments is not None else {}, ensure_ascii=False)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _fragment(fragment: Any) -> dict[str, Any]:
    """A streamed tool-call fragment, checked, with only the keys OpenAI defines."""
    fragment = _as_dict(fragment)
    index = fragment.get("index", 0)
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < 128:
        raise UpstreamError(MALFORMED)
    checked: dict[str, Any] = {"index": index}
    if fragment.get("id") is not None:
        checked["id"] = _as_text(fragment["id"])
        checked["type"] = "function"
    function = _as_dict(fragment.get("function"))
    if function:
        checked["function"] = {
            key: _as_text(function[key]) for key in ("name", "arguments") if function.get(key) is not None
        }
    return checked


def _finish_reason(choice: dict[str, Any]) -> str | None:
    reason = choice.get("finish_reason")
    return reason if isinstance(reason, str) and reason else None


def _stop_reason(choice: dict[str, Any]) -> str | None:
    reason = choice.get("stop_reason")  # a stop string, a stop token id (an int), or null
    return reason if isinstance(reason, str) and reason else None


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
