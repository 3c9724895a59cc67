"""Worker pools through the gateway: retries before the first byte, ejection and return, backpressure (429 / 3040),
timeouts, LoRA and fp8 placement, readiness, the drain at shutdown and pool reloads.

Every test runs real simulated workers on loopback ports in front of an in-process gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
from redis.asyncio import Redis

from billing import Tokenizer
from config import PoolSettings, WorkerSettings
from gateway.route import Health
from gateway.sim import SimConfig, create_sim_app
from tests.conftest import (
    BF16_NAME,
    FP8_MODEL,
    FP8_NAME,
    TENANT,
    Gateway,
    SimWorker,
    gateway_for,
    live_server,
    sim_worker,
    sse_events,
    wait_for,
)

STREAM = {"prompt": "Tell me a story", "stream": True, "max_tokens": 30}
WHOLE = {"prompt": "Tell me a story", "max_tokens": 30}
FAST = {"tokens_per_second": 0, "time_to_first_token_seconds": 0, "completion_tokens": 12}
# Quick routing for tests: no background checks unless a test starts them.
ROUTING = {"TOLLGATE_ROUTING__EJECT_SECONDS": "0.3", "TOLLGATE_ROUTING__MAX_EJECT_SECONDS": "0.6"}
# For tests that count on an ejected worker staying out, however slow the machine.
STAY_OUT = {"TOLLGATE_ROUTING__EJECT_SECONDS": "60", "TOLLGATE_ROUTING__MAX_EJECT_SECONDS": "60"}


@contextlib.asynccontextmanager
async def workers(tokenizer: Tokenizer, count: int, **config: Any) -> AsyncIterator[list[SimWorker]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(sim_worker(tokenizer, **{**FAST, **config})) for _ in range(count)]


@contextlib.asynccontextmanager
async def worker_serving(tokenizer: Tokenizer, *names: str, **config: Any) -> AsyncIterator[SimWorker]:
    """A simulated worker serving only ``names`` (and ``config``'s adapters)."""
    app = create_sim_app(SimConfig(served_model_names=names, **{**FAST, **config}), tokenizer)
    async with live_server(app) as url:
        yield SimWorker(url, app)


async def billed(gateway: Gateway, request_id: str) -> dict[str, Any]:
    await wait_for(lambda: not gateway.deps.bills._tasks)
    events = [event for event in await gateway.deps.ledger.events(TENANT) if event["request_id"] == request_id]
    assert len(events) == 1, f"{len(events)} bills for {request_id}"
    return events[0]


def served_ids(worker: SimWorker) -> set[str]:
    return {record["request_id"] for record in worker.served}


# -- retries before the first byte, and ejection ---------------------------------------------------------------


async def test_a_refused_connection_is_retried_on_another_worker_and_ejects_the_dead_one(
    tokenizer: Tokenizer, redis: Redis, redis_url: str
) -> None:
    async with workers(tokenizer, 1) as [alive]:
        dead = "http://127.0.0.1:9"
        async with gateway_for(redis_url, tokenizer, [dead, alive.url], **ROUTING) as gateway:
            for body in [STREAM, WHOLE] * 5:
                response = await gateway.run(body)
                assert response.status_code == 200, response.text
            pool = gateway.deps.pools["bf16"]
            [dead_worker] = [worker for worker in pool.workers if worker.url == dead]
            assert dead_worker.health is not Health.UP and dead_worker.ejections >= 1
            assert len(alive.served) == 10  # each request served once, by the live worker
            retries = gateway.deps.metrics.upstream_retries.labels("bf16")._value.get()
            assert retries == dead_worker.ejections  # one wasted attempt per ejection, none once it was out


async def test_worker_5xx_is_retried_elsewhere_billed_once_and_ejects_after_three(
    tokenizer: Tokenizer, redis: Redis, redis_url: str
) -> None:
    async with workers(tokenizer, 2) as [broken, good]:
        broken.faults.error_rate = 1.0
        async with gateway_for(redis_url, tokenizer, [broken.url, good.url], **STAY_OUT) as gateway:
            # the broken worker is drawn about every other time until its third failure ejects it
            responses = [await gateway.run(STREAM if i % 2 else WHOLE) for i in range(30)]
            assert [response.status_code for response in responses] == [200] * 30
            for response in responses:
                request_id = response.headers["x-request-id"]
                assert request_id in served_ids(good)
                event = await billed(gateway, request_id)
                assert event["status"] == "ok"
            [bad] = [worker for worker in gateway.deps.pools["bf16"].workers if worker.url == broken.url]
            assert bad.health is Health.EJECTED
            assert len(broken.served) == 3  # tried until ejected (3 failures), then left alone


async def test_a_stream_whose_worker_dies_before_its_first_token_is_served_by_another(
    tokenizer: Tokenizer, redis: Redis, redis_url: str
) -> None:
    async with workers(tokenizer, 2) as [dying, good]:
        dying.faults.die_after_tokens = 0
        async with gateway_for(redis_url, tokenizer, [dying.url, good.url], **ROUTING) as gateway:
            for _ in range(4):
                response = await gateway.run(STREAM)
                events = sse_events(response.text)
                assert response.status_code == 200 and "errors" not in events[-2], events[-2]
                request_id = response.headers["x-request-id"]
                record = good.record_for(request_id)
                event = await billed(gateway, request_id)
                assert int(event["completion_tokens"]) == record["completion_tokens"]
                assert events[-2]["usage"]["completion_tokens"] == record["completion_tokens"]


async def test_a_stream_no_worker_starts_after_its_headers_ends_in_band(
    tokenizer: Tokenizer, redis: Redis, redis_url: str
) -> None:
    async with workers(tokenizer, 2) as sims:
        for sim in sims:
            sim.faults.die_after_tokens = 0  # each takes the request (headers) and dies before its first token
        async with gateway_for(redis_url, tokenizer, [sim.url for sim in sims], **ROUTING) as gateway:
            response = await gateway.run(STREAM)
            assert response.status_code == 200 and response.headers["x-tollgate-prompt-tokens"] == "39"
            events = sse_events(response.text)
            assert events == [
                {"result": None, "success": False, "errors": events[0]["errors"], "messages": []},
                "[DONE]",
            ]
            assert events[0]["errors"][0]["code"] == 5502
            assert sum(len(sim.served) for sim in sims) == 2  # tried on both, nothing delivered
            event = await billed(gateway, response.headers["x-request-id"])
            assert (event["completion_tokens"], event["status"]) == ("0", "upstream_error")


async def test_with_first_token_headers_a_stream_no_worker_starts_is_an_http_error(
    tokenizer: Tokenizer, redis: Redis, redis_url: str
) -> None:
    async with workers(tokenizer, 2) as sims:
        for sim in sims:
            sim.faults.die_after_tokens = 0
        env = {**ROUTING, "TOLLGATE_UPSTREAM__STREAM_HEADERS": "with_first_token"}
        async with gateway_for(redis_url, tokenizer, [sim.url for sim in sims], **env) as gateway:
            response = await gateway.run(STREAM)
            assert response.status_code == 502 and response.json()["errors"][0]["code"] == 5502
            sims[0].faults.die_after_tokens = sims[1].faults.die_after_tokens = None
            await asyncio.sleep(0.35)  # both were ejected by their failure; past eject_seconds they get a trial
            response = await gateway.run(STREAM)
            assert response.status_code == 200 and "usage" in sse_events(response.text)[-2]


async def test_worker_statuses_busy_everywhere_is_3040_and_a_422_is_the_clients(
    tokenizer: Tokenizer, redis: Redis, redis_url: str
) -> None:
    answers = {"status": 429}

    def worker(request: httpx.Request) -> httpx.Response:
        error = {"message": "nope", "type": "BadRequestError", "code": answers["status"]}
        return httpx.Response(answers["status"], json={"error": error})

    http = httpx.AsyncClient(transport=httpx.MockTransport(worker))
    urls = ["http://w1.test", "http://w2.test"]
    async with gateway_for(redis_url, tokenizer, urls, http=http, **ROUTING) as gateway:
        for body in (WHOLE, STREAM):
            response = await gateway.run(body)
            assert response.status_code == 429 and response.json()["errors"][0]["code"] == 3040
        assert all(worker.health is Health.UP for worker in gateway.deps.pools["bf16"].workers)  # busy, not broken
        answers["status"] = 422
        response = await gateway.run(WHOLE)
        assert response.status_code == 400 and response.json()["errors"][0]["message"].endswith("nope")
        answers["status"] = 401  # a misconfigured worker: not retried, not the client's fault
        response = await gateway.run(WHOLE)
        assert response.status_code == 502 and "401" in response.json()["errors"][0]["message"]


async def test_a_stream_dying_mid_way_ends_in_band_and_counts_against_the_worker(
    tokenizer: Tokenizer, redis: Redis, redis_url: str
) -> None:
    async with workers(tokenizer, 1, completion_tokens=40) as [dying]:
        dying.faults.die_after_tokens = 5
        async with gateway_for(redis_url, tokenizer, [dying.url], **STAY_OUT) as gateway:
            for _ in range(3):
                response = await gateway.run(STREAM)
                events = sse_events(response.text)
                assert events[-1] == "[DONE]" and events[-2]["errors"][0]["code"] == 5502
                record = dying.record_for(response.headers["x-request-id"])
                event = await billed(gateway, response.headers["x-request-id"])
                assert int(event["completion_tokens"]) == record["completion_tokens"] >= 5
            assert gateway.deps.pools["bf16"].workers[0].health is Health.EJECTED
            response = await gateway.run(STREAM)  # nothing left to serve it
            assert response.status_code == 503 and response.json()["errors"][0]["code"] == 5503


async def test_an_ejected_worker_gets_one_trial_after_its_time_and_is_taken_back(
    tokenizer: Tokenizer, redis: Redis, redis_url: str
) -> None:
    async with workers(tokenizer, 1) as [worker]:
        worker.faults.error_rate = 1.0
        async with gateway_for(redis_url, tokenizer, [worker.url], **ROUTING) as gateway:
            statuses = [(await gateway.run(WHOLE)).status_code for _ in range(4)]
            assert statuses == [502, 502, 502, 503]
            worker.faults.error_rate = 0.0
            await asyncio.sleep(0.35)  # past routing.eject_seconds: half-open
            assert (await gateway.run(WHOLE)).status_code == 200
            assert gateway.deps.pools["bf16"].workers[0].health is Health.UP


async def test_health_checks_eject_an_unhealthy_worker_and_take_it_back(
    tokenizer: Tokenizer, redis: Redis, redis_url: str
) -> None:
    env = {
        **ROUTING,
        "TOLLGATE_ROUTING__HEALTH_INTERVAL_SECONDS": "0.05",
        "TOLLGATE_ROUTING__METRICS_INTERVAL_SECONDS": "0.05",
    }
    async with (
        workers(tokenizer, 2) as [flaky, steady],
        gateway_for(redis_url, tokenizer, [flaky.url, steady.url], live=True, **env) as gateway,
    ):
        [watched, _] = gateway.deps.pools["bf16"].workers
        await wait_for(lambda: watched.catalog is not None and watched.load is not None)
        flaky.faults.unhealthy = True
        await wait_for(lambda: watched.health is Health.EJECTED)
        for _ in range(6):
            assert (await gateway.run(WHOLE)).status_code == 200
        assert flaky.served == []
        ready = await gateway.client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["models"]["@cf/meta/llama-3.1-8b-instruct"]["workers_up"] == 1
        flaky.faults.unhealthy = False
        await wait_for(lambda: watched.current_health() is Health.HALF_OPEN)  # its checks pass again
        for _ in range(20):  # a passing check does not end the ejection: one request tries it, and succeeds
            assert (await gateway.run(WHOLE)).status_code == 200
            if watched.health is Health.UP:
                break
        assert watched.health is Health.UP and len(flaky.served) == 1


# -- backpressure ------------------------------------------------------------------------------------------------


async def test_fleet_full_waits_then_answers_429_3040_and_reject_if_busy_answers_at_once(
    tokenizer: Tokenizer, redis: Redis, redis_url: str
) -> None:
    env = {
        "TOLLGATE_ROUTING__MAX_IN_FLIGHT_PER_WORKER": "1",
        "TOLLGATE_ROUTING__QUEUE_SIZE": "1",
        "TOLLGATE_ROUTING__QUEUE_TIMEOUT_SECONDS": "0.3",
    }
    async with (
        workers(tokenizer, 1, tokens_per_second=20, completion_tokens=20) as [slow],
        gateway_for(redis_url, tokenizer, [slow.url], **env) as gateway,
    ):
        running = asyncio.create_task(gateway.run(STREAM))  # takes the worker's one place for about a second
        await wait_for(lambda: gateway.deps.pools["bf16"].workers[0].in_flight == 1)
        waiting = asyncio.create_task(gateway.run(WHOLE))  # takes the queue's one place
        await wait_for(lambda: gateway.deps.pools["bf16"].waiting == 1)
        overflow = await gateway.run(WHOLE)
        busy = await gateway.run({**WHOLE, "options": {"rejectIfBusy": True}})
        for refused in (overflow, busy):
            assert refused.status_code == 429
            assert refused.json()["errors"] == [
                {"code": 3040, "message": "Capacity temporarily exceeded, please try again."}
            ]
            assert refused.headers["retry-after"] == "1"
        timed_out = await waiting
        assert timed_out.status_code == 429 and timed_out.json()["errors"][0]["code"] == 3040
        assert (await running).status_code == 200
        # Refused before admission: no bill. Refused after waiting: recorded as admitted, at no cost.
        await wait_for(lambda: not gateway.deps.bills._tasks)
        events = {event["request_id"]: event for event in await gateway.deps.ledger.events(TENANT)}
        assert busy.headers["x-request-id"] not in events
        assert events[timed_out.headers["x-request-id"]]["cost_nano_usd"] == "0"
        assert events[timed_out.headers["x-request-id"]]["status"] == "capacity"
        assert len(slow.served) == 1


async def test_queued_requests_are_served_in_order_as_places_free(
    tokenizer: Tokenizer, redis: Redis, redis_url: str
) -> None:
    env = {"TOLLGATE_ROUTING__MAX_IN_FLIGHT_PER_WORKER": "2", "TOLLGATE_ROUTING__QUEUE_TIMEOUT_SECONDS": "20"}
    async with (
        workers(tokenizer, 2, tokens_per_second=200, completion_tokens=10) as sims,
        gateway_for(redis_url, tokenizer, [sim.url for sim in sims], **env) as gateway,
    ):
        responses = await asyncio.gather(*(gateway.run(STREAM) for _ in range(30)))
        assert [response.status_code for response in responses] == [200] * 30
        pool = gateway.deps.pools["bf16"]
        assert pool.waiting == 0 and [worker.in_flight for worker in pool.workers] == [0, 0]
        assert sum(len(sim.served) for sim in sims) == 30


# -- timeouts --------------------------------------------------------------------------------------------------


async def test_no_first_token_in_time_moves_the_stream_to_another_worker(
    tokenizer: Tokenizer, redis: Redis, redis_url: str
) -> None:
    env = {**ROUTING, "TOLLGATE_UPSTREAM__FIRST_TOKEN_TIMEOUT_SECONDS": "0.3"}
    async with (
        workers(tokenizer, 1, time_to_first_token_seconds=5) as [stuck],
        workers(tokenizer, 1) as [good],
        gateway_for(redis_url, tokenizer, [stuck.url, good.url], **env) as gateway,
    ):
        for _ in range(3):
            response = await gateway.run(STREAM)
            assert response.status_code == 200 and "usage" in sse_events(response.text)[-2]
            assert response.headers["x-request-id"] in served_ids(good)


async def test_a_stream_over_the_total_time_ends_in_band_and_bills_what_was_sent(
    tokenizer: Tokenizer, redis: Redis, redis_url: str
) -> None:
    async with workers(tokenizer, 1, tokens_per_second=20, completion_tokens=200) as [slow]:
        env = {"TOLLGATE_UPSTREAM__TOTAL_TIMEOUT_SECONDS": "0.5"}
        async with gateway_for(redis_url, tokenizer, [slow.url], **env) as gateway:
            response = await gateway.run({**STREAM, "max_tokens": 200})
            events = sse_events(response.text)
            assert events[-1] == "[DONE]" and events[-2]["errors"][0]["code"] == 5504
            text = "".join(event.get("response", "") for event in events[:-2])
            event = await billed(gateway, response.headers["x-request-id"])
            assert event["status"] == "upstream_timeout"
            await wait_for(lambda: any(r["request_id"] == response.headers["x-request-id"] for r in slow.served))
            completion = int(event["completion_tokens"])  # what reached the client; a token may have been in flight
            sent = slow.record_for(response.headers["x-request-id"])["completion_tokens"]
            assert 0 < completion <= sent <= completion + 3
            assert text


# -- what a worker serves: fp8 and LoRA ----------------------------------------------------------------------------


async def test_fp8_and_lora_requests_land_only_on_workers_that_serve_them(
    tokenizer: Tokenizer, redis: Redis, redis_url: str
) -> None:
    async with (
        worker_serving(tokenizer, BF16_NAME) as bf16_only,
        worker_serving(tokenizer, BF16_NAME, lora_adapters=("pirate",)) as with_lora,
        worker_serving(tokenizer, FP8_NAME) as fp8_only,
    ):
        urls = [bf16_only.url, with_lora.url, fp8_only.url]
        env = {"TOLLGATE_POOLS__FP8__WORKERS": ",".join(urls)}
        async with gateway_for(redis_url, tokenizer, urls, **env) as gateway:
            await gateway.deps.monitor.check_now()  # reads every worker's /v1/models
            for _ in range(6):
                assert (await gateway.run(WHOLE, model=FP8_MODEL)).status_code == 200
                assert (await gateway.run({**WHOLE, "lora": "pirate"})).status_code == 200
            assert len(fp8_only.served) == 6 and {r["model"] for r in fp8_only.served} == {FP8_NAME}
            assert len(with_lora.served) == 6 and {r["model"] for r in with_lora.served} == {"pirate"}
            assert bf16_only.served == []
            before = await redis.dbsize()
            unknown = await gateway.run({**WHOLE, "lora": "no-such-adapter"})
            assert unknown.status_code == 400 and "no-such-adapter" in unknown.json()["errors"][0]["message"]
            assert await redis.dbsize() == before  # refused before admission: no limits touched, nothing billed


async def test_prefix_affinity_keeps_a_system_prompt_on_one_worker(
    tokenizer: Tokenizer, redis: Redis, redis_url: str
) -> None:
    async with workers(tokenizer, 3) as sims:
        env = {"TOLLGATE_ROUTING__PREFIX_AFFINITY": "true"}
        async with gateway_for(redis_url, tokenizer, [sim.url for sim in sims], **env) as gateway:
            for system in ("You are a pirate.", "You are a librarian."):
                before = [len(sim.served) for sim in sims]
                for turn in range(8):
                    messages = [{"role": "system", "content": system}, {"role": "user", "content": f"turn {turn}"}]
                    assert (await gateway.run({"messages": messages, "max_tokens": 5})).status_code == 200
                grew = [len(sim.served) - count for sim, count in zip(sims, before, strict=True)]
                assert sorted(grew) == [0, 0, 8]  # one worker took every turn of the conversation


# -- readiness, drain and reload -----------------------------------------------------------------------------------


async def test_readiness_follows_the_workers_and_the_drain(tokenizer: Tokenizer, redis: Redis, redis_url: str) -> None:
    async with workers(tokenizer, 1) as [worker], gateway_for(redis_url, tokenizer, [worker.url], **ROUTING) as gateway:
        assert (await gateway.client.get("/readyz")).status_code == 200
        for pool in gateway.deps.pools.values():
            pool.workers[0].eject("test")
        response = await gateway.client.get("/readyz")
        assert response.status_code == 503 and response.json()["ready"] is False
        await asyncio.sleep(0.35)  # half-open again
        assert (await gateway.client.get("/readyz")).status_code == 200
        gateway.deps.drain.begin()
        draining = await gateway.client.get("/readyz")
        assert draining.status_code == 503 and draining.json()["draining"] is True
        refused = await gateway.run(WHOLE)
        assert refused.status_code == 503 and refused.headers["connection"] == "close"


async def test_drain_lets_short_streams_finish_and_ends_long_ones_cleanly_billed(
    tokenizer: Tokenizer, redis: Redis, redis_url: str
) -> None:
    async with workers(tokenizer, 1, tokens_per_second=40, completion_tokens=400) as [worker]:
        env = {"TOLLGATE_SERVER__DRAIN_SECONDS": "0.6"}
        async with gateway_for(redis_url, tokenizer, [worker.url], **env) as gateway:
            short = asyncio.create_task(gateway.run({**STREAM, "max_tokens": 10}))
            long = asyncio.create_task(gateway.run({**STREAM, "max_tokens": 400}))
            await wait_for(lambda: gateway.deps.drain.in_flight == 2)
            gateway.deps.drain.begin()
            short_response, long_response = await short, await long
            assert "usage" in sse_events(short_response.text)[-2]
            events = sse_events(long_response.text)
            assert events[-1] == "[DONE]" and events[-2]["errors"][0]["code"] == 5503
            request_id = long_response.headers["x-request-id"]
            event = await billed(gateway, request_id)
            await wait_for(lambda: request_id in served_ids(worker))
            assert event["status"] == "shutdown"
            # billed for what reached the client; the worker may have sent a token or two more meanwhile
        completion = int(event["completion_tokens"])
        assert 0 < completion <= worker.record_for(request_id)["completion_tokens"] <= completion + 3 < 400


async def test_a_pool_reload_adds_and_removes_workers_without_dropping_streams(
    tokenizer: Tokenizer, redis: Redis, redis_url: str
) -> None:
    async with (
        workers(tokenizer, 1, tokens_per_second=50, completion_tokens=25) as [old],
        workers(tokenizer, 1) as [new],
        gateway_for(redis_url, tokenizer, [old.url]) as gateway,
    ):
        pools = dict(gateway.deps.settings.pools)
        gateway.deps.reloader._load = lambda: pools
        stream = asyncio.create_task(gateway.run({**STREAM, "max_tokens": 25}))
        await wait_for(lambda: gateway.deps.pools["bf16"].workers[0].in_flight == 1)
        pools["bf16"] = PoolSettings(workers=(WorkerSettings(url=new.url),))
        assert gateway.deps.reloader.reload() is True
        assert gateway.deps.reloader.reload() is False  # nothing changed since
        for _ in range(3):
            assert (await gateway.run(WHOLE)).status_code == 200
        response = await stream
        assert "usage" in sse_events(response.text)[-2]  # the stream on the removed worker finished there
        assert len(old.served) == 1 and len(new.served) == 3
        status = gateway.deps.pools["bf16"].status()
        assert [worker["url"] for worker in status["workers"]] == [new.url]
        assert status["removed_with_requests"] == []


async def test_admin_pools_route_shows_workers_and_reloads(tokenizer: Tokenizer, redis: Redis, redis_url: str) -> None:
    token = "t" * 40
    async with (
        workers(tokenizer, 1) as [worker],
        gateway_for(redis_url, tokenizer, [worker.url], TOLLGATE_ADMIN__TOKEN=token) as gateway,
    ):
        headers = {"Authorization": f"Bearer {token}"}
        response = await gateway.client.get("/admin/v1/pools", headers=headers)
        assert response.status_code == 200
        [bf16, _] = response.json()["result"]
        assert bf16["pool"] == "bf16" and bf16["workers"][0]["url"] == worker.url
        assert bf16["workers"][0]["health"] == "up"
        response = await gateway.client.post("/admin/v1/pools/reload", headers=headers)
        assert response.status_code == 200 and response.json()["result"]["changed"] is False
        assert response.json()["result"]["pools"][0]["workers"][0]["models"] is not None  # checked just now
        assert (await gateway.client.get("/admin/v1/pools", headers=gateway.auth)).status_code == 403


async def test_admin_pools_routes_need_a_credential(redis: Redis, redis_url: str, tokenizer: Tokenizer) -> None:
    async with gateway_for(redis_url, tokenizer, ["http://127.0.0.1:9"]) as gateway:
        assert (await gateway.client.get("/admin/v1/pools")).status_code == 401
        assert (await gateway.client.post("/admin/v1/pools/reload")).status_code == 401
