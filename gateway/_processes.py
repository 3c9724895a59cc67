"""Child processes for the embedded default (``tollgate dev``), the tests and the benchmark: a private
redis-server, simulated workers and gateways, each on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import IO

import httpx

REDIS_INSTALL_HINT = (
    "redis-server is not on PATH. Install it: Debian/Ubuntu `sudo apt-get install redis-server`, "
    "macOS `brew install redis`."
)


class ProcessStartError(RuntimeError):
    """A child process did not come up in time."""


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return int(sock.getsockname()[1])


def is_port_free(port: int) -> bool:
    try:
        with socket.create_server(("127.0.0.1", port)):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def redis_server(port: int | None = None) -> Iterator[str]:
    """A private, memory-only redis-server in a temporary directory; yields its URL and removes it on exit."""
    port = port or free_port()
    workdir = tempfile.mkdtemp(prefix="tollgate-redis-")
    proc = start_redis(port, workdir)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


def start_redis(port: int, workdir: str, *, durable: bool = False) -> subprocess.Popen[bytes]:
    """Start redis-server on ``port`` with its files in ``workdir`` and wait until it answers. ``durable``: AOF with
    ``appendfsync always``, so a restart in the same ``workdir`` keeps every acknowledged write."""
    if shutil.which("redis-server") is None:
        raise ProcessStartError(REDIS_INSTALL_HINT)
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", workdir, "--save", ""]
    command += ["--appendonly", "yes", "--appendfsync", "always"] if durable else ["--appendonly", "no"]
    command += ["--logfile", os.path.join(workdir, "redis.log")]
    # Its own session: a terminal's Ctrl-C must not stop Redis before the gateway has drained and billed.
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for_redis(port, proc, deadline_seconds=10)
    except BaseException:
        stop(proc)
        raise
    return proc


def _wait_for_redis(port: int, proc: subprocess.Popen[bytes], deadline_seconds: float) -> None:
    deadline = time.monotonic() + deadline_seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ProcessStartError(f"redis-server exited with code {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            if sock.recv(16).startswith(b"+PONG"):
                return
        time.sleep(0.05)
    raise ProcessStartError(f"redis-server did not answer on port {port} within {deadline_seconds} s")


def start_tollgate(
    args: Sequence[str], env: Mapping[str, str] | None = None, *, log: IO[bytes] | int | None = None
) -> subprocess.Popen[bytes]:
    """Start ``tollgate <args>`` with this interpreter, in its own process group; its output goes to ``log`` (a
    file, or ``subprocess.DEVNULL``) if given, else to this process's."""
    return subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", *args],
        env={**os.environ, **(env or {})},
        start_new_session=True,
        stdout=log,
        stderr=log,
    )


def wait_for_http(url: str, proc: subprocess.Popen[bytes], deadline_seconds: float = 30) -> None:
    """Wait until ``url`` answers 200, or fail if ``proc`` exits or the deadline passes."""
    deadline = time.monotonic() + deadline_seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ProcessStartError(f"{' '.join(map(str, proc.args))} exited with code {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1, trust_env=False).status_code == 200:
                return
        time.sleep(0.1)
    raise ProcessStartError(f"{url} did not answer within {deadline_seconds} s")


def stop(proc: subprocess.Popen[bytes], timeout_seconds: float = 10) -> None:
    """Stop a child politely (SIGTERM), then firmly."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
