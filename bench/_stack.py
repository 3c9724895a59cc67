"""The system under test: a private redis-server, one simulated worker and one gateway process, plus a key.

Every child is stopped when the context exits, including on Ctrl-C. The children's own stdout and stderr go to a
log file, so that the bench's stdout carries nothing but its JSON lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO, Final

from billing import KeyStore
from config import load_settings
from gateway._processes import free_port, redis_server, start_tollgate, stop, wait_for_http
from gateway.deps import build_redis

SERVED_MODEL_NAME: Final = "meta-llama/Llama-3.1-8B-Instruct"
WORKERS_AI_MODEL: Final = "@cf/meta/llama-3.1-8b-instruct"
TENANT: Final = "bench"
_GATEWAY_START_SECONDS: Final = 60.0  # the gateway loads the tokenizer before it answers /healthz


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    tokens_per_second: float
    ttft_seconds: float
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class Stack:
    """Where the running system answers, and the process ids to watch for CPU use."""

    worker_url: str
    gateway_url: str
    tenant: str
    secret_key: str
    worker_pid: int
    gateway_pid: int


@contextlib.contextmanager
def running_stack(worker: WorkerOptions, log: BinaryIO) -> Iterator[Stack]:
    """Start redis-server, the simulated worker and the gateway (1 uvicorn worker); create a key; stop all on exit."""
    children: list[subprocess.Popen[bytes]] = []
    try:
        with redis_server() as redis_url:
            worker_port = free_port()
            worker_url = f"http://127.0.0.1:{worker_port}"
            sim = _start(children, log, _worker_args(worker_port, worker))
            wait_for_http(worker_url + "/health", sim)
            say(f"simulated worker up at {worker_url} (pid {sim.pid})")

            gateway_port = free_port()
            gateway_url = f"http://127.0.0.1:{gateway_port}"
            env = {
                "TOLLGATE_REDIS__URL": redis_url,
                "TOLLGATE_POOLS__BF16__WORKERS": worker_url,
                "TOLLGATE_POOLS__FP8__WORKERS": worker_url,
            }
            serve_args = ["serve", "--host", "127.0.0.1", "--port", str(gateway_port), "--workers", "1"]
            gateway = _start(children, log, serve_args, env)
            wait_for_http(gateway_url + "/healthz", gateway, deadline_seconds=_GATEWAY_START_SECONDS)
            say(f"gateway up at {gateway_url} (pid {gateway.pid})")

            secret_key = asyncio.run(_create_key(redis_url, TENANT))
            yield Stack(worker_url, gateway_url, TENANT, secret_key, sim.pid, gateway.pid)
    finally:
        for child in reversed(children):
            stop(child)


def _worker_args(port: int, worker: WorkerOptions) -> list[str]:
    return [
        "worker-sim",
        "--port",
        str(port),
        "--served-model-name",
        SERVED_MODEL_NAME,
        "--tokens-per-second",
        str(worker.tokens_per_second),
        "--ttft-seconds",
        str(worker.ttft_seconds),
        "--completion-tokens",
        str(worker.completion_tokens),
    ]


def _start(
    children: list[subprocess.Popen[bytes]], log: BinaryIO, args: Sequence[str], env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    with _output_to(log):
        child = start_tollgate(args, env)
    children.append(child)
    return child


@contextlib.contextmanager
def _output_to(log: BinaryIO) -> Iterator[None]:
    """Point file descriptors 1 and 2 at ``log`` while a child is spawned, so that it inherits them.

    ``start_tollgate`` lets children inherit this process's stdout and stderr; a worker that printed to stdout
    would corrupt the JSON lines.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    try:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


async def _create_key(redis_url: str, tenant: str) -> str:
    redis = build_redis(load_settings(environ={"TOLLGATE_REDIS__URL": redis_url}))
    try:
        issued = await KeyStore(redis).create(tenant, "bench")
    finally:
        await redis.aclose()
    return issued.secret_key


def say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)
