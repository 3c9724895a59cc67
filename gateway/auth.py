"""Step 1, auth: ``Authorization: Bearer <key>`` → the key's record, for its own account only.

Keys are looked up in Redis by their public id and compared by hash (billing/keys.py). Found keys are cached in
process for ``auth.cache_ttl_seconds``, which bounds how long a revoked key keeps working on a replica; unknown
keys are not cached, so a new key works at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Final

from redis.exceptions import RedisError

from billing import ApiKey, KeyStore, hash_key
from gateway.errors import AuthenticationError, KeyStoreUnavailableError, RouteNotFoundError

logger = logging.getLogger(__name__)

_MAX_CACHED_KEYS: Final = 100_000


class Authenticator:
    """Resolves bearer keys to :class:`~billing.ApiKey` records, with a short-lived cache."""

    def __init__(self, keys: KeyStore, *, cache_ttl_seconds: float, clock: Callable[[], float]) -> None:
        self._keys = keys
        self._ttl = cache_ttl_seconds
        self._clock = clock
        self._cache: dict[str, tuple[float, ApiKey]] = {}

    async def authenticate(self, headers: Mapping[str, str], account_id: str, path: str) -> ApiKey:
        """The key presented in ``headers``; it must belong to ``account_id`` (the path's account)."""
        secret_key = _bearer_token(headers)
        key = await self._lookup(secret_key)
        if key.tenant != account_id:
            # A key that works elsewhere must not reveal that this account exists: answer like a bad route.
            raise RouteNotFoundError(path)
        return key

    async def _lookup(self, secret_key: str) -> ApiKey:
        digest = hash_key(secret_key)
        now = self._clock()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            key = await self._keys.find(secret_key)
        except RedisError as exc:
            logger.error("cannot reach Redis to check a key: %r", exc)
            raise KeyStoreUnavailableError() from exc
        if key is None:
            self._cache.pop(digest, None)
            raise AuthenticationError()
        if len(self._cache) >= _MAX_CACHED_KEYS:
            self._cache.clear()
        self._cache[digest] = (now + self._ttl, key)
        return key


def _bearer_token(headers: Mapping[str, str]) -> str:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError()
    return token
