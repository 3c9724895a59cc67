"""``tollgate dev``: the embedded default. A private redis-server, two simulated workers, the gateway and a demo
key on this machine, stopped together on Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from billing import IssuedKey, KeyStore
from config import load_settings
from gateway._processes import (
    ProcessStartError,
    free_port,
    is_port_free,
    redis_server,
    start_tollgate,
    stop,
    wait_for_http,
)
from gateway.deps import build_redis

BF16_NAME = "meta-llama/Llama-3.1-8B-Instruct"
FP8_NAME = "meta-llama/Llama-3.1-8B-Instruct-FP8"


def run_dev(*, port: int, tenant: str) -> int:
    if not is_port_free(port):
        print(f"tollgate dev: port {port} is in use; pick another with --port", file=sys.stderr)
        return 2
    children: list[subprocess.Popen[bytes]] = []
    # `kill` (SIGTERM) must clean up like Ctrl-C: the children run in their own sessions and would be orphaned.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        with redis_server() as redis_url, tempfile.TemporaryDirectory(prefix="tollgate-dev-") as state:
            workers = []
            for _ in range(2):
                sim_port = free_port()
                sim = start_tollgate(
                    [
                        "worker-sim",
                        "--port",
                        str(sim_port),
                        "--served-model-name",
                        BF16_NAME,
                        "--served-model-name",
                        FP8_NAME,
                    ]
                )
                children.append(sim)
                workers.append(f"http://127.0.0.1:{sim_port}")
                wait_for_http(workers[-1] + "/health", sim)
            admin_token = secrets.token_urlsafe(32)
            env = {
                "TOLLGATE_ADMIN__TOKEN": admin_token,
                "TOLLGATE_LEDGER__SPOOL_DIR": str(Path(state) / "spool"),
                "TOLLGATE_REDIS__URL": redis_url,
                "TOLLGATE_POOLS__BF16__WORKERS": ",".join(workers),
                "TOLLGATE_POOLS__FP8__WORKERS": ",".join(workers),
                # Plain log lines for a terminal, unless asked otherwise.
                "TOLLGATE_LOGGING__FORMAT": os.environ.get("TOLLGATE_LOGGING__FORMAT", "text"),
            }
            gateway = start_tollgate(["serve", "--host", "127.0.0.1", "--port", str(port)], env)
            children.append(gateway)
            wait_for_http(f"http://127.0.0.1:{port}/healthz", gateway)
            issued = asyncio.run(_create_demo_key(redis_url, tenant))
            _print_banner(port, redis_url, workers, issued, admin_token, worker_pids=[c.pid for c in children[:-1]])
            _serve_until_the_gateway_exits(gateway, dict(zip(workers, children[:-1], strict=True)))
    except ProcessStartError as exc:
        print(f"tollgate dev: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ntollgate dev: stopping", file=sys.stderr)
    finally:
        for child in reversed(children):
            stop(child)
    return 0


def _raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


async def _create_demo_key(redis_url: str, tenant: str) -> IssuedKey:
    redis = build_redis(load_settings(environ={"TOLLGATE_REDIS__URL": redis_url}))
    try:
        return await KeyStore(redis).create(tenant, "demo")
    finally:
        await redis.aclose()


def _serve_until_the_gateway_exits(
    gateway: subprocess.Popen[bytes], workers: dict[str, subprocess.Popen[bytes]]
) -> None:
    """Wait for the gateway to exit; a simulated worker that exits is only reported (the gateway routes around it)."""
    gone: set[str] = set()
    while gateway.poll() is None:
        for url, worker in workers.items():
            if url not in gone and worker.poll() is not None:
                gone.add(url)
                print(
                    f"tollgate dev: the simulated worker at {url} exited; the gateway routes around it", file=sys.stderr
                )
        time.sleep(0.5)
    print(f"tollgate dev: the gateway exited with code {gateway.returncode}; stopping", file=sys.stderr)


def _tollgate_command() -> str:
    """How to run ``tollgate`` from this shell: by name if it is on PATH, else by its path in this environment."""
    if shutil.which("tollgate"):
        return "tollgate"
    return os.path.relpath(Path(sys.executable).parent / "tollgate")


def _print_banner(
    port: int, redis_url: str, workers: list[str], issued: IssuedKey, admin_token: str, *, worker_pids: list[int]
) -> None:
    base = f"http://127.0.0.1:{port}"
    account = issued.record.tenant
    url = f"{base}/client/v4/accounts/{account}/ai/run/@cf/meta/llama-3.1-8b-instruct"
    print(
        f"""
Tollgate is running (Ctrl-C stops everything).

  gateway     {base}
  redis       {redis_url}   (private, memory only)
  workers     {", ".join(workers)}   (simulated vLLM)
  account id  {account}
  API key     {issued.secret_key}
  admin token {admin_token}   (for /admin/v1/*)

Try it:

  curl -sS {url} \\
    -H "Authorization: Bearer {issued.secret_key}" \\
    -H "Content-Type: application/json" \\
    -d '{{"prompt": "Tell me about Tollgate", "max_tokens": 32}}'

Streamed:

  curl -sSN {url} \\
    -H "Authorization: Bearer {issued.secret_key}" \\
    -H "Content-Type: application/json" \\
    -d '{{"messages": [{{"role": "user", "content": "Hello"}}], "stream": true, "max_tokens": 32}}'

OpenAI-compatible (any OpenAI SDK: base_url={base}/v1, api_key=the key above):

  curl -sS {base}/v1/chat/completions \\
    -H "Authorization: Bearer {issued.secret_key}" \\
    -H "Content-Type: application/json" \\
    -d '{{"model": "@cf/meta/llama-3.1-8b-instruct", "max_tokens": 32,
         "messages": [{{"role": "user", "content": "Hello"}}]}}'

Usage and spend (this key's account, by hour):

  {base}/dashboard   (in a browser: sign in with the API key, or the admin token for every account)
  curl -sS {base}/client/v4/accounts/{account}/ai/usage -H "Authorization: Bearer {issued.secret_key}"
  {_tollgate_command()} usage --redis-url {redis_url} --tenant {account}

Prometheus metrics (requests, latency, tokens, spend, workers); the access log is this terminal:

  curl -sS {base}/metrics

The workers as the gateway sees them (health, load, what each serves), and readiness:

  curl -sS {base}/admin/v1/pools -H "Authorization: Bearer {admin_token}"
  curl -sS {base}/readyz

Stop a worker (kill -9 {worker_pids[0]}) and the gateway routes around it: requests keep succeeding, and the pools
show it ejected.
""",
        flush=True,
    )
