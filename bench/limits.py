"""Rate-limit precision across replicas, and the admission round trip's latency.

    python -m bench.limits                      # 3 gateways, 1 key (600 requests, 60,000 tokens a minute),
                                                # 200 clients for 120 s; prints one JSON line of figures
    python -m bench.limits --duration 20 --clients 100
    python -m bench.limits --latency            # the admission script alone: p50 and p99

Precision is read from the ledger, whose events carry each request's admission time by Redis's clock: the most
requests and reserved tokens (prompt + max_tokens) admitted in any 60 s, against the limits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, Final

import httpx
from redis.asyncio import Redis

from billing import ApiKey, KeyLimits, KeyStore, Limiter, Limits, tenant_key
from gateway._processes import free_port, redis_server, start_tollgate, stop, wait_for_http

TENANT: Final = "acct-limits"
MODEL_PATH: Final = f"/client/v4/accounts/{TENANT}/ai/run/@cf/meta/llama-3.1-8b-instruct"
MAX_TOKENS: Final = 40
WINDOW_SECONDS: Final = 60.0


@contextlib.contextmanager
def _processes(redis_url: str, gateways: int, log: Any) -> Iterator[list[str]]:
    children: list[subprocess.Popen[bytes]] = []
    try:
        port = free_port()
        worker = f"http://127.0.0.1:{port}"
        sim = start_tollgate(["worker-sim", "--port", str(port), "--tokens-per-second", "0", "--ttft-seconds", "0",
                              "--completion-tokens", "8"], log=log)  # fmt: skip
        children.append(sim)
        wait_for_http(worker + "/health", sim)
        urls = []
        for _ in range(gateways):
            port = free_port()
            env = {
                "TOLLGATE_REDIS__URL": redis_url,
                "TOLLGATE_POOLS__BF16__WORKERS": worker,
                "TOLLGATE_POOLS__FP8__WORKERS": worker,
                "TOLLGATE_LEDGER__SPOOL_DIR": tempfile.mkdtemp(prefix="tollgate-spool-"),
            }
            proc = start_tollgate(["serve", "--port", str(port)], env, log=log)
            children.append(proc)
            urls.append(f"http://127.0.0.1:{port}")
            wait_for_http(urls[-1] + "/healthz", proc)
        yield urls
    finally:
        for child in reversed(children):
            stop(child)


@contextlib.asynccontextmanager
async def _key(redis_url: str, rpm: int, tpm: int) -> AsyncIterator[str]:
    redis = Redis.from_url(redis_url)
    try:
        limits = KeyLimits(requests_per_minute=rpm, tokens_per_minute=tpm)
        yield (await KeyStore(redis).create(TENANT, "limits", limits=limits)).secret_key
    finally:
        await redis.aclose()


async def _hammer(urls: Sequence[str], secret_key: str, clients: int, duration: float) -> dict[str, int]:
    """``clients`` closed loops over the gateways for ``duration`` seconds; a refused one waits 50 ms."""
    statuses: dict[str, int] = {}
    deadline = time.monotonic() + duration
    headers = {"Authorization": f"Bearer {secret_key}"}
    limits = httpx.Limits(max_connections=clients * 2, max_keepalive_connections=clients)

    async def loop(index: int, client: httpx.AsyncClient) -> None:
        rng = random.Random(index)
        while time.monotonic() < deadline:
            url = urls[rng.randrange(len(urls))] + MODEL_PATH
            body = {"prompt": f"Client {index} asks: " + "why " * rng.randint(0, 20), "max_tokens": MAX_TOKENS}
            try:
                response = await client.post(url, json=body, headers=headers)
                key = str(response.status_code)
                if response.status_code == 429:
                    key += "/" + str(response.json()["errors"][0]["code"])
            except httpx.HTTPError as exc:
                key = type(exc).__name__
            statuses[key] = statuses.get(key, 0) + 1
            if not key.startswith("200"):
                await asyncio.sleep(0.05)

    async with httpx.AsyncClient(timeout=30, limits=limits, trust_env=False) as client:
        await asyncio.gather(*(loop(index, client) for index in range(clients)))
    return statuses


def _most_in_window(times: list[float], weights: list[int], seconds: float = WINDOW_SECONDS) -> int:
    """The largest sum of ``weights`` whose ``times`` fit in one window of ``seconds`` (two pointers over sorted
    times; a window is half-open, as the limiter's)."""
    order = sorted(range(len(times)), key=times.__getitem__)
    most = total = start = 0
    for end in range(len(order)):
        total += weights[order[end]]
        while times[order[end]] - times[order[start]] >= seconds:
            total -= weights[order[start]]
            start += 1
        most = max(most, total)
    return most


async def measure(*, gateways: int, clients: int, duration: float, rpm: int, tpm: int, log: Any) -> dict[str, Any]:
    """Run the load and read the ledger: the figures the closing note reports."""
    with redis_server() as redis_url, _processes(redis_url, gateways, log) as urls:
        async with _key(redis_url, rpm, tpm) as secret_key:
            started = time.monotonic()
            statuses = await _hammer(urls, secret_key, clients, duration)
            elapsed = time.monotonic() - started
        await asyncio.sleep(1.0)  # the last bills
        redis = Redis.from_url(redis_url, decode_responses=True)
        events = [fields for _, fields in await redis.xrange(tenant_key(TENANT, "events"))]
        await redis.aclose()
    times = [float(event["started_at"]) for event in events]
    reserved = [int(event["prompt_tokens"]) + MAX_TOKENS for event in events]
    used = [int(event["prompt_tokens"]) + int(event["completion_tokens"]) for event in events]
    windows = max(1.0, elapsed / WINDOW_SECONDS)
    return {
        "gateways": gateways,
        "clients": clients,
        "seconds": round(elapsed, 1),
        "limit_requests_per_minute": rpm,
        "limit_tokens_per_minute": tpm,
        "statuses": statuses,
        "admitted_requests": len(events),
        "admitted_per_limit": round(len(events) / (rpm * windows), 4) if elapsed > WINDOW_SECONDS else None,
        "most_requests_in_60s": _most_in_window(times, [1] * len(times)),
        "most_requests_in_120s": _most_in_window(times, [1] * len(times), 2 * WINDOW_SECONDS),
        "most_reserved_tokens_in_60s": _most_in_window(times, reserved),
        "most_used_tokens_in_60s": _most_in_window(times, used),
    }


async def admission_latency(samples: int = 3000) -> dict[str, float]:
    """The admission script alone (budgets, 3 limits, a slot), from one client on loopback: p50 and p99 in ms."""
    with redis_server() as redis_url:
        redis = Redis.from_url(redis_url)
        limiter = Limiter(redis, slot_ttl_seconds=60)
        key = ApiKey("benchbenchbe", TENANT, "", 0.0, False)
        limits = Limits(requests_per_minute=10**9, tokens_per_minute=10**12, concurrent_streams=10**6)
        timings = []
        for index in range(samples + 300):
            began = time.perf_counter()
            await limiter.admit(key, limits, request_id=f"r{index}", reserve_tokens=100, max_cost_nano_usd=1000,
                                now_hint=time.time(), default_cap_nano_usd=None)  # fmt: skip
            if index >= 300:
                timings.append((time.perf_counter() - began) * 1000)
        await redis.aclose()
    timings.sort()
    return {
        "admission_p50_ms": round(statistics.median(timings), 3),
        "admission_p99_ms": round(timings[int(len(timings) * 0.99)], 3),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.limits", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gateways", type=int, default=3)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load (default: 120)")
    parser.add_argument("--rpm", type=int, default=600)
    parser.add_argument("--tpm", type=int, default=60_000)
    parser.add_argument("--latency", action="store_true", help="time the admission script alone instead")
    args = parser.parse_args(argv)
    if args.latency:
        print(json.dumps(asyncio.run(admission_latency())))
        return 0
    load = {"gateways": args.gateways, "clients": args.clients, "duration": args.duration}
    figures = asyncio.run(measure(**load, rpm=args.rpm, tpm=args.tpm, log=subprocess.DEVNULL))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
