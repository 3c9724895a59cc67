"""Three gateway replicas share one state: keys, rate limits, budgets and the ledger all live in the one Redis.

Three ``tollgate serve`` processes, each on its own port, stand in front of one redis-server and two simulated workers,
as a Deployment's pods do, and are driven only through their HTTP interfaces: the admin API (with the admin token),
the Workers AI route and the usage API. A key made, rotated, updated or revoked through one replica holds on the others
within ``auth.cache_ttl_seconds``; a key's requests per minute and concurrent streams are counted once over all of
them; a tenant's monthly budget set on one stops spending on every one, exactly where README "Budgets" says; and every
replica reports the same ledger, the sum of what the clients were billed, each request once.

Nothing here sleeps for a fixed time: what the key cache or a bill delays is polled for, with a deadline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from decimal import Decimal
from typing import Any, TypeVar

import httpx
import pytest

from tests.conftest import MODEL, sse_events
from tests.processes import ADMIN_TOKEN, stack_in_tempdir

pytestmark = [pytest.mark.server, pytest.mark.timeout(60)]

T = TypeVar("T")
Answer = tuple[int, int | None]  # HTTP status and Workers AI error code (None for a 200)

REPLICAS = 3
AUTH_CACHE_TTL_SECONDS = 0.2
DEADLINE_SECONDS = 10.0  # for what the key cache (0.2 s) or a bill (a moment; a hang-up: <= 2 s drain) delays
POLL_SECONDS = 0.05
PROMPT_NANO_USD, COMPLETION_NANO_USD = 280, 830  # the 8b model's prices per token
STALL_AFTER_TOKENS = 200  # a worker stops sending after this many tokens: a longer answer runs until its client leaves
WORKER_OPTIONS = ("--tokens-per-second", "0", "--ttft-seconds", "0", "--completion-tokens", "1000")
WORKER_OPTIONS += ("--stall-after-tokens", str(STALL_AFTER_TOKENS))

OK: Answer = (200, None)
UNAUTHORIZED: Answer = (401, 10000)
RATE_LIMITED: Answer = (429, 5429)
OVER_BUDGET: Answer = (429, 3036)
CHAT = {"messages": [{"role": "user", "content": "Name a sea."}], "max_tokens": 8}


@dataclasses.dataclass
class Replicas:
    """The replicas' URLs (a replica is named by its index, 0 to 2) and one client to call them with."""

    urls: list[str]
    http: httpx.AsyncClient

    def run_url(self, replica: int, tenant: str) -> str:
        return f"{self.urls[replica]}/client/v4/accounts/{tenant}/ai/run/{MODEL}"

    async def run(self, replica: int, tenant: str, secret: str, body: dict[str, Any]) -> httpx.Response:
        return await self.http.post(self.run_url(replica, tenant), json=body, headers=bearer(secret))

    async def admin(self, replica: int, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = await self.http.request(method, self.urls[replica] + path, json=body, headers=bearer(ADMIN_TOKEN))
        assert response.status_code in (200, 201), response.text
        return response.json()["result"]


@pytest.fixture(scope="module")
def replica_urls() -> Iterator[list[str]]:
    with stack_in_tempdir() as stack:
        for _ in range(2):
            stack.start_worker(*WORKER_OPTIONS)
        yield stack.start_replicas(REPLICAS, TOLLGATE_AUTH__CACHE_TTL_SECONDS=str(AUTH_CACHE_TTL_SECONDS))


@pytest.fixture
async def gw(replica_urls: list[str]) -> AsyncIterator[Replicas]:
    async with httpx.AsyncClient(timeout=30, trust_env=False) as http:
        yield Replicas(replica_urls, http)


# -- keys ----------------------------------------------------------------------------------------------------------


async def test_key_created_on_one_replica_works_on_all_and_revoked_on_another_is_refused_by_all(gw: Replicas) -> None:
    tenant = "acct-keys"
    key_id, secret = await create_key(gw, 0, tenant)
    for replica in range(REPLICAS):  # each replica now holds the key in its cache
        assert answer_of(await gw.run(replica, tenant, secret, CHAT)) == OK

    await gw.admin(2, "DELETE", f"/admin/v1/keys/{key_id}")

    for replica in range(REPLICAS):
        await answer_becomes(gw, replica, tenant, secret, CHAT, until=UNAUTHORIZED, meanwhile=OK)
    assert (await gw.admin(0, "GET", f"/admin/v1/keys/{key_id}"))["revoked"] is True


async def test_key_rotated_or_updated_on_one_replica_is_seen_by_the_others(gw: Replicas) -> None:
    tenant = "acct-rotate"
    key_id, old_secret = await create_key(gw, 1, tenant)
    for replica in range(REPLICAS):
        assert answer_of(await gw.run(replica, tenant, old_secret, CHAT)) == OK

    rotated = await gw.admin(0, "POST", f"/admin/v1/keys/{key_id}/rotate", {"grace_seconds": 0})
    new_id, new_secret = rotated["new"]["id"], rotated["new"]["key"]
    for replica in range(REPLICAS):  # a key a replica has not seen is read from Redis at once
        assert answer_of(await gw.run(replica, tenant, new_secret, CHAT)) == OK
    for replica in range(REPLICAS):
        await answer_becomes(gw, replica, tenant, old_secret, CHAT, until=UNAUTHORIZED, meanwhile=OK)

    # A budget of $0 of the key's own, set through replica 2, stops it on replicas 0 and 1.
    await gw.admin(2, "PATCH", f"/admin/v1/keys/{new_id}", {"monthly_budget_usd": "0"})
    for replica in (0, 1):
        await answer_becomes(gw, replica, tenant, new_secret, CHAT, until=OVER_BUDGET, meanwhile=OK)


# -- rate limits ---------------------------------------------------------------------------------------------------


async def test_requests_per_minute_of_a_key_are_counted_once_over_all_replicas(gw: Replicas) -> None:
    tenant, rpm = "acct-rpm", 6
    _, secret = await create_key(gw, 0, tenant, limits={"requests_per_minute": rpm})

    burst = [gw.run(n % REPLICAS, tenant, secret, CHAT) for n in range(2 * rpm)]  # round-robin, all at once
    responses = await asyncio.gather(*burst)

    admitted = [response for response in responses if answer_of(response) == OK]
    refused = [response for response in responses if answer_of(response) == RATE_LIMITED]
    assert len(admitted) == rpm and len(refused) == rpm, [answer_of(response) for response in responses]
    # One window for all: the admitted requests took its places one by one, whichever replica admitted them.
    assert sorted(int(response.headers["x-ratelimit-remaining-requests"]) for response in admitted) == list(range(rpm))
    for replica in range(REPLICAS):  # used up everywhere
        refused.append(await gw.run(replica, tenant, secret, CHAT))
        assert answer_of(refused[-1]) == RATE_LIMITED
    for response in refused:
        assert f"may make {rpm} requests per minute" in error_message(response)
        assert float(response.headers["retry-after"]) > 0
        assert response.headers["x-ratelimit-limit-requests"] == str(rpm)


async def test_one_concurrent_stream_of_a_key_is_shared_by_all_replicas(gw: Replicas) -> None:
    tenant = "acct-streams"
    _, secret = await create_key(gw, 1, tenant, limits={"concurrent_streams": 1})
    held = {**CHAT, "max_tokens": 2 * STALL_AFTER_TOKENS, "stream": True}  # runs until this client leaves

    async with gw.http.stream("POST", gw.run_url(0, tenant), json=held, headers=bearer(secret)) as stream:
        assert stream.status_code == 200
        lines = stream.aiter_lines()  # kept: an abandoned iterator closes the response, and the client leaves
        assert "response" in await first_event(lines)
        for replica in (1, 2, 1, 0):
            refused = await gw.run(replica, tenant, secret, CHAT)
            assert answer_of(refused) == RATE_LIMITED, refused.text
            assert "may run 1 requests at once" in error_message(refused)

    # The client left: its replica stops the worker and bills the stream, which frees the slot for any replica.
    await answer_becomes(gw, 2, tenant, secret, CHAT, until=OK, meanwhile=RATE_LIMITED)


# -- budgets -------------------------------------------------------------------------------------------------------


async def test_tenant_budget_set_on_one_replica_stops_every_replica_without_passing_it(gw: Replicas) -> None:
    """README "Budgets": a request is refused (429 / 3036) when this month's spend plus its most possible cost (its
    prompt tokens and ``max_tokens`` at the model's prices) would pass the cap, and admitted otherwise; with no two
    requests in flight together, the spend therefore never passes the cap."""
    tenant, full_max_tokens = "acct-budget", 100
    prompt_tokens = await prompt_tokens_of(gw, CHAT)
    # Three full requests fit, a fourth does not; what is left then fits one of 10 tokens, and after it not even one.
    cap = 3 * cost(prompt_tokens, full_max_tokens) + cost(prompt_tokens, 10) + 500
    _, secret = await create_key(gw, 0, tenant)
    await gw.admin(0, "PUT", f"/admin/v1/tenants/{tenant}/budget", {"monthly_budget_usd": usd(cap)})

    spent, answers = 0, []
    for turn, max_tokens in enumerate((full_max_tokens,) * 4 + (10, 1)):
        replica = 1 + turn % 2  # spend through the two replicas that did not set the budget
        fits = spent + cost(prompt_tokens, max_tokens) <= cap
        response = await gw.run(replica, tenant, secret, {**CHAT, "max_tokens": max_tokens})
        answers.append(answer_of(response))
        assert answers[-1] == (OK if fits else OVER_BUDGET), (turn, spent, cap, response.text)
        if fits:
            spent += usage_of(response)["cost_nano_usd"]
            await spend_reaches(gw, 1 + (turn + 1) % 2, tenant, spent)  # billed before the next request is admitted
        else:
            assert response.headers["x-should-retry"] == "false"
            assert "Account limited: the account's monthly budget" in error_message(response)
    assert answers == [OK, OK, OK, OVER_BUDGET, OK, OVER_BUDGET]

    for replica in range(REPLICAS):  # every replica refuses even the smallest request, and sees the same spend
        assert answer_of(await gw.run(replica, tenant, secret, {**CHAT, "max_tokens": 1})) == OVER_BUDGET
        budget = await gw.admin(replica, "GET", f"/admin/v1/tenants/{tenant}/budget")
        assert (budget["monthly_budget_nano_usd"], budget["spent_nano_usd"]) == (cap, spent)
    assert cap - cost(prompt_tokens, 1) < spent <= cap


# -- ledger --------------------------------------------------------------------------------------------------------


async def test_every_replica_reports_the_ledger_of_what_clients_were_billed_each_request_once(gw: Replicas) -> None:
    tenant = "acct-ledger"
    _, secret = await create_key(gw, 2, tenant)
    bodies = [
        {"messages": [{"role": "user", "content": f"Tell me fact {n}."}], "max_tokens": 3 + n, "stream": n % 2 == 1}
        for n in range(12)
    ]

    sends = [billed_usage(gw, n % REPLICAS, tenant, secret, body) for n, body in enumerate(bodies)]  # round-robin
    billed = await asyncio.gather(*sends)

    assert len({request_id for request_id, _ in billed}) == len(bodies)
    usages = [usage for _, usage in billed]
    for usage in usages:
        assert usage["cost_nano_usd"] == cost(usage["prompt_tokens"], usage["completion_tokens"]), usage
    prompt, completion = sum(u["prompt_tokens"] for u in usages), sum(u["completion_tokens"] for u in usages)
    expected = {
        "requests": len(bodies),
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "cost_nano_usd": cost(prompt, completion),
        "errors": 0,
    }
    assert expected["cost_nano_usd"] == sum(u["cost_nano_usd"] for u in usages)

    await eventually(lambda: usage_totals(gw, 0, tenant, secret), lambda t: t["requests"] >= len(bodies), "ledger")
    for replica in range(REPLICAS):
        totals = await usage_totals(gw, replica, tenant, secret)
        assert {name: totals[name] for name in expected} == expected, (replica, totals)


# -- helpers -------------------------------------------------------------------------------------------------------


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def cost(prompt_tokens: int, completion_tokens: int) -> int:
    return PROMPT_NANO_USD * prompt_tokens + COMPLETION_NANO_USD * completion_tokens


def usd(nano_usd: int) -> str:
    return str(Decimal(nano_usd).scaleb(-9))


def answer_of(response: httpx.Response) -> Answer:
    if response.status_code == 200:
        return OK
    return response.status_code, response.json()["errors"][0]["code"]


def error_message(response: httpx.Response) -> str:
    return str(response.json()["errors"][0]["message"])


def usage_of(response: httpx.Response) -> dict[str, int]:
    return dict(response.json()["result"]["usage"])


async def create_key(gw: Replicas, replica: int, tenant: str, **fields: Any) -> tuple[str, str]:
    """A key made through ``replica``'s admin API: its id and secret."""
    created = await gw.admin(replica, "POST", "/admin/v1/keys", {"tenant": tenant, "name": "replicas", **fields})
    return created["id"], created["key"]


async def prompt_tokens_of(gw: Replicas, body: dict[str, Any]) -> int:
    """The prompt tokens ``body`` is billed for, asked of a tenant of its own."""
    _, secret = await create_key(gw, 0, "acct-probe")
    response = await gw.run(0, "acct-probe", secret, body)
    assert response.status_code == 200, response.text
    return int(response.headers["x-tollgate-prompt-tokens"])


async def first_event(lines: AsyncIterator[str]) -> Any:
    async for line in lines:
        if line.startswith("data: "):
            return sse_events(line)[0]
    raise AssertionError("the stream ended before its first event")


async def billed_usage(
    gw: Replicas, replica: int, tenant: str, secret: str, body: dict[str, Any]
) -> tuple[str, dict[str, int]]:
    """Send ``body`` to ``replica``; the request id and the ``usage`` the client was told it is billed for."""
    response = await gw.run(replica, tenant, secret, body)
    assert response.status_code == 200, response.text
    if not body.get("stream"):
        return response.headers["x-request-id"], usage_of(response)
    events = sse_events(response.text)
    assert events[-1] == "[DONE]" and "usage" in events[-2], events[-2:]
    return response.headers["x-request-id"], dict(events[-2]["usage"])


async def usage_totals(gw: Replicas, replica: int, tenant: str, secret: str) -> dict[str, Any]:
    """The tenant's usage of the last 30 days (by day), as ``replica``'s usage API adds it up."""
    url = f"{gw.urls[replica]}/client/v4/accounts/{tenant}/ai/usage"
    response = await gw.http.get(url, params={"granularity": "day"}, headers=bearer(secret))
    assert response.status_code == 200, response.text
    page = response.json()["result"]
    assert page["has_more"] is False
    return dict(page["totals"])


async def spend_reaches(gw: Replicas, replica: int, tenant: str, spent: int) -> None:
    """Wait until ``replica`` reports the tenant's spend this month as ``spent``; it must never be more."""
    budget = await eventually(
        lambda: gw.admin(replica, "GET", f"/admin/v1/tenants/{tenant}/budget"),
        lambda budget: budget["spent_nano_usd"] >= spent,
        f"the spend of {tenant}",
    )
    assert budget["spent_nano_usd"] == spent, budget


async def answer_becomes(
    gw: Replicas, replica: int, tenant: str, secret: str, body: dict[str, Any], *, until: Answer, meanwhile: Answer
) -> None:
    """Send ``body`` to ``replica`` until it answers ``until``; every answer before that must be ``meanwhile``."""
    answers: list[Answer] = []

    async def send() -> Answer:
        answers.append(answer_of(await gw.run(replica, tenant, secret, body)))
        return answers[-1]

    await eventually(send, lambda answer: answer == until, f"replica {replica}'s answer")
    assert set(answers[:-1]) <= {meanwhile}, answers


async def eventually(read: Callable[[], Awaitable[T]], is_done: Callable[[T], bool], what: str) -> T:
    """Call ``read`` until ``is_done`` holds for what it returns, and return that; fail after ``DEADLINE_SECONDS``."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while True:
        value = await read()
        if is_done(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what} is still {value!r} after {DEADLINE_SECONDS} s")
        await asyncio.sleep(POLL_SECONDS)
