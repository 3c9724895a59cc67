"""How traffic spreads over a pool with one slow worker.

    python -m bench.routing                     # 3 workers (the last 4x slower), 2 gateways, 48 clients, 30 s
    python -m bench.routing --slowdown 10 --gateways 1 --clients 24 --duration 20

Every client streams back to back through the gateways (alternating). At the end, each worker's ``/sim/served``
tells how many requests it served. A worker's fair share is proportional to its speed (a worker that decodes 4x
slower can serve about a quarter as many requests at the same latency); round robin would give each a third.
Prints one JSON line: requests and share per worker, the speed-proportional share, and the mean latency.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any, Final

import httpx
from redis.asyncio import Redis

from billing import KeyStore
from gateway._processes import free_port, redis_server, start_tollgate, stop, wait_for_http

TENANT: Final = "acct-routing"
MODEL_PATH: Final = f"/client/v4/accounts/{TENANT}/ai/run/@cf/meta/llama-3.1-8b-instruct"
FAST_TOKENS_PER_SECOND: Final = 100.0
COMPLETION_TOKENS: Final = 40


@contextlib.contextmanager
def _processes(
    redis_url: str, speeds: Sequence[float], gateways: int, log: Any
) -> Iterator[tuple[list[str], list[str]]]:
    children: list[subprocess.Popen[bytes]] = []
    try:
        workers = []
        for speed in speeds:
            port = free_port()
            args = ["worker-sim", "--port", str(port), "--tokens-per-second", str(speed), "--ttft-seconds", "0.05",
                    "--completion-tokens", str(COMPLETION_TOKENS)]  # fmt: skip
            children.append(start_tollgate(args, log=log))
            workers.append(f"http://127.0.0.1:{port}")
            wait_for_http(workers[-1] + "/health", children[-1])
        urls = []
        for _ in range(gateways):
            port = free_port()
            env = {
                "TOLLGATE_REDIS__URL": redis_url,
                "TOLLGATE_POOLS__BF16__WORKERS": ",".join(workers),
                "TOLLGATE_POOLS__FP8__WORKERS": ",".join(workers),
                "TOLLGATE_LEDGER__SPOOL_DIR": tempfile.mkdtemp(prefix="tollgate-spool-"),
                "TOLLGATE_ROUTING__METRICS_INTERVAL_SECONDS": "1",
            }
            children.append(start_tollgate(["serve", "--port", str(port)], env, log=log))
            urls.append(f"http://127.0.0.1:{port}")
            wait_for_http(urls[-1] + "/readyz", children[-1])
        yield workers, urls
    finally:
        for child in reversed(children):
            stop(child)


async def _load(urls: Sequence[str], secret_key: str, clients: int, duration: float) -> list[float]:
    """Closed loops, each on its own connection; returns each complete request's latency."""
    latencies: list[float] = []
    deadline = time.monotonic() + duration
    headers = {"Authorization": f"Bearer {secret_key}"}

    async def loop(index: int) -> None:
        async with httpx.AsyncClient(trust_env=False, timeout=60) as client:
            turn = 0
            while time.monotonic() < deadline:
                body = {"prompt": f"client {index} turn {turn}", "stream": True, "max_tokens": COMPLETION_TOKENS}
                started = time.monotonic()
                response = await client.post(urls[(index + turn) % len(urls)] + MODEL_PATH, json=body, headers=headers)
                if response.status_code == 200 and '"usage"' in response.text:
                    latencies.append(time.monotonic() - started)
                turn += 1

    await asyncio.gather(*(loop(index) for index in range(clients)))
    return latencies


async def measure(*, slowdown: float, gateways: int, clients: int, duration: float, log: Any) -> dict[str, Any]:
    speeds = [FAST_TOKENS_PER_SECOND, FAST_TOKENS_PER_SECOND, FAST_TOKENS_PER_SECOND / slowdown]
    with redis_server() as redis_url, _processes(redis_url, speeds, gateways, log) as (workers, urls):
        redis = Redis.from_url(redis_url)
        secret_key = (await KeyStore(redis).create(TENANT, "routing")).secret_key
        await redis.aclose()
        latencies = await _load(urls, secret_key, clients, duration)
        async with httpx.AsyncClient(trust_env=False) as client:
            served = [len((await client.get(url + "/sim/served")).json()) for url in workers]
    total = sum(served)
    return {
        "gateways": gateways,
        "clients": clients,
        "duration_seconds": duration,
        "tokens_per_second": speeds,
        "served": served,
        "share": [round(count / total, 3) for count in served],
        "speed_proportional_share": [round(speed / sum(speeds), 3) for speed in speeds],
        "slow_share_vs_fast_share": round(served[2] / (sum(served[:2]) / 2), 3),
        "mean_latency_seconds": round(statistics.fmean(latencies), 3) if latencies else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.routing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--slowdown", type=float, default=4.0, help="how many times slower the third worker is")
    parser.add_argument("--gateways", type=int, default=2)
    parser.add_argument("--clients", type=int, default=48)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load (default: 30)")
    args = parser.parse_args(argv)
    load = {"gateways": args.gateways, "clients": args.clients, "duration": args.duration}
    print(json.dumps(asyncio.run(measure(slowdown=args.slowdown, **load, log=subprocess.DEVNULL))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
