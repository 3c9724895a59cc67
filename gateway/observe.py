"""Step 8, observe: the gateway's Prometheus metrics, on a registry passed in (never prometheus-client's global)."""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from billing import DurableLedger


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
