"""What the simulated worker generates: a window of corpus tokens, a JSON object, or one tool call.

An `Answer` is cut into `Piece`s, one per stream frame, with the text decoded incrementally the way vLLM's
detokenizer does it: a token that ends inside a UTF-8 character shows nothing, and the character appears with the
next token. The stop token (``<|eot_id|>``) is counted as generated, as vLLM counts it, but never shown; it rides
in the last frame together with the last visible token (``upstream-vllm.md`` §4.2).
"""

from __future__ import annotations

import codecs
import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

from billing.tokens import Tokenizer

_WORDS: Final = ("Paris", "amber", "river", "seven", "lantern", "north", "harbor", "quiet", "maple", "copper")


@dataclass(frozen=True, slots=True)
class Piece:
    """The generated tokens carried by one stream frame, and what they show (at most one of the three)."""

    tokens: int
    content: str | None = None
    tool_name: str | None = None
    tool_arguments: str | None = None


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class Answer:
    pieces: tuple[Piece, ...]
    finish_reason: str
    text: str | None  # None when the answer is a tool call (``content: null``)
    tool_call: ToolCall | None = None
    stop_reason: str | None = None  # the stop string that ended it, as vLLM reports it

    @property
    def completion_tokens(self) -> int:
        return sum(piece.tokens for piece in self.pieces)


@dataclass(frozen=True, slots=True)
class AnswerRequest:
    """What a request asks for: the token limit, and a tool to call or JSON to produce, if any."""

    max_tokens: int
    completion_tokens: int | None = None
    tool: Mapping[str, Any] | None = None
    tool_named: bool = False  # ``tool_choice`` named the tool: vLLM constrains the output to its arguments
    json_schema: Mapping[str, Any] | None = None
    json_mode: bool = False
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one generated


class AnswerWriter:
    """Writes answers from a corpus encoded once; holds no per-request state."""

    def __init__(self, tokenizer: Tokenizer, corpus: str) -> None:
        self._tokenizer = tokenizer
        self._corpus_ids = tuple(tokenizer.encode(corpus))
        if not self._corpus_ids:
            raise ValueError("the corpus must not be empty")

    def write(self, request: AnswerRequest, rng: random.Random) -> Answer:
        """The answer to ``request``; every random choice comes from ``rng``, in a fixed order."""
        drawn = rng.randint(1, request.max_tokens)
        target = request.completion_tokens or drawn  # generated tokens, the stop token included
        offset = rng.randrange(len(self._corpus_ids))
        if request.tool is not None:
            return self._tool_answer(request.tool, request.max_tokens, rng, named=request.tool_named)
        if request.json_mode or request.json_schema is not None:
            ids = self._json_ids(request.json_schema, rng, offset, min(target, request.max_tokens) - 1)
            stops = len(ids) < request.max_tokens
        else:
            stops = target <= request.max_tokens
            ids = self._window(offset, target - 1 if stops else request.max_tokens)
        answer = self._text_answer(ids[: request.max_tokens], finish_reason="stop" if stops else "length")
        return _cut_at_stop(answer, request.stop) if request.stop else answer

    def _window(self, offset: int, count: int) -> list[int]:
        size = len(self._corpus_ids)
        return [self._corpus_ids[(offset + index) % size] for index in range(max(count, 0))]

    def _text_answer(self, ids: Sequence[int], *, finish_reason: str) -> Answer:
        with_stop_token = finish_reason == "stop"
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pieces = []
        for index, token in enumerate(ids):
            last = index == len(ids) - 1
            text = decoder.decode(self._tokenizer.decode_bytes([token]), final=last)
            pieces.append(Piece(tokens=2 if last and with_stop_token else 1, content=text))
        if not pieces:  # only the stop token was generated
            pieces.append(Piece(tokens=1, content=""))
        text = "".join(piece.content or "" for piece in pieces)
        return Answer(pieces=tuple(pieces), finish_reason=finish_reason, text=text)

    def _json_ids(
        self, schema: Mapping[str, Any] | None, rng: random.Random, offset: int, budget_tokens: int
    ) -> list[int]:
        filled = fill_object(schema, rng) if schema is not None else {}
        if filled:
            return self._tokenizer.encode(json.dumps(filled, ensure_ascii=False))
        # {"response": "<corpus text>"}, sized to the budget where the wrapper allows it.
        size = max(budget_tokens - self._tokenizer.count('{"response": ""}'), 0)
        while True:
            text = self._tokenizer.decode_bytes(self._window(offset, size)).decode("utf-8", errors="ignore")
            ids = self._tokenizer.encode(json.dumps({"response": text.strip()}, ensure_ascii=False))
            if len(ids) <= budget_tokens or size == 0:
                return ids
            size = max(size - (len(ids) - budget_tokens), 0)

    def _tool_answer(self, tool: Mapping[str, Any], max_tokens: int, rng: random.Random, *, named: bool) -> Answer:
        function = tool["function"]
        call = ToolCall(
            id=f"chatcmpl-tool-{rng.getrandbits(128):032x}",
            name=function["name"],
            arguments=json.dumps(fill_object(function.get("parameters"), rng), ensure_ascii=False),
        )
        if named:  # guided decoding writes the arguments alone; vLLM wraps them in a call and says "stop"
            ids = self._tokenizer.encode(call.arguments)
            if len(ids) >= max_tokens:
                return self._text_answer(ids[:max_tokens], finish_reason="length")
            return Answer(pieces=self._argument_pieces(ids, call), finish_reason="stop", text=None, tool_call=call)
        # The model writes the llama3_json form; vLLM's parser turns it into a tool call.
        prefix = '{"name": "' + call.name + '", "parameters": '
        text = prefix + call.arguments + "}"
        ids = self._tokenizer.encode(text)
        if len(ids) >= max_tokens:  # cut short: the parser finds no call and the text becomes content
            return self._text_answer(ids[:max_tokens], finish_reason="length")
        pieces = self._tool_pieces(ids, text, arguments_start=len(prefix), call=call)
        return Answer(pieces=pieces, finish_reason="tool_calls", text=None, tool_call=call)

    def _argument_pieces(self, ids: Sequence[int], call: ToolCall) -> tuple[Piece, ...]:
        """A named call's frames: the call itself first, then the arguments as they decode; the stop token last."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pieces, pending = [Piece(tokens=0, tool_name=call.name)], 0
        for index, token in enumerate(ids):
            pending += 1
            text = decoder.decode(self._tokenizer.decode_bytes([token]), final=index == len(ids) - 1)
            if text:
                pieces.append(Piece(tokens=pending, tool_arguments=text))
                pending = 0
        pieces[-1] = replace(pieces[-1], tokens=pieces[-1].tokens + pending + 1)
        return tuple(pieces)

    def _tool_pieces(self, ids: Sequence[int], text: str, *, arguments_start: int, call: ToolCall) -> tuple[Piece, ...]:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        arguments_end = arguments_start + len(call.arguments)
        pieces: list[Piece] = []
        decoded = pending = 0
        shown = arguments_start
        for index, token in enumerate(ids):
            decoded += len(decoder.decode(self._tokenizer.decode_bytes([token]), final=index == len(ids) - 1))
            pending += 1
            if not pieces:  # the parser announces the call once the name is complete
                if decoded >= arguments_start:
                    pieces.append(Piece(tokens=pending, tool_name=call.name))
                    pending = 0
                continue
            visible_end = min(decoded, arguments_end)
            if visible_end > shown:
                pieces.append(Piece(tokens=pending, tool_arguments=text[shown:visible_end]))
                shown, pending = visible_end, 0
        if pending == 0:  # the stop token rides with the last fragment
            pieces[-1] = replace(pieces[-1], tokens=pieces[-1].tokens + 1)
        else:
            pieces.append(Piece(tokens=pending + 1))
        return tuple(pieces)


def _cut_at_stop(answer: Answer, stop: tuple[str, ...]) -> Answer:
    """``answer`` as vLLM ends it at a stop string: the text before it is shown, the tokens up to the one that
    completes it are counted (no end-of-turn token follows), and ``finish_reason`` is ``stop``."""
    text = answer.text or ""
    # vLLM stops at the first token after which any stop string is complete: the one that ends first.
    found = [(text.find(string) + len(string), text.find(string), string) for string in stop if string in text]
    if not found:
        return answer
    end, start, string = min(found)
    pieces, shown = [], 0
    for piece in answer.pieces:
        content = piece.content or ""
        keep = content[: max(0, start - shown)]
        shown += len(content)
        pieces.append(Piece(tokens=1, content=keep))
        if shown >= end:
            break
    return Answer(pieces=tuple(pieces), finish_reason="stop", text=text[:start], stop_reason=string)


def fill_object(schema: Any, rng: random.Random) -> dict[str, Any]:
    """An object with every required property of a JSON schema filled with a short plausible value."""
    if not isinstance(schema, Mapping):
        return {}
    properties = schema.get("properties")
    properties = properties if isinstance(properties, Mapping) else {}
    required = schema.get("required")
    required = required if isinstance(required, list) else []
    return {name: _sample_value(properties.get(name), rng) for name in required if isinstance(name, str)}


def _sample_value(schema: Any, rng: random.Random) -> Any:
    if not isinstance(schema, Mapping):
        return rng.choice(_WORDS)
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((item for item in kind if item != "null"), "string")
    samplers: dict[str, Callable[[], Any]] = {
        "integer": lambda: rng.randint(1, 9),
        "number": lambda: rng.randint(1, 99) / 10,
        "boolean": lambda: True,
        "array": list,
        "object": lambda: fill_object(schema, rng),
        "null": lambda: None,
    }
    sampler = samplers.get(kind) if isinstance(kind, str) else None
    return sampler() if sampler is not None else rng.choice(_WORDS)
