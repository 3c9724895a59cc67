"""API keys: created once, stored only as SHA-256 hashes, looked up by a public key id.

A key reads ``tg_<key_id>_<secret>``: ``key_id`` is 12 public characters that name the record, ``secret`` 256
random bits. For random secrets of that size one SHA-256 is enough; a slow KDF would add latency without real
benefit (RELIABILITY §7.2). The hash is compared with :func:`hmac.compare_digest`.

Each key has scopes (``inference``, ``usage:read``, ``admin``), an optional expiry and an optional monthly budget of
its own. Rotating a key issues a new secret with the same tenant, name, scopes, expiry and budget, and retires the
old one at once or after a grace period.

Redis layout (global, not per tenant: the key id is all an incoming request carries)::

    tg:key:<key_id>     hash: tenant, name, sha256, scopes ("inference,usage:read"), created_at, expires_at
                        (0: never), revoked ("0" or "1"), monthly_budget_nano_usd ("": none),
                        requests_per_minute, tokens_per_minute, concurrent_streams ("": the tenant's)
    tg:{<tenant>}:keys  set of the tenant's key ids
    tg:tenants          set of every tenant that ever had a key
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import math
import re
import secrets
import time
from collections.abc import Callable, Iterable
from typing import Final

from redis.asyncio import Redis

from billing.ledger import tenant_key

KEY_PREFIX: Final = "tg_"
SCOPES: Final = ("inference", "usage:read", "admin")
DEFAULT_SCOPES: Final = frozenset({"inference", "usage:read"})
TENANTS_KEY: Final = "tg:tenants"
_KEY_ID_ALPHABET: Final = "abcdefghijklmnopqrstuvwxyz234567"
_KEY_PATTERN: Final = re.compile(r"tg_([a-z2-7]{12})_([A-Za-z0-9_-]{43})")
_KEY_ID_PATTERN: Final = re.compile(r"[a-z2-7]{12}")
_LIMIT_FIELDS: Final = ("requests_per_minute", "tokens_per_minute", "concurrent_streams")
TENANT_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


class InvalidKeySettingError(ValueError):
    """A tenant id, scope, expiry or budget given for a key is not acceptable; the message says which and why."""


class InvalidTenantError(InvalidKeySettingError):
    """A tenant (account) id must be 1 to 64 letters, digits, ``-`` or ``_``."""


@dataclasses.dataclass(frozen=True, slots=True)
class KeyLimits:
    """A key's own rate limits; ``None`` takes its tenant's (or the configured default), 0 means no limit."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent_streams: int | None = None

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise InvalidKeySettingError(f"{field.name} must be a whole number >= 0, got {value!r}")

    def as_dict(self) -> dict[str, int | None]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, slots=True)
class ApiKey:
    """The stored record of a key: everything but the secret."""

    key_id: str
    tenant: str
    name: str
    created_at: float
    revoked: bool
    scopes: frozenset[str] = DEFAULT_SCOPES
    expires_at: float | None = None  # Unix seconds; None: never
    monthly_budget_nano_usd: int | None = None  # the key's own spend cap per calendar month (UTC); None: none
    limits: KeyLimits = KeyLimits()

    def usable_at(self, now: float) -> bool:
        """Not revoked and not expired at ``now``."""
        return not self.revoked and (self.expires_at is None or now < self.expires_at)

    def as_dict(self) -> dict[str, object]:
        """The record as JSON-able data (never the secret or its hash)."""
        return {
            "id": self.key_id,
            "tenant": self.tenant,
            "name": self.name,
            "scopes": sorted(self.scopes),
            "created_at": round(self.created_at, 3),
            "expires_at": None if self.expires_at is None else round(self.expires_at, 3),
            "revoked": self.revoked,
            "monthly_budget_nano_usd": self.monthly_budget_nano_usd,
            "limits": self.limits.as_dict(),
        }


@dataclasses.dataclass(frozen=True, slots=True)
class IssuedKey:
    """A newly created key. ``secret_key`` exists only here: show it once, store it nowhere."""

    record: ApiKey
    secret_key: str


def hash_key(secret_key: str) -> str:
    return hashlib.sha256(secret_key.encode()).hexdigest()


def parse_key_id(secret_key: str) -> str | None:
    """The key id of a well-formed key, else ``None``."""
    match = _KEY_PATTERN.fullmatch(secret_key)
    return match.group(1) if match else None


def check_tenant(tenant: str) -> str:
    """``tenant`` if it is a valid account id (safe inside a Redis hash tag), else :class:`InvalidTenantError`."""
    if not TENANT_PATTERN.fullmatch(tenant):
        raise InvalidTenantError(f"invalid tenant id {tenant!r}: use 1-64 letters, digits, '-' or '_'")
    return tenant


def check_scopes(scopes: Iterable[str]) -> frozenset[str]:
    """``scopes`` as a set, if every one is known and there is at least one."""
    chosen = frozenset(scopes)
    unknown = sorted(chosen - set(SCOPES))
    if unknown or not chosen:
        raise InvalidKeySettingError(f"scopes must be one or more of {', '.join(SCOPES)}; got {sorted(chosen)}")
    return chosen


class KeyStore:
    """Creates, finds, lists, rotates and revokes API keys in Redis."""

    def __init__(self, redis: Redis, *, clock: Callable[[], float] = time.time) -> None:
        self._redis = redis
        self._clock = clock

    async def create(
        self,
        tenant: str,
        name: str = "",
        *,
        scopes: Iterable[str] = DEFAULT_SCOPES,
        expires_at: float | None = None,
        monthly_budget_nano_usd: int | None = None,
        limits: KeyLimits = KeyLimits(),
    ) -> IssuedKey:
        """Create a key for ``tenant``; the returned secret is never stored."""
        record = ApiKey(
            key_id="",
            tenant=check_tenant(tenant),
            name=name,
            created_at=self._clock(),
            revoked=False,
            scopes=check_scopes(scopes),
            expires_at=expires_at,
            monthly_budget_nano_usd=_check_budget(monthly_budget_nano_usd),
            limits=limits,
        )
        if expires_at is not None and not (math.isfinite(expires_at) and expires_at > record.created_at):
            raise InvalidKeySettingError("the expiry must be a time in the future")
        while True:  # 60 random bits name a key: a clash is unlikely, but must never overwrite another key
            key_id = "".join(secrets.choice(_KEY_ID_ALPHABET) for _ in range(12))
            secret_key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
            if await self._redis.hsetnx(_record_key(key_id), "sha256", hash_key(secret_key)):
                break
        record = dataclasses.replace(record, key_id=key_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(_record_key(key_id), mapping=_encode(record))
            pipe.sadd(tenant_key(tenant, "keys"), key_id)
            pipe.sadd(TENANTS_KEY, tenant)
            await pipe.execute()
        return IssuedKey(record=record, secret_key=secret_key)

    async def find(self, secret_key: str) -> ApiKey | None:
        """The record of a well-formed key whose hash matches, or ``None``. The caller checks
        :meth:`ApiKey.usable_at`: a revoked or expired key is still returned, so it can be cached as such."""
        key_id = parse_key_id(secret_key)
        if key_id is None:
            return None
        fields = await self._redis.hgetall(_record_key(key_id))
        if not fields or not fields.get(b"tenant"):
            return None
        stored_hash = fields.get(b"sha256", b"").decode()
        if not hmac.compare_digest(stored_hash, hash_key(secret_key)):
            return None
        return _decode(key_id, fields)

    async def get(self, key_id: str) -> ApiKey | None:
        if not _KEY_ID_PATTERN.fullmatch(key_id):
            return None
        fields = await self._redis.hgetall(_record_key(key_id))
        return _decode(key_id, fields) if fields.get(b"tenant") else None

    async def list_keys(self, tenant: str | None = None) -> list[ApiKey]:
        """The keys of ``tenant``, or of every tenant; oldest first."""
        tenants = [tenant] if tenant is not None else await self.tenants()
        key_ids: list[str] = []
        for name in tenants:
            key_ids += sorted(member.decode() for member in await self._redis.smembers(tenant_key(name, "keys")))
        async with self._redis.pipeline(transaction=False) as pipe:
            for key_id in key_ids:
                pipe.hgetall(_record_key(key_id))
            rows = await pipe.execute()
        keys = [_decode(key_id, fields) for key_id, fields in zip(key_ids, rows, strict=True) if fields]
        return sorted(keys, key=lambda key: (key.tenant, key.created_at, key.key_id))

    async def tenants(self) -> list[str]:
        """Every tenant that ever had a key, sorted."""
        return sorted(member.decode() for member in await self._redis.smembers(TENANTS_KEY))

    async def revoke(self, key_id: str) -> ApiKey | None:
        """Revoke a key; its updated record, or ``None`` if there is no such key."""
        if await self.get(key_id) is None:
            return None
        await self._redis.hset(_record_key(key_id), "revoked", "1")
        return await self.get(key_id)

    async def rotate(self, key_id: str, *, grace_seconds: float = 0.0) -> tuple[IssuedKey, ApiKey] | None:
        """Issue a successor of ``key_id`` (same tenant, name, scopes, expiry and budget) and retire the old key:
        revoked at once, or expiring after ``grace_seconds`` so that clients can switch over. ``None`` if there is
        no usable key with that id."""
        if not (math.isfinite(grace_seconds) and grace_seconds >= 0):
            raise InvalidKeySettingError(f"grace must be a finite number of seconds >= 0, not {grace_seconds}")
        old = await self.get(key_id)
        now = self._clock()
        if old is None or not old.usable_at(now):
            return None
        issued = await self.create(
            old.tenant,
            old.name,
            scopes=old.scopes,
            expires_at=old.expires_at,
            monthly_budget_nano_usd=old.monthly_budget_nano_usd,
            limits=old.limits,
        )
        if grace_seconds > 0:
            retire_at = now + grace_seconds if old.expires_at is None else min(old.expires_at, now + grace_seconds)
            await self._redis.hset(_record_key(key_id), "expires_at", f"{retire_at:.3f}")
        else:
            await self._redis.hset(_record_key(key_id), "revoked", "1")
        retired = await self.get(key_id)
        assert retired is not None
        return issued, retired

    async def set_budget(self, key_id: str, monthly_budget_nano_usd: int | None) -> ApiKey | None:
        """Set or clear (``None``) a key's own monthly budget; the updated record, or ``None`` if no such key."""
        if await self.get(key_id) is None:
            return None
        value = _check_budget(monthly_budget_nano_usd)
        await self._redis.hset(_record_key(key_id), "monthly_budget_nano_usd", "" if value is None else str(value))
        return await self.get(key_id)

    async def set_limits(self, key_id: str, limits: KeyLimits) -> ApiKey | None:
        """Replace a key's own rate limits; the updated record, or ``None`` if there is no such key."""
        if await self.get(key_id) is None:
            return None
        await self._redis.hset(_record_key(key_id), mapping=_encode_limits(limits))
        return await self.get(key_id)


def _check_budget(nano_usd: int | None) -> int | None:
    if nano_usd is not None and (isinstance(nano_usd, bool) or not isinstance(nano_usd, int) or nano_usd < 0):
        raise InvalidKeySettingError(f"a budget must be a non-negative whole number of nano-dollars, got {nano_usd!r}")
    return nano_usd


def _record_key(key_id: str) -> str:
    return f"tg:key:{key_id}"


def _encode(record: ApiKey) -> dict[str, str]:
    budget = record.monthly_budget_nano_usd
    return {
        "tenant": record.tenant,
        "name": record.name,
        "scopes": ",".join(sorted(record.scopes)),
        "created_at": f"{record.created_at:.3f}",
        "expires_at": "0" if record.expires_at is None else f"{record.expires_at:.3f}",
        "revoked": "1" if record.revoked else "0",
        "monthly_budget_nano_usd": "" if budget is None else str(budget),
        **_encode_limits(record.limits),
    }


def _encode_limits(limits: KeyLimits) -> dict[str, str]:
    return {name: "" if value is None else str(value) for name, value in limits.as_dict().items()}


def _decode(key_id: str, fields: dict[bytes, bytes]) -> ApiKey:
    scopes = fields.get(b"scopes")
    expires_at = float(fields.get(b"expires_at") or 0)
    budget = fields.get(b"monthly_budget_nano_usd") or b""
    return ApiKey(
        key_id=key_id,
        tenant=fields.get(b"tenant", b"").decode(),
        name=fields.get(b"name", b"").decode(),
        created_at=float(fields.get(b"created_at") or 0),
        revoked=fields.get(b"revoked") == b"1",
        # keys created before scopes existed could do what a default key does
        scopes=frozenset(scopes.decode().split(",")) - {""} if scopes is not None else DEFAULT_SCOPES,
        expires_at=expires_at or None,
        monthly_budget_nano_usd=int(budget) if budget else None,
        limits=KeyLimits(**{field: _optional_int(fields.get(field.encode())) for field in _LIMIT_FIELDS}),
    )


def _optional_int(value: bytes | None) -> int | None:
    return int(value) if value else None
