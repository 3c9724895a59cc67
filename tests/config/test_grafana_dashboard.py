"""The Grafana dashboard (shipped by the Helm chart, provisioned by docker-compose) and the files that wire it up.

The dashboard is checked as Grafana would load it and as Prometheus would parse its queries: every query is
PromQL that reads only metrics and labels the gateway exports (the list lives in ``tests/grafana.py``).
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

from tests.grafana import (
    DASHBOARD_PATH,
    GATEWAY_METRIC_LABELS,
    GATEWAY_METRIC_NAMES,
    REPO_ROOT,
    SCRAPE_LABELS,
    dashboard_metric_names,
    iter_panels,
    load_dashboard,
    metric_names,
    panel_exprs,
    variable_queries,
)

CHART_DIR = REPO_ROOT / "helm" / "tollgate"
PROVISIONING_DIR = REPO_ROOT / "config" / "grafana" / "provisioning"
PROMETHEUS_CONFIG = REPO_ROOT / "config" / "prometheus" / "prometheus.yml"
DATASOURCE_VARIABLE = "${datasource}"
# docker-compose mounts the chart's dashboards folder here, where the file provider reads it.
GRAFANA_DASHBOARDS_MOUNT = "/var/lib/grafana/dashboards"
GRID_COLUMNS = 24
# Grafana 10 and 11 write schemaVersion 38 to 41 (Grafana 9 wrote 37 and older).
GRAFANA_10_AND_11_SCHEMAS = range(38, 42)
# Grafana's range macros, replaced by durations so the query parses as plain PromQL.
GRAFANA_RANGE_MACROS = {"$__rate_interval": "1m", "$__range": "6h"}
COUNTER_SUFFIXES = ("_total", "_bucket", "_sum", "_count")
MATCH_OPS = {"MatchOp.Equal": "=", "MatchOp.NotEqual": "!=", "MatchOp.Re": "=~", "MatchOp.NotRe": "!~"}
# The query variables, in the order Grafana shows them after the data source; each panel query follows them.
QUERY_VARIABLES = ("job", "model", "instance")
# The job the dashboard opens on: the one docker-compose's Prometheus scrapes the gateway as.
DEFAULT_JOB = "tollgate"
UNITS = frozenset({"reqps", "s", "currencyUSD", "short", "percentunit", "ops"})

DASHBOARD = load_dashboard()
VARIABLES = {variable["name"]: variable for variable in DASHBOARD["templating"]["list"]}
PANELS = [panel for panel in iter_panels(DASHBOARD) if panel["type"] != "row"]
EXPRS = panel_exprs(DASHBOARD)


def as_promql(expr: str) -> promql_parser.Expr:
    for macro, duration in GRAFANA_RANGE_MACROS.items():
        expr = expr.replace(macro, duration)
    return promql_parser.parse(expr)


def nodes(expr: promql_parser.Expr) -> list[promql_parser.Expr]:
    found: list[promql_parser.Expr] = []
    promql_parser.walk(expr, found.append)
    return found


def selectors(expr: promql_parser.Expr) -> list[tuple[str, set[tuple[str, str, str]]]]:
    """Each metric selector in ``expr``: its name and its ``(label, op, value)`` matchers, op as written."""
    return [
        (node.name or "", {(m.name, MATCH_OPS[str(m.op)], m.value) for m in node.matchers.matchers})
        for node in nodes(expr)
        if isinstance(node, promql_parser.VectorSelector)
    ]


def variable_selector(query: str) -> tuple[str, set[tuple[str, str, str]]]:
    """The series selector of a ``label_values(selector, label)`` variable query, parsed as PromQL."""
    match = re.fullmatch(r"label_values\((.+), *\w+\)", query)
    assert match, query
    [selector] = selectors(promql_parser.parse(match[1]))
    return selector


def job_matchers(matchers: set[tuple[str, str, str]]) -> set[tuple[str, str, str]]:
    return {matcher for matcher in matchers if matcher[0] == "job"}


def ranged_names(expr: promql_parser.Expr) -> list[str]:
    """The metric names read over a range (``name[5m]``), as rate() and increase() need."""
    return [node.vector_selector.name or "" for node in nodes(expr) if isinstance(node, promql_parser.MatrixSelector)]


def groupings(expr: promql_parser.Expr) -> list[tuple[set[str], set[str]]]:
    """Each ``by (...)`` aggregation in ``expr``: its labels and the metric names it aggregates."""
    return [
        (set(node.modifier.labels), {name for name, _ in selectors(node.expr)})
        for node in nodes(expr)
        if isinstance(node, promql_parser.AggregateExpr)
        and node.modifier is not None
        and node.modifier.type == promql_parser.AggModifierType.By
    ]


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def test_dashboard_identity_refresh_and_time_range() -> None:
    assert (DASHBOARD["uid"], DASHBOARD["title"]) == ("tollgate", "Tollgate")
    assert DASHBOARD["schemaVersion"] in GRAFANA_10_AND_11_SCHEMAS
    assert DASHBOARD["refresh"] == "30s"
    assert DASHBOARD["time"] == {"from": "now-6h", "to": "now"}


def test_dashboard_panel_ids_are_unique() -> None:
    ids = [panel["id"] for panel in iter_panels(DASHBOARD)]
    assert all(isinstance(panel_id, int) for panel_id in ids)
    assert [panel_id for panel_id, n in Counter(ids).items() if n > 1] == []


def test_dashboard_panels_have_title_and_description() -> None:
    for panel in iter_panels(DASHBOARD):
        assert panel.get("title", "").strip(), panel["id"]
        assert panel.get("description", "").strip(), panel["title"]


def test_dashboard_panels_query_the_datasource_variable() -> None:
    for panel in PANELS:
        assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_VARIABLE}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]


def test_dashboard_targets_have_expr_and_unique_ref_ids() -> None:
    for panel in PANELS:
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert all(ref_ids) and len(set(ref_ids)) == len(ref_ids), panel["title"]
        assert all(target["expr"].strip() for target in panel["targets"]), panel["title"]


def test_dashboard_panels_have_units() -> None:
    for panel in PANELS:
        assert panel["fieldConfig"]["defaults"].get("unit") in UNITS, panel["title"]


def test_dashboard_grid_panels_fit_and_do_not_overlap() -> None:
    boxes = []
    for panel in iter_panels(DASHBOARD):
        grid = panel["gridPos"]
        x, y, w, h = grid["x"], grid["y"], grid["w"], grid["h"]
        assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= GRID_COLUMNS, panel["title"]
        boxes.append((panel["title"], x, y, w, h))
    for (a, ax, ay, aw, ah), (b, bx, by, bw, bh) in itertools.combinations(boxes, 2):
        overlap = ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah
        assert not overlap, f"{a!r} overlaps {b!r}"


def test_dashboard_queries_parse_as_promql_and_name_the_same_metrics() -> None:
    for expr in EXPRS:
        names = {name for name, _ in selectors(as_promql(expr))}
        assert "" not in names, f"selector without a metric name in {expr!r}"
        assert names == metric_names(expr), expr


def test_dashboard_metric_names_are_exported_by_the_gateway() -> None:
    used = dashboard_metric_names(DASHBOARD_PATH)
    assert used, "the dashboard queries no gateway metric"
    assert used - GATEWAY_METRIC_NAMES == set()


def test_dashboard_queries_use_only_labels_the_metrics_carry() -> None:
    for expr in EXPRS:
        parsed = as_promql(expr)
        for name, matchers in selectors(parsed):
            assert {label for label, _, _ in matchers} <= GATEWAY_METRIC_LABELS[name] | SCRAPE_LABELS, expr
        for labels, inner in groupings(parsed):
            assert labels <= SCRAPE_LABELS.union(*(GATEWAY_METRIC_LABELS[name] for name in inner)), expr


def test_dashboard_counters_are_read_through_a_range() -> None:
    """A counter or histogram series plotted raw is a climbing line; rate() or increase() it over a range."""
    for expr in EXPRS:
        parsed = as_promql(expr)
        ranged = Counter(ranged_names(parsed))
        for name, count in Counter(name for name, _ in selectors(parsed)).items():
            if name.endswith(COUNTER_SUFFIXES):
                assert ranged[name] == count, expr


def test_dashboard_ranges_come_from_grafana() -> None:
    ranges = [r for expr in EXPRS for r in re.findall(r"\[([^\]]*)\]", expr)]
    assert ranges and set(ranges) <= {"$__rate_interval", "$__range"}


def test_dashboard_variables_default_to_the_provisioned_datasource() -> None:
    assert list(VARIABLES) == ["datasource", *QUERY_VARIABLES]
    source = VARIABLES["datasource"]
    provisioned = load_yaml(PROVISIONING_DIR / "datasources" / "prometheus.yaml")["datasources"]
    assert (source["type"], source["query"]) == ("datasource", "prometheus")
    assert source["current"]["value"] == "prometheus" == provisioned[0]["uid"]
    for name in QUERY_VARIABLES:
        variable = VARIABLES[name]
        assert variable["type"] == "query", name
        assert variable["datasource"] == {"type": "prometheus", "uid": DATASOURCE_VARIABLE}, name
        assert variable["definition"] == variable["query"], name
    labels = [
        re.fullmatch(r"label_values\((tollgate_\w+)(?:\{.*\})?, *(\w+)\)", q) for q in variable_queries(DASHBOARD)
    ]
    assert [match and match[2] for match in labels] == list(QUERY_VARIABLES)


def test_dashboard_job_variable_lists_the_jobs_and_defaults_to_tollgate() -> None:
    """Under kube-prometheus-stack the job is named after the Service, so the dashboard lets the viewer pick it."""
    job = VARIABLES["job"]
    assert variable_selector(job["query"]) == ("tollgate_requests_total", set())
    assert not job["multi"] and not job["includeAll"]
    assert (job["current"]["text"], job["current"]["value"]) == (DEFAULT_JOB, DEFAULT_JOB)


@pytest.mark.parametrize("name", ["model", "instance"])
def test_dashboard_model_and_instance_variables_list_the_chosen_jobs_values(name: str) -> None:
    variable = VARIABLES[name]
    assert variable["multi"] and variable["includeAll"] and variable["allValue"] == ".*"
    metric, matchers = variable_selector(variable["query"])
    assert metric == "tollgate_requests_total"
    assert matchers == {("job", "=~", "$job")}, variable["query"]


def test_dashboard_queries_never_hard_code_a_job() -> None:
    for expr in EXPRS:
        for _, matchers in selectors(as_promql(expr)):
            assert job_matchers(matchers) == {("job", "=~", "$job")}, expr
    for query in variable_queries(DASHBOARD):
        _, matchers = variable_selector(query)
        assert job_matchers(matchers) <= {("job", "=~", "$job")}, query


@pytest.mark.parametrize("variable", QUERY_VARIABLES)
def test_dashboard_queries_select_the_job_and_follow_the_variables(variable: str) -> None:
    for expr in EXPRS:
        for name, matchers in selectors(as_promql(expr)):
            if variable in GATEWAY_METRIC_LABELS[name] | SCRAPE_LABELS:
                assert (variable, "=~", f"${variable}") in matchers, expr


def test_grafana_datasource_provisioning_points_at_prometheus() -> None:
    document = load_yaml(PROVISIONING_DIR / "datasources" / "prometheus.yaml")
    [source] = document["datasources"]
    assert document["apiVersion"] == 1
    assert source["type"] == "prometheus" and source["isDefault"] is True
    assert source["url"] == "http://prometheus:9090"
    prometheus = load_yaml(PROMETHEUS_CONFIG)
    assert source["jsonData"]["timeInterval"] == prometheus["global"]["scrape_interval"]


def test_grafana_dashboard_provider_reads_the_mounted_chart_dashboards() -> None:
    document = load_yaml(PROVISIONING_DIR / "dashboards" / "tollgate.yaml")
    [provider] = document["providers"]
    assert document["apiVersion"] == 1
    assert provider["type"] == "file"
    assert provider["options"]["path"] == GRAFANA_DASHBOARDS_MOUNT
    assert DASHBOARD_PATH.parent == CHART_DIR / "dashboards"


def test_prometheus_scrapes_the_gateway_as_the_job_the_dashboard_queries() -> None:
    jobs = {job["job_name"]: job for job in load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]}
    assert set(jobs) == {"tollgate", "workers"}
    assert jobs["tollgate"]["static_configs"] == [{"targets": ["gateway:8080"]}]
    assert jobs["tollgate"]["scrape_interval"] == "15s"
    assert jobs["workers"]["static_configs"] == [{"targets": ["worker-1:8000", "worker-2:8000"]}]
    assert all(job["metrics_path"] == "/metrics" for job in jobs.values())
    assert VARIABLES["job"]["current"]["value"] == DEFAULT_JOB in jobs


def test_helm_chart_ships_the_dashboard_to_the_grafana_sidecar() -> None:
    chart = load_yaml(CHART_DIR / "Chart.yaml")
    assert (chart["apiVersion"], chart["name"], chart["type"]) == ("v2", "tollgate", "application")
    assert chart["appVersion"] == "0.1.0"
    values = load_yaml(CHART_DIR / "values.yaml")["grafanaDashboard"]
    assert values == {"enabled": True, "labels": {"grafana_dashboard": "1"}, "annotations": {}, "namespace": ""}
    template = (CHART_DIR / "templates" / "grafana-dashboard.yaml").read_text(encoding="utf-8")
    [packaged] = re.findall(r'\.Files\.Get "([^"]+)"', template)
    assert CHART_DIR / packaged == DASHBOARD_PATH
