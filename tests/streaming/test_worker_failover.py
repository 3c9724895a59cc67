"""Worker failure and shutdown, as deployed: ``tollgate serve`` in front of simulated worker processes.

1. Three workers under load; one is killed (SIGKILL) mid-load and started again later. No client may see an error
   before its first byte (the gateway retries elsewhere); streams cut by the kill end with an in-band error event
   and are billed for what they delivered; the dead worker is ejected and taken back once it returns.
2. SIGTERM during streams: short streams finish, long ones are ended cleanly at the drain deadline and billed
   exactly for what the worker sent; new connections are refused; the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from billing import KeyStore, Ledger, Retention, Tokenizer
from tests.processes import ADMIN_TOKEN, Stack, stack_in_tempdir

pytestmark = [pytest.mark.server, pytest.mark.timeout(180)]

TENANT = "acct-failover"
MODEL_PATH = f"/client/v4/accounts/{TENANT}/ai/run/@cf/meta/llama-3.1-8b-instruct"


@contextlib.asynccontextmanager
async def tenant_key(stack: Stack) -> AsyncIterator[tuple[str, Ledger]]:
    redis = Redis.from_url(stack.redis_url, decode_responses=True)
    try:
        issued = await KeyStore(redis).create(TENANT, "failover")
        yield issued.secret_key, Ledger(redis, Retention())
    finally:
        await redis.aclose()


def parse_events(text: str) -> list[Any]:
    blocks = [block[len("data: ") :] for block in text.split("\n\n") if block.startswith("data: ")]
    return [data if data == "[DONE]" else json.loads(data) for data in blocks]


async def pools(client: httpx.AsyncClient, stack: Stack) -> dict[str, str]:
    response = await client.get(stack.gateway + "/admin/v1/pools", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    return {worker["url"]: worker["health"] for worker in response.json()["result"][0]["workers"]}


async def test_a_worker_killed_mid_load_is_invisible_before_the_first_byte_and_taken_back(
    tokenizer: Tokenizer,
) -> None:
    with stack_in_tempdir() as stack:
        for _ in range(3):
            stack.start_worker("--tokens-per-second", "80", "--ttft-seconds", "0.05")
        stack.start_gateway()
        victim = stack.workers[0]
        async with tenant_key(stack) as (secret, ledger):
            headers = {"Authorization": f"Bearer {secret}"}
            limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
            results: list[tuple[int, str, bool, Any]] = []  # status, request id, streamed, events or body
            health_seen: set[str] = set()
            stop_at = time.monotonic() + 6.0

            async def client_loop(index: int, client: httpx.AsyncClient) -> None:
                turn = 0
                while time.monotonic() < stop_at:
                    stream = (index + turn) % 3 != 0
                    body = {"prompt": f"client {index} turn {turn}", "stream": stream, "max_tokens": 60}
                    response = await client.post(stack.gateway + MODEL_PATH, json=body, headers=headers)
                    payload = parse_events(response.text) if stream and response.status_code == 200 else response.json()
                    results.append((response.status_code, response.headers["x-request-id"], stream, payload))
                    turn += 1

            async def chaos(client: httpx.AsyncClient) -> None:
                await asyncio.sleep(2.0)
                stack.kill_worker(victim)
                for _ in range(20):
                    await asyncio.sleep(0.1)
                    health_seen.add((await pools(client, stack))[victim])
                await asyncio.to_thread(stack.start_worker, url=victim)

            async with httpx.AsyncClient(trust_env=False, timeout=60, limits=limits) as client:
                await asyncio.gather(chaos(client), *(client_loop(index, client) for index in range(30)))
                assert "ejected" in health_seen
                for _ in range(50):  # back up, its checks pass: it is half-open, for one request to try it
                    if (await pools(client, stack))[victim] != "ejected":
                        break
                    await asyncio.sleep(0.1)
                for turn in range(30):
                    body = {"prompt": f"after {turn}", "max_tokens": 5}
                    assert (
                        await client.post(stack.gateway + MODEL_PATH, json=body, headers=headers)
                    ).status_code == 200
                assert (await pools(client, stack))[victim] == "up"  # the trial succeeded: taken back
                assert len((await client.get(victim + "/sim/served")).json()) > 0  # traffic reaches it again

            # No client saw an error before its first byte.
            assert {status for status, *_ in results} == {200}, [r for r in results if r[0] != 200][:3]
            cut = [
                (request_id, events)
                for _, request_id, streamed, events in results
                if streamed and "errors" in events[-2]
            ]
            assert cut, "no stream was on the killed worker"
            for _, events in cut:
                assert events[-1] == "[DONE]" and events[-2]["errors"][0]["code"] == 5502
            # Every request is billed once; cut streams for what they delivered.
            await asyncio.sleep(0.5)
            billed = {event["request_id"]: event for event in await ledger.events(TENANT, count=100_000)}
            assert {request_id for _, request_id, *_ in results} <= set(billed)
            assert len(billed) == len(results) + 30  # and the 30 after
            for _, request_id, streamed, payload in results:
                usage = payload[-2].get("usage") if streamed else payload["result"]["usage"]
                if usage is not None:
                    assert int(billed[request_id]["completion_tokens"]) == usage["completion_tokens"]
            for request_id, events in cut:
                text = "".join(event.get("response", "") for event in events[:-2])
                assert billed[request_id]["status"] == "upstream_error"
                assert abs(int(billed[request_id]["completion_tokens"]) - tokenizer.count(text)) <= 2


@pytest.mark.parametrize("processes", ["1", "2"])
async def test_sigterm_drains_streams_then_ends_the_rest_cleanly_and_bills_them(processes: str) -> None:
    with stack_in_tempdir() as stack:
        worker = stack.start_worker("--tokens-per-second", "40", "--ttft-seconds", "0", "--completion-tokens", "400")
        stack.start_gateway("--workers", processes, TOLLGATE_SERVER__DRAIN_SECONDS="1.5")
        async with tenant_key(stack) as (secret, ledger):
            headers = {"Authorization": f"Bearer {secret}"}
            async with httpx.AsyncClient(trust_env=False, timeout=30) as client:

                async def stream(max_tokens: int) -> httpx.Response:
                    body = {"prompt": "Tell me a long story", "stream": True, "max_tokens": max_tokens}
                    return await client.post(stack.gateway + MODEL_PATH, json=body, headers=headers)

                tasks = [asyncio.create_task(stream(n)) for n in (10, 10, 400, 400, 400)]
                await asyncio.sleep(0.5)
                assert stack.gateway_proc is not None
                stack.gateway_proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                late_id = None
                try:  # no longer accepting; or, with several processes sharing the socket, a draining one refuses it
                    late = await client.post(stack.gateway + MODEL_PATH, json={"prompt": "hi"}, headers=headers)
                    assert late.status_code == 503 and late.json()["errors"][0]["code"] == 5503
                    late_id = late.headers["x-request-id"]
                except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
                    pass  # refused, or a connection closed as the process stopped listening
                responses = await asyncio.gather(*tasks)
                # uvicorn re-raises the signal once shut down, so a clean exit reads as "killed by SIGTERM"
                assert await asyncio.to_thread(stack.gateway_proc.wait, 15) in (0, -signal.SIGTERM)
                served = {record["request_id"]: record for record in (await client.get(worker + "/sim/served")).json()}

            billed = {event["request_id"]: event for event in await ledger.events(TENANT)}
            refused_late = billed.pop(late_id, None)  # admitted just before its process began draining
            assert refused_late is None or refused_late["cost_nano_usd"] == "0"
            assert len(billed) == 5
            for response in responses:
                events = parse_events(response.text)
                request_id = response.headers["x-request-id"]
                assert events[-1] == "[DONE]"
                completion = int(billed[request_id]["completion_tokens"])
                if "usage" in events[-2]:
                    assert billed[request_id]["status"] == "ok"
                    assert (
                        completion
                        == served[request_id]["completion_tokens"]
                        == events[-2]["usage"]["completion_tokens"]
                    )
                else:  # billed for what reached the client; the worker may have sent a token or two more meanwhile
                    assert events[-2]["errors"][0]["code"] == 5503
                    assert billed[request_id]["status"] == "shutdown"
                    assert 40 < completion <= served[request_id]["completion_tokens"] <= completion + 3
            assert sum(billed[r.headers["x-request-id"]]["status"] == "shutdown" for r in responses) == 3
