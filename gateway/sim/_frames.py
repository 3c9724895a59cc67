"""vLLM v0.11's JSON bodies and SSE frames (``upstream-vllm.md`` §4), built as plain dicts in vLLM's key order."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final, Protocol

from gateway.sim._answer import Answer, Piece

DONE_EVENT: Final = b"data: [DONE]\n\n"


def encode_event(payload: Any) -> bytes:
    """One SSE ``data:`` event, serialized compactly with non-ASCII kept, as pydantic's ``model_dump_json``."""
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """vLLM's stream usage; note the key order, total before completion."""
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }


def error_body(message: str, error_type: str, code: int, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


class StreamFrames(Protocol):
    """The frames of one endpoint's stream; ``usage`` is set on a frame only with ``continuous_usage_stats``."""

    def opening(self, usage: dict[str, int] | None) -> list[dict[str, Any]]: ...

    def piece(self, piece: Piece, finish_reason: str | None, usage: dict[str, int] | None) -> dict[str, Any]: ...

    def usage_only(self, usage: dict[str, int]) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class ChatFrames:
    """``/v1/chat/completions`` chunks (``model_dump_json(exclude_unset=True)``)."""

    response_id: str
    created: int
    model: str
    answer: Answer

    def _head(self) -> dict[str, Any]:
        return {"id": self.response_id, "object": "chat.completion.chunk", "created": self.created, "model": self.model}

    def opening(self, usage: dict[str, int] | None) -> list[dict[str, Any]]:
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        chunk = {**self._head(), "choices": [choice]}
        if usage is not None:
            chunk["usage"] = usage
        chunk["prompt_token_ids"] = None
        return [chunk]

    def piece(self, piece: Piece, finish_reason: str | None, usage: dict[str, int] | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "delta": self._delta(piece), "logprobs": None}
        choice["finish_reason"] = finish_reason
        if finish_reason is not None:
            choice["stop_reason"] = self.answer.stop_reason
        choice["token_ids"] = None
        chunk = {**self._head(), "choices": [choice]}
        if usage is not None:
            chunk["usage"] = usage
        return chunk

    def usage_only(self, usage: dict[str, int]) -> dict[str, Any]:
        return {**self._head(), "choices": [], "usage": usage}

    def _delta(self, piece: Piece) -> dict[str, Any]:
        call = self.answer.tool_call
        if piece.tool_name is not None and call is not None:
            named = {"id": call.id, "type": "function", "index": 0, "function": {"name": piece.tool_name}}
            return {"tool_calls": [named]}
        if piece.tool_arguments is not None:
            return {"tool_calls": [{"index": 0, "function": {"arguments": piece.tool_arguments}}]}
        if piece.content is not None:
            return {"content": piece.content}
        return {}


@dataclass(frozen=True, slots=True)
class CompletionFrames:
    """``/v1/completions`` chunks (v0.11 serializes every key, ``exclude_unset=False``)."""

    response_id: str
    created: int
    model: str
    answer: Answer

    def _head(self) -> dict[str, Any]:
        return {"id": self.response_id, "object": "text_completion", "created": self.created, "model": self.model}

    def opening(self, usage: dict[str, int] | None) -> list[dict[str, Any]]:
        return []

    def piece(self, piece: Piece, finish_reason: str | None, usage: dict[str, int] | None) -> dict[str, Any]:
        choice = {
            "index": 0,
            "text": piece.content or "",
            "logprobs": None,
            "finish_reason": finish_reason,
            "stop_reason": self.answer.stop_reason if finish_reason is not None else None,
            "prompt_token_ids": None,
            "token_ids": None,
        }
        return {**self._head(), "choices": [choice], "usage": usage}

    def usage_only(self, usage: dict[str, int]) -> dict[str, Any]:
        return {**self._head(), "choices": [], "usage": usage}


def chat_completion_body(
    response_id: str, created: int, model: str, answer: Answer, prompt_tokens: int
) -> dict[str, Any]:
    """The non-streaming ``chat.completion`` body (v0.11 ``model_dump()``: every field, nulls included)."""
    tool_calls = []
    if answer.tool_call is not None:
        function = {"name": answer.tool_call.name, "arguments": answer.tool_call.arguments}
        tool_calls.append({"id": answer.tool_call.id, "type": "function", "function": function})
    message = {
        "role": "assistant",
        "content": answer.text,
        "refusal": None,
        "annotations": None,
        "audio": None,
        "function_call": None,
        "tool_calls": tool_calls,
        "reasoning_content": None,
    }
    choice = {
        "index": 0,
        "message": message,
        "logprobs": None,
        "finish_reason": answer.finish_reason,
        "stop_reason": answer.stop_reason,
        "token_ids": None,
    }
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "service_tier": None,
        "system_fingerprint": None,
        "usage": {**usage(prompt_tokens, answer.completion_tokens), "prompt_tokens_details": None},
        "prompt_logprobs": None,
        "prompt_token_ids": None,
        "kv_transfer_params": None,
    }


def completion_body(response_id: str, created: int, model: str, answer: Answer, prompt_tokens: int) -> dict[str, Any]:
    """The non-streaming ``text_completion`` body."""
    choice = {
        "index": 0,
        "text": answer.text or "",
        "logprobs": None,
        "finish_reason": answer.finish_reason,
        "stop_reason": answer.stop_reason,
        "prompt_logprobs": None,
        "prompt_token_ids": None,
        "token_ids": None,
    }
    return {
        "id": response_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "service_tier": None,
        "system_fingerprint": None,
        "usage": {**usage(prompt_tokens, answer.completion_tokens), "prompt_tokens_details": None},
        "kv_transfer_params": None,
    }
