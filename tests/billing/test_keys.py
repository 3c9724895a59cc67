"""API keys against a real Redis: shown once, stored as hashes, revocable, one tenant each; scopes, expiry,
rotation and budgets."""

from __future__ import annotations

import time

import pytest
from redis.asyncio import Redis

from billing import (
    DEFAULT_SCOPES,
    SCOPES,
    ApiKey,
    InvalidKeySettingError,
    InvalidTenantError,
    KeyStore,
    hash_key,
    parse_key_id,
)


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


class Clock:
    """A settable clock for KeyStore: created_at, expiry and rotation happen at ``now``."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_keys_scopes_default_explicit_and_invalid(redis: Redis) -> None:
    store = KeyStore(redis)
    default = await store.create("acct-1")
    assert default.record.scopes == DEFAULT_SCOPES == {"inference", "usage:read"}
    admin = await store.create("acct-1", scopes=["admin", "admin"])
    found = await store.find(admin.secret_key)
    assert found is not None and found.scopes == {"admin"}
    assert await redis.hget(f"tg:key:{admin.record.key_id}", "scopes") == b"admin"
    every = await store.get((await store.create("acct-1", scopes=SCOPES)).record.key_id)
    assert every is not None and every.scopes == set(SCOPES)
    for scopes in (["root"], ["inference", "Admin"], []):
        with pytest.raises(InvalidKeySettingError, match="scopes must be"):
            await store.create("acct-2", scopes=scopes)
    assert await store.list_keys("acct-2") == [] and "acct-2" not in await store.tenants()


async def test_keys_expiry_must_lie_in_the_future_and_ends_usability(redis: Redis) -> None:
    clock = Clock()
    store = KeyStore(redis, clock=clock)
    for expires_at in (clock.now - 1, clock.now):
        with pytest.raises(InvalidKeySettingError, match="future"):
            await store.create("acct-1", expires_at=expires_at)
    assert await store.list_keys("acct-1") == []
    issued = await store.create("acct-1", expires_at=clock.now + 60)
    found = await store.find(issued.secret_key)
    assert found is not None and found.expires_at == clock.now + 60
    assert found.usable_at(clock.now + 59.999) and not found.usable_at(clock.now + 60)
    assert (await store.create("acct-1")).record.usable_at(float("inf"))  # no expiry: never expires


@pytest.mark.parametrize("expires_at", [float("nan"), float("inf")])
async def test_keys_expiry_must_be_a_finite_time(redis: Redis, expires_at: float) -> None:
    with pytest.raises(InvalidKeySettingError):
        await KeyStore(redis).create("acct-1", expires_at=expires_at)


async def test_keys_list_per_tenant_and_across_tenants_oldest_first(redis: Redis) -> None:
    clock = Clock()
    store = KeyStore(redis, clock=clock)
    created = {}
    for name, tenant, at in [("b1", "acct-b", 10), ("a5", "acct-a", 50), ("a2", "acct-a", 20), ("a4", "acct-a", 40),
                             ("a1", "acct-a", 10), ("a3", "acct-a", 30)]:  # fmt: skip
        clock.now = 1_800_000_000.0 + at
        created[name] = (await store.create(tenant, name)).record
    assert [key.name for key in await store.list_keys("acct-a")] == ["a1", "a2", "a3", "a4", "a5"]
    assert await store.list_keys("acct-b") == [created["b1"]]
    assert [key.name for key in await store.list_keys()] == ["a1", "a2", "a3", "a4", "a5", "b1"]
    assert await store.list_keys("acct-none") == []
    assert await store.tenants() == ["acct-a", "acct-b"]
    await store.revoke(created["b1"].key_id)  # revoked keys stay listed, and their tenant too
    assert [key.revoked for key in await store.list_keys()] == [False] * 5 + [True]
    assert await store.tenants() == ["acct-a", "acct-b"]


async def test_keys_rotate_issues_a_successor_and_revokes_the_old_key(redis: Redis) -> None:
    clock = Clock()
    store = KeyStore(redis, clock=clock)
    old = await store.create(
        "acct-1", "ci", scopes=["inference"], expires_at=clock.now + 86400, monthly_budget_nano_usd=5_000_000_000
    )
    clock.now += 100
    rotated = await store.rotate(old.record.key_id)
    assert rotated is not None
    issued, retired = rotated
    new = issued.record
    assert new.key_id != old.record.key_id and issued.secret_key != old.secret_key
    assert (new.tenant, new.name, new.scopes, new.expires_at, new.monthly_budget_nano_usd) == (
        "acct-1",
        "ci",
        {"inference"},
        old.record.expires_at,
        5_000_000_000,
    )
    assert new.created_at == clock.now and not new.revoked
    assert await store.find(issued.secret_key) == new
    assert retired.revoked and retired == await store.find(old.secret_key)
    assert retired.expires_at == old.record.expires_at  # revoked, not re-dated
    assert {key.key_id for key in await store.list_keys("acct-1")} == {old.record.key_id, new.key_id}
    assert await store.rotate(old.record.key_id) is None  # a revoked key has no successor
    assert await store.rotate("nosuchkeyid0") is None


async def test_keys_rotate_with_grace_keeps_the_old_key_working_until_then(redis: Redis) -> None:
    clock = Clock()
    store = KeyStore(redis, clock=clock)
    old = await store.create("acct-1", "ci")
    rotated = await store.rotate(old.record.key_id, grace_seconds=3600)
    assert rotated is not None
    issued, retired = rotated
    assert not retired.revoked and retired.expires_at == pytest.approx(clock.now + 3600, abs=0.001)
    assert issued.record.expires_at is None  # the successor keeps the old key's (absent) expiry
    found = await store.find(old.secret_key)
    assert found == retired and found.usable_at(clock.now + 3599) and not found.usable_at(clock.now + 3600)
    # an expiry sooner than the grace period is kept
    soon = await store.create("acct-1", expires_at=clock.now + 60)
    rotated = await store.rotate(soon.record.key_id, grace_seconds=3600)
    assert rotated is not None and rotated[1].expires_at == pytest.approx(clock.now + 60, abs=0.001)
    clock.now += 60
    assert await store.rotate(soon.record.key_id) is None  # expired: no successor


async def test_keys_set_budget(redis: Redis) -> None:
    store = KeyStore(redis)
    key_id = (await store.create("acct-1")).record.key_id
    updated = await store.set_budget(key_id, 2_500_000_000)
    assert updated is not None and updated.monthly_budget_nano_usd == 2_500_000_000
    assert (await store.get(key_id)) == updated
    cleared = await store.set_budget(key_id, None)
    assert cleared is not None and cleared.monthly_budget_nano_usd is None
    assert (await store.set_budget(key_id, 0)).monthly_budget_nano_usd == 0  # type: ignore[union-attr]
    for bad in (-1, 1.5, True, "5"):
        with pytest.raises(InvalidKeySettingError, match="budget"):
            await store.set_budget(key_id, bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidKeySettingError, match="budget"):
        await store.create("acct-1", monthly_budget_nano_usd=-5)
    assert (await store.get(key_id)).monthly_budget_nano_usd == 0  # type: ignore[union-attr]
    assert await store.set_budget("nosuchkeyid0", 1) is None


@pytest.mark.parametrize("key_id", ["", "ABCDEFGHIJKL", "abcdefghijk", "abcdefghijklm", "abcdefghijk1", "a:b*"])
async def test_keys_get_of_a_malformed_id_is_none(redis: Redis, key_id: str) -> None:
    await redis.hset(f"tg:key:{key_id}", mapping={"tenant": "acct-1", "name": "planted"})
    assert await KeyStore(redis).get(key_id) is None


async def test_keys_stored_before_scopes_existed_decode_with_default_scopes(redis: Redis) -> None:
    key_id = "legacykey234"
    secret_key = f"tg_{key_id}_" + "S" * 43
    await redis.hset(
        f"tg:key:{key_id}",
        mapping={
            "tenant": "acct-old",
            "name": "legacy",
            "sha256": hash_key(secret_key),
            "created_at": "1700000000.000",
            "revoked": "0",
        },
    )
    await redis.sadd("tg:{acct-old}:keys", key_id)
    await redis.sadd("tg:tenants", "acct-old")
    store = KeyStore(redis)
    expected = ApiKey(key_id, "acct-old", "legacy", 1_700_000_000.0, False, DEFAULT_SCOPES, None, None)
    assert await store.find(secret_key) == expected
    assert await store.get(key_id) == expected and await store.list_keys() == [expected]
    assert expected.usable_at(time.time())
    rotated = await store.rotate(key_id)  # the successor is written in today's format
    assert rotated is not None
    assert await redis.hget(f"tg:key:{rotated[0].record.key_id}", "scopes") == b"inference,usage:read"
