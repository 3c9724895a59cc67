"""Tollgate as deployed, for tests: Redis, simulated workers and ``tollgate serve``, each a process of its own."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator

from gateway._processes import free_port, start_redis, start_tollgate, stop, wait_for_http
from tests.conftest import BF16_NAME

ADMIN_TOKEN = "stack-admin-token-" + "x" * 20
FAST_CHECKS = {
    "TOLLGATE_ROUTING__HEALTH_INTERVAL_SECONDS": "0.2",
    "TOLLGATE_ROUTING__METRICS_INTERVAL_SECONDS": "0.2",
    "TOLLGATE_ROUTING__EJECT_SECONDS": "0.5",
    "TOLLGATE_ROUTING__MAX_EJECT_SECONDS": "1",
    "TOLLGATE_ADMIN__TOKEN": ADMIN_TOKEN,
}


class Stack:
    """Redis, simulated workers and one gateway (or several replicas), each a process on a free port; workers can be
    killed and revived."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.log = open(os.path.join(workdir, "processes.log"), "ab")  # noqa: SIM115 - closed in close()
        redis_port = free_port()
        self.redis_url = f"redis://127.0.0.1:{redis_port}/0"
        self.redis = start_redis(redis_port, workdir)
        self.workers: list[str] = []
        self.worker_procs: dict[str, subprocess.Popen[bytes]] = {}
        self.worker_options: dict[str, tuple[str, ...]] = {}
        self.gateway = ""
        self.gateway_proc: subprocess.Popen[bytes] | None = None
        self.replicas: list[str] = []
        self.replica_procs: list[subprocess.Popen[bytes]] = []

    def start_worker(self, *options: str, url: str | None = None) -> str:
        url = url or f"http://127.0.0.1:{free_port()}"
        options = options or self.worker_options[url]
        port = url.rsplit(":", 1)[1]
        proc = start_tollgate(["worker-sim", "--port", port, "--served-model-name", BF16_NAME, *options], log=self.log)
        wait_for_http(url + "/health", proc)
        if url not in self.workers:
            self.workers.append(url)
        self.worker_procs[url], self.worker_options[url] = proc, options
        return url

    def kill_worker(self, url: str) -> None:
        proc = self.worker_procs[url]
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def start_gateway(self, *options: str, **env: str) -> None:
        self.gateway, self.gateway_proc = self._spawn_gateway(free_port(), options, env)
        wait_for_http(self.gateway + "/readyz", self.gateway_proc)

    def start_replicas(self, count: int, *options: str, **env: str) -> list[str]:
        """Start ``count`` gateway replicas at once, each a ``tollgate serve`` of its own on its own port, all on this
        stack's Redis and workers (as a Deployment's pods are); returns their URLs once every one is ready."""
        ports: set[int] = set()
        while len(ports) < count:  # distinct, though none is bound until its process starts
            ports.add(free_port())
        started = [self._spawn_gateway(port, options, env) for port in ports]
        self.replica_procs += [proc for _, proc in started]
        for url, proc in started:
            wait_for_http(url + "/readyz", proc)
        self.replicas += [url for url, _ in started]
        return [url for url, _ in started]

    def _spawn_gateway(
        self, port: int, options: tuple[str, ...], env: dict[str, str]
    ) -> tuple[str, subprocess.Popen[bytes]]:
        environment = {
            "TOLLGATE_REDIS__URL": self.redis_url,
            "TOLLGATE_POOLS__BF16__WORKERS": ",".join(self.workers),
            "TOLLGATE_POOLS__FP8__WORKERS": ",".join(self.workers),
            "TOLLGATE_LEDGER__SPOOL_DIR": os.path.join(self.workdir, "spool"),
            **FAST_CHECKS,
            **env,
        }
        proc = start_tollgate(["serve", "--port", str(port), *options], environment, log=self.log)
        return f"http://127.0.0.1:{port}", proc

    def close(self) -> None:
        if self.gateway_proc is not None:
            stop(self.gateway_proc)
        for proc in self.replica_procs:
            stop(proc)
        for proc in self.worker_procs.values():
            stop(proc)
        stop(self.redis)
        self.log.close()


@contextlib.contextmanager
def stack_in_tempdir() -> Iterator[Stack]:
    workdir = tempfile.mkdtemp(prefix="tollgate-stack-")
    stack = Stack(workdir)
    try:
        yield stack
    finally:
        stack.close()
        shutil.rmtree(workdir, ignore_errors=True)
