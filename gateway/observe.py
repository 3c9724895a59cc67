"""Step 8, observe: the gateway's Prometheus metrics.

:class:`GatewayMetrics` defines every metric; the request middleware (gateway/middleware.py), the relay and admission
record into it. Labels come from bounded sets only: routes and outcomes are enums of this code, models and workers
come from the configuration, and tenants appear only when ``metrics.tenant_labels`` lists them (all others are
"other"). Keys never appear.

Several processes: ``tollgate serve --workers N`` runs N uvicorn processes behind one port, so a scrape reaches any
one of them. There, prometheus-client's multiprocess mode keeps each process's values in files under
``PROMETHEUS_MULTIPROC_DIR``, and :meth:`GatewayMetrics.exposition` sums all of them: counters and histograms over
every process that ever ran, gauges over the live ones (``worker_up`` takes the minimum: a worker is up when no
process has it ejected). What only lives in a process's memory (its view of the workers, its spool counts) is
published by :class:`ProcessSampler` every ``metrics.sample_interval_seconds``, and by the scraped process at the
scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from billing import DurableLedger, UsageRecord
from gateway.route import Health, WorkerPool

logger = logging.getLogger(__name__)

OTHER_TENANT: Final = "other"
EXPOSITION_TYPE: Final = CONTENT_TYPE_LATEST
# The routes' metric labels, by the first pattern their path matches (gateway/app.py's routes).
_ROUTES: Final = (
    ("/ai/run/", "native"),
    ("/chat/completions", "openai_chat"),
    ("/completions", "openai_completions"),
    ("/models", "models"),
    ("/ai/usage", "usage"),
    ("/ai/budget", "usage"),
    ("/tokens/verify", "usage"),
)
_PREFIXES: Final = (("/admin/", "admin"), ("/dashboard", "dashboard"))
_EXACT: Final = {"/healthz": "health", "/readyz": "health", "/metrics": "metrics"}
_SECONDS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_FIRST_TOKEN_SECONDS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
_ADDED_SECONDS: Final = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_REFUSALS: Final = {
    "requests": "requests_per_minute",
    "tokens": "tokens_per_minute",
    "tokens_too_large": "tokens_per_minute",
    "streams": "concurrent_streams",
    "budget_key": "budget_key",
    "budget_tenant": "budget_tenant",
}


def safe_observe(record: Callable[..., object], *args: object) -> None:
    """Run one metric or log call. Telemetry must never break a request or stop a bill: a failure is logged, never
    raised. Every metric and access-log call on the request path goes through here."""
    try:
        record(*args)
    except Exception:
        logger.exception("telemetry failed: %s", getattr(record, "__qualname__", record))


def route_label(path: str) -> str:
    """The ``route`` label of a request path: one of a fixed set, whatever the path."""
    if path in _EXACT:
        return _EXACT[path]
    for prefix, label in _PREFIXES:
        if path.startswith(prefix):
            return label
    if path.startswith(("/client/v4/accounts/", "/accounts/", "/v1/", "/client/v4/user/", "/user/")):
        for pattern, label in _ROUTES:
            if pattern in path:
                return label
    return "other"


@dataclasses.dataclass(slots=True)
class RequestFacts:
    """What the handlers learned about one request, for its metrics and its access log line. The middleware creates
    it (``request.state.facts``); auth, the endpoints and the relay fill in what they know."""

    request_id: str
    route: str
    started: float  # time.perf_counter() when the request arrived
    model: str = ""
    tenant: str = ""
    key_id: str = ""
    stream: bool | None = None
    outcome: str = ""  # an admitted request's end, as billed: ok, client_disconnected, upstream_error, ...
    error_code: int | None = None  # the Tollgate error code of a refused or failed request
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost_nano_usd: int | None = None
    worker: str = ""
    first_token: float | None = None  # perf_counter() when the first token (or the whole answer) was sent
    worker_first_token_seconds: float | None = None  # the serving worker's own time to it


class GatewayMetrics:
    """Every metric the gateway exports, registered on ``registry`` (never prometheus-client's global one)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        spool: Collector | None = None,
        tenant_labels: Collection[str] = (),
        multiprocess_dir: str | None = None,
    ) -> None:
        self.registry = registry
        self.multiprocess_dir = multiprocess_dir
        self._spool = spool
        if spool is not None:
            registry.register(spool)
        self._tenant_labels = frozenset(tenant_labels)
        self.requests = Counter(
            "tollgate_requests", "HTTP requests, by route, model and status class", ["route", "model", "status_class"],
            registry=registry,
        )  # fmt: skip
        self.duration = Histogram(
            "tollgate_request_duration_seconds", "Whole requests, from arrival to the last byte sent",
            ["route", "model"], buckets=_SECONDS, registry=registry,
        )  # fmt: skip
        self.first_token = Histogram(
            "tollgate_time_to_first_token_seconds", "Streamed answers: from the request's arrival to its first token",
            ["route", "model"], buckets=_FIRST_TOKEN_SECONDS, registry=registry,
        )  # fmt: skip
        self.gateway_added = Histogram(
            "tollgate_gateway_added_latency_seconds",
            "Time to the client's first token (or whole answer) minus the serving worker's own time to it: auth, "
            "validation, admission, routing, retries and relay",
            ["route", "model"], buckets=_ADDED_SECONDS, registry=registry,
        )  # fmt: skip
        self.in_flight = Gauge(
            "tollgate_requests_in_flight", "Requests being served", ["route"],
            multiprocess_mode="livesum", registry=registry,
        )  # fmt: skip
        self.streams_in_flight = Gauge(
            "tollgate_streams_in_flight", "Streamed answers being relayed", ["model"],
            multiprocess_mode="livesum", registry=registry,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "tollgate_prompt_tokens", "Prompt tokens billed", ["model", "tenant"], registry=registry
        )
        self.completion_tokens = Counter(
            "tollgate_completion_tokens", "Completion tokens billed", ["model", "tenant"], registry=registry
        )
        self.cost = Counter(
            "tollgate_cost_nano_usd", "Money billed, in nano-dollars (1e-9 USD)", ["model", "tenant"], registry=registry
        )
        self.billed = Counter(
            "tollgate_billed_requests", "Admitted requests billed, by how they ended", ["model", "tenant", "outcome"],
            registry=registry,
        )  # fmt: skip
        self.refusals = Counter(
            "tollgate_refusals", "Requests refused by a rate limit or a budget, by which", ["model", "reason"],
            registry=registry,
        )  # fmt: skip
        self.redis_errors = Counter(
            "tollgate_redis_errors", "Redis calls that failed (unreachable, timed out), by what they were for",
            ["operation"], registry=registry,
        )  # fmt: skip
        self.admission_unchecked = Counter(
            "tollgate_admission_unchecked",
            "Admissions whose budgets and rate limits could not be checked (Redis unreachable), by outcome",
            ["outcome"], registry=registry,
        )  # fmt: skip
        self.token_count_mismatches = Counter(
            "tollgate_token_count_mismatches",
            "Requests whose worker-reported token count disagreed with the gateway's own (kind: prompt, completion)",
            ["model", "kind"], registry=registry,
        )  # fmt: skip
        self.upstream_retries = Counter(
            "tollgate_upstream_retries",
            "Attempts on a worker that failed before the first byte and moved the request to another worker",
            ["pool"], registry=registry,
        )  # fmt: skip
        self.routing_refusals = Counter(
            "tollgate_routing_refusals", "Requests no worker could take (reason: capacity, no_worker, unknown_adapter)",
            ["pool", "reason"], registry=registry,
        )  # fmt: skip
        self.worker_up = Gauge(
            "tollgate_worker_up", "1 while the worker takes requests (from every process), 0 while ejected",
            ["pool", "worker"], multiprocess_mode="livemin", registry=registry,
        )  # fmt: skip
        self.worker_in_flight = Gauge(
            "tollgate_worker_in_flight", "Requests in flight on the worker from this replica", ["pool", "worker"],
            multiprocess_mode="livesum", registry=registry,
        )  # fmt: skip
        self.worker_ejections = Counter(
            "tollgate_worker_ejections", "Times a process ejected the worker (failures or health checks)",
            ["pool", "worker"], registry=registry,
        )  # fmt: skip
        self.pool_waiting = Gauge(
            "tollgate_pool_waiting", "Requests waiting for a worker of the pool with room", ["pool"],
            multiprocess_mode="livesum", registry=registry,
        )  # fmt: skip
        self.bills_spooled = Counter(
            "tollgate_bills_spooled", "Bills spooled to the local disk because Redis was unreachable", registry=registry
        )
        self.bills_replayed = Counter(
            "tollgate_bills_replayed", "Spooled bills replayed into the ledger", registry=registry
        )

    def start_at_zero(self, models: Collection[str], pools: Collection[str]) -> None:
        """Create the error and refusal series at 0, so that ``increase()`` sees their first event (a series that
        appears with 1 has no earlier value to grow from)."""
        for model in models:
            for reason in sorted(set(_REFUSALS.values())):
                self.refusals.labels(model, reason)
            for kind in ("prompt", "completion"):
                self.token_count_mismatches.labels(model, kind)
        for pool in pools:
            self.upstream_retries.labels(pool)
            for reason in ("capacity", "no_worker", "unknown_adapter"):
                self.routing_refusals.labels(pool, reason)
        for operation in ("auth", "admission", "bill", "usage", "admin"):
            self.redis_errors.labels(operation)
        for outcome in ("allowed", "refused"):
            self.admission_unchecked.labels(outcome)

    def tenant_label(self, tenant: str) -> str:
        return tenant if tenant in self._tenant_labels else OTHER_TENANT

    def record_bill(self, record: UsageRecord) -> None:
        """A bill was written (to Redis or the spool): its tokens and money, exactly once per admitted request."""
        labels = (record.model, self.tenant_label(record.tenant))
        self.prompt_tokens.labels(*labels).inc(record.prompt_tokens)
        self.completion_tokens.labels(*labels).inc(record.completion_tokens)
        self.cost.labels(*labels).inc(record.cost_nano_usd)
        self.billed.labels(*labels, record.status).inc()

    def record_refusal(self, model: str, verdict: str) -> None:
        """Admission refused a request: ``verdict`` is the limiter's (billing/limits.py)."""
        self.refusals.labels(model, _REFUSALS.get(verdict, verdict)).inc()

    def record_request(self, facts: RequestFacts, status: int, finished: float) -> None:
        """One HTTP request is done (``finished``: perf_counter() after its last byte)."""
        labels = (facts.route, facts.model)
        self.requests.labels(*labels, f"{status // 100}xx").inc()
        self.duration.labels(*labels).observe(finished - facts.started)
        if facts.first_token is None or status != 200:
            return
        to_first_token = facts.first_token - facts.started
        if facts.stream:
            self.first_token.labels(*labels).observe(to_first_token)
        if facts.worker_first_token_seconds is not None:
            self.gateway_added.labels(*labels).observe(max(0.0, to_first_token - facts.worker_first_token_seconds))

    def exposition(self) -> bytes:
        """The metrics in Prometheus's text format: this process's, or every process's in multiprocess mode."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)
        if self._spool is not None:
            registry.register(self._spool)
        return generate_latest(registry)


class SpoolCollector(Collector):
    """The spool's depth and the age of its oldest bill, read from its directory when scraped (every process of a
    replica shares it, so any process can answer)."""

    def __init__(self, durable_ledger: DurableLedger) -> None:
        self._durable = durable_ledger

    def collect(self) -> Iterator[Metric]:
        depth, oldest = self._durable.spool.depth()
        yield GaugeMetricFamily("tollgate_spool_records", "Bills waiting in the local spool for Redis", value=depth)
        yield GaugeMetricFamily(
            "tollgate_spool_oldest_age_seconds",
            "Age of the oldest bill waiting in the spool (0 when empty)",
            value=0.0 if oldest is None else max(0.0, time.time() - oldest),
        )


class ProcessSampler:
    """Publishes what this process alone knows (its view of the workers, its spool counts) to the metrics, now
    (:meth:`sample`) and every ``interval_seconds`` in the background."""

    def __init__(
        self,
        metrics: GatewayMetrics,
        pools: Mapping[str, WorkerPool],
        durable_ledger: DurableLedger,
        interval_seconds: float,
    ) -> None:
        self._metrics = metrics
        self._pools = pools
        self._durable = durable_ledger
        self._interval = interval_seconds
        self._workers: dict[tuple[str, str], tuple[object, int]] = {}  # (pool, url) → (worker, ejections published)
        self._spooled = 0
        self._replayed = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._clear_dead_processes()
        self._task = asyncio.create_task(self._run())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        safe_observe(self._publish_spool_counts)  # what the last moments spooled and replayed
        if self._metrics.multiprocess_dir is not None:  # this process's live gauges leave the sums
            multiprocess.mark_process_dead(os.getpid(), self._metrics.multiprocess_dir)

    def sample(self) -> None:
        metrics, seen = self._metrics, set()
        for name, pool in self._pools.items():
            metrics.pool_waiting.labels(name).set(pool.waiting)
            for worker in pool.workers:
                key = (name, worker.url)
                seen.add(key)
                metrics.worker_up.labels(*key).set(1.0 if worker.health is Health.UP else 0.0)
                metrics.worker_in_flight.labels(*key).set(worker.in_flight)
                known, published = self._workers.get(key, (None, 0))
                published = published if known is worker else 0  # a worker re-added by a reload starts over
                if worker.ejections > published:
                    metrics.worker_ejections.labels(*key).inc(worker.ejections - published)
                self._workers[key] = (worker, worker.ejections)
        for key in set(self._workers) - seen:  # removed by a pool reload: not a worker any more, nor a down one
            del self._workers[key]
            self._forget(key)
        self._publish_spool_counts()

    def _forget(self, key: tuple[str, str]) -> None:
        metrics = self._metrics
        if metrics.multiprocess_dir is None:
            for metric in (metrics.worker_up, metrics.worker_in_flight, metrics.worker_ejections):
                metric.remove(*key)
        else:  # the processes' files keep every series: NaN marks it as no value (neither up nor down)
            metrics.worker_up.labels(*key).set(math.nan)
            metrics.worker_in_flight.labels(*key).set(0)

    def _publish_spool_counts(self) -> None:
        spooled, replayed = self._durable.spooled_total, self._durable.replayed_total
        if spooled > self._spooled:
            self._metrics.bills_spooled.inc(spooled - self._spooled)
            self._spooled = spooled
        if replayed > self._replayed:
            self._metrics.bills_replayed.inc(replayed - self._replayed)
            self._replayed = replayed

    async def _run(self) -> None:
        while True:
            safe_observe(self.sample)
            await asyncio.sleep(self._interval)

    def _clear_dead_processes(self) -> None:
        """Drop the live gauges of processes that died without saying so (uvicorn replaced them)."""
        directory = self._metrics.multiprocess_dir
        if directory is None:
            return
        for name in os.listdir(directory):
            if name.startswith("gauge_live") and name.endswith(".db"):
                pid = name.rsplit("_", 1)[-1].removesuffix(".db")
                if pid.isdigit() and not _alive(int(pid)):
                    multiprocess.mark_process_dead(int(pid), directory)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
