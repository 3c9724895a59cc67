"""Real uvicorn servers on free ports: concurrent streams, client disconnects and the bill, request by request."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random

import httpx
import pytest
import uvicorn
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from billing import DurableLedger, Ledger, Tokenizer, UsageRecord, hour_bucket, tenant_key
from gateway import build_dependencies, create_app
from gateway._processes import free_port
from tests.conftest import TENANT, Gateway, gateway_for, make_settings, sim_worker, wait_for

pytestmark = pytest.mark.server


async def ledger_by_request(gateway: Gateway) -> dict[str, dict[str, str]]:
    events = await gateway.deps.ledger.events(TENANT, count=10_000)
    by_id = {event["request_id"]: event for event in events}
    assert len(by_id) == len(events), "a request id was billed twice"
    return by_id


async def ledger_with(gateway: Gateway, count: int) -> dict[str, dict[str, str]]:
    """The ledger once it holds ``count`` requests (bills are written as each request's handler finishes)."""
    for _ in range(100):
        ledger = await ledger_by_request(gateway)
        if len(ledger) >= count:
            return ledger
        await asyncio.sleep(0.05)
    raise AssertionError(f"the ledger holds {len(ledger)} requests, expected {count}")


async def stream_all(client: httpx.AsyncClient, gateway: Gateway, body: dict[str, object]) -> tuple[str, list[str]]:
    async with client.stream("POST", gateway.run_path(), json=body, headers=gateway.auth) as response:
        assert response.status_code == 200
        lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
        return response.headers["x-request-id"], lines


async def test_stream_50_concurrent_ledger_equals_what_the_worker_served(
    tokenizer: Tokenizer, redis: Redis, redis_url: str
) -> None:
    async with (
        sim_worker(tokenizer, tokens_per_second=400, time_to_first_token_seconds=0.01) as worker,
        gateway_for(redis_url, tokenizer, [worker.url], live=True) as gateway,
    ):
        bodies = [
            {
                "messages": [{"role": "user", "content": f"Question number {i}: " + "why? " * i}],
                "stream": True,
                "max_tokens": 8 + i,
            }
            for i in range(50)
        ]
        results = await asyncio.gather(*(stream_all(gateway.client, gateway, body) for body in bodies))
        ledger = await ledger_by_request(gateway)
        assert len(ledger) == 50
        totals = {"prompt": 0, "completion": 0, "cost": 0}
        for request_id, lines in results:
            served = worker.record_for(request_id)
            billed = ledger[request_id]
            assert lines[-1] == "data: [DONE]"
            usage = json.loads(lines[-2][len("data: ") :])["usage"]
            assert int(billed["prompt_tokens"]) == served["prompt_tokens"] == usage["prompt_tokens"]
            assert int(billed["completion_tokens"]) == served["completion_tokens"] == usage["completion_tokens"]
            assert int(billed["cost_nano_usd"]) == 280 * served["prompt_tokens"] + 830 * served["completion_tokens"]
            totals["prompt"] += served["prompt_tokens"]
            totals["completion"] += served["completion_tokens"]
            totals["cost"] += int(billed["cost_nano_usd"])
        hour = next(iter(ledger.values()))
        bucket = await gateway.deps.ledger.bucket_totals(TENANT, hour["model"], hour_bucket(float(hour["started_at"])))
        assert bucket == {
            "requests": 50,
            "prompt_tokens": totals["prompt"],
            "completion_tokens": totals["completion"],
            "cost_nano_usd": totals["cost"],
            "errors": 0,
        }


async def test_stream_client_disconnect_bills_exactly_what_was_generated_before_it(
    tokenizer: Tokenizer, redis: Redis, redis_url: str
) -> None:
    rng = random.Random(7)
    async with (
        sim_worker(tokenizer, tokens_per_second=40, time_to_first_token_seconds=0.01, completion_tokens=200) as worker,
        gateway_for(redis_url, tokenizer, [worker.url], live=True) as gateway,
    ):
        received: dict[str, int] = {}

        async def read_then_leave(stop_after: int) -> None:
            async with httpx.AsyncClient(base_url=str(gateway.client.base_url), trust_env=False) as client:
                body = {"prompt": "Tell me everything", "stream": True, "max_tokens": 150}
                async with client.stream("POST", gateway.run_path(), json=body, headers=gateway.auth) as response:
                    request_id = response.headers["x-request-id"]
                    count = 0
                    async for line in response.aiter_lines():
                        if line.startswith("data: "):
                            count += 1
                            if count == stop_after:
                                break
                    received[request_id] = stop_after
            # leaving the `async with` closes the connection mid-stream

        await asyncio.gather(*(read_then_leave(rng.randint(1, 20)) for _ in range(12)))
        await wait_for(lambda: len(worker.served) == 12 and all(r["client_disconnected"] for r in worker.served))
        ledger = await ledger_with(gateway, 12)
        for request_id, events_read in received.items():
            served = worker.record_for(request_id)
            billed = ledger[request_id]
            assert served["client_disconnected"] is True, "the worker did not see its connection close"
            assert billed["status"] == "client_disconnected"
            assert int(billed["completion_tokens"]) == served["completion_tokens"]
            assert int(billed["prompt_tokens"]) == served["prompt_tokens"]
            # The client stopped after `events_read` events. Each carries at least one token; a few more can have been
            # on the wire when it hung up, or carried half of a character (no event of their own): they were
            # generated and relayed, so they are billed.
            assert events_read <= served["completion_tokens"] <= events_read + 3


async def test_non_stream_client_disconnect_closes_the_worker_call_and_costs_nothing(
    tokenizer: Tokenizer, redis: Redis, redis_url: str
) -> None:
    async with (
        sim_worker(tokenizer, tokens_per_second=20, completion_tokens=100) as worker,
        gateway_for(redis_url, tokenizer, [worker.url], live=True) as gateway,
    ):
        with pytest.raises(httpx.ReadTimeout):
            async with httpx.AsyncClient(base_url=str(gateway.client.base_url), trust_env=False) as client:
                await client.post(gateway.run_path(), json={"prompt": "hi"}, headers=gateway.auth, timeout=0.5)
        await wait_for(lambda: len(worker.served) == 1 and worker.served[0]["client_disconnected"])
        ledger = await ledger_with(gateway, 1)
        [billed] = ledger.values()
        assert billed["status"] == "client_disconnected"
        assert (billed["prompt_tokens"], billed["completion_tokens"], billed["cost_nano_usd"]) == ("0", "0", "0")


class SlowLedger(Ledger):
    """A ledger whose writes take half a second, so that shutdown would close Redis under them if it did not wait."""

    async def record(self, record: UsageRecord) -> bool:
        await asyncio.sleep(0.5)
        return await super().record(record)


async def test_shutdown_mid_stream_bills_what_was_relayed_before_redis_closes(
    tokenizer: Tokenizer, redis: Redis, redis_url: str
) -> None:
    async with sim_worker(tokenizer, tokens_per_second=20, time_to_first_token_seconds=0, completion_tokens=200) as sim:
        settings = make_settings(redis_url, [sim.url])
        deps = build_dependencies(settings, tokenizer=tokenizer)
        slow = DurableLedger(SlowLedger(deps.redis), deps.durable_ledger.spool, replay_interval_seconds=1)
        deps = dataclasses.replace(deps, durable_ledger=slow)
        key = await deps.keys.create(TENANT)
        port = free_port()
        app = create_app(settings, deps)
        server = uvicorn.Server(
            uvicorn.Config(app, port=port, lifespan="on", log_level="critical", timeout_graceful_shutdown=0.3)
        )
        serving = asyncio.create_task(server.serve())
        await wait_for(lambda: server.started)
        url = f"http://127.0.0.1:{port}/client/v4/accounts/{TENANT}/ai/run/@cf/meta/llama-3.1-8b-instruct"
        body = {"prompt": "Tell me everything", "stream": True, "max_tokens": 150}
        headers = {"Authorization": f"Bearer {key.secret_key}"}

        async def stream_until_shut_down() -> str:
            async with (
                httpx.AsyncClient(trust_env=False) as client,
                client.stream("POST", url, json=body, headers=headers) as response,
            ):
                with contextlib.suppress(httpx.HTTPError):  # the server ends the stream after its grace period
                    async for line in response.aiter_lines():
                        if line.startswith("data: "):
                            server.should_exit = True  # shut down while the stream runs
                return response.headers["x-request-id"]

        streaming = asyncio.create_task(stream_until_shut_down())
        await serving  # uvicorn cancels the request after 0.3 s, then runs the lifespan shutdown
        # No await from here on: the bill must already be in Redis when the server has finished (the process would
        # exit now), although writing it took longer than the shutdown.
        with SyncRedis.from_url(redis_url) as sync_redis:
            entries = sync_redis.xrange(tenant_key(TENANT, "events"))
        request_id = await streaming
        [billed] = [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]
        assert billed["request_id"] == request_id
        served = sim.record_for(request_id)
        assert billed["status"] == "cancelled"
        assert 1 <= served["completion_tokens"] < 150
        # Billed for what was relayed. The request is cancelled (past the grace period) at any point: the worker's
        # next token may be in flight then (sent, not yet read), or read but not yet relayed.
        completion = int(billed["completion_tokens"])
        assert 1 <= completion <= served["completion_tokens"] <= completion + 2
        assert int(billed["prompt_tokens"]) == served["prompt_tokens"]
