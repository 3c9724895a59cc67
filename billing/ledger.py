"""The ledger: one atomic, deduplicating Redis script per finished request.

Every admitted request is recorded exactly once, keyed by its request id. The script sets the request's
"seen" key with ``NX`` and only then adds to the tenant's hourly, daily and monthly counters and appends a usage
event, so a write that redis-py retries after a timeout (it may already have been applied), or a spooled record
replayed later (billing/spool.py), counts once.

Key layout (all of a tenant's keys share the hash tag ``{tenant}``, so each script touches one Cluster slot)::

    tg:{<tenant>}:seen:<request_id>         "1", expires after Retention.seen_seconds
    tg:{<tenant>}:usage:h:<YYYYMMDDHH>      hash, fields "<model>|requests", "|prompt_tokens",
    tg:{<tenant>}:usage:d:<YYYYMMDD>            "|completion_tokens", "|cost_nano_usd", "|errors" (UTC);
                                                kept Retention.hourly_seconds / daily_seconds after the bucket
    tg:{<tenant>}:spend:m:<YYYYMM>          hash, "total" and "key:<key_id>": nano-dollars spent that month (UTC)
    tg:{<tenant>}:events                    stream of usage events, trimmed to Retention.events_seconds;
                                                expires that long after its newest event

Buckets are dated by the request's ``started_at``, which comes from Redis ``TIME`` at admission, so one clock dates
every event however skewed the replicas' clocks are.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from typing import Final

from redis.asyncio import Redis

from billing._pipelined import hget_each

COUNTER_FIELDS: Final = ("requests", "prompt_tokens", "completion_tokens", "cost_nano_usd", "errors")

# KEYS: seen, hour bucket, day bucket, month spend, events, the key's rate-limit window tokens and slots.
# ARGV: seen_ttl, hour bucket expiry (Unix s), day bucket expiry (Unix s), events retention (s), model, prompt_tokens,
# completion_tokens, cost_nano_usd, is_error, key field of the month spend, request id, then the event's field/value
# pairs.
_RECORD_SCRIPT: Final = """
-- numbers are passed on as the strings they came in (a Lua number would print large values in exponent form)
for i = 6, 9 do
  if not string.match(ARGV[i], '^%d+$') then
    return redis.error_reply('ERR tollgate ledger: bad usage numbers')
  end
end
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  return 0
end
local model = ARGV[5]
for i = 2, 3 do
  redis.call('HINCRBY', KEYS[i], model .. '|requests', 1)
  redis.call('HINCRBY', KEYS[i], model .. '|prompt_tokens', ARGV[6])
  redis.call('HINCRBY', KEYS[i], model .. '|completion_tokens', ARGV[7])
  redis.call('HINCRBY', KEYS[i], model .. '|cost_nano_usd', ARGV[8])
  redis.call('HINCRBY', KEYS[i], model .. '|errors', ARGV[9])
  redis.call('EXPIREAT', KEYS[i], ARGV[i])
end
redis.call('HINCRBY', KEYS[4], 'total', ARGV[8])
redis.call('HINCRBY', KEYS[4], ARGV[10], ARGV[8])
local now = redis.call('TIME')
local oldest = (tonumber(now[1]) - tonumber(ARGV[4])) * 1000
redis.call('XADD', KEYS[5], 'MINID', '~', string.format('%d', oldest), '*', unpack(ARGV, 12))
-- trimming needs a next event: a tenant that stops has its stream expire once its newest event is past retention
redis.call('EXPIRE', KEYS[5], ARGV[4])
-- the rate-limit window keeps the tokens used instead of those reserved (billing/limits.py); the slot is free
local reserved = redis.call('HGET', KEYS[6], ARGV[11])
if reserved then
  local used = tonumber(ARGV[6]) + tonumber(ARGV[7])
  redis.call('HINCRBY', KEYS[6], '__total', used - tonumber(reserved))
  redis.call('HSET', KEYS[6], ARGV[11], used)
end
redis.call('ZREM', KEYS[7], ARGV[11])
return 1
"""


@dataclasses.dataclass(frozen=True, slots=True)
class Retention:
    """How long the ledger keeps what it writes."""

    seen_seconds: int = 35 * 86400  # request ids for deduplication: longer than any spool replay may take
    events_seconds: int = 35 * 86400  # the usage event stream
    hourly_seconds: int = 400 * 86400  # hourly buckets, counted from the end of the bucket
    daily_seconds: int = 5 * 366 * 86400  # daily buckets


@dataclasses.dataclass(frozen=True, slots=True)
class UsageRecord:
    """One finished request, as billed."""

    request_id: str
    tenant: str
    key_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost_nano_usd: int
    status: str  # "ok", or why the answer ended early: "client_disconnected", "upstream_error", ...
    started_at: float  # Unix seconds; dates the hourly and daily buckets
    duration_seconds: float

    @property
    def is_error(self) -> bool:
        return self.status not in ("ok", "client_disconnected")


def tenant_key(tenant: str, *parts: str) -> str:
    """A Redis key of ``tenant``'s, under its hash tag."""
    return ":".join(("tg", "{" + tenant + "}", *parts))


def hour_bucket(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y%m%d%H")


def month_of(timestamp: float) -> str:
    """The calendar month (UTC) of ``timestamp``, as ``YYYYMM``."""
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y%m")


def rate_keys(tenant: str, key_id: str) -> tuple[str, str, str]:
    """A key's rate-limit window (sorted set), its tokens (hash) and its stream slots (sorted set): see
    billing/limits.py."""
    return (
        tenant_key(tenant, "rl", key_id, "w"),
        tenant_key(tenant, "rl", key_id, "wt"),
        tenant_key(tenant, "rl", key_id, "c"),
    )


def spend_key(tenant: str, month: str) -> str:
    """The hash of ``tenant``'s spend in ``month`` (``YYYYMM``): ``total`` and ``key:<key_id>``, in nano-dollars."""
    return tenant_key(tenant, "spend", "m", month)


class Ledger:
    """Records usage in Redis, exactly once per request id.

    Usage::

        ledger = Ledger(redis, Retention(seen_seconds=35 * 86400))
        is_new = await ledger.record(usage_record)
    """

    def __init__(self, redis: Redis, retention: Retention = Retention()) -> None:
        self._redis = redis
        self._retention = retention
        self._record = redis.register_script(_RECORD_SCRIPT)

    async def record(self, record: UsageRecord) -> bool:
        """Record ``record``; ``True`` if it was new, ``False`` if its request id was already billed."""
        hour = hour_bucket(record.started_at)
        hour_start = int(record.started_at) // 3600 * 3600
        day_start = int(record.started_at) // 86400 * 86400
        keys = [
            tenant_key(record.tenant, "seen", record.request_id),
            tenant_key(record.tenant, "usage", "h", hour),
            tenant_key(record.tenant, "usage", "d", hour[:8]),
            spend_key(record.tenant, month_of(record.started_at)),
            tenant_key(record.tenant, "events"),
            *rate_keys(record.tenant, record.key_id)[1:],
        ]
        event = {
            "request_id": record.request_id,
            "tenant": record.tenant,
            "key_id": record.key_id,
            "model": record.model,
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens,
            "cost_nano_usd": record.cost_nano_usd,
            "status": record.status,
            "started_at": f"{record.started_at:.6f}",
            "duration_seconds": f"{record.duration_seconds:.6f}",
        }
        args: list[str | int] = [
            self._retention.seen_seconds,
            hour_start + 3600 + self._retention.hourly_seconds,
            day_start + 86400 + self._retention.daily_seconds,
            self._retention.events_seconds,
            record.model,
            record.prompt_tokens,
            record.completion_tokens,
            record.cost_nano_usd,
            int(record.is_error),
            f"key:{record.key_id}",
            record.request_id,
        ]
        for name, value in event.items():
            args += [name, value]
        return bool(await self._record(keys=keys, args=args))

    async def bucket_totals(self, tenant: str, model: str, bucket: str) -> dict[str, int]:
        """The counters of one hourly (``YYYYMMDDHH``) or daily (``YYYYMMDD``) bucket for ``model``."""
        kind = "h" if len(bucket) == 10 else "d"
        fields = [f"{model}|{name}" for name in COUNTER_FIELDS]
        values = await self._redis.hmget(tenant_key(tenant, "usage", kind, bucket), fields)
        return {name: int(value or 0) for name, value in zip(COUNTER_FIELDS, values, strict=True)}

    async def month_spend(self, tenant: str, month: str, key_id: str | None = None) -> int:
        """Nano-dollars ``tenant`` (or one of its keys) spent in ``month`` (``YYYYMM``, UTC)."""
        value = await self._redis.hget(spend_key(tenant, month), "total" if key_id is None else f"key:{key_id}")
        return int(value or 0)

    async def month_spends(self, tenants: Sequence[str], month: str) -> list[int]:
        """:meth:`month_spend` of each of ``tenants`` in ``month``, in order, read in pipelines of 1,000 tenants."""
        values = await hget_each(self._redis, [(spend_key(tenant, month), "total") for tenant in tenants])
        return [int(value or 0) for value in values]

    async def events(self, tenant: str, count: int = 1000) -> list[dict[str, str]]:
        """The tenant's most recent usage events, oldest first."""
        entries = await self._redis.xrevrange(tenant_key(tenant, "events"), count=count)
        return [{_text(k): _text(v) for k, v in fields.items()} for _, fields in reversed(entries)]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
