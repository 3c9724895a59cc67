"""Admission in one Redis round trip: Redis time, the monthly budgets, and a key's rate limits.

One Lua script decides, on Redis's clock, whether a request may go on. It reads ``TIME``, checks the tenant's and
the key's monthly budget (nothing is written when a budget refuses), then the key's limits, and only when all pass
records the request in them:

- **requests per minute** and **tokens per minute** over a sliding 60-second window. Each admitted request is one
  entry (its request id, scored by its admission time) holding the tokens it reserves: prompt tokens plus
  ``max_tokens``. A request is admitted only if the window then holds at most the limit, so whatever the number of
  replicas the requests, and the reserved tokens, admitted in any 60 s never exceed the limits. When the request is
  billed, the ledger script (billing/ledger.py) sets its entry to the tokens really used, returning the rest to the
  window while the entry is still in it. Memory is one entry per request of the last minute, per key.
- **concurrent streams**: a slot per running request, released by the ledger script when the request is billed
  (whatever ended it). A slot whose gateway died before billing expires after ``slot_ttl_seconds``.

Redis layout (all under the tenant's hash tag, so the script touches one Cluster slot)::

    tg:{<tenant>}:rl:<key_id>:w     sorted set: request id → admission time (µs, Redis TIME)
    tg:{<tenant>}:rl:<key_id>:wt    hash: request id → reserved (then used) tokens, and "__total"
    tg:{<tenant>}:rl:<key_id>:c     sorted set: request id → slot expiry (µs)

Budget amounts are compared as Lua numbers: exact up to 2^53 nano-dollars (about $9 million a month).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Final, Literal

from redis.asyncio import Redis

from billing.budgets import month_bounds
from billing.keys import ApiKey
from billing.ledger import month_of, rate_keys, spend_key, tenant_key

WINDOW_SECONDS: Final = 60

# KEYS: budget hash, month spend hash, window zset, window tokens hash, slots zset.
# ARGV: spend field of the key, default tenant cap ('' none), key cap ('' none), most possible cost,
#       rpm, tpm, streams (0: none), request id, tokens to reserve, slot ttl (ms), the month's bounds (Unix s).
_ADMIT_SCRIPT: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])  -- microseconds, as the ledger dates requests
local cap = redis.call('HGET', KEYS[1], 'monthly_nano_usd')
if not cap then cap = ARGV[2] end
local spent = redis.call('HMGET', KEYS[2], 'total', ARGV[1])
local tenant_spent, key_spent = tonumber(spent[1] or '0'), tonumber(spent[2] or '0')
local cost = tonumber(ARGV[4])
-- amounts go back as the strings stored (a Lua number would print large values in exponent form)
local head = {t[1], t[2], cap, spent[1] or '0', spent[2] or '0'}
local function answer(verdict, a, b, c, d, e, f)
  return {verdict, head[1], head[2], head[3], head[4], head[5], a or 0, b or 0, c or 0, d or 0, e or 0, f or 0}
end
if tonumber(t[1]) < tonumber(ARGV[11]) or tonumber(t[1]) >= tonumber(ARGV[12]) then return answer('month') end
if ARGV[3] ~= '' and key_spent + cost > tonumber(ARGV[3]) then return answer('budget_key') end
if cap ~= '' and tenant_spent + cost > tonumber(cap) then return answer('budget_tenant') end

local rpm, tpm, streams = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local id, reserve, window = ARGV[8], tonumber(ARGV[9]), 60000000
-- a retry of an admission that went through (redis-py retries a call that timed out): admitted, nothing written
if redis.call('ZSCORE', KEYS[3], id) or redis.call('ZSCORE', KEYS[5], id) then
  return answer('ok', redis.call('ZCARD', KEYS[3]), window, tonumber(redis.call('HGET', KEYS[4], '__total') or '0'),
    0, redis.call('ZCARD', KEYS[5]), 0)
end
-- forget what left the window
local gone = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now - window)
for _, old in ipairs(gone) do
  local amount = tonumber(redis.call('HGET', KEYS[4], old) or '0')
  redis.call('HINCRBY', KEYS[4], '__total', -amount)
  redis.call('HDEL', KEYS[4], old)
end
if #gone > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - window) end
local count = redis.call('ZCARD', KEYS[3])
local total = tonumber(redis.call('HGET', KEYS[4], '__total') or '0')
local oldest = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
local frees_at = oldest[2] and (tonumber(oldest[2]) + window - now) or 0
if rpm > 0 and count + 1 > rpm then
  return answer('requests', count, frees_at, total, 0, 0, frees_at)
end
if tpm > 0 and reserve > tpm then
  return answer('tokens_too_large', count, frees_at, total, 0, 0, window)
end
if tpm > 0 and total + reserve > tpm then
  -- when will enough of the window's tokens have left it?
  local entries = redis.call('ZRANGE', KEYS[3], 0, -1, 'WITHSCORES')
  local freed, wait = 0, window
  for i = 1, #entries, 2 do
    freed = freed + tonumber(redis.call('HGET', KEYS[4], entries[i]) or '0')
    if total - freed + reserve <= tpm then wait = tonumber(entries[i + 1]) + window - now break end
  end
  return answer('tokens', count, frees_at, total, wait, 0, wait)
end
local running = 0
if streams > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
  running = redis.call('ZCARD', KEYS[5])
  if running >= streams then return answer('streams', count, frees_at, total, 0, running, 1000000) end
  redis.call('ZADD', KEYS[5], now + tonumber(ARGV[10]) * 1000, id)
  redis.call('PEXPIRE', KEYS[5], tonumber(ARGV[10]))
  running = running + 1
end
if rpm > 0 or tpm > 0 then
  redis.call('ZADD', KEYS[3], now, id)
  redis.call('HSET', KEYS[4], id, reserve)
  redis.call('HINCRBY', KEYS[4], '__total', reserve)
  redis.call('PEXPIRE', KEYS[3], 120000)
  redis.call('PEXPIRE', KEYS[4], 120000)
  count, total = count + 1, total + reserve
  if frees_at == 0 then frees_at = window end
end
return answer('ok', count, frees_at, total, 0, running, 0)
"""

Verdict = Literal["ok", "budget_key", "budget_tenant", "requests", "tokens", "tokens_too_large", "streams"]
_WRONG_MONTH: Final = "month"
_MAX_REMEMBERED_TENANTS: Final = 100_000


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """A key's rate limits; 0 means none."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    concurrent_streams: int = 0

    @property
    def any(self) -> bool:
        return bool(self.requests_per_minute or self.tokens_per_minute or self.concurrent_streams)


@dataclasses.dataclass(frozen=True, slots=True)
class AdmissionDecision:
    """What the admission script decided, and the state of the key's budgets and limits it saw."""

    verdict: Verdict
    now: float  # Redis TIME, Unix seconds
    tenant_cap: int | None
    tenant_spent: int
    key_cap: int | None
    key_spent: int
    limits: Limits
    requests_in_window: int  # including this request, when admitted
    requests_reset_seconds: float  # until the oldest request of the window leaves it
    tokens_in_window: int  # reserved and used tokens of the window, this request's reservation included
    tokens_reset_seconds: float  # refused for tokens: until enough have left the window
    streams_running: int
    retry_after_seconds: float

    @property
    def admitted(self) -> bool:
        return self.verdict == "ok"

    @property
    def budget_resets_at(self) -> float:
        """The start of the next month (UTC), when monthly budgets start again."""
        return month_bounds(month_of(self.now))[1]


class Limiter:
    """Runs the admission script. Usage::

    limiter = Limiter(redis, slot_ttl_seconds=600)
    decision = await limiter.admit(key, Limits(requests_per_minute=600), request_id=request_id,
                                   reserve_tokens=prompt_tokens + max_tokens, max_cost_nano_usd=cost,
                                   now_hint=time.time(), default_cap_nano_usd=None)
    """

    def __init__(self, redis: Redis, *, slot_ttl_seconds: float) -> None:
        self._script = redis.register_script(_ADMIT_SCRIPT)
        self._slot_ttl_ms = int(slot_ttl_seconds * 1000)
        self._tenant_caps: dict[str, int | None] = {}  # as last seen: what a Redis outage can still go by

    def last_tenant_cap(self, tenant: str) -> tuple[bool, int | None]:
        """Whether this process has seen ``tenant``'s monthly cap, and what it was (``None``: no cap)."""
        if tenant in self._tenant_caps:
            return True, self._tenant_caps[tenant]
        return False, None

    async def admit(
        self,
        key: ApiKey,
        limits: Limits,
        *,
        request_id: str,
        reserve_tokens: int,
        max_cost_nano_usd: int,
        now_hint: float,
        default_cap_nano_usd: int | None,
    ) -> AdmissionDecision:
        """Admit a request (``reserve_tokens`` = prompt + ``max_tokens``) or say why not; writes nothing unless
        admitted. ``now_hint`` (this replica's clock) picks the month whose spend is read; on the rare request
        where Redis's clock is in another month, the script says so before deciding and runs again."""
        window, window_tokens, slots = rate_keys(key.tenant, key.key_id)
        key_cap = key.monthly_budget_nano_usd
        args: list[str | int] = [
            f"key:{key.key_id}",
            "" if default_cap_nano_usd is None else default_cap_nano_usd,
            "" if key_cap is None else key_cap,
            max_cost_nano_usd,
            limits.requests_per_minute,
            limits.tokens_per_minute,
            limits.concurrent_streams,
            request_id,
            reserve_tokens,
            self._slot_ttl_ms,
        ]
        month = month_of(now_hint)
        while True:
            keys = [tenant_key(key.tenant, "budget"), spend_key(key.tenant, month), window, window_tokens, slots]
            bounds = [int(bound) for bound in month_bounds(month)]
            reply = await self._script(keys=keys, args=[*args, *bounds])
            if _text(reply[0]) != _WRONG_MONTH:
                decision = _decision(reply, key, limits)
                if len(self._tenant_caps) >= _MAX_REMEMBERED_TENANTS:
                    self._tenant_caps.clear()
                self._tenant_caps[key.tenant] = decision.tenant_cap
                return decision
            month = month_of(int(reply[1]))


def _decision(reply: list[Any], key: ApiKey, limits: Limits) -> AdmissionDecision:
    verdict, seconds, micros, cap, tenant_spent, key_spent, *numbers = reply
    count, frees_us, total, tokens_wait_us, running, retry_us = (int(value) for value in numbers)
    return AdmissionDecision(
        verdict=_text(verdict),  # type: ignore[arg-type]
        now=int(seconds) + int(micros) / 1_000_000,
        tenant_cap=int(cap) if cap not in (b"", "", None) else None,
        tenant_spent=int(tenant_spent),
        key_cap=key.monthly_budget_nano_usd,
        key_spent=int(key_spent),
        limits=limits,
        requests_in_window=count,
        requests_reset_seconds=frees_us / 1_000_000,
        tokens_in_window=total,
        tokens_reset_seconds=tokens_wait_us / 1_000_000,
        streams_running=running,
        retry_after_seconds=retry_us / 1_000_000,
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
