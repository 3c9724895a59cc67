"""The ledger: one atomic, deduplicating Redis script per finished request.

Every admitted request is recorded exactly once, keyed by its request id. The script sets the request's
"seen" key with ``NX`` and only then adds to the tenant's hourly and daily counters and appends a usage event,
so a write that redis-py retries after a timeout (it may already have been applied) counts once.

Key layout (all of a tenant's keys share the hash tag ``{tenant}``, so each script touches one Cluster slot)::

    tg:{<tenant>}:seen:<request_id>         "1", expires after ledger.seen_ttl_seconds
    tg:{<tenant>}:usage:h:<YYYYMMDDHH>      hash, fields "<model>|requests", "|prompt_tokens",
    tg:{<tenant>}:usage:d:<YYYYMMDD>            "|completion_tokens", "|cost_nano_usd", "|errors" (UTC)
    tg:{<tenant>}:events                    stream of usage events, trimmed to about ledger.events_max_length
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Final

from redis.asyncio import Redis

COUNTER_FIELDS: Final = ("requests", "prompt_tokens", "completion_tokens", "cost_nano_usd", "errors")

# KEYS: seen, hour bucket, day bucket, events.  ARGV: seen_ttl, events_max_length, model, prompt_tokens,
# completion_tokens, cost_nano_usd, is_error, then the event's field/value pairs.
_RECORD_SCRIPT: Final = """
local prompt, completion, cost, is_error = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
if not (prompt and completion and cost and is_error) or prompt < 0 or completion < 0 or cost < 0 then
  return redis.error_reply('ERR tollgate ledger: bad usage numbers')
end
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  return 0
end
local model = ARGV[3]
for i = 2, 3 do
  redis.call('HINCRBY', KEYS[i], model .. '|requests', 1)
  redis.call('HINCRBY', KEYS[i], model .. '|prompt_tokens', prompt)
  redis.call('HINCRBY', KEYS[i], model .. '|completion_tokens', completion)
  redis.call('HINCRBY', KEYS[i], model .. '|cost_nano_usd', cost)
  redis.call('HINCRBY', KEYS[i], model .. '|errors', is_error)
end
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 8))
return 1
"""


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


class Ledger:
    """Records usage in Redis, exactly once per request id.

    Usage::

        ledger = Ledger(redis, seen_ttl_seconds=35 * 86400, events_max_length=1_000_000)
        is_new = await ledger.record(usage_record)
    """

    def __init__(self, redis: Redis, *, seen_ttl_seconds: int, events_max_length: int) -> None:
        self._redis = redis
        self._seen_ttl_seconds = seen_ttl_seconds
        self._events_max_length = events_max_length
        self._record = redis.register_script(_RECORD_SCRIPT)

    async def record(self, record: UsageRecord) -> bool:
        """Record ``record``; ``True`` if it was new, ``False`` if its request id was already billed."""
        hour = hour_bucket(record.started_at)
        keys = [
            tenant_key(record.tenant, "seen", record.request_id),
            tenant_key(record.tenant, "usage", "h", hour),
            tenant_key(record.tenant, "usage", "d", hour[:8]),
            tenant_key(record.tenant, "events"),
        ]
        event = {
            "request_id": record.request_id,
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
            self._seen_ttl_seconds,
            self._events_max_length,
            record.model,
            record.prompt_tokens,
            record.completion_tokens,
            record.cost_nano_usd,
            int(record.is_error),
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

    async def events(self, tenant: str, count: int = 1000) -> list[dict[str, str]]:
        """The tenant's most recent usage events, oldest first."""
        entries = await self._redis.xrevrange(tenant_key(tenant, "events"), count=count)
        return [{_text(k): _text(v) for k, v in fields.items()} for _, fields in reversed(entries)]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
