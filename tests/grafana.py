"""The Grafana dashboard's queries and the metrics the gateway exports, in one place for every test that needs them.

``GATEWAY_METRIC_LABELS`` is the list the dashboard is designed against: each exposition name (counters with
``_total``, histograms as ``_bucket``/``_sum``/``_count``) with its labels, not counting the ``job`` and
``instance`` labels Prometheus adds when it scrapes. ``dashboard_metric_names()`` reads the names a dashboard
queries, so a test can hold them against this list or against a live ``/metrics``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DASHBOARD_PATH = REPO_ROOT / "helm" / "tollgate" / "dashboards" / "tollgate.json"

_ROUTE_MODEL = frozenset({"route", "model"})
_ROUTE_MODEL_LE = _ROUTE_MODEL | {"le"}
_MODEL_TENANT = frozenset({"model", "tenant"})
_POOL_WORKER = frozenset({"pool", "worker"})

GATEWAY_METRIC_LABELS: dict[str, frozenset[str]] = {
    "tollgate_requests_total": frozenset({"route", "model", "status_class"}),
    "tollgate_request_duration_seconds_bucket": _ROUTE_MODEL_LE,
    "tollgate_request_duration_seconds_sum": _ROUTE_MODEL,
    "tollgate_request_duration_seconds_count": _ROUTE_MODEL,
    "tollgate_time_to_first_token_seconds_bucket": _ROUTE_MODEL_LE,
    "tollgate_time_to_first_token_seconds_sum": _ROUTE_MODEL,
    "tollgate_time_to_first_token_seconds_count": _ROUTE_MODEL,
    "tollgate_gateway_added_latency_seconds_bucket": _ROUTE_MODEL_LE,
    "tollgate_gateway_added_latency_seconds_sum": _ROUTE_MODEL,
    "tollgate_gateway_added_latency_seconds_count": _ROUTE_MODEL,
    "tollgate_requests_in_flight": frozenset({"route"}),
    "tollgate_streams_in_flight": frozenset({"model"}),
    "tollgate_prompt_tokens_total": _MODEL_TENANT,
    "tollgate_completion_tokens_total": _MODEL_TENANT,
    "tollgate_cost_nano_usd_total": _MODEL_TENANT,
    "tollgate_billed_requests_total": _MODEL_TENANT | {"outcome"},
    "tollgate_refusals_total": frozenset({"model", "reason"}),
    "tollgate_routing_refusals_total": frozenset({"pool", "reason"}),
    "tollgate_upstream_retries_total": frozenset({"pool"}),
    "tollgate_worker_up": _POOL_WORKER,
    "tollgate_worker_in_flight": _POOL_WORKER,
    "tollgate_worker_ejections_total": _POOL_WORKER,
    "tollgate_pool_waiting": frozenset({"pool"}),
    "tollgate_redis_errors_total": frozenset({"operation"}),
    "tollgate_admission_unchecked_total": frozenset({"outcome"}),
    "tollgate_spool_records": frozenset(),
    "tollgate_spool_oldest_age_seconds": frozenset(),
    "tollgate_bills_spooled_total": frozenset(),
    "tollgate_bills_replayed_total": frozenset(),
    "tollgate_token_count_mismatches_total": frozenset({"model", "kind"}),
}
GATEWAY_METRIC_NAMES = frozenset(GATEWAY_METRIC_LABELS)
SCRAPE_LABELS = frozenset({"job", "instance"})

# Quoted strings go first: a label value may hold braces, brackets or a metric-like word.
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_LABEL_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_GATEWAY_METRIC = re.compile(r"(?<![\w:])tollgate_[A-Za-z0-9_:]*")


def load_dashboard(path: Path = DASHBOARD_PATH) -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return dashboard


def iter_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows included, and the panels folded inside collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def panel_exprs(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in iter_panels(dashboard) for target in panel.get("targets", [])]


def variable_queries(dashboard: dict[str, Any]) -> list[str]:
    """The queries of the dashboard's query variables (``label_values(...)``: Grafana syntax, not PromQL)."""
    queries = []
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            queries.append(query if isinstance(query, str) else query["query"])
    return queries


def metric_names(query: str) -> set[str]:
    """The ``tollgate_`` metric names a PromQL (or ``label_values``) query reads.

    Strings, label matchers, range selectors and label lists are removed first, so label values and names
    never count; what is left that starts with ``tollgate_`` is a metric name, suffix included.
    """
    stripped = _STRINGS.sub('""', query)
    for pattern in (_LABEL_MATCHERS, _RANGES, _LABEL_LISTS):
        stripped = pattern.sub(" ", stripped)
    return set(_GATEWAY_METRIC.findall(stripped))


def dashboard_metric_names(path: Path = DASHBOARD_PATH) -> set[str]:
    """Every gateway metric name the dashboard at ``path`` queries, in panels and in variables."""
    dashboard = load_dashboard(path)
    names: set[str] = set()
    for query in panel_exprs(dashboard) + variable_queries(dashboard):
        names |= metric_names(query)
    return names
