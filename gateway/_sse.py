"""Workers AI server-sent events: framing, padding and the final error event."""

from __future__ import annotations

import json
import random
from typing import Any, Final

from gateway.errors import error_body

DONE_FRAME: Final = b"data: [DONE]\n\n"
_PAD_ALPHABET: Final = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_PADS: Final = tuple(_PAD_ALPHABET[:length] for length in range(1, len(_PAD_ALPHABET) + 1))
SSE_HEADERS: Final = (
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # tell nginx-style proxies not to buffer the stream
)


def frame(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def content_frame(text: str, *, with_tool_calls: bool, rng: random.Random) -> bytes:
    """A content event, ``{"response", ["tool_calls": [],] "p"}``; ``p`` pads to hide token lengths."""
    pad = _PADS[rng.randrange(len(_PADS))]
    if with_tool_calls:
        return frame({"response": text, "tool_calls": [], "p": pad})
    return frame({"response": text, "p": pad})


def error_frame(code: int, message: str) -> bytes:
    """The final event of a stream that failed after its headers were sent."""
    return frame(error_body(code, message))
