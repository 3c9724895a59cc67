"""Step 8, observe: the gateway's Prometheus metrics, on a registry passed in (never prometheus-client's global)."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from billing import DurableLedger
from gateway.route import Health, WorkerPool


class GatewayMetrics:
    """Every metric the gateway exports. Labels come from bounded sets only: model names from config, enums."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.admission_unchecked = Counter(
            "tollgate_admission_unchecked",
            "Admissions whose budgets and rate limits could not be checked (Redis unreachable), by outcome",
            ["outcome"],
            registry=registry,
        )
        self.token_count_mismatches = Counter(
            "tollgate_token_count_mismatches",
            "Requests whose worker-reported token count disagreed with the gateway's own (kind: prompt, completion)",
            ["model", "kind"],
            registry=registry,
        )
        self.upstream_retries = Counter(
            "tollgate_upstream_retries",
            "Attempts on a worker that failed before the first byte and moved the request to another worker",
            ["pool"],
            registry=registry,
        )
        self.routing_refusals = Counter(
            "tollgate_routing_refusals",
            "Requests no worker could take (reason: capacity, no_worker, unknown_adapter)",
            ["pool", "reason"],
            registry=registry,
        )


class SpoolCollector(Collector):
    """The spool, read when scraped: records waiting (all processes sharing the directory), the age of the oldest,
    and this process's spooled and replayed bills."""

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
        yield CounterMetricFamily(
            "tollgate_bills_spooled", "Bills this process spooled because Redis was unreachable",
            value=self._durable.spooled_total,
        )  # fmt: skip
        yield CounterMetricFamily(
            "tollgate_bills_replayed", "Spooled bills this process replayed into the ledger",
            value=self._durable.replayed_total,
        )  # fmt: skip


class PoolCollector(Collector):
    """Each worker's state as this process sees it, read when scraped; labelled by pool and worker URL, both from
    the configuration (a bounded set)."""

    def __init__(self, pools: Mapping[str, WorkerPool]) -> None:
        self._pools = pools

    def collect(self) -> Iterator[Metric]:
        labels = ["pool", "worker"]
        up = GaugeMetricFamily(
            "tollgate_worker_up", "1 while the worker takes requests, 0 while ejected", labels=labels
        )
        in_flight = GaugeMetricFamily(
            "tollgate_worker_in_flight", "This process's requests in flight on the worker", labels=labels
        )
        ejections = CounterMetricFamily(
            "tollgate_worker_ejections",
            "Times this process ejected the worker (failures or health checks)",
            labels=labels,
        )
        waiting = GaugeMetricFamily(
            "tollgate_pool_waiting", "Requests waiting for a worker of the pool with room", labels=["pool"]
        )
        for name, pool in self._pools.items():
            waiting.add_metric([name], pool.waiting)
            for worker in pool.workers:
                up.add_metric([name, worker.url], 1.0 if worker.health is Health.UP else 0.0)
                in_flight.add_metric([name, worker.url], worker.in_flight)
                ejections.add_metric([name, worker.url], worker.ejections)
        yield from (up, in_flight, ejections, waiting)
