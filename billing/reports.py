"""Usage reports: the ledger's hourly and daily counters, read back as pages of time buckets.

A report answers "what did these tenants use between two times", bucket by bucket, in the shape of OpenAI's
organization Usage API (a page of buckets, each with its results) with Tollgate's counter names
(shared/spec/usage-api.md). An endpoint puts :meth:`UsageReport.as_dict` in the ``result`` of the Workers AI
envelope, and turns :class:`ReportQueryError` into a 400::

    query = parse_query(request.query_params, tenants=[tenant], now=time.time(), allow_group_by_tenant=False)
    report = await usage_report(redis, query, models=list(settings.models))
    body = {"result": report.as_dict(), "success": True, "errors": [], "messages": []}

Buckets are UTC hours or days. Every bucket of the range is returned, with zeros when nothing was used, so charts
have no gaps. Money stays integer nano-dollars; ``cost_usd`` is its exact decimal string, never a float.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import io
import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Final, Literal

from redis.asyncio import Redis

from billing.ledger import COUNTER_FIELDS, tenant_key
from billing.pricing import format_usd

Granularity = Literal["hour", "day"]
GroupKey = Literal["model", "tenant"]

_GROUP_KEYS: Final[tuple[GroupKey, ...]] = ("model", "tenant")
_PARAMETERS: Final = ("from", "to", "granularity", "model", "group_by", "limit", "page")
_COUNTER_COLUMNS: Final = (
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost_nano_usd",
    "cost_usd",
    "errors",
)
_CSV_COLUMNS: Final = ("start", "end", "model", "tenant", *_COUNTER_COLUMNS)

_COUNTER_INDEX: Final = MappingProxyType({name: index for index, name in enumerate(COUNTER_FIELDS)})
_Group = tuple[str | None, str | None]  # (model, tenant); None when the report is not grouped by it

_EARLIEST: Final = 946_684_800  # 2000-01-01T00:00:00Z: older times are typos, and no ledger is that old
_FUTURE_LEEWAY_SECONDS: Final = 86_400


@dataclasses.dataclass(frozen=True, slots=True)
class _BucketSpec:
    """How one granularity maps to the ledger's keys, and how long a range of it may be."""

    name: Granularity
    seconds: int
    ledger_kind: str  # the ledger's key part: tg:{tenant}:usage:<kind>:<date>
    key_format: str
    max_buckets: int
    default_buckets: int  # the range when 'from' is not given


_BUCKETS: Final = MappingProxyType(
    {
        "hour": _BucketSpec("hour", 3600, "h", "%Y%m%d%H", max_buckets=24 * 93, default_buckets=24),
        "day": _BucketSpec("day", 86400, "d", "%Y%m%d", max_buckets=3 * 366, default_buckets=30),
    }
)


class ReportQueryError(ValueError):
    """A usage query parameter is malformed, unknown or out of range; the message names it, e.g.
    ``'from': expected ISO 8601 or Unix seconds, got 'abc'``. Endpoints answer it with a 400."""


@dataclasses.dataclass(frozen=True, slots=True)
class UsageQuery:
    """One page of a usage report: whose usage, which UTC buckets, filtered and grouped how.

    ``start`` and ``end`` are bucket boundaries (Unix seconds, ``end`` exclusive) of the whole range; ``page`` is
    the start of this page's first bucket (``None``: ``start``), and a page holds at most ``limit`` buckets
    (``None``: the most a range may have). Build it with :func:`parse_query`, which validates all of it.
    """

    tenants: tuple[str, ...]  # one for a tenant's own report; several for an operator's
    start: int
    end: int
    granularity: Granularity
    model: str | None = None
    group_by: tuple[GroupKey, ...] = ()  # a subset of ("model", "tenant"), in that order
    limit: int | None = None
    page: int | None = None

    @property
    def bucket_seconds(self) -> int:
        return _BUCKETS[self.granularity].seconds

    @property
    def page_start(self) -> int:
        return self.start if self.page is None else self.page

    @property
    def page_end(self) -> int:
        limit = self.limit or _BUCKETS[self.granularity].max_buckets
        return min(self.end, self.page_start + limit * self.bucket_seconds)


def parse_query(
    params: Mapping[str, str], *, tenants: Sequence[str], now: float, allow_group_by_tenant: bool
) -> UsageQuery:
    """Read a usage query from URL parameters.

    Parameters: ``from`` and ``to`` (ISO 8601 with ``Z`` or an offset, a bare date, naive meaning UTC; or Unix
    seconds), ``granularity`` (``hour``, the default, or ``day``), ``model`` (a filter), ``group_by``
    (comma-separated ``model`` and/or ``tenant``), ``limit`` (buckets per page) and ``page`` (a ``next_page``
    cursor). ``from`` is aligned down and ``to`` up to UTC bucket boundaries; ``to`` defaults to ``now``, and
    ``from`` to 24 hours (``day``: 30 days) before the aligned ``to``, so the current bucket comes last.

    * tenants - whose usage: the caller's own tenant, or several for an operator.
    * now - the current Unix time, for the defaults and the check against times in the future.
    * allow_group_by_tenant - whether ``group_by=tenant`` is allowed (operators only).

    Raises :class:`ReportQueryError` naming the first bad parameter.
    """
    unknown = sorted(set(params) - set(_PARAMETERS))
    if unknown:
        raise ReportQueryError(f"{unknown[0]!r}: unknown parameter; expected one of {', '.join(_PARAMETERS)}")
    spec = _parse_granularity(params.get("granularity", "hour"))
    start, end = _parse_range(params.get("from"), params.get("to"), spec, now)
    return UsageQuery(
        tenants=tuple(dict.fromkeys(tenants)),
        start=start,
        end=end,
        granularity=spec.name,
        model=params.get("model") or None,
        group_by=_parse_group_by(params.get("group_by", ""), allow_group_by_tenant),
        limit=_parse_limit(params.get("limit"), spec),
        page=_parse_page(params.get("page"), start, end, spec),
    )


def _parse_granularity(value: str) -> _BucketSpec:
    spec = _BUCKETS.get(value)
    if spec is None:
        raise ReportQueryError(f"'granularity': expected 'hour' or 'day', got {value!r}")
    return spec


def _parse_range(since: str | None, until: str | None, spec: _BucketSpec, now: float) -> tuple[int, int]:
    """The aligned ``[start, end)`` of the query, from the raw ``from`` and ``to``."""
    to = now if until is None else _parse_time("to", until, now)
    end = _align_up(math.ceil(to), spec.seconds)
    if since is None:
        start = max(end - spec.default_buckets * spec.seconds, _EARLIEST)
    else:
        moment = _parse_time("from", since, now)
        if moment >= to:
            raise ReportQueryError(f"'from': {since!r} is not before 'to' ({_iso(math.floor(to))})")
        start = _align_down(math.floor(moment), spec.seconds)
    buckets = (end - start) // spec.seconds
    if buckets > spec.max_buckets:
        raise ReportQueryError(
            f"'from': the range spans {buckets} {spec.name} buckets; the maximum is {spec.max_buckets}"
        )
    return start, end


def parse_time(value: str, name: str) -> float:
    """Unix seconds from an integer string or ISO 8601 (naive means UTC); errors name the parameter ``name``."""
    try:
        if value.isascii() and value.isdigit():
            return float(int(value))
        moment = dt.datetime.fromisoformat(value)
        return (moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)).timestamp()
    except (ValueError, OverflowError):
        raise ReportQueryError(f"{name!r}: expected ISO 8601 or Unix seconds, got {value!r}") from None


def _parse_time(name: str, value: str, now: float) -> float:
    """:func:`parse_time`, within 2000-01-01 .. now + 1 day."""
    seconds = parse_time(value, name)
    if seconds < _EARLIEST:
        raise ReportQueryError(f"{name!r}: {value!r} is before 2000-01-01")
    if seconds > now + _FUTURE_LEEWAY_SECONDS:
        raise ReportQueryError(f"{name!r}: {value!r} is more than a day in the future")
    return seconds


def _parse_group_by(value: str, allow_tenant: bool) -> tuple[GroupKey, ...]:
    names = {name.strip() for name in value.split(",")} if value else set()
    unknown = sorted(names - set(_GROUP_KEYS))
    if unknown:
        raise ReportQueryError(f"'group_by': expected 'model' and/or 'tenant', got {unknown[0]!r}")
    if "tenant" in names and not allow_tenant:
        raise ReportQueryError("'group_by': 'tenant' is only available in operator reports")
    return tuple(key for key in _GROUP_KEYS if key in names)


def _parse_limit(value: str | None, spec: _BucketSpec) -> int | None:
    if value is None:
        return None
    if not (value.isascii() and value.isdigit() and 1 <= int(value) <= spec.max_buckets):
        raise ReportQueryError(f"'limit': expected an integer from 1 to {spec.max_buckets}, got {value!r}")
    return int(value)


def _parse_page(value: str | None, start: int, end: int, spec: _BucketSpec) -> int | None:
    """The cursor is the Unix start of the page's first bucket; it must fall on a bucket of the range."""
    if value is None:
        return None
    if not (value.isascii() and value.isdigit() and start <= int(value) < end and int(value) % spec.seconds == 0):
        raise ReportQueryError(f"'page': {value!r} is not a page of this range; pass the 'next_page' of the last one")
    return int(value)


def _align_down(seconds: int, width: int) -> int:
    return seconds // width * width


def _align_up(seconds: int, width: int) -> int:
    return -(-seconds // width) * width


def _iso(seconds: int) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclasses.dataclass(frozen=True, slots=True)
class UsageCounters:
    """The ledger's counters for one bucket and group, or summed over many; money in integer nano-dollars."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_nano_usd: int = 0
    errors: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: UsageCounters) -> UsageCounters:
        return UsageCounters(**{name: getattr(self, name) + getattr(other, name) for name in COUNTER_FIELDS})

    def as_dict(self) -> dict[str, int | str]:
        """The ledger's counters with ``total_tokens`` and the exact ``cost_usd``, in the report's column order."""
        return {
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "cost_nano_usd": self.cost_nano_usd,
            "cost_usd": format_usd(self.cost_nano_usd),
            "errors": self.errors,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class UsageResult:
    """One group of a bucket; ``model`` and ``tenant`` are ``None`` when the report is not grouped by them."""

    model: str | None
    tenant: str | None
    counters: UsageCounters

    def as_dict(self) -> dict[str, int | str | None]:
        return {"model": self.model, "tenant": self.tenant, **self.counters.as_dict()}


@dataclasses.dataclass(frozen=True, slots=True)
class UsageBucket:
    """One UTC hour or day, ``[start_time, end_time)``, with one result per group, sorted by (model, tenant)."""

    start_time: int
    end_time: int
    results: tuple[UsageResult, ...]

    def as_dict(self) -> dict[str, object]:
        return {
            "object": "bucket",
            "start_time": self.start_time,
            "end_time": self.end_time,
            "start": _iso(self.start_time),
            "results": [result.as_dict() for result in self.results],
        }


@dataclasses.dataclass(frozen=True, slots=True)
class UsageReport:
    """One page of a usage report: the query and its buckets, in time order, with no gaps."""

    query: UsageQuery
    buckets: tuple[UsageBucket, ...]

    @property
    def totals(self) -> UsageCounters:
        """The counters summed over this page only; a report of several pages sums its pages' totals."""
        total = UsageCounters()
        for bucket in self.buckets:
            for result in bucket.results:
                total += result.counters
        return total

    @property
    def next_page(self) -> str | None:
        """The ``page`` cursor of the next page, or ``None`` on the last page."""
        return str(self.query.page_end) if self.query.page_end < self.query.end else None

    def as_dict(self) -> dict[str, object]:
        """The JSON page: ``from``/``to`` are the whole range, ``data`` and ``totals`` this page only.

        ``{"object": "page", "granularity": "hour", "from": 1795305600, "to": 1795392000, "data": [{"object":
        "bucket", "start_time": ..., "end_time": ..., "start": "2026-11-22T04:00:00Z", "results": [{"model": null,
        "tenant": null, "requests": 2, ..., "cost_usd": "0.000816130", "errors": 0}]}], "totals": {...},
        "has_more": false, "next_page": null}``
        """
        return {
            "object": "page",
            "granularity": self.query.granularity,
            "from": self.query.start,
            "to": self.query.end,
            "data": [bucket.as_dict() for bucket in self.buckets],
            "totals": self.totals.as_dict(),
            "has_more": self.next_page is not None,
            "next_page": self.next_page,
        }

    def to_csv(self) -> str:
        """One row per bucket and group, with the JSON's names; times in ISO 8601 UTC, ungrouped keys empty."""
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=_CSV_COLUMNS)
        writer.writeheader()
        for bucket in self.buckets:
            times = {"start": _iso(bucket.start_time), "end": _iso(bucket.end_time)}
            writer.writerows({**times, **result.as_dict()} for result in bucket.results)
        return out.getvalue()

    def to_table(self) -> str:
        """An aligned plain-text table for a terminal, numbers right-aligned, ending with a TOTAL row."""
        header = ("start", "model", "tenant", *_COUNTER_COLUMNS)
        rows = [
            (_iso(bucket.start_time), result.model or "-", result.tenant or "-", *_cells(result.counters))
            for bucket in self.buckets
            for result in bucket.results
        ]
        rows.append(("TOTAL", "", "", *_cells(self.totals)))
        widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
        lines = [_table_line(row, widths) for row in [header, *rows]]
        return "\n".join(lines) + "\n"


def _cells(counters: UsageCounters) -> tuple[str, ...]:
    return tuple(str(value) for value in counters.as_dict().values())


def _table_line(row: Sequence[str], widths: Sequence[int]) -> str:
    """Text columns (start, model, tenant) left-aligned, the counters right-aligned."""
    cells = [cell.ljust(width) for cell, width in zip(row[:3], widths[:3], strict=True)]
    cells += [cell.rjust(width) for cell, width in zip(row[3:], widths[3:], strict=True)]
    return "  ".join(cells).rstrip()


async def usage_report(redis: Redis, query: UsageQuery, *, models: Sequence[str]) -> UsageReport:
    """Read one page of ``query`` from the ledger's counters.

    Every bucket of every tenant is read in one pipeline of ``HGETALL`` (no transaction: the counters only grow,
    and a report is a snapshot either way), so a month of hours costs one round trip.

    * models - the configured model names. Grouped by model, each of them (only ``query.model`` when filtered)
      appears in every bucket, with zeros when unused, as does any other model found in the page's data.
      Grouped by tenant, every tenant of the query appears in every bucket.
    """
    spec = _BUCKETS[query.granularity]
    starts = range(query.page_start, query.page_end, spec.seconds)
    reads = [(start, tenant) for start in starts for tenant in query.tenants]
    async with redis.pipeline(transaction=False) as pipe:
        for start, tenant in reads:
            pipe.hgetall(_bucket_key(tenant, start, spec))
        replies = await pipe.execute()
    found = _sum_by_group(query, reads, replies)
    groups = _groups(query, models, {model for _, (model, _) in found if model is not None})
    buckets = tuple(
        UsageBucket(
            start,
            start + spec.seconds,
            tuple(UsageResult(*group, found.get((start, group), UsageCounters())) for group in groups),
        )
        for start in starts
    )
    return UsageReport(query, buckets)


def _bucket_key(tenant: str, start: int, spec: _BucketSpec) -> str:
    date = dt.datetime.fromtimestamp(start, dt.UTC).strftime(spec.key_format)
    return tenant_key(tenant, "usage", spec.ledger_kind, date)


def _sum_by_group(
    query: UsageQuery, reads: Sequence[tuple[int, str]], replies: Sequence[Mapping[bytes | str, bytes | str]]
) -> dict[tuple[int, _Group], UsageCounters]:
    """The counters of each (bucket start, group) that has data, ``query.model`` only when filtered.

    Ledger fields are ``<model>|<counter>``: model names hold ``/`` and ``@`` but never ``|``, so the last ``|``
    splits them. Counters this module does not know (a newer ledger's) are skipped.
    """
    sums: dict[tuple[int, _Group], list[int]] = {}
    for (start, tenant), fields in zip(reads, replies, strict=True):
        for field, value in fields.items():
            model, _, counter = (field.decode() if isinstance(field, bytes) else field).rpartition("|")
            index = _COUNTER_INDEX.get(counter)
            if index is not None and model and query.model in (None, model):
                sums.setdefault((start, _group_of(query, model, tenant)), [0] * len(COUNTER_FIELDS))[index] += int(
                    value
                )
    return {key: UsageCounters(**dict(zip(COUNTER_FIELDS, values, strict=True))) for key, values in sums.items()}


def _group_of(query: UsageQuery, model: str, tenant: str) -> _Group:
    return (model if "model" in query.group_by else None, tenant if "tenant" in query.group_by else None)


def _groups(query: UsageQuery, models: Sequence[str], found_models: set[str]) -> list[_Group]:
    """Every group each bucket shows, sorted by (model, tenant)."""
    model_names: list[str | None] = [None]
    if "model" in query.group_by:
        configured = [query.model] if query.model is not None else models
        model_names = [*sorted({*configured, *found_models})]
    tenant_names: list[str | None] = [*sorted(query.tenants)] if "tenant" in query.group_by else [None]
    return [(model, tenant) for model in model_names for tenant in tenant_names]
