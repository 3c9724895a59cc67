"""The Helm chart, rendered by Helm's own Go SDK (``helm-python-sdk``) with its default values and with the
production-like ``ci/production-values.yaml``: it lints clean, every manifest is valid against Kubernetes' OpenAPI
schemas (``kubernetes-validate``, strict: no unknown fields), and what the pods get is a valid Tollgate
configuration whose values are the chart's ``config`` key for key. Shutdown, secrets, probes, autoscaling,
disruption budget, ServiceMonitor and NetworkPolicy are held against what the gateway itself does."""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from config import DEFAULT_CONFIG_PATH, Settings, load_settings
from config.schema import settings_schema
from gateway.lifecycle import shutdown_seconds
from tests.grafana import REPO_ROOT, load_dashboard

CHART_DIR = REPO_ROOT / "helm" / "tollgate"
PRODUCTION_VALUES = yaml.safe_load((CHART_DIR / "ci" / "production-values.yaml").read_text(encoding="utf-8"))
VALUES = yaml.safe_load((CHART_DIR / "values.yaml").read_text(encoding="utf-8"))
# The oldest Kubernetes the chart supports (Chart.yaml's kubeVersion) and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.27.0", kubernetes_validate.utils.latest_version())
# Custom resources: their schemas come with their operators, not with Kubernetes; checked field by field below.
CUSTOM_KINDS = frozenset({"ServiceMonitor"})
# The only `config` values where the chart departs from config/tollgate.yaml, because a pod needs it.
CHART_DEPARTURES = {"server.host", "redis.url", "ledger.spool_dir", "pools"}
PRODUCTION_SECRET = {
    "redis-url": "rediss://:secret@redis.example.internal:6380/0",
    "admin-token": "a" * 40,
    "metrics-token": "m" * 40,
}


def _helm() -> Any:
    try:
        import helm_python
    except ImportError:
        reason = "helm-python-sdk has wheels for Linux x86_64 and macOS arm64 only"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return helm_python


class Release:
    """A rendered release: its manifests by kind and name, and what a pod of it would run with."""

    def __init__(self, values: Mapping[str, Any] | None = None, name: str = "tollgate") -> None:
        self.values = dict(values or {})
        rendered = _helm().Chart.load(CHART_DIR).render(self.values, name=name, namespace="inference")
        self.notes = rendered.pop("tollgate/templates/NOTES.txt", "")
        self.manifests = [doc for text in rendered.values() for doc in yaml.safe_load_all(text) if doc]

    def get(self, kind: str) -> dict[str, Any]:
        [manifest] = [
            doc for doc in self.manifests if doc["kind"] == kind and "dashboard" not in doc["metadata"]["name"]
        ]
        return manifest

    def kinds(self) -> set[str]:
        return {doc["kind"] for doc in self.manifests}

    @property
    def pod(self) -> dict[str, Any]:
        return self.get("Deployment")["spec"]["template"]

    @property
    def container(self) -> dict[str, Any]:
        [container] = self.pod["spec"]["containers"]
        return container

    def env(self, secret: Mapping[str, str] | None = None) -> dict[str, str]:
        """The container's environment: the image's own, then the Deployment's, with Secret references resolved from
        the chart's Secret or from ``secret`` (standing in for an existing one)."""
        environment = dockerfile_env()
        secret_name = self.values.get("existingSecret")
        if secret is None:
            data = self.get("Secret")["data"]
            secret = {key: base64.b64decode(value).decode() for key, value in data.items()}
            secret_name = self.get("Secret")["metadata"]["name"]
        for entry in self.container["env"]:
            if "value" in entry:
                environment[entry["name"]] = entry["value"]
                continue
            reference = entry["valueFrom"]["secretKeyRef"]
            assert reference["name"] == secret_name, entry
            if reference["key"] in secret:
                environment[entry["name"]] = secret[reference["key"]]
            else:
                assert reference.get("optional"), entry
        return environment

    def settings(self, tmp_path: Path, secret: Mapping[str, str] | None = None) -> Settings:
        """Load the configuration a pod loads: the ConfigMap's file at TOLLGATE_CONFIG, under the pod's environment."""
        environment = self.env(secret)
        mount = next(m for m in self.container["volumeMounts"] if m["name"] == "config")["mountPath"]
        config_path = environment.pop("TOLLGATE_CONFIG")
        assert Path(config_path).parent == Path(mount)
        target = tmp_path / Path(config_path).name
        target.write_text(self.get("ConfigMap")["data"][target.name], encoding="utf-8")
        return load_settings(target, environment)


def dockerfile_env() -> dict[str, str]:
    """The TOLLGATE_* variables the image sets (``ENV`` lines of the Dockerfile)."""
    text = (REPO_ROOT / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    pairs = [pair for line in text.splitlines() if line.startswith("ENV ") for pair in line[4:].split()]
    return dict(pair.split("=", 1) for pair in pairs if pair.startswith("TOLLGATE_"))


@pytest.fixture(scope="module")
def default() -> Release:
    return Release()


@pytest.fixture(scope="module")
def production() -> Release:
    return Release(PRODUCTION_VALUES, name="gw")


def test_the_chart_lints_clean_with_default_and_production_values() -> None:
    helm = _helm()
    for values in (None, PRODUCTION_VALUES):
        report = helm.lint(CHART_DIR, values, strict=True, kube_version="v" + KUBERNETES_VERSIONS[0])
        assert report["errors"] == [], report
        assert [m for m in report["messages"] if m["severity"] >= 2] == [], report  # no warnings or errors


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("values", ["default", "production"])
def test_every_manifest_is_valid_kubernetes(values: str, version: str, request: pytest.FixtureRequest) -> None:
    release: Release = request.getfixturevalue(values)
    expected = {"ConfigMap", "Secret", "ServiceAccount", "Service", "Deployment", "HorizontalPodAutoscaler"}
    expected |= {"PodDisruptionBudget"} | ({"ServiceMonitor", "NetworkPolicy"} if values == "production" else set())
    if values == "production":
        expected.discard("Secret")  # existingSecret
    assert release.kinds() == expected
    for manifest in release.manifests:
        if manifest["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(manifest, version, strict=True)


def test_kubernetes_validation_can_fail() -> None:
    deployment = Release().get("Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["paht"] = "/healthz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_config_values_are_the_settings_one_to_one() -> None:
    file = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text(encoding="utf-8"))
    chart = VALUES["config"]
    assert set(_leaves(chart)) == set(_leaves(file))  # the same keys, at the same places
    differing = {key for key, value in _leaves(chart).items() if value != _leaves(file)[key]}
    assert {key for key in differing if not key.startswith(tuple(CHART_DEPARTURES))} == set()
    schema = json.loads((CHART_DIR / "values.schema.json").read_text(encoding="utf-8"))
    # Regenerate with: .venv/bin/python -m config.schema helm/tollgate/values.schema.json
    assert schema["properties"]["config"] == settings_schema()


def test_pods_load_the_charts_config_as_given(default: Release, tmp_path: Path) -> None:
    settings = default.settings(tmp_path)
    assert settings == load_settings(DEFAULT_CONFIG_PATH, _environment_for(VALUES["config"]))
    assert settings.redis.url == VALUES["config"]["redis"]["url"]
    assert "url:" not in yaml.safe_load(default.get("ConfigMap")["data"]["tollgate.yaml"])["redis"]
    assert settings.admin.token == ""  # no token, no admin API
    assert default.container["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]


def test_production_pods_take_their_secrets_from_the_existing_secret(production: Release, tmp_path: Path) -> None:
    settings = production.settings(tmp_path, secret=PRODUCTION_SECRET)
    assert settings.redis.url == PRODUCTION_SECRET["redis-url"]
    assert settings.admin.token == PRODUCTION_SECRET["admin-token"]
    assert settings.metrics.token == PRODUCTION_SECRET["metrics-token"]
    assert settings.server.workers == 2 and settings.server.drain_seconds == 60
    assert settings.limits.tenants["acct-internal-search"].requests_per_minute == 6000
    assert [(w.url, w.weight) for w in settings.pools["bf16"].workers][2][1] == 2
    references = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in production.container["env"] if "valueFrom" in e}
    assert {ref["name"] for ref in references.values()} == {"tollgate-secrets"}
    # An existing Secret may leave the admin API off and /metrics open.
    assert references["TOLLGATE_ADMIN__TOKEN"]["optional"] is references["TOLLGATE_METRICS__TOKEN"]["optional"] is True
    without_tokens = production.settings(tmp_path, secret={"redis-url": PRODUCTION_SECRET["redis-url"]})
    assert without_tokens.admin.token == without_tokens.metrics.token == ""


def test_the_charts_secret_holds_the_tokens_and_the_config_map_does_not(tmp_path: Path) -> None:
    admin, metrics, url = "t" * 48, "s" * 32, "redis://:pw@redis-master:6379/2"
    release = Release({"config": {"admin": {"token": admin}, "metrics": {"token": metrics}, "redis": {"url": url}}})
    settings = release.settings(tmp_path)
    assert (settings.admin.token, settings.metrics.token, settings.redis.url) == (admin, metrics, url)
    config_map = release.get("ConfigMap")["data"]["tollgate.yaml"]
    assert admin not in config_map and metrics not in config_map and "pw@" not in config_map
    assert set(release.get("Secret")["data"]) == {"redis-url", "admin-token", "metrics-token"}


def test_config_given_in_values_wins_over_the_images_environment(tmp_path: Path) -> None:
    values = {"config": {"server": {"port": 9000, "host": "::"}, "ledger": {"spool_dir": "/spool"}}}
    release = Release(values)
    settings = release.settings(tmp_path)
    assert (settings.server.port, settings.server.host, settings.ledger.spool_dir) == (9000, "::", "/spool")
    assert release.container["ports"][0]["containerPort"] == 9000
    assert {"name": "spool", "mountPath": "/spool"} in release.container["volumeMounts"]
    assert set(dockerfile_env()) <= {entry["name"] for entry in release.container["env"]}


def test_values_are_checked_by_the_settings_names_and_ranges() -> None:
    helm = _helm()
    refused = {
        "/config/server": {"config": {"server": {"drian_seconds": 30}}},
        "/config/routing/retries": {"config": {"routing": {"retries": -1}}},
        "/config/upstream/stream_headers": {"config": {"upstream": {"stream_headers": "later"}}},
        "/config/admin/token": {"config": {"admin": {"token": "too-short"}}},
        "/config/server/drain_seconds": {"config": {"server": {"drain_seconds": 0}}},
        "/config/pools/bf16/workers/0": {"config": {"pools": {"bf16": {"workers": ["vllm:8000"]}}}},
        "/autoscaling": {"autoscaling": {"enabeld": True}},
    }
    for where, values in refused.items():
        with pytest.raises(helm.HelmValuesError, match=f"at '{re.escape(where)}'"):
            Release(values)


def test_the_grace_period_outlasts_the_drain(default: Release, tmp_path: Path) -> None:
    def stop_seconds(release: Release) -> float:
        """The pause before SIGTERM, then what the gateway itself takes to stop (uvicorn's grace period)."""
        pause = float(release.container["lifecycle"]["preStop"]["exec"]["command"][1])
        return pause + shutdown_seconds(release.settings(tmp_path))

    assert default.container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    assert default.pod["spec"]["terminationGracePeriodSeconds"] == 47
    longer = Release({"config": {"server": {"drain_seconds": 120.5}}, "preStopSleepSeconds": 3})
    assert longer.pod["spec"]["terminationGracePeriodSeconds"] == 136  # ceil(3 + 120.5 + 2 + 10)
    for release in (default, longer):  # 5 s to spare past the gateway's own deadline
        assert release.pod["spec"]["terminationGracePeriodSeconds"] >= stop_seconds(release) + 5
    assert Release({"terminationGracePeriodSeconds": 300}).pod["spec"]["terminationGracePeriodSeconds"] == 300
    with pytest.raises(_helm().HelmRenderError, match="terminationGracePeriodSeconds \\(30\\) must be at least 47"):
        Release({"terminationGracePeriodSeconds": 30})


def test_probes_use_the_gateways_health_routes(default: Release) -> None:
    from gateway.app import create_app  # the routes, not a copy of their paths

    paths = {route.path for route in create_app(load_settings(DEFAULT_CONFIG_PATH, {})).routes}
    container = default.container
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert {"/healthz", "/readyz"} <= paths


def test_pool_edits_reach_running_pods_and_other_edits_roll_them() -> None:
    def checksums(values: dict[str, Any]) -> dict[str, str]:
        return Release(values).pod["metadata"]["annotations"]

    base = checksums({})
    pools = checksums({"config": {"pools": {"bf16": {"workers": ["http://vllm-bf16-new:8000"]}}}})
    limits = checksums({"config": {"limits": {"default": {"requests_per_minute": 60}}}})
    token = checksums({"config": {"admin": {"token": "z" * 32}}})
    assert pools == base  # the kubelet updates the mounted file; the pods re-read their pools
    no_reloads = {"routing": {"reload_interval_seconds": 0}}
    assert checksums({"config": {**no_reloads, "pools": {"bf16": {"workers": ["http://vllm-bf16-new:8000"]}}}}) != (
        checksums({"config": no_reloads})
    )  # pods that never re-read their pools are rolled instead
    assert limits["checksum/config"] != base["checksum/config"] and limits["checksum/secret"] == base["checksum/secret"]
    assert token["checksum/secret"] != base["checksum/secret"] and token["checksum/config"] == base["checksum/config"]
    mount = next(m for m in Release().container["volumeMounts"] if m["name"] == "config")
    assert "subPath" not in mount  # a subPath mount would never see the update


def test_pods_run_as_the_images_user_on_a_read_only_root(default: Release) -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert "--uid 10001 --gid 10001" in dockerfile and "\nUSER tollgate\n" in dockerfile
    pod, container = default.pod["spec"]["securityContext"], default.container["securityContext"]
    assert (pod["runAsUser"], pod["runAsGroup"], pod["fsGroup"], pod["runAsNonRoot"]) == (10001, 10001, 10001, True)
    assert container["readOnlyRootFilesystem"] is True and container["capabilities"]["drop"] == ["ALL"]
    writable = {m["mountPath"] for m in default.container["volumeMounts"] if not m.get("readOnly")}
    assert writable == {VALUES["config"]["ledger"]["spool_dir"], "/tmp"}  # the spool, and multiprocess metrics
    assert default.pod["spec"]["automountServiceAccountToken"] is False


def test_the_spool_is_an_empty_dir_or_a_shared_claim(default: Release, production: Release) -> None:
    def spool(release: Release) -> dict[str, Any]:
        return next(v for v in release.pod["spec"]["volumes"] if v["name"] == "spool")

    assert spool(default) == {"name": "spool", "emptyDir": {"sizeLimit": "1Gi"}}
    assert spool(production) == {"name": "spool", "persistentVolumeClaim": {"claimName": "tollgate-spool"}}
    with pytest.raises(_helm().HelmRenderError, match="spool_dir must be an absolute path"):
        Release({"config": {"ledger": {"spool_dir": "var/spool"}}})


def test_autoscaling_owns_the_replica_count_and_the_budget_keeps_all_but_one(default: Release) -> None:
    hpa, deployment = default.get("HorizontalPodAutoscaler")["spec"], default.get("Deployment")
    assert "replicas" not in deployment["spec"]  # or every upgrade would reset what the autoscaler chose
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "tollgate"}
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (3, 12)
    fixed = Release({"autoscaling": {"enabled": False}, "replicaCount": 4})
    assert fixed.get("Deployment")["spec"]["replicas"] == 4 and "HorizontalPodAutoscaler" not in fixed.kinds()
    pdb = default.get("PodDisruptionBudget")["spec"]
    assert pdb["maxUnavailable"] == 1
    assert pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"  # pods unready for want of workers do not block drains
    assert _selects(pdb["selector"]["matchLabels"], default.pod["metadata"]["labels"])
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


def test_the_service_monitor_scrapes_every_pod_as_the_dashboards_job(production: Release) -> None:
    monitor, service = production.get("ServiceMonitor"), production.get("Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert _selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["inference"]}
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]} and endpoint["path"] == "/metrics"
    # Prometheus Operator names the job after this Service label: the job the Grafana dashboard selects by default,
    # whatever the release is called ("gw" here).
    job = service["metadata"]["labels"][monitor["spec"]["jobLabel"]]
    variables = {variable["name"]: variable for variable in load_dashboard()["templating"]["list"]}
    assert job == variables["job"]["current"]["value"] == "tollgate"
    assert _selects(service["spec"]["selector"], production.pod["metadata"]["labels"])
    # Scrapes send the metrics token from the Secret the pods read it from.
    assert endpoint["authorization"] == {
        "type": "Bearer",
        "credentials": {"name": "tollgate-secrets", "key": "metrics-token"},
    }


def test_the_service_monitor_sends_a_metrics_token_only_where_there_is_one() -> None:
    def endpoint(values: dict[str, Any]) -> dict[str, Any]:
        [endpoint] = Release({"serviceMonitor": {"enabled": True}, **values}).get("ServiceMonitor")["spec"]["endpoints"]
        return endpoint

    assert "authorization" not in endpoint({})
    assert "authorization" not in endpoint({"existingSecret": "mine"})
    own = endpoint({"config": {"metrics": {"token": "q" * 32}}})
    assert own["authorization"]["credentials"] == {"name": "tollgate", "key": "metrics-token"}
    with pytest.raises(_helm().HelmRenderError, match="Prometheus Operator reads the Secret"):
        Release(
            {"serviceMonitor": {"enabled": True, "namespace": "monitoring"}, "config": {"metrics": {"token": "q" * 32}}}
        )


def test_the_network_policy_lets_in_the_given_peers_and_out_to_dns_redis_and_workers(production: Release) -> None:
    policy = production.get("NetworkPolicy")["spec"]
    assert _selects(policy["podSelector"]["matchLabels"], production.pod["metadata"]["labels"])
    [ingress] = policy["ingress"]
    assert ingress["from"] == PRODUCTION_VALUES["networkPolicy"]["ingressFrom"]
    assert ingress["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert _egress_ports(policy) == {(53, "UDP"), (53, "TCP"), (6380, "TCP"), (8000, "TCP"), (443, "TCP")}
    # With the chart's own Secret, the Redis port comes from the URL; the workers' from theirs.
    values = {
        "networkPolicy": {"enabled": True},
        "config": {"redis": {"url": "redis://r:7000/0"}, "pools": {"fp8": {"workers": [{"url": "http://w:9000"}]}}},
    }
    assert _egress_ports(Release(values).get("NetworkPolicy")["spec"]) == {
        (53, "UDP"), (53, "TCP"), (7000, "TCP"), (8000, "TCP"), (9000, "TCP")
    }  # fmt: skip
    assert (
        "Egress"
        not in Release({"networkPolicy": {"enabled": True, "egressRestricted": False}}).get("NetworkPolicy")["spec"][
            "policyTypes"
        ]
    )


def test_topology_spread_selects_the_releases_pods(production: Release) -> None:
    constraints = production.pod["spec"]["topologySpreadConstraints"]
    assert [c["topologyKey"] for c in constraints] == ["topology.kubernetes.io/zone", "kubernetes.io/hostname"]
    for constraint in constraints:
        assert _selects(constraint["labelSelector"]["matchLabels"], production.pod["metadata"]["labels"])


def test_the_notes_say_how_to_reach_it_and_make_a_key(default: Release) -> None:
    assert "port-forward svc/tollgate 8080:80" in default.notes
    assert "tollgate keys create --tenant" in default.notes
    assert "admin API (/admin/v1) is off" in default.notes
    assert "admin API" not in Release({"config": {"admin": {"token": "k" * 32}}}).notes


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    leaves = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and key != "tenants":
            leaves.update(_leaves(value, path + "."))
        else:
            leaves[path] = value
    return leaves


def _environment_for(config: Mapping[str, Any]) -> dict[str, str]:
    """The chart's departures from the default file, as TOLLGATE_* variables."""
    environment = {
        "TOLLGATE_SERVER__HOST": config["server"]["host"],
        "TOLLGATE_REDIS__URL": config["redis"]["url"],
        "TOLLGATE_LEDGER__SPOOL_DIR": config["ledger"]["spool_dir"],
    }
    for pool, settings in config["pools"].items():
        environment[f"TOLLGATE_POOLS__{pool.upper()}__WORKERS"] = ",".join(settings["workers"])
    return environment


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def _egress_ports(policy: Mapping[str, Any]) -> set[tuple[int, str]]:
    return {(int(port["port"]), port["protocol"]) for rule in policy["egress"] for port in rule["ports"]}


def test_values_that_would_deploy_something_else_than_they_say_are_refused() -> None:
    render_error = _helm().HelmRenderError
    cases = {
        "set TOLLGATE_ROUTING__RETRIES under config": {
            "extraEnv": [{"name": "TOLLGATE_ROUTING__RETRIES", "value": "9"}]
        },
        "put the admin and metrics tokens in that Secret": {
            "existingSecret": "mine",
            "config": {"admin": {"token": "k" * 32}},
        },
        "give a CPU or memory target or metrics": {"autoscaling": {"targetCPUUtilizationPercentage": None}},
    }
    for message, values in cases.items():
        with pytest.raises(render_error, match=message):
            Release(values)
    # An integer past what Helm's float64 values keep exactly is refused before it can change on its way.
    with pytest.raises(_helm().HelmValuesError, match="/config/budgets/default_monthly_nano_usd"):
        Release({"config": {"budgets": {"default_monthly_nano_usd": 2**53 + 2}}})


def test_a_recreate_strategy_carries_no_rolling_update_and_files_can_be_mounted() -> None:
    release = Release(
        {
            "strategy": {"type": "Recreate"},
            "extraVolumes": [{"name": "templates", "configMap": {"name": "chat-templates"}}],
            "extraVolumeMounts": [{"name": "templates", "mountPath": "/etc/templates", "readOnly": True}],
            "tmpSizeLimit": "1Gi",
        }
    )
    assert release.get("Deployment")["spec"]["strategy"] == {"type": "Recreate"}
    volumes = {volume["name"]: volume for volume in release.pod["spec"]["volumes"]}
    assert (
        volumes["templates"]["configMap"] == {"name": "chat-templates"}
        and volumes["tmp"]["emptyDir"]["sizeLimit"] == "1Gi"
    )
    assert {"name": "templates", "mountPath": "/etc/templates", "readOnly": True} in release.container["volumeMounts"]
    for manifest in release.manifests:
        kubernetes_validate.validate(manifest, KUBERNETES_VERSIONS[-1], strict=True)
