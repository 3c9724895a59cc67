"""Step 1, auth: ``Authorization: Bearer <key>`` → the key's record, for its own account and scopes only.

Keys are looked up in Redis by their public id and compared by hash (billing/keys.py). Found keys are cached in
process for ``auth.cache_ttl_seconds``, which bounds how long a revoked key keeps working on a replica; unknown
keys are not cached, so a new key works at once. Expiry is checked on every request, cached or not. While Redis
cannot be reached, a key read within ``auth.stale_if_error_seconds`` keeps working (nothing could revoke it
meanwhile), so an outage does not stop known clients; new keys get 503.

Operators reach the admin routes with a key that has the ``admin`` scope, or with the bootstrap admin token from
the settings (``admin.token``, meant for a Secret), compared by hash in constant time.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Mapping
from typing import Final

from redis.exceptions import RedisError

from billing import ApiKey, KeyStore, hash_key
from gateway.errors import AuthenticationError, ForbiddenError, KeyStoreUnavailableError, RouteNotFoundError

logger = logging.getLogger(__name__)

_MAX_CACHED_KEYS: Final = 100_000


class Authenticator:
    """Resolves bearer keys to :class:`~billing.ApiKey` records, with a short-lived cache."""

    def __init__(
        self,
        keys: KeyStore,
        *,
        cache_ttl_seconds: float,
        clock: Callable[[], float],
        admin_token: str = "",
        stale_if_error_seconds: float = 0.0,
        on_redis_error: Callable[[], None] = lambda: None,
    ) -> None:
        self._keys = keys
        self._on_redis_error = on_redis_error  # counts the failure (tollgate_redis_errors_total)
        self._ttl = cache_ttl_seconds
        self._stale_if_error = stale_if_error_seconds
        self._clock = clock
        self._admin_token_hash = hash_key(admin_token) if admin_token else ""
        self._cache: dict[str, tuple[float, ApiKey]] = {}

    async def authenticate(self, headers: Mapping[str, str], account_id: str | None, path: str, scope: str) -> ApiKey:
        """The key presented in ``headers``; it must belong to ``account_id`` (the path's account; ``None`` on routes
        without one, where the account is the key's) and hold ``scope``."""
        secret = _bearer_token(headers)
        if self._is_admin_token(secret):
            raise ForbiddenError("Authentication error: the admin token works on /admin/v1/* only; use an API key")
        key = await self._lookup(secret)
        if account_id is not None and key.tenant != account_id:
            # A key that works elsewhere must not reveal that this account exists: answer like a bad route.
            raise RouteNotFoundError(path)
        if scope not in key.scopes:
            raise ForbiddenError(f"Authentication error: this key lacks the '{scope}' scope")
        return key

    async def authenticate_admin(self, headers: Mapping[str, str]) -> ApiKey | None:
        """Admit the bootstrap admin token (``None``: no key behind it) or a key with the ``admin`` scope."""
        key = await self.identify(headers)
        if key is not None and "admin" not in key.scopes:
            raise ForbiddenError("Authentication error: this key lacks the 'admin' scope")
        return key

    async def identify(self, headers: Mapping[str, str]) -> ApiKey | None:
        """Whoever ``headers`` present, whatever their scopes: a usable key, or ``None`` for the bootstrap admin
        token. Anything else is an :class:`AuthenticationError`."""
        secret = _bearer_token(headers)
        if self._is_admin_token(secret):
            return None
        return await self._lookup(secret)

    def _is_admin_token(self, secret: str) -> bool:
        return bool(self._admin_token_hash) and hmac.compare_digest(hash_key(secret), self._admin_token_hash)

    async def _lookup(self, secret_key: str) -> ApiKey:
        digest = hash_key(secret_key)
        now = self._clock()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            return _usable(cached[1], now)
        try:
            key = await self._keys.find(secret_key)
        except RedisError as exc:
            self._on_redis_error()
            if cached is not None and now < cached[0] - self._ttl + self._stale_if_error:
                logger.warning("cannot reach Redis to check a key; using what was read %.1f s ago: %r",
                               now - cached[0] + self._ttl, exc)  # fmt: skip
                return _usable(cached[1], now)
            logger.error("cannot reach Redis to check a key: %r", exc)
            raise KeyStoreUnavailableError() from exc
        if key is None:
            self._cache.pop(digest, None)
            raise AuthenticationError()
        if len(self._cache) >= _MAX_CACHED_KEYS:
            self._cache.clear()
        self._cache[digest] = (now + self._ttl, key)
        return _usable(key, now)


def require_bearer(headers: Mapping[str, str], token: str) -> None:
    """Admit only a request whose bearer is ``token`` (compared in constant time): ``GET /metrics`` when
    ``metrics.token`` is set. Anything else is an :class:`AuthenticationError`."""
    if not hmac.compare_digest(_bearer_token(headers).encode(), token.encode()):
        raise AuthenticationError()


def _usable(key: ApiKey, now: float) -> ApiKey:
    if not key.usable_at(now):
        raise AuthenticationError()
    return key


def _bearer_token(headers: Mapping[str, str]) -> str:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError()
    return token
