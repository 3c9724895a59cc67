"""Usage reports: the ledger's hourly and daily counters, read back as pages of time buckets.

A report answers "what did these tenants use between two times", bucket by bucket, in the shape of OpenAI's
organization Usage API (a page of buckets, each with its results) with Tollgate's counter names
(shared/spec/usage-api.md). An endpoint puts :meth:`UsageReport.as_dict` in the ``result`` of the Workers AI
envelope, and turns :class:`ReportQueryError` into a 400::

    query = parse_query(request.query_params, tenants=[tenant], now=time.time(), allow_group_by_tenant=False)
    report = await usage_report(redis, query, models=list(settings.models))
    body = {"result": report.as_dict(), "success": True, "errors": [], "messages": []}

Buckets are UTC hours or days. Every bucket of the range is returned, so charts have no gaps. Its results are every
group with zeros when nothing was used, except in a report grouped by tenant: there a bucket lists only the groups
(tenant, or tenant and model) with usage in it, and its ``results`` are empty when nobody used anything; a missing
group means zero. (A week of hours over 3,000 tenants, each with one request, was otherwise half a million results,
all zeros but 3,000.) Money stays integer nano-dollars; ``cost_usd`` is its exact decimal string, never a float.
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

import anyio.to_thread
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
    """One UTC hour or day, ``[start_time, end_time)``, with its results sorted by (model, tenant): one per group of
    the report, or, grouped by tenant, one per group with usage in the bucket."""

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
    def result_count(self) -> int:
        """How many results this page holds over all its buckets: the rows of its CSV."""
        return sum(len(bucket.results) for bucket in self.buckets)

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
        """One row per result of each bucket (grouped by tenant: none for a tenant without usage in the bucket), with
        the JSON's names; times in ISO 8601 UTC, ungrouped keys empty."""
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

    One script call reads up to 168 of a tenant's buckets and answers only those that hold data, and the calls go in
    pipelines of about 5,000 buckets (no transaction: the counters only grow, and a report is a
    snapshot either way): a week of hours over 3,000 tenants takes 104 pipelines, and the event loop runs between
    them. Summing more than 1,000 buckets with data (about 8 µs each) into the report runs in a worker thread.

    * models - the configured model names. Grouped by model but not by tenant, each of them (only ``query.model``
      when filtered) appears in every bucket, with zeros when unused, as does any other model found in the page's
      data. Grouped by tenant, a bucket holds only the groups with usage in it, in the same order.
    """
    found = await _read_buckets(redis, query)
    if len(found) <= _SUM_ON_LOOP_MAX_BUCKETS:
        return _assemble(query, models, found)
    return await anyio.to_thread.run_sync(_assemble, query, models, found)


def _assemble(query: UsageQuery, models: Sequence[str], found: Sequence[_Found]) -> UsageReport:
    """The report of the buckets read: every bucket of the page, with the groups :func:`usage_report` describes."""
    sums = _sum_by_group(query, found)
    every = None if "tenant" in query.group_by else _groups(query, models, sums)
    zero = UsageCounters()
    buckets = []
    for start in range(query.page_start, query.page_end, query.bucket_seconds):
        bucket = sums.get(start, {})
        groups = every if every is not None else sorted(bucket, key=_group_order)
        results = tuple(UsageResult(*group, bucket.get(group, zero)) for group in groups)
        buckets.append(UsageBucket(start, start + query.bucket_seconds, results))
    return UsageReport(query, tuple(buckets))


# KEYS: usage buckets of one tenant, all under its hash tag (one Cluster slot). The reply lists only the buckets that
# have fields, each as its position in KEYS (from 1) followed by HGETALL's flat field/value list: an idle tenant's
# week of hours is one call and an empty reply, where one HGETALL per bucket cost the gateway 20 µs each to send and
# parse (3,000 tenants: 504,000 commands and 11 s on the event loop). A call reads at most _KEYS_PER_CALL buckets, so
# it holds Redis for 0.1 ms (0.8 ms if every bucket has data); 2,232 hours in one call held it for 1.5 ms (10 ms).
_READ_SCRIPT: Final = """
local found = {}
for i, key in ipairs(KEYS) do
  local fields = redis.call('HGETALL', key)
  if #fields > 0 then
    found[#found + 1] = i
    found[#found + 1] = fields
  end
end
return found
"""
_KEYS_PER_CALL: Final = 168  # a week of hours
_KEYS_PER_PIPELINE: Final = 5000
_SUM_ON_LOOP_MAX_BUCKETS: Final = 1000

_Fields = Sequence[bytes | str]  # HGETALL's flat list: field, value, field, value, ...
_Found = tuple[int, str, _Fields]  # a bucket with data: its start, its tenant, its fields


async def _read_buckets(redis: Redis, query: UsageQuery) -> list[_Found]:
    """Every bucket of the page where one of the query's tenants has data."""
    spec = _BUCKETS[query.granularity]
    read = redis.register_script(_READ_SCRIPT)
    starts = range(query.page_start, query.page_end, spec.seconds)
    # keys as bytes: redis-py then sends them without encoding each one, which took a third of the time to pack them
    dates = [dt.datetime.fromtimestamp(start, dt.UTC).strftime(spec.key_format).encode() for start in starts]
    calls = [(tenant, first) for tenant in query.tenants for first in range(0, len(dates), _KEYS_PER_CALL)]
    calls_per_pipeline = max(1, _KEYS_PER_PIPELINE // max(1, min(len(dates), _KEYS_PER_CALL)))
    found: list[_Found] = []
    for offset in range(0, len(calls), calls_per_pipeline):
        batch = calls[offset : offset + calls_per_pipeline]
        async with redis.pipeline(transaction=False) as pipe:
            for tenant, first in batch:
                prefix = tenant_key(tenant, "usage", spec.ledger_kind, "").encode()
                await read(keys=[prefix + date for date in dates[first : first + _KEYS_PER_CALL]], client=pipe)
            replies = await pipe.execute()
        for (tenant, first), reply in zip(batch, replies, strict=True):
            pairs = zip(reply[::2], reply[1::2], strict=True)
            found += [(starts[first + position - 1], tenant, fields) for position, fields in pairs]
    return found


def _sum_by_group(query: UsageQuery, found: Sequence[_Found]) -> dict[int, dict[_Group, UsageCounters]]:
    """The counters of each group that has data, by bucket start; ``query.model`` only when filtered."""
    sums: dict[int, dict[_Group, list[int]]] = {}
    columns: dict[bytes | str, tuple[str, int] | None] = {}  # the few distinct fields, each parsed once
    for start, tenant, fields in found:
        for field, value in zip(fields[::2], fields[1::2], strict=True):
            if field not in columns:
                columns[field] = _column(query, field)
            column = columns[field]
            if column is not None:
                group = _group_of(query, column[0], tenant)
                sums.setdefault(start, {}).setdefault(group, [0] * len(COUNTER_FIELDS))[column[1]] += int(value)
    return {start: {group: _counters(values) for group, values in groups.items()} for start, groups in sums.items()}


def _column(query: UsageQuery, field: bytes | str) -> tuple[str, int] | None:
    """A ledger field's model and counter index; ``None`` when the report does not count it.

    Ledger fields are ``<model>|<counter>``: model names hold ``/`` and ``@`` but never ``|``, so the last ``|``
    splits them. Counters this module does not know (a newer ledger's) are skipped, as are other models than
    ``query.model`` when it filters.
    """
    model, _, counter = (field.decode() if isinstance(field, bytes) else field).rpartition("|")
    index = _COUNTER_INDEX.get(counter)
    if index is None or not model or query.model not in (None, model):
        return None
    return model, index


def _counters(values: Sequence[int]) -> UsageCounters:
    return UsageCounters(**dict(zip(COUNTER_FIELDS, values, strict=True)))


def _group_of(query: UsageQuery, model: str, tenant: str) -> _Group:
    return (model if "model" in query.group_by else None, tenant if "tenant" in query.group_by else None)


def _group_order(group: _Group) -> tuple[str, str]:
    return (group[0] or "", group[1] or "")


def _groups(query: UsageQuery, models: Sequence[str], found: Mapping[int, Mapping[_Group, object]]) -> list[_Group]:
    """Every group each bucket shows when the report is not grouped by tenant, sorted by model."""
    if "model" not in query.group_by:
        return [(None, None)]
    configured = [query.model] if query.model is not None else models
    found_models = {model for groups in found.values() for model, _ in groups if model is not None}
    return [(model, None) for model in sorted({*configured, *found_models})]
