"""Step 8, observe: the gateway's Prometheus metrics, on a registry passed in (never prometheus-client's global)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class GatewayMetrics:
    """Every metric the gateway exports. Labels come from bounded sets only: model names from config, enums."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.token_count_mismatches = Counter(
            "tollgate_token_count_mismatches",
            "Requests whose worker-reported token count disagreed with the gateway's own (kind: prompt, completion)",
            ["model", "kind"],
            registry=registry,
        )
