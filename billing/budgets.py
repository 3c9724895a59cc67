"""Budgets: spend caps per tenant, and optionally per key, for each calendar month (UTC).

A request is refused before it reaches a worker when what was already spent this month plus the most it can cost
(its prompt tokens and ``max_tokens`` at the model's prices) would pass a cap. A running stream is never cut.

Overshoot: spend is counted when a request is billed, so requests in flight are not in it. Each one was admitted
with ``spent + its maximum cost <= cap``, and so a month can end above the cap by at most the maximum cost of the
requests that were in flight together when it was reached: concurrent requests * window tokens * completion price
in the worst case, about $0.0066 per concurrent request for the 8b model. Concurrency limits (per key) bound it.

The admission check is part of the one admission script (billing/limits.py), which also reads Redis ``TIME``: the
request's timestamp, which dates its bill. Redis layout::

    tg:{<tenant>}:budget          hash: monthly_nano_usd (absent: the configured default)
    tg:{<tenant>}:spend:m:<YYYYMM>  written by the ledger (billing/ledger.py)
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from decimal import Context, Decimal, Inexact, InvalidOperation, Overflow, Underflow
from typing import Final

from redis.asyncio import Redis

from billing._pipelined import hget_each
from billing.ledger import tenant_key

_FIELD: Final = "monthly_nano_usd"
# Wide enough for any int64 amount, and loud about anything inexact.
_EXACT: Final = Context(prec=60, traps=[Inexact, Overflow, Underflow, InvalidOperation])
_MAX_USD: Final = Decimal(2**63 - 1).scaleb(-9)


class InvalidBudgetError(ValueError):
    """A budget must be a non-negative amount of dollars with at most 9 decimal places."""


def parse_usd(text: str) -> int:
    """Exact dollars (``"25"``, ``"0.50"``) to nano-dollars: at most 9 decimal places, and at most what a Redis
    counter holds (a signed 64-bit number of nano-dollars)."""
    try:
        amount = Decimal(text.strip())
    except InvalidOperation:
        raise InvalidBudgetError(f"expected an amount of dollars such as 25.00, got {text!r}") from None
    if not amount.is_finite() or amount < 0:
        raise InvalidBudgetError(f"expected a non-negative amount of dollars, got {text!r}")
    if amount > _MAX_USD:
        raise InvalidBudgetError(f"amounts above ${_MAX_USD} cannot be counted, got {text!r}")
    try:
        nano = amount.scaleb(9, _EXACT)
        if nano != nano.to_integral_value(context=_EXACT):
            raise Inexact
    except ArithmeticError:  # Inexact, Underflow: digits below a nano-dollar
        raise InvalidBudgetError(f"expected at most 9 decimal places, got {text!r}") from None
    return int(nano)


def month_bounds(month: str) -> tuple[float, float]:
    """The first instant of ``month`` (``YYYYMM``, UTC) and of the month after, in Unix seconds."""
    start = dt.datetime.strptime(month, "%Y%m").replace(tzinfo=dt.UTC)
    following = (start + dt.timedelta(days=32)).replace(day=1)
    return start.timestamp(), following.timestamp()


class Budgets:
    """Reads and sets monthly budgets (billing/limits.py checks requests against them)."""

    def __init__(self, redis: Redis, *, default_monthly_nano_usd: int | None) -> None:
        self._redis = redis
        self._default = default_monthly_nano_usd

    async def tenant_budget(self, tenant: str) -> tuple[int | None, bool]:
        """The tenant's cap in nano-dollars (``None``: no cap), and whether it is the configured default."""
        return self._decode_cap(await self._redis.hget(_budget_key(tenant), _FIELD))

    async def tenant_budgets(self, tenants: Sequence[str]) -> list[tuple[int | None, bool]]:
        """:meth:`tenant_budget` of each of ``tenants``, in order, read in pipelines of 1,000 tenants."""
        stored = await hget_each(self._redis, [(_budget_key(tenant), _FIELD) for tenant in tenants])
        return [self._decode_cap(value) for value in stored]

    async def set_tenant_budget(self, tenant: str, nano_usd: int | None) -> None:
        """Set the tenant's monthly cap; ``None`` removes any cap (the configured default included)."""
        if nano_usd is not None and nano_usd < 0:
            raise InvalidBudgetError("a budget cannot be negative")
        await self._redis.hset(_budget_key(tenant), _FIELD, "" if nano_usd is None else str(nano_usd))

    async def reset_tenant_budget(self, tenant: str) -> None:
        """Go back to the configured default cap."""
        await self._redis.hdel(_budget_key(tenant), _FIELD)

    def _decode_cap(self, stored: bytes | str | None) -> tuple[int | None, bool]:
        if stored is None:
            return self._default, True
        return (int(stored) if stored else None), False


def _budget_key(tenant: str) -> str:
    return tenant_key(tenant, "budget")
