"""The ``tollgate`` command as a user runs it: ``dev`` end to end, ``keys``, and start-up config errors."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from billing import KeyStore
from gateway._processes import free_port, is_port_free

pytestmark = pytest.mark.server
TOLLGATE = [sys.executable, "-m", "gateway.cli"]


def read_until(proc: subprocess.Popen[str], pattern: str, timeout_seconds: float = 60) -> re.Match[str]:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_seconds
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    raise AssertionError(f"{pattern!r} not printed; output was:\n{''.join(seen)}")


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "kill"])
def test_cli_dev_serves_a_demo_key_and_stops_everything_it_started(stop_signal: signal.Signals) -> None:
    port = free_port()
    proc = subprocess.Popen([*TOLLGATE, "dev", "--port", str(port)], stdout=subprocess.PIPE, text=True)
    try:
        workers = read_until(proc, r"workers\s+(\S+), (\S+)")
        key = read_until(proc, r"API key\s+(tg_\S+)").group(1)
        curl = read_until(proc, r"curl -sS (\S+)").group(1)
        body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}
        response = httpx.post(curl, json=body, headers={"Authorization": f"Bearer {key}"}, trust_env=False, timeout=30)
        assert response.status_code == 200, response.text
        assert response.json()["result"]["usage"]["prompt_tokens"] == 36
        worker_ports = [int(url.rsplit(":", 1)[1].rstrip(",")) for url in workers.groups()]
    finally:
        proc.send_signal(stop_signal)
        assert proc.wait(timeout=30) == 0
    for p in [port, *worker_ports]:
        assert is_port_free(p), f"port {p} still in use after {stop_signal.name}"


def test_cli_dev_routes_around_a_worker_killed_while_it_runs() -> None:
    port = free_port()
    proc = subprocess.Popen([*TOLLGATE, "dev", "--port", str(port)], stdout=subprocess.PIPE, text=True)
    try:
        key = read_until(proc, r"API key\s+(tg_\S+)").group(1)
        url = read_until(proc, r"curl -sS (\S+)").group(1)
        victim = int(read_until(proc, r"kill -9 (\d+)").group(1))
        os.kill(victim, signal.SIGKILL)
        body = {"prompt": "Hello", "max_tokens": 8}
        for stream in (False, True) * 5:
            response = httpx.post(
                url, json={**body, "stream": stream}, headers={"Authorization": f"Bearer {key}"}, trust_env=False
            )
            assert response.status_code == 200, response.text
        assert proc.poll() is None  # a worker's death does not stop the others
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


async def test_cli_keys_create_prints_a_working_key_once(redis: Redis, redis_url: str) -> None:
    result = await asyncio.to_thread(
        subprocess.run,
        [*TOLLGATE, "keys", "create", "--tenant", "acct-cli", "--name", "ci", "--redis-url", redis_url],
        capture_output=True,
        text=True,
        check=True,
    )
    key = re.search(r"key:\s+(tg_\S+)", result.stdout)
    assert key is not None
    record = await KeyStore(redis).find(key.group(1))
    assert record is not None and record.tenant == "acct-cli" and record.name == "ci"
    revoke = await asyncio.to_thread(
        subprocess.run,
        [*TOLLGATE, "keys", "revoke", record.key_id, "--redis-url", redis_url],
        capture_output=True,
        text=True,
    )
    assert revoke.returncode == 0
    revoked = await KeyStore(redis).find(key.group(1))
    assert revoked is not None and revoked.revoked


def test_cli_keys_create_refuses_a_bad_tenant(redis_url: str) -> None:
    result = subprocess.run(
        [*TOLLGATE, "keys", "create", "--tenant", "bad{tenant}", "--redis-url", redis_url],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "invalid tenant id" in result.stderr


def test_cli_serve_with_a_bad_setting_fails_naming_the_key() -> None:
    env = {**os.environ, "TOLLGATE_SERVER__PORT": "eighty"}
    result = subprocess.run([*TOLLGATE, "serve"], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2
    assert "configuration error: server.port: expected int" in result.stderr


def test_cli_keys_with_redis_unreachable_says_so_without_a_traceback() -> None:
    result = subprocess.run(
        [*TOLLGATE, "keys", "create", "--tenant", "acct", "--redis-url", "redis://127.0.0.1:9/0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "cannot reach Redis" in result.stderr and "Traceback" not in result.stderr


def test_cli_keys_revoke_given_a_whole_key_points_to_the_key_id(redis_url: str) -> None:
    key = "tg_abcdefghijkl_" + "A" * 43
    result = subprocess.run(
        [*TOLLGATE, "keys", "revoke", key, "--redis-url", redis_url], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1 and "pass the key id, here abcdefghijkl" in result.stderr


def test_cli_serve_with_a_missing_metrics_directory_says_so() -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": "/nonexistent/tollgate-metrics"}
    result = subprocess.run([*TOLLGATE, "serve", "--workers", "2"], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "PROMETHEUS_MULTIPROC_DIR=/nonexistent/tollgate-metrics: not a writable directory" in result.stderr


def test_cli_serve_with_a_spool_it_cannot_write_says_so(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {**os.environ, "TOLLGATE_LEDGER__SPOOL_DIR": str(blocker / "spool")}  # under a file: never a directory
    result = subprocess.run([*TOLLGATE, "serve"], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"ledger.spool_dir: cannot write to {blocker / 'spool'}" in result.stderr
