"""Prices: tokens to integer nano-dollars, and nano-dollars to exact decimal dollars for display.

Money is never a float: $0.28 per million prompt tokens is 280 nano-dollars per token.
"""

from __future__ import annotations

import dataclasses
from typing import Final

from config import ModelSettings

NANO_USD_PER_USD: Final = 1_000_000_000


@dataclasses.dataclass(frozen=True, slots=True)
class Price:
    """Per-token prices of one model, in integer nano-dollars."""

    prompt_nano_usd_per_token: int
    completion_nano_usd_per_token: int


def price_of(model: ModelSettings) -> Price:
    """The configured prices of ``model``."""
    return Price(model.prompt_nano_usd_per_token, model.completion_nano_usd_per_token)


def cost_nano_usd(price: Price, prompt_tokens: int, completion_tokens: int) -> int:
    """The cost of a request in nano-dollars: exact integer arithmetic.

    >>> cost_nano_usd(Price(280, 830), 1234, 567)
    816130
    """
    return price.prompt_nano_usd_per_token * prompt_tokens + price.completion_nano_usd_per_token * completion_tokens


def format_usd(nano_usd: int) -> str:
    """Exact dollars with nine decimals by integer arithmetic: ``816130`` → ``"0.000816130"``, 0 → ``"0.000000000"``."""
    dollars, nano = divmod(abs(nano_usd), NANO_USD_PER_USD)
    return f"{'-' if nano_usd < 0 else ''}{dollars}.{nano:09d}"
