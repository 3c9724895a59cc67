"""Usage reports, budgets and the admin API end to end, in process, against a simulated vLLM worker.

Tenant isolation comes first: a tenant's key must not reach another tenant's usage, budget or model route, nor any
admin route, and a refused call must change nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from redis.asyncio import Redis

from billing import Tokenizer, count_chat_prompt_tokens, format_usd, hash_key, month_bounds, month_of
from gateway import create_app
from gateway._processes import free_port
from gateway.sim import SimConfig, create_sim_app
from tests.conftest import (
    BF16_NAME,
    FP8_MODEL,
    FP8_NAME,
    MODEL,
    TENANT,
    USAGE_CSV_COLUMNS,
    Gateway,
    SimWorker,
    gateway_for,
    usage_record,
)

ADMIN_TOKEN = "admin-token-" + "x" * 40
OTHER = "acct-other"  # tenant B; TENANT is tenant A
HI = {"prompt": "hi", "max_tokens": 12}
DEAD_REDIS = "redis://127.0.0.1:9/0"


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


ADMIN = bearer(ADMIN_TOKEN)


def assert_error(response: httpx.Response, status: int, code: int, *fragments: str) -> str:
    """The response is the Workers AI error envelope with ``status`` and ``code``; its message holds ``fragments``."""
    assert response.status_code == status, response.text
    payload = response.json()
    assert payload["result"] is None and payload["success"] is False and payload["messages"] == []
    [error] = payload["errors"]
    assert error["code"] == code, error
    for fragment in fragments:
        assert fragment in error["message"], error["message"]
    return str(error["message"])


def result_of(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    payload = response.json()
    assert payload["success"] is True and payload["errors"] == [] and payload["messages"] == []
    return payload["result"]


def run_path(account: str = TENANT, model: str = MODEL, prefix: str = "/client/v4") -> str:
    return f"{prefix}/accounts/{account}/ai/run/{model}"


async def run(
    gw: Gateway, secret: str, account: str = TENANT, body: dict[str, Any] = HI, model: str = MODEL
) -> httpx.Response:
    return await gw.client.post(run_path(account, model), json=body, headers=bearer(secret))


async def new_key(gw: Gateway, tenant: str = TENANT, **fields: Any) -> dict[str, Any]:
    """Create a key through the admin API with the bootstrap token; its record, with the secret as ``key``."""
    created: dict[str, Any] = result_of(
        await gw.client.post("/admin/v1/keys", json={"tenant": tenant, **fields}, headers=ADMIN), 201
    )
    return created


async def redis_snapshot(redis: Redis) -> dict[bytes, bytes | None]:
    """Every key of the test's private Redis with its serialized value: equal snapshots mean nothing changed."""
    return {key: await redis.dump(key) for key in sorted(await redis.keys("*"))}


async def ledger_state(gw: Gateway, tenant: str = TENANT) -> tuple[list[dict[str, str]], int]:
    return await gw.deps.ledger.events(tenant), await gw.deps.ledger.month_spend(tenant, month_of(time.time()))


def cost_of(response: httpx.Response) -> dict[str, int]:
    """What one successful inference response says it cost: the headers of a whole answer, the final usage event
    of a stream."""
    assert response.status_code == 200, response.text
    if response.headers["content-type"].startswith("text/event-stream"):
        events = [block[len("data: ") :] for block in response.text.split("\n\n") if block.strip()]
        assert events[-1] == "[DONE]"
        usage = json.loads(events[-2])["usage"]
        assert usage["cost_usd"] == format_usd(usage["cost_nano_usd"])
        return {name: usage[name] for name in ("prompt_tokens", "completion_tokens", "cost_nano_usd")}
    headers = response.headers
    assert headers["x-tollgate-cost-usd"] == format_usd(int(headers["x-tollgate-cost-nano-usd"]))
    return {
        "prompt_tokens": int(headers["x-tollgate-prompt-tokens"]),
        "completion_tokens": int(headers["x-tollgate-completion-tokens"]),
        "cost_nano_usd": int(headers["x-tollgate-cost-nano-usd"]),
    }


def summed(costs: list[dict[str, int]]) -> dict[str, int | str]:
    """The report's counters for ``costs``: what a usage report must show for those requests."""
    prompt = sum(cost["prompt_tokens"] for cost in costs)
    completion = sum(cost["completion_tokens"] for cost in costs)
    nano = sum(cost["cost_nano_usd"] for cost in costs)
    return {
        "requests": len(costs),
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "cost_nano_usd": nano,
        "cost_usd": format_usd(nano),
        "errors": 0,
    }


def resets_at() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(month_bounds(month_of(time.time()))[1]))


@pytest.fixture(scope="module")
def worker(tokenizer: Tokenizer) -> Iterator[SimWorker]:
    """conftest's fast simulated worker (answers stop after 12 tokens), but one for the whole module, served from a
    thread of its own: starting and stopping a worker per test would cost most of this module's run time. No test
    here sets a fault; tests compare ``len(worker.served)`` before and after, never against an empty list."""
    config = SimConfig(
        served_model_names=(BF16_NAME, FP8_NAME),
        tokens_per_second=0,
        time_to_first_token_seconds=0,
        completion_tokens=12,
    )
    app = create_sim_app(config, tokenizer)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on", log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, name="sim-worker", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the simulated worker did not start"
        time.sleep(0.01)
    yield SimWorker(f"http://127.0.0.1:{port}", app)
    server.should_exit = True
    thread.join(10)


@pytest.fixture
async def gw(redis: Redis, redis_url: str, tokenizer: Tokenizer, worker: SimWorker) -> AsyncIterator[Gateway]:
    """The gateway with the bootstrap admin token set, and a key (inference, usage:read) for TENANT."""
    async with gateway_for(redis_url, tokenizer, [worker.url], TOLLGATE_ADMIN__TOKEN=ADMIN_TOKEN) as gateway:
        yield gateway


def fresh_gateway(
    redis_url: str, tokenizer: Tokenizer, worker: SimWorker
) -> contextlib.AbstractAsyncContextManager[Gateway]:
    """A second replica on the same Redis, with an empty auth cache."""
    return gateway_for(redis_url, tokenizer, [worker.url], TOLLGATE_ADMIN__TOKEN=ADMIN_TOKEN)


@pytest.fixture
async def tenant_b(gw: Gateway) -> dict[str, Any]:
    """Tenant B with a key, one billed request and a distinctive budget: numbers that must never leak to A."""
    key = await new_key(gw, OTHER, name="b-key")
    billed = await run(gw, key["key"], OTHER, {"prompt": "B's secret business", "max_tokens": 12})
    cost = cost_of(billed)["cost_nano_usd"]
    result_of(
        await gw.client.put(
            f"/admin/v1/tenants/{OTHER}/budget", json={"monthly_budget_usd": "7.654321987"}, headers=ADMIN
        )
    )
    return {"key": key, "cost_nano_usd": cost, "budget_nano_usd": 7_654_321_987}


# -- 1. tenant isolation --------------------------------------------------------------------------------------------

B_TENANT_ROUTES = [
    ("GET", f"/client/v4/accounts/{OTHER}/ai/usage"),
    ("GET", f"/accounts/{OTHER}/ai/usage"),
    ("GET", f"/client/v4/accounts/{OTHER}/ai/usage?granularity=day&group_by=model"),
    ("GET", f"/client/v4/accounts/{OTHER}/ai/usage?format=csv"),
    ("GET", f"/client/v4/accounts/{OTHER}/ai/budget"),
    ("GET", f"/accounts/{OTHER}/ai/budget"),
    ("POST", run_path(OTHER)),
    ("POST", run_path(OTHER, prefix="")),
]


@pytest.mark.parametrize(("method", "path"), B_TENANT_ROUTES)
async def test_isolation_a_key_on_b_paths_is_404_and_reveals_nothing(
    gw: Gateway, tenant_b: dict[str, Any], worker: SimWorker, redis: Redis, method: str, path: str
) -> None:
    everything = await new_key(gw, TENANT, scopes=["inference", "usage:read", "admin"])
    served = len(worker.served)
    before = await redis_snapshot(redis)
    for secret in (gw.key.secret_key, everything["key"]):  # usage:read, and even admin, give no reach into B
        kwargs: dict[str, Any] = {"json": HI} if method == "POST" else {}
        response = await gw.client.request(method, path, headers=bearer(secret), **kwargs)
        assert_error(response, 404, 7003, path.split("?")[0])
        for secret_number in (tenant_b["cost_nano_usd"], tenant_b["budget_nano_usd"], "7.654321987"):
            assert str(secret_number) not in response.text
        assert tenant_b["key"]["id"] not in response.text
    assert len(worker.served) == served
    assert await redis_snapshot(redis) == before  # nothing billed to A or B


async def test_isolation_a_tenant_cannot_name_another_tenant_in_its_usage_query(
    gw: Gateway, tenant_b: dict[str, Any]
) -> None:
    response = await gw.client.get(f"/client/v4/accounts/{TENANT}/ai/usage?tenant={OTHER}", headers=gw.auth)
    assert_error(response, 400, 5006, "'tenant'")
    assert str(tenant_b["cost_nano_usd"]) not in response.text
    grouped = await gw.client.get(f"/client/v4/accounts/{TENANT}/ai/usage?group_by=tenant", headers=gw.auth)
    assert_error(grouped, 400, 5006, "'group_by'")
    own = result_of(await gw.client.get(f"/client/v4/accounts/{TENANT}/ai/usage", headers=gw.auth))
    assert own["totals"]["requests"] == 0 and str(tenant_b["cost_nano_usd"]) not in json.dumps(own)


# Every admin route, aimed at tenant B where it takes a target ({b_key}: B's key id), with a valid body.
ADMIN_ROUTES: list[tuple[str, str, Any]] = [
    ("GET", "/admin/v1/usage", None),
    ("GET", f"/admin/v1/usage?tenant={OTHER}&group_by=tenant", None),
    ("GET", "/admin/v1/tenants", None),
    ("POST", "/admin/v1/keys", {"tenant": OTHER, "scopes": ["inference"]}),
    ("POST", "/admin/v1/keys", {"tenant": TENANT, "scopes": ["admin"]}),
    ("GET", "/admin/v1/keys", None),
    ("GET", f"/admin/v1/keys?tenant={OTHER}", None),
    ("GET", "/admin/v1/keys/{b_key}", None),
    ("PATCH", "/admin/v1/keys/{b_key}", {"monthly_budget_usd": "0"}),
    ("DELETE", "/admin/v1/keys/{b_key}", None),
    ("POST", "/admin/v1/keys/{b_key}/rotate", {"grace_seconds": 0}),
    ("GET", f"/admin/v1/tenants/{OTHER}/budget", None),
    ("PUT", f"/admin/v1/tenants/{OTHER}/budget", {"monthly_budget_usd": "0"}),
    ("DELETE", f"/admin/v1/tenants/{OTHER}/budget", None),
]
ADMIN_ROUTE_IDS = [f"{method} {path} {json.dumps(body) if body else ''}".strip() for method, path, body in ADMIN_ROUTES]


def admin_routes(b_key: str) -> list[tuple[str, str, Any]]:
    return [(method, path.format(b_key=b_key), body) for method, path, body in ADMIN_ROUTES]


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ROUTES, ids=ADMIN_ROUTE_IDS)
async def test_isolation_a_tenant_key_on_admin_routes_is_403_and_changes_nothing(
    gw: Gateway, tenant_b: dict[str, Any], redis: Redis, method: str, path: str, body: Any
) -> None:
    path = path.format(b_key=tenant_b["key"]["id"])
    before = await redis_snapshot(redis)
    response = await gw.client.request(method, path, json=body, headers=gw.auth)  # inference + usage:read
    assert_error(response, 403, 10000, "'admin'")
    assert str(tenant_b["cost_nano_usd"]) not in response.text and tenant_b["key"]["id"] not in response.text
    assert await redis_snapshot(redis) == before
    # B's key still works and B's budget is as it was
    assert (await run(gw, tenant_b["key"]["key"], OTHER)).status_code == 200
    budget = result_of(await gw.client.get(f"/admin/v1/tenants/{OTHER}/budget", headers=ADMIN))
    assert budget["monthly_budget_nano_usd"] == tenant_b["budget_nano_usd"] and budget["budget_is_default"] is False


BAD_AUTHORIZATIONS = [
    None,
    "Bearer",
    "Bearer garbage",
    "Bearer " + "y" * 52,
    f"Basic {ADMIN_TOKEN}",
    f"Bearer {ADMIN_TOKEN}x",
    "Bearer tg_aaaaaaaaaaaa_" + "A" * 43,
]


async def test_admin_routes_with_a_missing_or_bad_bearer_are_401(
    gw: Gateway, tenant_b: dict[str, Any], redis: Redis
) -> None:
    before = await redis_snapshot(redis)
    for authorization in BAD_AUTHORIZATIONS:
        headers = {} if authorization is None else {"Authorization": authorization}
        for method, path, body in admin_routes(tenant_b["key"]["id"]):
            response = await gw.client.request(method, path, json=body, headers=headers)
            assert response.status_code == 401, (authorization, method, path)
            assert_error(response, 401, 10000, "Authentication error")
    assert await redis_snapshot(redis) == before


async def test_admin_routes_refuse_a_revoked_or_expired_admin_key(gw: Gateway) -> None:
    revoked = await new_key(gw, TENANT, scopes=["admin"])
    result_of(await gw.client.delete(f"/admin/v1/keys/{revoked['id']}", headers=ADMIN))
    assert_error(await gw.client.get("/admin/v1/keys", headers=bearer(revoked["key"])), 401, 10000)
    expiring = await new_key(gw, TENANT, scopes=["admin"], expires_in_seconds=0.3)
    assert (await gw.client.get("/admin/v1/tenants", headers=bearer(expiring["key"]))).status_code == 200
    await asyncio.sleep(0.35)
    assert_error(await gw.client.get("/admin/v1/tenants", headers=bearer(expiring["key"])), 401, 10000)


async def test_admin_routes_are_closed_without_a_token_or_admin_key(
    redis: Redis, redis_url: str, tokenizer: Tokenizer, worker: SimWorker
) -> None:
    async with gateway_for(redis_url, tokenizer, [worker.url]) as gateway:  # admin.token left empty
        assert_error(await gateway.client.get("/admin/v1/keys", headers=bearer("")), 401, 10000)
        assert_error(await gateway.client.get("/admin/v1/keys", headers=ADMIN), 401, 10000)
        assert_error(await gateway.client.get("/admin/v1/keys", headers=gateway.auth), 403, 10000)


async def test_admin_token_is_not_a_tenant_key(gw: Gateway, worker: SimWorker) -> None:
    served = len(worker.served)
    assert_error(await run(gw, ADMIN_TOKEN), 403, 10000, "/admin/v1/* only")
    assert_error(await gw.client.get(usage_url(), headers=ADMIN), 403, 10000, "/admin/v1/* only")
    assert len(worker.served) == served


# -- 2. scopes ------------------------------------------------------------------------------------------------------


async def test_scope_inference_only_key_runs_but_cannot_read_usage_or_budget(gw: Gateway) -> None:
    key = await new_key(gw, TENANT, scopes=["inference"])
    assert (await run(gw, key["key"])).status_code == 200
    for route in ("usage", "budget"):
        response = await gw.client.get(f"/client/v4/accounts/{TENANT}/ai/{route}", headers=bearer(key["key"]))
        assert_error(response, 403, 10000, "'usage:read'")
    assert_error(await gw.client.get("/admin/v1/tenants", headers=bearer(key["key"])), 403, 10000, "'admin'")


async def test_scope_usage_read_only_key_cannot_run_and_nothing_is_billed(gw: Gateway, worker: SimWorker) -> None:
    key = await new_key(gw, TENANT, scopes=["usage:read"])
    served = len(worker.served)
    ledger = await ledger_state(gw)
    for stream in (False, True):
        response = await run(gw, key["key"], body={**HI, "stream": stream})
        assert_error(response, 403, 10000, "'inference'")
        assert response.headers["x-tollgate-cost-nano-usd"] == "0"
    assert len(worker.served) == served
    assert await ledger_state(gw) == ledger
    usage = result_of(await gw.client.get(f"/client/v4/accounts/{TENANT}/ai/usage", headers=bearer(key["key"])))
    assert usage["totals"]["requests"] == 0


async def test_scope_admin_key_of_a_tenant_manages_every_tenant_but_cannot_run(
    gw: Gateway, tenant_b: dict[str, Any]
) -> None:
    admin = bearer((await new_key(gw, TENANT, name="ops", scopes=["admin"]))["key"])
    tenants = result_of(await gw.client.get("/admin/v1/tenants", headers=admin))
    assert [t["tenant"] for t in tenants] == sorted([TENANT, OTHER])
    created = result_of(await gw.client.post("/admin/v1/keys", json={"tenant": OTHER}, headers=admin), 201)
    assert created["tenant"] == OTHER and (await run(gw, created["key"], OTHER)).status_code == 200
    got = result_of(await gw.client.get(f"/admin/v1/keys/{tenant_b['key']['id']}", headers=admin))
    assert got["tenant"] == OTHER
    usage = result_of(await gw.client.get(f"/admin/v1/usage?tenant={OTHER}", headers=admin))
    assert usage["totals"]["requests"] == 2
    assert_error(await gw.client.post(run_path(), json=HI, headers=admin), 403, 10000, "'inference'")


# -- 3. the admin API with the bootstrap token ----------------------------------------------------------------------


async def test_admin_create_key_shows_the_secret_once(gw: Gateway, redis: Redis) -> None:
    response = await gw.client.post(
        "/admin/v1/keys",
        json={"tenant": TENANT, "name": "ci", "scopes": ["inference"], "monthly_budget_usd": "5.00"},
        headers=ADMIN,
    )
    created = result_of(response, 201)
    secret = created.pop("key")
    assert secret.startswith(f"tg_{created['id']}_") and len(created["id"]) == 12
    assert created["tenant"] == TENANT and created["name"] == "ci" and created["scopes"] == ["inference"]
    assert created["monthly_budget_nano_usd"] == 5_000_000_000
    assert created["revoked"] is False and created["expires_at"] is None
    assert abs(created["created_at"] - time.time()) < 5
    assert (await run(gw, secret)).status_code == 200
    digest = hash_key(secret)
    assert digest.encode() in (await redis.hgetall(f"tg:key:{created['id']}")).values()  # stored: the hash only
    for path in ("/admin/v1/keys", f"/admin/v1/keys?tenant={TENANT}", f"/admin/v1/keys/{created['id']}"):
        listed = await gw.client.get(path, headers=ADMIN)
        assert listed.status_code == 200
        assert (
            secret not in listed.text
            and secret[len(f"tg_{created['id']}_") :] not in listed.text
            and digest not in listed.text
        )
        assert "sha256" not in listed.text
    assert result_of(await gw.client.get(f"/admin/v1/keys/{created['id']}", headers=ADMIN)) == created


async def test_admin_create_key_defaults(gw: Gateway) -> None:
    created = await new_key(gw, OTHER)
    assert created["scopes"] == ["inference", "usage:read"] and created["name"] == ""
    assert created["monthly_budget_nano_usd"] is None and created["expires_at"] is None


async def test_admin_list_keys_by_tenant_and_all(gw: Gateway) -> None:
    mine = await new_key(gw, TENANT, name="second")
    theirs = await new_key(gw, OTHER, name="b")
    only_mine = result_of(await gw.client.get(f"/admin/v1/keys?tenant={TENANT}", headers=ADMIN))
    assert [k["id"] for k in only_mine] == [gw.key.record.key_id, mine["id"]]  # oldest first
    assert all(k["tenant"] == TENANT for k in only_mine)
    only_theirs = result_of(await gw.client.get(f"/admin/v1/keys?tenant={OTHER}", headers=ADMIN))
    assert [k["id"] for k in only_theirs] == [theirs["id"]]
    every = result_of(await gw.client.get("/admin/v1/keys", headers=ADMIN))
    # sorted by tenant, then oldest first
    assert [(k["tenant"], k["id"]) for k in every] == [
        (OTHER, theirs["id"]),
        (TENANT, gw.key.record.key_id),
        (TENANT, mine["id"]),
    ]
    none = result_of(await gw.client.get("/admin/v1/keys?tenant=acct-nobody", headers=ADMIN))
    assert none == []
    assert_error(await gw.client.get("/admin/v1/keys?tenant=bad%20id", headers=ADMIN), 400, 5006, "tenant")


async def test_admin_patch_sets_and_clears_a_key_budget(gw: Gateway) -> None:
    key_id = gw.key.record.key_id
    patched = result_of(
        await gw.client.patch(f"/admin/v1/keys/{key_id}", json={"monthly_budget_usd": "0.5"}, headers=ADMIN)
    )
    assert patched["monthly_budget_nano_usd"] == 500_000_000 and patched["id"] == key_id
    assert result_of(await gw.client.get(f"/admin/v1/keys/{key_id}", headers=ADMIN)) == patched
    cleared = result_of(
        await gw.client.patch(f"/admin/v1/keys/{key_id}", json={"monthly_budget_usd": None}, headers=ADMIN)
    )
    assert cleared["monthly_budget_nano_usd"] is None
    as_number = result_of(
        await gw.client.patch(f"/admin/v1/keys/{key_id}", json={"monthly_budget_usd": 2}, headers=ADMIN)
    )
    assert as_number["monthly_budget_nano_usd"] == 2_000_000_000


async def test_admin_revoke_stops_the_key_on_every_replica(
    gw: Gateway, redis_url: str, tokenizer: Tokenizer, worker: SimWorker
) -> None:
    key = await new_key(gw, TENANT)
    assert (await run(gw, key["key"])).status_code == 200
    revoked = result_of(await gw.client.delete(f"/admin/v1/keys/{key['id']}", headers=ADMIN))
    assert revoked["revoked"] is True and revoked["id"] == key["id"] and "key" not in revoked
    served = len(worker.served)
    async with fresh_gateway(redis_url, tokenizer, worker) as replica:  # no cached copy of the key
        assert_error(await run(replica, key["key"]), 401, 10000)
        assert_error(
            await replica.client.get(f"/client/v4/accounts/{TENANT}/ai/usage", headers=bearer(key["key"])), 401, 10000
        )
        assert (await run(replica, gw.key.secret_key)).status_code == 200  # the tenant's other key is untouched
    assert len(worker.served) == served + 1
    # revoking again is harmless; the record stays visible as revoked
    assert result_of(await gw.client.delete(f"/admin/v1/keys/{key['id']}", headers=ADMIN))["revoked"] is True
    assert result_of(await gw.client.get(f"/admin/v1/keys/{key['id']}", headers=ADMIN))["revoked"] is True


async def test_admin_rotate_without_grace_retires_the_old_key_at_once(
    gw: Gateway, redis_url: str, tokenizer: Tokenizer, worker: SimWorker
) -> None:
    old = await new_key(gw, TENANT, name="svc", scopes=["inference"], monthly_budget_usd="3")
    response = await gw.client.post(f"/admin/v1/keys/{old['id']}/rotate", json={"grace_seconds": 0}, headers=ADMIN)
    rotated = result_of(response, 201)
    new, retired = rotated["new"], rotated["old"]
    assert retired["id"] == old["id"] and retired["revoked"] is True and "key" not in retired
    assert new["id"] != old["id"] and new["key"] != old["key"] and new["key"].startswith(f"tg_{new['id']}_")
    for field in ("tenant", "name", "scopes", "monthly_budget_nano_usd", "expires_at"):
        assert new[field] == old[field], field
    async with fresh_gateway(redis_url, tokenizer, worker) as replica:
        assert_error(await run(replica, old["key"]), 401, 10000)
        assert (await run(replica, new["key"])).status_code == 200
    # a retired key cannot be rotated again
    again = await gw.client.post(f"/admin/v1/keys/{old['id']}/rotate", json={}, headers=ADMIN)
    assert_error(again, 400, 5006, old["id"])


async def test_admin_rotate_with_grace_keeps_both_keys_working_until_it_ends(
    gw: Gateway, redis_url: str, tokenizer: Tokenizer, worker: SimWorker
) -> None:
    old = await new_key(gw, TENANT)
    before = time.time()
    response = await gw.client.post(f"/admin/v1/keys/{old['id']}/rotate", json={"grace_seconds": 3600}, headers=ADMIN)
    rotated = result_of(response, 201)
    retired = rotated["old"]
    assert retired["revoked"] is False and before + 3600 - 1 <= retired["expires_at"] <= time.time() + 3600 + 1
    assert rotated["new"]["expires_at"] is None
    async with fresh_gateway(redis_url, tokenizer, worker) as replica:
        assert (await run(replica, old["key"])).status_code == 200
        assert (await run(replica, rotated["new"]["key"])).status_code == 200
    # without a body the grace is 0
    plain = await gw.client.post(f"/admin/v1/keys/{rotated['new']['id']}/rotate", headers=ADMIN)
    assert result_of(plain, 201)["old"]["revoked"] is True


async def test_admin_rotate_with_a_short_grace_retires_the_old_key_when_it_ends(gw: Gateway) -> None:
    old = await new_key(gw, TENANT)
    rotated = result_of(
        await gw.client.post(f"/admin/v1/keys/{old['id']}/rotate", json={"grace_seconds": 0.3}, headers=ADMIN), 201
    )
    assert (await run(gw, old["key"])).status_code == 200
    await asyncio.sleep(0.35)
    assert_error(await run(gw, old["key"]), 401, 10000)  # expiry is checked on every request, cached or not
    assert (await run(gw, rotated["new"]["key"])).status_code == 200


CREATE_BAD_BODIES = [
    ({"tenant": TENANT, "colour": "red"}, "'colour'"),
    ({"tenant": TENANT, "scopes": ["inference", "superuser"]}, "scopes"),
    ({"tenant": TENANT, "scopes": []}, "scopes"),
    ({"tenant": TENANT, "scopes": "admin"}, "'scopes'"),
    ({"tenant": TENANT, "scopes": [1]}, "'scopes'"),
    ({"tenant": TENANT, "monthly_budget_usd": "-1"}, "'monthly_budget_usd'"),
    ({"tenant": TENANT, "monthly_budget_usd": -1}, "'monthly_budget_usd'"),
    ({"tenant": TENANT, "monthly_budget_usd": "1.0000000001"}, "'monthly_budget_usd'"),
    ({"tenant": TENANT, "monthly_budget_usd": "lots"}, "'monthly_budget_usd'"),
    ({"tenant": TENANT, "monthly_budget_usd": "NaN"}, "'monthly_budget_usd'"),
    ({"tenant": TENANT, "monthly_budget_usd": True}, "'monthly_budget_usd'"),
    ({"tenant": TENANT, "monthly_budget_usd": ["1"]}, "'monthly_budget_usd'"),
    ({"tenant": TENANT, "expires_in_seconds": 0}, "'expires_in_seconds'"),
    ({"tenant": TENANT, "expires_in_seconds": -5}, "'expires_in_seconds'"),
    ({"tenant": TENANT, "expires_in_seconds": "60"}, "'expires_in_seconds'"),
    ({"tenant": TENANT, "expires_at": "next tuesday"}, "'expires_at'"),
    ({"tenant": TENANT, "expires_at": "2030-01-01", "expires_in_seconds": 60}, "'expires_at'"),
    ({"name": "no tenant"}, "'tenant'"),
    ({"tenant": 7}, "'tenant'"),
    ({"tenant": "acct with spaces"}, "tenant"),
    ({"tenant": "{acct}"}, "tenant"),
    ({"tenant": TENANT, "name": "n" * 201}, "'name'"),
    ({"tenant": TENANT, "name": None}, "'name'"),
]


async def test_admin_create_key_bad_body_is_400_naming_the_field(gw: Gateway, redis: Redis) -> None:
    before = await redis_snapshot(redis)
    for body, names in CREATE_BAD_BODIES:
        response = await gw.client.post("/admin/v1/keys", json=body, headers=ADMIN)
        assert response.status_code == 400, body
        assert names in assert_error(response, 400, 5006), body
    assert await redis_snapshot(redis) == before  # no key was created


@pytest.mark.parametrize("expires_at", ["2001-01-01", "5"])
async def test_admin_create_key_expiry_in_the_past_is_400_naming_expires_at(gw: Gateway, expires_at: str) -> None:
    response = await gw.client.post("/admin/v1/keys", json={"tenant": TENANT, "expires_at": expires_at}, headers=ADMIN)
    assert_error(response, 400, 5006, "'expires_at'")


OTHER_BAD_BODIES = [
    ("PATCH", "/admin/v1/keys/{key}", {"monthly_budget_usd": "1", "scopes": ["admin"]}, "'scopes'"),
    ("PATCH", "/admin/v1/keys/{key}", {}, "'monthly_budget_usd'"),
    ("PATCH", "/admin/v1/keys/{key}", {"monthly_budget_usd": "-0.01"}, "'monthly_budget_usd'"),
    ("PATCH", "/admin/v1/keys/{key}", {"monthly_budget_usd": "1.0000000001"}, "'monthly_budget_usd'"),
    ("PUT", f"/admin/v1/tenants/{TENANT}/budget", {}, "'monthly_budget_usd'"),
    ("PUT", f"/admin/v1/tenants/{TENANT}/budget", {"monthly_budget_usd": "-5"}, "'monthly_budget_usd'"),
    ("PUT", f"/admin/v1/tenants/{TENANT}/budget", {"monthly_budget_usd": "1.0000000001"}, "'monthly_budget_usd'"),
    ("PUT", f"/admin/v1/tenants/{TENANT}/budget", {"monthly_budget_usd": "1", "x": 1}, "'x'"),
    ("PUT", "/admin/v1/tenants/bad%20tenant/budget", {"monthly_budget_usd": "1"}, "tenant"),
    ("POST", "/admin/v1/keys/{key}/rotate", {"grace_seconds": -1}, "'grace_seconds'"),
    ("POST", "/admin/v1/keys/{key}/rotate", {"grace_seconds": "60"}, "'grace_seconds'"),
    ("POST", "/admin/v1/keys/{key}/rotate", {"grace_seconds": True}, "'grace_seconds'"),
    ("POST", "/admin/v1/keys/{key}/rotate", {"grace_seconds": 31 * 86400}, "'grace_seconds'"),
    ("POST", "/admin/v1/keys/{key}/rotate", {"grace": 60}, "'grace'"),
]


async def test_admin_update_bad_body_is_400_naming_the_field(gw: Gateway, redis: Redis) -> None:
    before = await redis_snapshot(redis)
    for method, path, body, names in OTHER_BAD_BODIES:
        response = await gw.client.request(method, path.format(key=gw.key.record.key_id), json=body, headers=ADMIN)
        assert response.status_code == 400, (method, path, body)
        assert names in assert_error(response, 400, 5006), (method, path, body)
    assert await redis_snapshot(redis) == before


async def test_admin_non_json_or_non_object_body_is_400(gw: Gateway, redis: Redis) -> None:
    before = await redis_snapshot(redis)
    for method, path in [
        ("POST", "/admin/v1/keys"),
        ("PATCH", "/admin/v1/keys/{key}"),
        ("PUT", f"/admin/v1/tenants/{TENANT}/budget"),
        ("POST", "/admin/v1/keys/{key}/rotate"),
    ]:
        for content in (b"{not json", b"[1, 2]", b'"text"', b"null"):
            response = await gw.client.request(
                method,
                path.format(key=gw.key.record.key_id),
                content=content,
                headers={**ADMIN, "content-type": "application/json"},
            )
            assert response.status_code == 400, (method, path, content)
            assert_error(response, 400, 5006, "body")
    assert await redis_snapshot(redis) == before


async def test_admin_unknown_key_id_is_404_7003(gw: Gateway, redis: Redis) -> None:
    before = await redis_snapshot(redis)
    for key_id in ("aaaaaaaaaaaa", "not-a-key-id"):
        for method, path, body in [
            ("GET", "/admin/v1/keys/{key}", None),
            ("PATCH", "/admin/v1/keys/{key}", {"monthly_budget_usd": "1"}),
            ("DELETE", "/admin/v1/keys/{key}", None),
            ("POST", "/admin/v1/keys/{key}/rotate", {"grace_seconds": 0}),
        ]:
            response = await gw.client.request(method, path.format(key=key_id), json=body, headers=ADMIN)
            assert response.status_code == 404, (method, key_id)
            assert_error(response, 404, 7003, key_id)
    assert await redis_snapshot(redis) == before


async def test_admin_wrong_method_is_405(gw: Gateway) -> None:
    assert_error(await gw.client.put("/admin/v1/keys", json={}, headers=ADMIN), 405, 7001)
    assert_error(await gw.client.post(f"/client/v4/accounts/{TENANT}/ai/usage", headers=gw.auth), 405, 7001)


# -- 4. expiry ------------------------------------------------------------------------------------------------------


async def test_expiry_key_works_until_it_expires_then_401(gw: Gateway, worker: SimWorker) -> None:
    before = time.time()
    key = await new_key(gw, TENANT, expires_in_seconds=0.5)
    assert before + 0.5 - 0.05 <= key["expires_at"] <= time.time() + 0.5 + 0.05
    assert (await run(gw, key["key"])).status_code == 200
    usage_path = f"/client/v4/accounts/{TENANT}/ai/usage"
    assert (await gw.client.get(usage_path, headers=bearer(key["key"]))).status_code == 200
    await asyncio.sleep(max(0.0, key["expires_at"] - time.time()) + 0.05)
    served = len(worker.served)
    assert_error(await run(gw, key["key"]), 401, 10000)
    assert_error(await gw.client.get(usage_path, headers=bearer(key["key"])), 401, 10000)
    assert len(worker.served) == served
    # an expired key cannot be rotated into a fresh one
    assert_error(await gw.client.post(f"/admin/v1/keys/{key['id']}/rotate", headers=ADMIN), 400, 5006)


async def test_expiry_expires_at_in_the_future_is_kept(gw: Gateway) -> None:
    key = await new_key(gw, TENANT, expires_at="2099-01-01T00:00:00Z")
    assert key["expires_at"] == 4070908800
    assert (await run(gw, key["key"])).status_code == 200


# -- 5. usage reports -----------------------------------------------------------------------------------------------


async def make_traffic(
    gw: Gateway, secret: str | None = None, account: str = TENANT
) -> dict[str, list[dict[str, int]]]:
    """Whole and streamed requests on both models; what each response said it cost, by model."""
    secret = secret or gw.key.secret_key
    costs: dict[str, list[dict[str, int]]] = {MODEL: [], FP8_MODEL: []}
    for model, body in [
        (MODEL, {"prompt": "Tell me a story", "max_tokens": 20}),
        (MODEL, {"messages": [{"role": "user", "content": "Hello"}], "stream": True, "max_tokens": 24}),
        (MODEL, {"prompt": "hi", "max_tokens": 3}),
        (FP8_MODEL, {"prompt": "hi", "max_tokens": 8}),
        (FP8_MODEL, {"prompt": "Stream it", "stream": True}),
    ]:
        costs[model].append(cost_of(await run(gw, secret, account, body, model)))
    return costs


def usage_url(account: str = TENANT, query: str = "") -> str:
    return f"/client/v4/accounts/{account}/ai/usage" + (f"?{query}" if query else "")


def bucket_sum(report: dict[str, Any], **group: str | None) -> dict[str, int | str]:
    """The counters of every result in ``report`` whose model/tenant match ``group``, summed over all buckets
    (a request made just before an hour's end sits in the previous bucket)."""
    names = ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "cost_nano_usd", "errors")
    sums = dict.fromkeys(names, 0)
    for bucket in report["data"]:
        assert bucket["object"] == "bucket" and bucket["end_time"] - bucket["start_time"] in (3600, 86400)
        for result in bucket["results"]:
            assert result["cost_usd"] == format_usd(result["cost_nano_usd"])
            if all(result[name] == value for name, value in group.items()):
                for name in names:
                    sums[name] += result[name]
    return {
        **{name: sums[name] for name in names[:5]},
        "cost_usd": format_usd(sums["cost_nano_usd"]),
        "errors": sums["errors"],
    }


async def test_usage_default_report_totals_equal_what_the_responses_said(gw: Gateway) -> None:
    costs = await make_traffic(gw)
    everything = summed(costs[MODEL] + costs[FP8_MODEL])
    assert everything["cost_nano_usd"] > 0
    report = result_of(await gw.client.get(usage_url(), headers=gw.auth))
    assert report["object"] == "page" and report["granularity"] == "hour"
    assert report["has_more"] is False and report["next_page"] is None
    assert len(report["data"]) == 24 and report["to"] - report["from"] == 24 * 3600
    assert report["data"][-1]["start_time"] <= time.time() < report["data"][-1]["end_time"]  # current hour last
    assert report["totals"] == everything
    assert all(result["model"] is None and result["tenant"] is None for b in report["data"] for result in b["results"])
    assert bucket_sum(report) == everything
    # the same report without the /client/v4 prefix
    assert result_of(await gw.client.get(f"/accounts/{TENANT}/ai/usage", headers=gw.auth))["totals"] == everything


async def test_usage_by_day_grouped_by_model_and_filtered(gw: Gateway) -> None:
    costs = await make_traffic(gw)
    daily = result_of(await gw.client.get(usage_url(query="granularity=day"), headers=gw.auth))
    assert daily["granularity"] == "day" and len(daily["data"]) == 30
    assert daily["totals"] == summed(costs[MODEL] + costs[FP8_MODEL])
    grouped = result_of(await gw.client.get(usage_url(query="granularity=day&group_by=model"), headers=gw.auth))
    # every bucket, empty ones too, has one result per model, in order
    assert all([r["model"] for r in bucket["results"]] == sorted([MODEL, FP8_MODEL]) for bucket in grouped["data"])
    for model in (MODEL, FP8_MODEL):
        assert bucket_sum(grouped, model=model) == summed(costs[model])
    filtered = result_of(await gw.client.get(usage_url(query=f"model={FP8_MODEL}"), headers=gw.auth))
    assert filtered["totals"] == summed(costs[FP8_MODEL])
    nothing = result_of(await gw.client.get(usage_url(query="model=@cf/none"), headers=gw.auth))
    assert nothing["totals"] == summed([])


async def test_usage_range_and_paging(gw: Gateway) -> None:
    costs = await make_traffic(gw)
    now = int(time.time())
    query = f"from={now - 5 * 3600}&to={now + 1}&limit=2"
    first = result_of(await gw.client.get(usage_url(query=query), headers=gw.auth))
    assert len(first["data"]) == 2 and first["has_more"] is True
    pages, page = [first], first
    while page["next_page"] is not None:
        page = result_of(await gw.client.get(usage_url(query=f"{query}&page={page['next_page']}"), headers=gw.auth))
        pages.append(page)
    assert sum(len(p["data"]) for p in pages) == 6
    assert sum(p["totals"]["cost_nano_usd"] for p in pages) == summed(costs[MODEL] + costs[FP8_MODEL])["cost_nano_usd"]


async def test_usage_csv_rows_sum_to_the_responses(gw: Gateway) -> None:
    costs = await make_traffic(gw)
    response = await gw.client.get(usage_url(query="format=csv&group_by=model"), headers=gw.auth)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert response.headers["content-disposition"].startswith('attachment; filename="tollgate-usage-hour-')
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert list(rows[0]) == USAGE_CSV_COLUMNS
    assert len(rows) == 24 * 2
    for model in (MODEL, FP8_MODEL):
        mine = [row for row in rows if row["model"] == model]
        expected = summed(costs[model])
        for column in ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "cost_nano_usd", "errors"):
            assert sum(int(row[column]) for row in mine) == expected[column], (model, column)
        assert all(row["cost_usd"] == format_usd(int(row["cost_nano_usd"])) and row["tenant"] == "" for row in mine)


USAGE_BAD_QUERIES = [
    ("from=abc", "'from'"),
    ("to=yesterday-ish", "'to'"),
    ("from=1990-01-01", "'from'"),
    ("to=2999-01-01", "'to'"),
    ("from=2020-01-01&granularity=hour", "'from'"),
    ("granularity=week", "'granularity'"),
    ("group_by=colour", "'group_by'"),
    ("group_by=tenant", "'group_by'"),
    ("limit=0", "'limit'"),
    ("limit=ten", "'limit'"),
    ("page=12345", "'page'"),
    ("format=xml", "'format'"),
    ("colour=red", "'colour'"),
]


async def test_usage_bad_parameter_is_400_naming_it(gw: Gateway) -> None:
    for query, names in USAGE_BAD_QUERIES:
        response = await gw.client.get(usage_url(query=query), headers=gw.auth)
        assert response.status_code == 400, query
        assert names in assert_error(response, 400, 5006), query
        if not query.startswith("format="):  # the CSV form checks its parameters just the same
            csv_response = await gw.client.get(usage_url(query=f"{query}&format=csv"), headers=gw.auth)
            assert_error(csv_response, 400, 5006, names)


async def test_admin_usage_grouped_by_tenant_shows_each_tenant_with_usage(gw: Gateway) -> None:
    mine = await make_traffic(gw)
    b_key = await new_key(gw, OTHER)
    theirs = [cost_of(await run(gw, b_key["key"], OTHER, {"prompt": "B", "max_tokens": 5}))]
    await new_key(gw, "acct-idle")  # a tenant with a key and no usage: in no bucket's results
    report = result_of(await gw.client.get("/admin/v1/usage?group_by=tenant", headers=ADMIN))
    assert len(report["data"]) == 24  # every bucket, used or not
    assert all(result["requests"] > 0 for bucket in report["data"] for result in bucket["results"])
    assert {r["tenant"] for bucket in report["data"] for r in bucket["results"]} == {TENANT, OTHER}
    assert bucket_sum(report, tenant=TENANT) == summed(mine[MODEL] + mine[FP8_MODEL])
    assert bucket_sum(report, tenant=OTHER) == summed(theirs)
    assert report["totals"] == summed(mine[MODEL] + mine[FP8_MODEL] + theirs)
    both = result_of(await gw.client.get("/admin/v1/usage?group_by=tenant,model&granularity=day", headers=ADMIN))
    assert [(r["model"], r["tenant"]) for r in both["data"][-1]["results"]] == [
        (MODEL, OTHER),
        (MODEL, TENANT),
        (FP8_MODEL, TENANT),
    ]  # sorted by model, then tenant; B never used the fp8 model
    assert bucket_sum(both, tenant=TENANT, model=FP8_MODEL) == summed(mine[FP8_MODEL])
    assert bucket_sum(both, tenant=OTHER, model=MODEL) == summed(theirs)
    assert bucket_sum(both, tenant=OTHER, model=FP8_MODEL) == summed([])
    only_b = result_of(await gw.client.get(f"/admin/v1/usage?tenant={OTHER}", headers=ADMIN))
    assert only_b["totals"] == summed(theirs)
    csv_text = (
        await gw.client.get(f"/admin/v1/usage?tenant={OTHER},{TENANT}&group_by=tenant&format=csv", headers=ADMIN)
    ).text
    rows = [row for row in csv.DictReader(io.StringIO(csv_text)) if int(row["requests"])]
    assert sorted((row["tenant"], int(row["cost_nano_usd"])) for row in rows) == sorted(
        [(TENANT, summed(mine[MODEL] + mine[FP8_MODEL])["cost_nano_usd"]), (OTHER, summed(theirs)["cost_nano_usd"])]
    )


async def test_admin_usage_of_over_a_thousand_results_is_the_same_report(gw: Gateway, redis: Redis) -> None:
    """A report of more than 1,000 results is rendered in a worker thread: JSON and CSV, each result once."""
    end = int(time.time()) // 3600 * 3600
    used = range(end - 1200 * 3600, end, 3600)
    async with redis.pipeline(transaction=False) as pipe:
        for start in used:
            key = f"tg:{{{TENANT}}}:usage:h:{time.strftime('%Y%m%d%H', time.gmtime(start))}"
            pipe.hset(key, mapping={f"{MODEL}|requests": 1, f"{MODEL}|cost_nano_usd": start})
        await pipe.execute()
    query = f"tenant={TENANT}&group_by=tenant&from={end - 1500 * 3600}&to={end}"
    report = result_of(await gw.client.get(f"/admin/v1/usage?{query}", headers=ADMIN))
    rows = [
        (bucket["start_time"], r["tenant"], r["cost_nano_usd"]) for bucket in report["data"] for r in bucket["results"]
    ]
    assert len(report["data"]) == 1500 and rows == [(start, TENANT, start) for start in used]
    assert report["totals"]["requests"] == 1200 and report["totals"]["cost_nano_usd"] == sum(used)
    response = await gw.client.get(f"/admin/v1/usage?{query}&format=csv", headers=ADMIN)
    assert response.status_code == 200 and response.headers["content-type"] == "text/csv; charset=utf-8"
    csv_rows = list(csv.DictReader(io.StringIO(response.text)))
    assert [(row["tenant"], int(row["cost_nano_usd"])) for row in csv_rows] == [(TENANT, start) for start in used]


async def test_admin_usage_bad_parameter_is_400(gw: Gateway) -> None:
    for query, names in [
        ("tenant=bad%20name", "tenant"),
        ("group_by=colour", "'group_by'"),
        ("granularity=minute", "'granularity'"),
        ("format=pdf", "'format'"),
    ]:
        response = await gw.client.get(f"/admin/v1/usage?{query}", headers=ADMIN)
        assert response.status_code == 400, query
        assert names in assert_error(response, 400, 5006), query


def lenient_client(gateway: Gateway) -> httpx.AsyncClient:
    """A client on the same app and dependencies that shows a crash as the 500 a real client would get."""
    app = create_app(gateway.deps.settings, gateway.deps)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


async def test_admin_usage_before_any_tenant_exists_is_an_empty_report(
    redis: Redis, redis_url: str, tokenizer: Tokenizer
) -> None:
    async with (
        gateway_for(redis_url, tokenizer, [], skip_key=True, TOLLGATE_ADMIN__TOKEN=ADMIN_TOKEN) as gateway,
        lenient_client(gateway) as client,
    ):
        response = await client.get("/admin/v1/usage", headers=ADMIN)
        assert response.status_code == 200, response.text
        assert response.json()["result"]["totals"]["requests"] == 0


async def test_admin_usage_with_an_empty_tenant_list_is_400(gw: Gateway) -> None:
    async with lenient_client(gw) as client:
        assert_error(await client.get("/admin/v1/usage?tenant=,", headers=ADMIN), 400, 5006, "'tenant'")


# -- 6. budgets through the inference route -------------------------------------------------------------------------


def max_cost(tokenizer: Tokenizer, prompt: str, max_tokens: int) -> int:
    """The most a chat-form prompt request to the 8b model can cost: what admission checks against a cap."""
    return count_chat_prompt_tokens(tokenizer, [{"role": "user", "content": prompt}]) * 280 + max_tokens * 830


async def put_budget(gw: Gateway, tenant: str, usd: str | None) -> dict[str, Any]:
    body = {"monthly_budget_usd": usd}
    status: dict[str, Any] = result_of(
        await gw.client.put(f"/admin/v1/tenants/{tenant}/budget", json=body, headers=ADMIN)
    )
    return status


def assert_refused_for_budget(response: httpx.Response, whose: str, cap_nano: int, spent_nano: int) -> None:
    message = assert_error(response, 429, 3036, "Account limited", whose, f"${format_usd(cap_nano)}")
    assert f"${format_usd(spent_nano)} spent" in message and f"resets at {resets_at()}" in message
    assert response.headers["x-should-retry"] == "false"
    for header in ("prompt-tokens", "completion-tokens", "total-tokens", "cost-nano-usd"):
        assert response.headers[f"x-tollgate-{header}"] == "0"
    assert response.headers["x-tollgate-cost-usd"] == "0.000000000"


async def test_budget_tenant_cap_refuses_the_request_that_would_pass_it(
    gw: Gateway, worker: SimWorker, tokenizer: Tokenizer
) -> None:
    spent = cost_of(await run(gw, gw.key.secret_key))["cost_nano_usd"]
    limit = spent + max_cost(tokenizer, HI["prompt"], HI["max_tokens"])
    status = await put_budget(gw, TENANT, format_usd(limit - 1))
    assert status["monthly_budget_nano_usd"] == limit - 1 and status["budget_is_default"] is False
    assert status["spent_nano_usd"] == spent and status["resets_at"] == resets_at()
    served, ledger = len(worker.served), await ledger_state(gw)
    for body in (HI, {**HI, "stream": True}):
        assert_refused_for_budget(await run(gw, gw.key.secret_key, body=body), "the account's", limit - 1, spent)
    assert len(worker.served) == served  # refused before it reached a worker
    assert await ledger_state(gw) == ledger  # and never billed
    # exactly at the cap is allowed: the check is spent + most possible cost <= cap
    await put_budget(gw, TENANT, format_usd(limit))
    assert (await run(gw, gw.key.secret_key)).status_code == 200
    assert len(worker.served) == served + 1


async def test_budget_endpoint_shows_the_spend_in_the_ledger(gw: Gateway) -> None:
    costs = await make_traffic(gw)
    total = summed(costs[MODEL] + costs[FP8_MODEL])["cost_nano_usd"]
    other_key = await new_key(gw, TENANT, monthly_budget_usd="1.5")
    other_cost = cost_of(await run(gw, other_key["key"]))["cost_nano_usd"]
    month = month_of(time.time())
    assert await gw.deps.ledger.month_spend(TENANT, month) == total + other_cost
    for path in (f"/client/v4/accounts/{TENANT}/ai/budget", f"/accounts/{TENANT}/ai/budget"):
        status = result_of(await gw.client.get(path, headers=bearer(other_key["key"])))
        assert status == {
            "tenant": TENANT,
            "month": f"{month[:4]}-{month[4:]}",
            "resets_at": resets_at(),
            "monthly_budget_nano_usd": None,
            "monthly_budget_usd": None,
            "budget_is_default": True,
            "spent_nano_usd": total + other_cost,
            "spent_usd": format_usd(total + other_cost),
            "key": {
                "id": other_key["id"],
                "monthly_budget_nano_usd": 1_500_000_000,
                "monthly_budget_usd": "1.500000000",
                "spent_nano_usd": other_cost,
                "spent_usd": format_usd(other_cost),
            },
        }
    own = result_of(await gw.client.get(f"/client/v4/accounts/{TENANT}/ai/budget", headers=gw.auth))
    assert own["key"]["spent_nano_usd"] == total
    admin_view = result_of(await gw.client.get(f"/admin/v1/tenants/{TENANT}/budget", headers=ADMIN))
    assert admin_view["spent_nano_usd"] == total + other_cost and "key" not in admin_view
    [listed] = [t for t in result_of(await gw.client.get("/admin/v1/tenants", headers=ADMIN)) if t["tenant"] == TENANT]
    assert listed == admin_view


async def test_admin_tenants_lists_every_tenants_budget_and_spend_as_its_own_budget_route(
    redis: Redis, redis_url: str, tokenizer: Tokenizer, worker: SimWorker
) -> None:
    env = {"TOLLGATE_ADMIN__TOKEN": ADMIN_TOKEN, "TOLLGATE_BUDGETS__DEFAULT_MONTHLY_NANO_USD": "50000"}
    async with gateway_for(redis_url, tokenizer, [worker.url], **env) as gw:
        month = month_of(time.time())
        last_month = month_bounds(month)[0] - 1
        tenants = [TENANT, OTHER, "acct-default", "acct-zero", "acct-none"]
        for tenant in tenants[1:]:
            await new_key(gw, tenant)
        await put_budget(gw, TENANT, "25.00")
        await put_budget(gw, "acct-zero", "0")
        await put_budget(gw, "acct-none", None)
        bills = [(TENANT, time.time()), (TENANT, time.time()), (OTHER, time.time()), (OTHER, last_month)]
        for number, (tenant, at) in enumerate(bills):
            await gw.deps.ledger.record(usage_record(f"bill-{number}", tenant, started_at=at))
        listed = result_of(await gw.client.get("/admin/v1/tenants", headers=ADMIN))
        one_by_one = [
            result_of(await gw.client.get(f"/admin/v1/tenants/{tenant}/budget", headers=ADMIN))
            for tenant in sorted(tenants)
        ]
        assert listed == one_by_one
        common = {"month": f"{month[:4]}-{month[4:]}", "resets_at": resets_at()}
        assert {status["tenant"]: status for status in listed} == {
            TENANT: {
                "tenant": TENANT,
                **common,
                "monthly_budget_nano_usd": 25_000_000_000,
                "monthly_budget_usd": "25.000000000",
                "budget_is_default": False,
                "spent_nano_usd": 2 * 816_130,
                "spent_usd": "0.001632260",
            },
            OTHER: {
                "tenant": OTHER,
                **common,
                "monthly_budget_nano_usd": 50_000,
                "monthly_budget_usd": "0.000050000",
                "budget_is_default": True,
                "spent_nano_usd": 816_130,  # last month's bill is not this month's spend
                "spent_usd": "0.000816130",
            },
            "acct-default": {
                "tenant": "acct-default",
                **common,
                "monthly_budget_nano_usd": 50_000,
                "monthly_budget_usd": "0.000050000",
                "budget_is_default": True,
                "spent_nano_usd": 0,
                "spent_usd": "0.000000000",
            },
            "acct-zero": {
                "tenant": "acct-zero",
                **common,
                "monthly_budget_nano_usd": 0,
                "monthly_budget_usd": "0.000000000",
                "budget_is_default": False,
                "spent_nano_usd": 0,
                "spent_usd": "0.000000000",
            },
            "acct-none": {
                "tenant": "acct-none",
                **common,
                "monthly_budget_nano_usd": None,
                "monthly_budget_usd": None,
                "budget_is_default": False,
                "spent_nano_usd": 0,
                "spent_usd": "0.000000000",
            },
        }


async def test_budget_key_cap_counts_that_keys_own_spend(gw: Gateway, tokenizer: Tokenizer) -> None:
    most = max_cost(tokenizer, HI["prompt"], HI["max_tokens"])
    exact = await new_key(gw, TENANT, monthly_budget_usd=format_usd(most))
    assert (await run(gw, gw.key.secret_key)).status_code == 200  # the tenant's spend is not this key's
    spent = cost_of(await run(gw, exact["key"]))["cost_nano_usd"]  # exactly at the cap: allowed
    assert_refused_for_budget(await run(gw, exact["key"]), "this key's", most, spent)
    assert (await run(gw, gw.key.secret_key)).status_code == 200


async def test_budget_key_cap_refuses_that_key_only(
    gw: Gateway, worker: SimWorker, redis_url: str, tokenizer: Tokenizer
) -> None:
    capped = await new_key(gw, TENANT, name="capped")
    patched = await gw.client.patch(f"/admin/v1/keys/{capped['id']}", json={"monthly_budget_usd": "0"}, headers=ADMIN)
    assert result_of(patched)["monthly_budget_nano_usd"] == 0
    served, ledger = len(worker.served), await ledger_state(gw)
    assert_refused_for_budget(await run(gw, capped["key"]), "this key's", 0, 0)
    assert len(worker.served) == served and await ledger_state(gw) == ledger
    assert (await run(gw, gw.key.secret_key)).status_code == 200  # the tenant's other key still works
    # clearing the cap lets the key run again (on a replica that has not cached the capped record)
    await gw.client.patch(f"/admin/v1/keys/{capped['id']}", json={"monthly_budget_usd": None}, headers=ADMIN)
    async with fresh_gateway(redis_url, tokenizer, worker) as replica:
        assert (await run(replica, capped["key"])).status_code == 200


async def test_budget_default_cap_null_and_reset(
    redis: Redis, redis_url: str, tokenizer: Tokenizer, worker: SimWorker
) -> None:
    big = {"prompt": "hi", "max_tokens": 100}  # can cost up to more than the 50,000 n$ default
    assert max_cost(tokenizer, "hi", 100) > 50_000 > max_cost(tokenizer, "hi", 12)
    async with gateway_for(
        redis_url,
        tokenizer,
        [worker.url],
        TOLLGATE_ADMIN__TOKEN=ADMIN_TOKEN,
        TOLLGATE_BUDGETS__DEFAULT_MONTHLY_NANO_USD="50000",
    ) as gw:
        status = result_of(await gw.client.get(f"/admin/v1/tenants/{TENANT}/budget", headers=ADMIN))
        assert status["monthly_budget_nano_usd"] == 50_000 and status["monthly_budget_usd"] == "0.000050000"
        assert status["budget_is_default"] is True
        assert_refused_for_budget(await run(gw, gw.key.secret_key, body=big), "the account's", 50_000, 0)
        assert (await run(gw, gw.key.secret_key)).status_code == 200  # a cheaper request still fits
        # a tenant without a cap of its own gets the default too
        other = await new_key(gw, OTHER)
        assert_refused_for_budget(await run(gw, other["key"], OTHER, big), "the account's", 50_000, 0)
        # null: no cap at all, not even the default
        cleared = await put_budget(gw, TENANT, None)
        assert cleared["monthly_budget_nano_usd"] is None and cleared["budget_is_default"] is False
        assert (await run(gw, gw.key.secret_key, body=big)).status_code == 200
        assert (await run(gw, other["key"], OTHER, big)).status_code == 429  # B still has the default
        # DELETE goes back to the default
        reset = result_of(await gw.client.delete(f"/admin/v1/tenants/{TENANT}/budget", headers=ADMIN))
        assert reset["monthly_budget_nano_usd"] == 50_000 and reset["budget_is_default"] is True
        spent = await gw.deps.ledger.month_spend(TENANT, month_of(time.time()))
        assert spent == reset["spent_nano_usd"] > 0
        assert_refused_for_budget(await run(gw, gw.key.secret_key, body=big), "the account's", 50_000, spent)


async def test_budget_set_via_put_takes_effect_on_the_next_request(gw: Gateway) -> None:
    """No cache between a budget change and admission: the very next request sees it."""
    assert (await run(gw, gw.key.secret_key)).status_code == 200
    await put_budget(gw, TENANT, "0")
    assert (await run(gw, gw.key.secret_key)).status_code == 429
    await put_budget(gw, TENANT, "25.00")
    assert (await run(gw, gw.key.secret_key)).status_code == 200


# -- 7. Redis down --------------------------------------------------------------------------------------------------


@pytest.fixture
async def dead_gw(tokenizer: Tokenizer, worker: SimWorker) -> AsyncIterator[Gateway]:
    """A gateway whose Redis URL points at a closed port (no key could be created: ``skip_key``)."""
    async with gateway_for(
        DEAD_REDIS,
        tokenizer,
        [worker.url],
        skip_key=True,
        TOLLGATE_ADMIN__TOKEN=ADMIN_TOKEN,
        TOLLGATE_REDIS__RETRIES="0",  # each retry of a refused connection costs ~0.3 s; the mapping is what counts
    ) as gateway:
        yield gateway


async def test_redis_down_admin_routes_are_503_5530(dead_gw: Gateway) -> None:
    for method, path, body in admin_routes("aaaaaaaaaaaa"):
        response = await dead_gw.client.request(method, path, json=body, headers=ADMIN)
        assert response.status_code == 503, (method, path, response.text)
        assert_error(response, 503, 5530)


async def test_redis_down_key_bearers_and_tenant_routes_are_503_5530(dead_gw: Gateway, worker: SimWorker) -> None:
    some_key = bearer("tg_aaaaaaaaaaaa_" + "A" * 43)
    assert_error(await dead_gw.client.get("/admin/v1/keys", headers=some_key), 503, 5530)
    for route in ("usage", "budget"):
        assert_error(await dead_gw.client.get(f"/client/v4/accounts/{TENANT}/ai/{route}", headers=some_key), 503, 5530)
    assert_error(await dead_gw.client.get("/admin/v1/keys", headers=bearer("garbage")), 401, 10000)
    served = len(worker.served)
    assert_error(await run(dead_gw, "tg_aaaaaaaaaaaa_" + "A" * 43), 503, 5530)
    assert len(worker.served) == served


async def test_admin_bad_json_is_400_in_admin_words(gw: Gateway) -> None:
    response = await gw.client.post("/admin/v1/keys", content=b'{"tenant":', headers=ADMIN)
    message = assert_error(response, 400, 5006, "the body is not valid JSON")
    assert "AiError" not in message


# -- 8. who the bearer is -------------------------------------------------------------------------------------------

VERIFY_PATHS = ["/client/v4/user/tokens/verify", "/user/tokens/verify"]


@pytest.mark.parametrize("path", VERIFY_PATHS)
async def test_verify_a_key_shows_its_id_account_name_and_scopes(gw: Gateway, path: str) -> None:
    key = await new_key(gw, TENANT, name="dashboard", scopes=["usage:read", "inference"])
    identity = result_of(await gw.client.get(path, headers=bearer(key["key"])))
    assert identity == {
        "id": key["id"],
        "status": "active",
        "expires_on": None,
        "account_id": TENANT,
        "name": "dashboard",
        "scopes": ["inference", "usage:read"],
    }
    assert key["key"] not in json.dumps(identity)


async def test_verify_needs_no_particular_scope(gw: Gateway) -> None:
    for scopes in (["inference"], ["usage:read"], ["admin"]):
        key = await new_key(gw, OTHER, scopes=scopes)
        identity = result_of(await gw.client.get(VERIFY_PATHS[0], headers=bearer(key["key"])))
        assert identity["scopes"] == scopes and identity["account_id"] == OTHER and identity["id"] == key["id"]


async def test_verify_the_admin_token_is_the_operator_without_an_account(gw: Gateway) -> None:
    for path in VERIFY_PATHS:
        assert result_of(await gw.client.get(path, headers=ADMIN)) == {
            "id": "admin-token",
            "status": "active",
            "expires_on": None,
            "account_id": None,
            "name": "bootstrap admin token",
            "scopes": ["admin"],
        }


async def test_verify_shows_the_expiry_in_iso_8601_utc(gw: Gateway) -> None:
    key = await new_key(gw, TENANT, expires_at="2099-01-01T00:00:00Z")
    identity = result_of(await gw.client.get(VERIFY_PATHS[0], headers=bearer(key["key"])))
    assert identity["expires_on"] == "2099-01-01T00:00:00Z" and identity["status"] == "active"


async def test_verify_a_missing_bad_revoked_or_expired_key_is_401(gw: Gateway) -> None:
    revoked = await new_key(gw, TENANT)
    result_of(await gw.client.delete(f"/admin/v1/keys/{revoked['id']}", headers=ADMIN))
    expiring = await new_key(gw, TENANT, expires_in_seconds=0.2)
    assert (await gw.client.get(VERIFY_PATHS[0], headers=bearer(expiring["key"]))).status_code == 200
    await asyncio.sleep(0.25)
    for authorization in [*BAD_AUTHORIZATIONS, f"Bearer {revoked['key']}", f"Bearer {expiring['key']}"]:
        headers = {} if authorization is None else {"Authorization": authorization}
        for path in VERIFY_PATHS:
            assert_error(await gw.client.get(path, headers=headers), 401, 10000, "Authentication error")


async def test_verify_with_redis_down_is_503_5530(dead_gw: Gateway) -> None:
    response = await dead_gw.client.get(VERIFY_PATHS[0], headers=bearer("tg_aaaaaaaaaaaa_" + "A" * 43))
    assert_error(response, 503, 5530)
    assert result_of(await dead_gw.client.get(VERIFY_PATHS[0], headers=ADMIN))["id"] == "admin-token"
