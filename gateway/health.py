"""Background checks of every worker: health and catalog (``/health``, ``/v1/models``) and load (``/metrics``).

One task per gateway process ticks every ``routing.metrics_interval_seconds`` and, concurrently for every worker:

- reads ``/metrics`` (vLLM's ``vllm:num_requests_running``, ``vllm:num_requests_waiting`` and
  ``vllm:kv_cache_usage_perc``, summed over engines) into :attr:`Worker.load`, for routing; a worker that does
  not answer keeps no load figure (its own in-flight count still counts);
- every ``routing.health_interval_seconds``, unless it sits out an ejection, checks ``/health`` (200) and
  ``/v1/models`` (which models, context windows and LoRA adapters it serves). A refused connection or ``/health``
  503 (vLLM's engine is dead) ejects the worker at once; other failures (a slow answer under load, say) count like
  failed requests. A passing check never ends an ejection by itself: a real request must succeed (gateway/route.py
  has the circuit breaker).

The checks have their own small connection pool, so that a gateway whose worker connections are all busy does not
mistake its own congestion for dead workers. A worker whose ``/metrics`` cannot be read keeps its last figures for
three intervals.

A worker is routable only while its catalog lists the model's served name with a context window at least the
model's (upstream-vllm.md §6). After each round, waiting requests are handed any worker that came back.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any, Final

import httpx
from prometheus_client.parser import text_string_to_metric_families

from config import RoutingSettings
from gateway.lifecycle import BackgroundTask
from gateway.route import Catalog, Health, Worker, WorkerLoad, WorkerPool

logger = logging.getLogger(__name__)

_LOAD_METRICS: Final = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_cache_usage",
}
_LOAD_PREFIXES: Final = tuple(name + suffix for name in _LOAD_METRICS for suffix in ("{", " "))
_MAX_BODY_BYTES: Final = 4 * 1024 * 1024


class PoolMonitor:
    """Keeps the pools' view of their workers current. ``start()`` in the running loop, ``await aclose()`` to stop.

    ``pools`` is read afresh on every round, so workers added by a reload are checked from the next one."""

    def __init__(
        self,
        pools: Callable[[], Mapping[str, WorkerPool]],
        http: httpx.AsyncClient,
        routing: RoutingSettings,
        *,
        clock: Callable[[], float],
    ) -> None:
        self._pools = pools
        self._http = http
        self._routing = routing
        self._clock = clock
        self._last_probe: dict[Worker, float] = {}
        self._last_load: dict[Worker, float] = {}
        self._task = BackgroundTask("tollgate-pool-monitor", self._run)

    def start(self) -> None:
        self._task.start()

    async def aclose(self) -> None:
        """Stop the checks and close their client."""
        await self._task.aclose()
        await self._http.aclose()

    async def check_now(self) -> None:
        """One round: every worker's load, and health of those due (all of them on the first round)."""
        pools = self._pools()
        workers = [worker for pool in pools.values() for worker in pool.workers]
        for gone in set(self._last_probe) - set(workers):  # removed by a reload
            self._last_probe.pop(gone, None)
            self._last_load.pop(gone, None)
        await asyncio.gather(*(self._check(worker) for worker in workers))
        for pool in pools.values():
            pool.dispatch(workers_changed=True)

    async def _run(self) -> None:
        while True:
            try:
                await self.check_now()
            except Exception:  # a bug here must not stop the checks for good
                logger.exception("worker checks failed")
            await asyncio.sleep(self._routing.metrics_interval_seconds)

    async def _check(self, worker: Worker) -> None:
        now = self._clock()
        due = now - self._last_probe.get(worker, -math.inf) >= self._routing.health_interval_seconds
        if due and worker.is_probe_due():
            self._last_probe[worker] = now
            await self._probe(worker)
        if worker.current_health() is not Health.EJECTED:
            load = await self._read_load(worker)
            if load is not None:
                worker.load, self._last_load[worker] = load, now
            elif now - self._last_load.get(worker, -math.inf) > 3 * self._routing.metrics_interval_seconds:
                worker.load = None

    async def _probe(self, worker: Worker) -> None:
        try:
            health = await self._get(worker, "/health")
            if health.status_code == 503:
                worker.eject("/health answered 503")
                return
            if health.status_code != 200:
                worker.failed(f"/health answered {health.status_code}")
                return
            worker.catalog = _parse_catalog(await self._get(worker, "/v1/models"))
        except httpx.ConnectError as exc:
            worker.eject(f"health check cannot connect: {exc!r}")
        except (httpx.HTTPError, ValueError) as exc:
            worker.failed(f"health check failed: {exc!r}")

    async def _read_load(self, worker: Worker) -> WorkerLoad | None:
        own = worker.in_flight
        try:
            response = await self._get(worker, "/metrics")
            if response.status_code != 200:
                return None
            return _parse_load(response.text, own)
        except (httpx.HTTPError, ValueError):
            return None

    async def _get(self, worker: Worker, path: str) -> httpx.Response:
        response = await self._http.get(worker.url + path, timeout=self._routing.health_timeout_seconds)
        if len(response.content) > _MAX_BODY_BYTES:
            raise ValueError(f"{path} answer too large")
        return response


def _parse_catalog(response: httpx.Response) -> Catalog:
    """vLLM's ``/v1/models``: base models (``parent`` null) with ``max_model_len``, and LoRA adapters."""
    if response.status_code != 200:
        raise ValueError(f"/v1/models answered {response.status_code}")
    body: Any = response.json()
    cards = body.get("data") if isinstance(body, dict) else None
    if not isinstance(cards, list):
        raise ValueError("/v1/models has no data list")
    models: dict[str, int | None] = {}
    adapters = set()
    for card in cards:
        if not isinstance(card, dict) or not isinstance(card.get("id"), str):
            continue
        if card.get("parent"):
            adapters.add(card["id"])
        else:
            window = card.get("max_model_len")
            models[card["id"]] = window if isinstance(window, int) and not isinstance(window, bool) else None
    return Catalog(models, frozenset(adapters))


def _parse_load(text: str, own_in_flight: int) -> WorkerLoad | None:
    """Sum vLLM's load gauges over engines (the highest KV-cache use); ``None`` if the worker exports none of them.
    Only their lines are parsed: a vLLM ``/metrics`` page is mostly histograms, and this runs on the event loop."""
    values = {"running": 0.0, "waiting": 0.0, "kv_cache_usage": 0.0}
    found = False
    wanted = "\n".join(line for line in text.splitlines() if _is_load_line(line))
    for family in text_string_to_metric_families(wanted):
        field = _LOAD_METRICS.get(family.name)
        if field is None:
            continue
        for sample in family.samples:
            if sample.name == family.name and math.isfinite(sample.value):
                found = True
                values[field] = (
                    max(values[field], sample.value) if field == "kv_cache_usage" else values[field] + sample.value
                )
    if not found:
        return None
    return WorkerLoad(own_in_flight=own_in_flight, **values)


def _is_load_line(line: str) -> bool:
    if line.startswith("#"):
        parts = line.split(maxsplit=3)
        return len(parts) > 2 and parts[2] in _LOAD_METRICS
    return line.startswith(_LOAD_PREFIXES)
