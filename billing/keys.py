"""API keys: created once, stored only as SHA-256 hashes, looked up by a public key id.

A key reads ``tg_<key_id>_<secret>``: ``key_id`` is 12 public characters that name the record, ``secret`` 256
random bits. For random secrets of that size one SHA-256 is enough; a slow KDF would add latency without real
benefit (RELIABILITY §7.2). The hash is compared with :func:`hmac.compare_digest`.

Redis layout (global, not per tenant: the key id is all an incoming request carries)::

    tg:key:<key_id>     hash: tenant, name, sha256, created_at, revoked ("0" or "1")
    tg:{<tenant>}:keys  set of the tenant's key ids
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re
import secrets
import time
from typing import Final

from redis.asyncio import Redis

from billing.ledger import tenant_key

KEY_PREFIX: Final = "tg_"
_KEY_ID_ALPHABET: Final = "abcdefghijklmnopqrstuvwxyz234567"
_KEY_PATTERN: Final = re.compile(r"tg_([a-z2-7]{12})_([A-Za-z0-9_-]{43})")
TENANT_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


class InvalidTenantError(ValueError):
    """A tenant (account) id must be 1 to 64 letters, digits, ``-`` or ``_``."""


@dataclasses.dataclass(frozen=True, slots=True)
class ApiKey:
    """The stored record of a key: everything but the secret."""

    key_id: str
    tenant: str
    name: str
    created_at: float
    revoked: bool


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


class KeyStore:
    """Creates, finds and revokes API keys in Redis."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def create(self, tenant: str, name: str = "") -> IssuedKey:
        """Create a key for ``tenant``; the returned secret is never stored."""
        if not TENANT_PATTERN.fullmatch(tenant):
            raise InvalidTenantError(f"invalid tenant id {tenant!r}: use 1-64 letters, digits, '-' or '_'")
        while True:  # 60 random bits name a key: a clash is unlikely, but must never overwrite another key
            key_id = "".join(secrets.choice(_KEY_ID_ALPHABET) for _ in range(12))
            secret_key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
            if await self._redis.hsetnx(_record_key(key_id), "sha256", hash_key(secret_key)):
                break
        record = ApiKey(key_id=key_id, tenant=tenant, name=name, created_at=time.time(), revoked=False)
        fields = {"tenant": tenant, "name": name, "created_at": f"{record.created_at:.3f}", "revoked": "0"}
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(_record_key(key_id), mapping=fields)
            pipe.sadd(tenant_key(tenant, "keys"), key_id)
            await pipe.execute()
        return IssuedKey(record=record, secret_key=secret_key)

    async def find(self, secret_key: str) -> ApiKey | None:
        """The record of a valid, unrevoked key, or ``None``."""
        key_id = parse_key_id(secret_key)
        if key_id is None:
            return None
        fields = await self._redis.hgetall(_record_key(key_id))
        if not fields:
            return None
        record = _decode(key_id, fields)
        stored_hash = fields.get(b"sha256", b"").decode()
        if not hmac.compare_digest(stored_hash, hash_key(secret_key)) or record.revoked or not record.tenant:
            return None
        return record

    async def get(self, key_id: str) -> ApiKey | None:
        fields = await self._redis.hgetall(_record_key(key_id))
        return _decode(key_id, fields) if fields else None

    async def revoke(self, key_id: str) -> bool:
        """Revoke a key; ``False`` if there is no such key."""
        if not await self._redis.exists(_record_key(key_id)):
            return False
        await self._redis.hset(_record_key(key_id), "revoked", "1")
        return True


def _record_key(key_id: str) -> str:
    return f"tg:key:{key_id}"


def _decode(key_id: str, fields: dict[bytes, bytes]) -> ApiKey:
    return ApiKey(
        key_id=key_id,
        tenant=fields.get(b"tenant", b"").decode(),
        name=fields.get(b"name", b"").decode(),
        created_at=float(fields.get(b"created_at", b"0")),
        revoked=fields.get(b"revoked") == b"1",
    )
