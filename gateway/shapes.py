"""The shapes of an answer: Workers AI's (the native route) and OpenAI's chat and text completions.

The relay (gateway/relay.py) is the same for every route: it reads the worker, meters and bills. What it sends is
built here, by one :class:`AnswerShape` per request:

=================  =========================================  ==================================================
                   Workers AI (``/ai/run/{model}``)           OpenAI (``/ai/v1/chat/completions``, ``/completions``)
=================  =========================================  ==================================================
whole answer       ``{"result": {"response", "tool_calls",    ``chat.completion`` / ``text_completion`` with
                   "usage"}, "success": true, ...}``; JSON     ``choices[0]`` and ``usage``; JSON mode's text is
                   mode's ``response`` is the parsed object   passed on as the model wrote it
stream content     ``{"response", ["tool_calls": [],] "p"}``  ``chat.completion.chunk`` deltas (the first with
                                                              ``role``) / ``text_completion`` chunks
tool calls         buffered; one ``{"response": "",           relayed as the worker streams them, in OpenAI's
                   "tool_calls": [{"name", "arguments"}]}``   ``delta.tool_calls`` fragments
stream end         ``{"response": "", "usage"}``, ``[DONE]``  a chunk with ``finish_reason``; the usage chunk
                                                              (``choices: []``) only with ``include_usage``;
                                                              ``[DONE]``
error mid-stream   ``{"errors": [...]}``-envelope event       ``{"error": {...}}`` event (the SDK raises it)
=================  =========================================  ==================================================

Every ``usage`` object also carries ``cost_nano_usd`` and ``cost_usd``.
"""

from __future__ import annotations

import json
import random
from typing import Any, Final, Protocol

from billing import Usage
from gateway import _sse
from gateway._answers import WholeAnswer
from gateway.errors import JsonModeError, TollgateError, openai_error_body
from gateway.meter import usage_with_cost
from gateway.translate import workers_ai_tool_calls
from gateway.validate import InferenceJob

_DONE: Final = _sse.DONE_FRAME


class AnswerShape(Protocol):
    """How one request's answer is written; stateful (one per request)."""

    def prepare(self, answer: WholeAnswer) -> Any:
        """Check a whole answer before it is billed and sent (JSON mode); raise to refuse it."""

    def whole(self, prepared: Any, usage: Usage, cost_nano_usd: int) -> bytes:
        """The body of a whole (non-streaming) answer."""

    def content(self, text: str) -> bytes:
        """A stream event carrying ``text``."""

    def tool_fragments(self, fragments: tuple[dict[str, Any], ...]) -> bytes:
        """Stream events for tool-call fragments as they arrive (``b""`` where they are sent whole at the end)."""

    def end(self, tool_calls: list[dict[str, Any]], finish_reason: str, usage: Usage, cost_nano_usd: int) -> bytes:
        """The last events of a complete stream, ``[DONE]`` included; ``tool_calls`` in OpenAI shape."""

    def error(self, error: TollgateError) -> bytes:
        """The last events of a stream that failed after its headers, ``[DONE]`` included."""


class WorkersAiShape:
    """The native route's answers (../shared/spec/workers-ai-api.md §4, §5)."""

    def __init__(self, job: InferenceJob) -> None:
        self._json_mode = job.is_json_mode
        self._with_tool_calls = job.form == "messages"
        self._rng = random.Random()

    def prepare(self, answer: WholeAnswer) -> Any:
        response: Any = answer.text
        if self._json_mode:
            try:
                response = json.loads(answer.text)
            except ValueError:
                raise JsonModeError() from None
        return {"response": response, "tool_calls": workers_ai_tool_calls(answer.tool_calls)}

    def whole(self, prepared: Any, usage: Usage, cost_nano_usd: int) -> bytes:
        result = {**prepared, "usage": usage_with_cost(usage, cost_nano_usd)}
        return _json({"result": result, "success": True, "errors": [], "messages": []})

    def content(self, text: str) -> bytes:
        return _sse.content_frame(text, with_tool_calls=self._with_tool_calls, rng=self._rng)

    def tool_fragments(self, fragments: tuple[dict[str, Any], ...]) -> bytes:
        return b""

    def end(self, tool_calls: list[dict[str, Any]], finish_reason: str, usage: Usage, cost_nano_usd: int) -> bytes:
        frames = b""
        if tool_calls:
            frames = _sse.frame({"response": "", "tool_calls": workers_ai_tool_calls(tool_calls)})
        return frames + _sse.frame({"response": "", "usage": usage_with_cost(usage, cost_nano_usd)}) + _DONE

    def error(self, error: TollgateError) -> bytes:
        return _sse.error_frame(error.code, error.message) + _DONE


class OpenAiChatShape:
    """``/chat/completions`` answers in OpenAI's ``chat.completion`` and ``chat.completion.chunk`` shapes."""

    def __init__(self, request_id: str, model: str, created: int, *, include_usage: bool) -> None:
        self._head = {"id": f"chatcmpl-{request_id}", "object": "chat.completion", "created": created, "model": model}
        self._chunk_head = {**self._head, "object": "chat.completion.chunk"}
        self._include_usage = include_usage
        self._role_sent = False

    def prepare(self, answer: WholeAnswer) -> Any:
        return answer

    def whole(self, prepared: Any, usage: Usage, cost_nano_usd: int) -> bytes:
        answer: WholeAnswer = prepared
        message: dict[str, Any] = {"role": "assistant", "content": answer.text or None}
        if answer.tool_calls:
            message["tool_calls"] = answer.tool_calls
        elif message["content"] is None:
            message["content"] = ""
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": answer.finish_reason}
        return _json({**self._head, "choices": [choice], "usage": usage_with_cost(usage, cost_nano_usd)})

    def content(self, text: str) -> bytes:
        return self._chunk({"content": text})

    def tool_fragments(self, fragments: tuple[dict[str, Any], ...]) -> bytes:
        return self._chunk({"tool_calls": list(fragments)}) if fragments else b""

    def end(self, tool_calls: list[dict[str, Any]], finish_reason: str, usage: Usage, cost_nano_usd: int) -> bytes:
        frames = self._chunk({}, finish_reason=finish_reason)
        if self._include_usage:
            frames += _sse.frame({**self._chunk_head, "choices": [], "usage": usage_with_cost(usage, cost_nano_usd)})
        return frames + _DONE

    def error(self, error: TollgateError) -> bytes:
        return _sse.frame(openai_error_body(error)) + _DONE

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        if not self._role_sent:
            self._role_sent = True
            delta = {"role": "assistant", **delta}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return _sse.frame({**self._chunk_head, "choices": [choice]})


class OpenAiCompletionShape:
    """``/completions`` answers in OpenAI's ``text_completion`` shape (streamed chunks have the same object name)."""

    def __init__(self, request_id: str, model: str, created: int, *, include_usage: bool) -> None:
        self._head = {"id": f"cmpl-{request_id}", "object": "text_completion", "created": created, "model": model}
        self._include_usage = include_usage

    def prepare(self, answer: WholeAnswer) -> Any:
        return answer

    def whole(self, prepared: Any, usage: Usage, cost_nano_usd: int) -> bytes:
        answer: WholeAnswer = prepared
        choice = {"index": 0, "text": answer.text, "logprobs": None, "finish_reason": answer.finish_reason}
        return _json({**self._head, "choices": [choice], "usage": usage_with_cost(usage, cost_nano_usd)})

    def content(self, text: str) -> bytes:
        return self._chunk(text, None)

    def tool_fragments(self, fragments: tuple[dict[str, Any], ...]) -> bytes:
        return b""  # a raw completion has no tools

    def end(self, tool_calls: list[dict[str, Any]], finish_reason: str, usage: Usage, cost_nano_usd: int) -> bytes:
        frames = self._chunk("", finish_reason)
        if self._include_usage:
            frames += _sse.frame({**self._head, "choices": [], "usage": usage_with_cost(usage, cost_nano_usd)})
        return frames + _DONE

    def error(self, error: TollgateError) -> bytes:
        return _sse.frame(openai_error_body(error)) + _DONE

    def _chunk(self, text: str, finish_reason: str | None) -> bytes:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return _sse.frame({**self._head, "choices": [choice]})


def _json(payload: Any) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
