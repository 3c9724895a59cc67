"""Usage: what one request consumed, and the billing policy that decides it.

The policy lives in :func:`settle_usage` alone, and the tests hold bills against that same function.

Policy: a request is billed once its answer started to reach the client (a 200: the stream's headers, or the whole
JSON answer); a request that ends in an error response before that (no worker, worker error, malformed answer)
costs nothing.

- Prompt tokens: always Tollgate's own count (the workers' chat template and tokenizer, billing/prompts.py). The
  worker's figure is untrusted input (RELIABILITY §7.7); a different one is only counted as a mismatch.
- Completion tokens: every token the worker generated for the request until it stopped: at the answer's end, when
  it failed, or when it saw the client leave. (When a streaming client hangs up, the gateway half-closes the worker
  connection: the worker aborts at once, and the gateway keeps reading what it sent until then, sending nothing
  more; those last tokens were generated for the client, which may not have received them.) The figure is the
  worker's cumulative count at the last chunk the gateway read (a chunk with no text yet, such as half of a
  character or a tool-call fragment, counts when it arrives), bounded by ``max_tokens``. The worker is the only
  one who knows the tokens it generated, the end-of-turn token included. When it reports nothing, the text read is
  counted with the tokenizer instead. Either way that text is re-counted, and a worker figure further than
  ``COMPLETION_TOLERANCE`` tokens from it counts as a mismatch (re-tokenizing text can differ from the generated
  tokens by the end-of-turn token and a split character).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Final

COMPLETION_TOLERANCE: Final = 2


@dataclasses.dataclass(frozen=True, slots=True)
class Usage:
    """Prompt and completion tokens of one request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class Delivery:
    """What the gateway saw of one answer: the facts the billing policy needs.

    ``reported_*`` are the worker's numbers (untrusted; ``None`` when absent or malformed), taken from the last
    chunk the gateway read and passed on (or, once the client was gone, read), or from the final usage report.
    """

    answered: bool  # the client got a 200: the stream's headers, or the whole JSON answer
    max_tokens: int
    delivered_text: str = ""
    reported_prompt_tokens: int | None = None
    reported_completion_tokens: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Settlement:
    """The billed usage, and where the worker's own figures disagreed with the gateway's (``"prompt"``,
    ``"completion"``)."""

    usage: Usage
    mismatches: tuple[str, ...] = ()


def settle_usage(delivery: Delivery, prompt_tokens: Callable[[], int], count_text: Callable[[str], int]) -> Settlement:
    """Apply the billing policy to ``delivery``. ``prompt_tokens`` is the gateway's own prompt count and
    ``count_text`` its tokenizer; neither is called for a request that was never answered."""
    if not delivery.answered:
        return Settlement(Usage())
    own_prompt = prompt_tokens()
    text_tokens = count_text(delivery.delivered_text) if delivery.delivered_text else 0
    mismatches = []
    if delivery.reported_prompt_tokens is not None and delivery.reported_prompt_tokens != own_prompt:
        mismatches.append("prompt")
    reported = delivery.reported_completion_tokens
    if reported is None:
        completion = text_tokens
    else:
        completion = reported
        if reported > delivery.max_tokens or abs(reported - text_tokens) > COMPLETION_TOLERANCE:
            mismatches.append("completion")
    return Settlement(Usage(own_prompt, min(completion, delivery.max_tokens)), tuple(mismatches))


def parse_reported_count(value: object) -> int | None:
    """A worker-reported token count, or ``None`` unless it is a non-negative integer."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None
