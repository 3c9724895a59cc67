"""Step 6, meter: what of a worker's answer the gateway received and passed on.

The relay reports every usage figure the worker sends (:meth:`Meter.observe_usage`) and every piece of output it
has dealt with (:meth:`Meter.delivered`: sent to the client, or read after the client left). Only usage seen *up to
the last such piece* counts, so a stream cut by the worker is billed for what the worker sent before the cut.
:meth:`Meter.delivery` hands the facts to the billing policy (billing/usage.py).
"""

from __future__ import annotations

from typing import Any

from billing import Delivery, Usage, format_usd, parse_reported_count


def usage_headers(usage: Usage, cost_nano_usd: int) -> dict[str, str]:
    """The usage and cost of one request as response headers (every response has them; refusals cost 0)."""
    return {
        "x-tollgate-prompt-tokens": str(usage.prompt_tokens),
        "x-tollgate-completion-tokens": str(usage.completion_tokens),
        "x-tollgate-total-tokens": str(usage.total_tokens),
        "x-tollgate-cost-nano-usd": str(cost_nano_usd),
        "x-tollgate-cost-usd": format_usd(cost_nano_usd),
    }


def usage_with_cost(usage: Usage, cost_nano_usd: int) -> dict[str, int | str]:
    """The Workers AI ``usage`` object, plus the request's cost."""
    return {**usage.as_dict(), "cost_nano_usd": cost_nano_usd, "cost_usd": format_usd(cost_nano_usd)}


class Meter:
    """Collects the delivery facts of one request."""

    __slots__ = ("_delivered_completion", "_delivered_prompt", "_pending", "_text", "answered", "max_tokens")

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.answered = False
        self._text: list[str] = []
        self._pending: tuple[int | None, int | None] = (None, None)
        self._delivered_prompt: int | None = None
        self._delivered_completion: int | None = None

    def observe_usage(self, usage: Any) -> None:
        """A usage object from the worker (cumulative); it counts once what it covers has been delivered."""
        if isinstance(usage, dict):
            prompt = parse_reported_count(usage.get("prompt_tokens"))
            completion = parse_reported_count(usage.get("completion_tokens"))
            self._pending = (prompt, completion)
            if self._delivered_prompt is None:
                self._delivered_prompt = prompt

    def delivered(self, text: str = "") -> None:
        """``text`` (possibly empty) has been sent to the client: everything observed so far is delivered."""
        if text:
            self._text.append(text)
        prompt, completion = self._pending
        if prompt is not None:
            self._delivered_prompt = prompt
        self._delivered_completion = completion

    def delivery(self) -> Delivery:
        return Delivery(
            answered=self.answered,
            max_tokens=self.max_tokens,
            delivered_text="".join(self._text),
            reported_prompt_tokens=self._delivered_prompt,
            reported_completion_tokens=self._delivered_completion,
        )
