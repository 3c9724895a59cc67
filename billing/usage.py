"""Usage: what one request consumed, and the billing policy that decides it.

The policy lives in :func:`settle_usage` alone, and the tests hold bills against that same function.

Policy: a request is billed once its answer started to reach the client (a 200: the stream's headers, or the whole
JSON answer): its prompt tokens, plus the completion tokens of every chunk the gateway relayed before the answer
ended or was cut (a chunk that carries no text yet, such as half of a character or a tool-call fragment, counts as
relayed when it arrives). When the worker reports usage, its cumulative count at the last relayed chunk is used,
bounded by ``max_tokens``; when it reports none, the gateway counts the relayed text with the model's tokenizer (and
the prompt with the chat template). A request that ends in an error response before that (no worker, worker
error, malformed answer) costs nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable


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
    chunk that was delivered to the client, or from the final usage report once everything was delivered.
    """

    answered: bool  # the client got a 200: the stream's headers, or the whole JSON answer
    max_tokens: int
    delivered_text: str = ""
    reported_prompt_tokens: int | None = None
    reported_completion_tokens: int | None = None


def settle_usage(delivery: Delivery, count_prompt: Callable[[], int], count_text: Callable[[str], int]) -> Usage:
    """Apply the billing policy to ``delivery``.

    ``count_prompt`` and ``count_text`` are the gateway's own counters; they are only called when the worker
    reported nothing usable, so the common path does no tokenization.
    """
    if not delivery.answered:
        return Usage()
    prompt_tokens = delivery.reported_prompt_tokens
    if prompt_tokens is None:
        prompt_tokens = count_prompt()
    completion_tokens = delivery.reported_completion_tokens
    if completion_tokens is None:
        completion_tokens = count_text(delivery.delivered_text) if delivery.delivered_text else 0
    return Usage(prompt_tokens, min(completion_tokens, delivery.max_tokens))


def parse_reported_count(value: object) -> int | None:
    """A worker-reported token count, or ``None`` unless it is a non-negative integer."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None
