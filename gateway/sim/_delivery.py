"""Sending an answer: paced SSE frames or one JSON body, with the configured fault injected on the way.

The stream is written straight to ASGI ``send`` rather than through Starlette's ``StreamingResponse``: the pacing
sleeps race the client watch, so a disconnect stops the answer at once, and the record is updated after each
``send()`` returns, never from a generator's finalizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from gateway.sim._answer import Answer
from gateway.sim._config import FaultKind
from gateway.sim._exchange import Exchange
from gateway.sim._frames import DONE_EVENT, StreamFrames, encode_event, error_body, usage

_SSE_HEADERS: Final = [(b"content-type", b"text/event-stream; charset=utf-8")]
_ENGINE_ERROR: Final = "The simulated engine failed while generating (injected fault)."


@dataclass(frozen=True, slots=True)
class Delivery:
    """How one answer goes out: its frames or body, the usage options, the pacing and the fault to inject."""

    answer: Answer
    frames: StreamFrames
    body: dict[str, Any]
    prompt_tokens: int
    include_usage: bool
    continuous_usage: bool
    first_token_seconds: float
    seconds_per_token: float
    fault: tuple[FaultKind, int] | None

    def delay_seconds(self, index: int, tokens: int) -> float:
        """The wait before frame ``index``, which carries ``tokens`` generated tokens."""
        first = self.first_token_seconds if index == 0 else self.seconds_per_token
        return first + (tokens - 1) * self.seconds_per_token

    def generation_seconds(self, tokens: int) -> float:
        return self.delay_seconds(0, tokens) if tokens > 0 else 0.0

    def frame_usage(self, completion_tokens: int) -> dict[str, int] | None:
        return usage(self.prompt_tokens, completion_tokens) if self.continuous_usage else None


async def stream_answer(exchange: Exchange, delivery: Delivery, add_generated: Callable[[int], None]) -> None:
    """Send the answer as vLLM's SSE stream; returns early, leaving ``finish_reason: abort``, if the client goes."""
    await exchange.start_response(200, _SSE_HEADERS)
    pieces = delivery.answer.pieces
    sent = 0
    for index, piece in enumerate(pieces):
        if delivery.fault is not None and sent >= delivery.fault[1]:
            await _inject_stream_fault(exchange, delivery.fault[0])
            return
        if not await exchange.watch.sleep(delivery.delay_seconds(index, piece.tokens)):
            return
        finish_reason = delivery.answer.finish_reason if index == len(pieces) - 1 else None
        frames = delivery.frames.opening(delivery.frame_usage(0)) if index == 0 else []
        frames.append(delivery.frames.piece(piece, finish_reason, delivery.frame_usage(sent + piece.tokens)))
        if not await exchange.send_body(b"".join(encode_event(frame) for frame in frames), more_body=True):
            return
        sent += piece.tokens
        exchange.tally.completion_tokens = sent
        add_generated(piece.tokens)
    exchange.tally.finish_reason = delivery.answer.finish_reason
    tail = b""
    if delivery.include_usage:
        tail = encode_event(delivery.frames.usage_only(usage(delivery.prompt_tokens, sent)))
    exchange.commit()
    await exchange.send_body(tail + DONE_EVENT, more_body=False)


async def _inject_stream_fault(exchange: Exchange, kind: FaultKind) -> None:
    if kind == "die":
        exchange.tally.finish_reason = "died"
        exchange.commit()
        await exchange.drop_connection()
    elif kind == "in_band_error":
        exchange.tally.finish_reason = "error"
        exchange.commit()
        frame = encode_event(error_body(_ENGINE_ERROR, "InternalServerError", 500))
        await exchange.send_body(frame + DONE_EVENT, more_body=False)
    else:
        exchange.tally.finish_reason = "stalled"
        await exchange.watch.wait_gone()


async def send_whole_answer(exchange: Exchange, delivery: Delivery, add_generated: Callable[[int], None]) -> None:
    """Wait for the whole generation, then send one JSON body (or fail as the fault says)."""
    total = delivery.answer.completion_tokens
    fault = delivery.fault if delivery.fault is not None and delivery.fault[1] < total else None
    generated = total if fault is None else fault[1]
    if not await exchange.watch.sleep(delivery.generation_seconds(generated)):
        return
    add_generated(generated)
    if fault is None:
        exchange.tally.completion_tokens = total
        exchange.tally.finish_reason = delivery.answer.finish_reason
        await exchange.respond_json(200, delivery.body)
    elif fault[0] == "die":
        exchange.tally.finish_reason = "died"
        exchange.commit()
        await exchange.drop_connection()
    elif fault[0] == "in_band_error":
        exchange.tally.finish_reason = "error"
        await exchange.respond_json(500, error_body(_ENGINE_ERROR, "InternalServerError", 500))
    else:
        exchange.tally.finish_reason = "stalled"
        await exchange.watch.wait_gone()
