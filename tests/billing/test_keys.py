"""API keys against a real Redis: shown once, stored as hashes, revocable, one tenant each."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from billing import InvalidTenantError, KeyStore, hash_key, parse_key_id


async def test_keys_create_stores_only_a_hash(redis: Redis) -> None:
    store = KeyStore(redis)
    issued = await store.create("acct-1", "ci")
    assert issued.secret_key.startswith("tg_") and parse_key_id(issued.secret_key) == issued.record.key_id
    stored = [await redis.dump(key) async for key in redis.scan_iter("*")]
    assert stored and not any(issued.secret_key.encode() in value for value in stored)
    record = await redis.hgetall(f"tg:key:{issued.record.key_id}")
    assert record[b"sha256"] == hash_key(issued.secret_key).encode() and record[b"tenant"] == b"acct-1"
    assert await redis.smembers("tg:{acct-1}:keys") == {issued.record.key_id.encode()}


async def test_keys_find_returns_the_tenant_and_refuses_forgeries(redis: Redis) -> None:
    store = KeyStore(redis)
    issued = await store.create("acct-1")
    found = await store.find(issued.secret_key)
    assert found is not None and found.tenant == "acct-1" and found.key_id == issued.record.key_id
    assert await store.find(issued.secret_key[:-1] + ("A" if issued.secret_key[-1] != "A" else "B")) is None
    assert await store.find("tg_" + "a" * 12 + "_" + "x" * 43) is None
    assert await store.find("garbage") is None


async def test_keys_revoked_key_is_found_but_not_usable(redis: Redis) -> None:
    store = KeyStore(redis)
    issued = await store.create("acct-1")
    revoked = await store.revoke(issued.record.key_id)
    assert revoked is not None and revoked.revoked and not revoked.usable_at(0)
    found = await store.find(issued.secret_key)
    assert found is not None and found.revoked
    assert await store.revoke("nosuchkeyid0") is None


@pytest.mark.parametrize("tenant", ["", "a{b}", "a b", "x" * 65, "-lead"])
async def test_keys_tenant_ids_are_safe_for_hash_tags(redis: Redis, tenant: str) -> None:
    with pytest.raises(InvalidTenantError):
        await KeyStore(redis).create(tenant)
