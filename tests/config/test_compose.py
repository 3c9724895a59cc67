"""docker-compose.yml, without a Docker engine: it is valid against the Compose Specification's schema (as vendored by
``check-jsonschema``), the gateway's environment is a valid Tollgate configuration whose pools are the compose
workers, Prometheus scrapes the services by the names and ports compose gives them, and Grafana gets the
provisioning and the dashboard the Helm chart ships."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from config import load_settings
from tests.grafana import DASHBOARD_PATH, REPO_ROOT

COMPOSE = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
SERVICES: dict[str, Any] = COMPOSE["services"]
PROMETHEUS = yaml.safe_load((REPO_ROOT / "config" / "prometheus" / "prometheus.yml").read_text(encoding="utf-8"))


def bind_mounts(service: str) -> dict[str, Path]:
    """A service's bind mounts (``./host:/container[:ro]``): container path → host path in the repository."""
    mounts = {}
    for volume in SERVICES[service].get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("./"):
            mounts[target] = REPO_ROOT / source
    return mounts


def check_compose_spec(path: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def test_the_compose_file_is_valid_against_the_compose_specification(tmp_path: Path) -> None:
    checked = check_compose_spec(REPO_ROOT / "docker-compose.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # The check can fail: a misspelt key and a depends_on condition compose does not know.
    text = (REPO_ROOT / "docker-compose.yml").read_text(encoding="utf-8")
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text.replace("stop_grace_period:", "stop_grace_periode:"), encoding="utf-8")
    assert "'stop_grace_periode' was unexpected" in check_compose_spec(broken).stdout
    broken.write_text(text.replace("service_healthy", "service_ready"), encoding="utf-8")
    assert check_compose_spec(broken).returncode == 1


def test_the_gateway_environment_is_a_valid_configuration_over_the_compose_workers() -> None:
    environment = {name: str(value) for name, value in SERVICES["gateway"]["environment"].items()}
    token = environment["TOLLGATE_ADMIN__TOKEN"]
    assert re.fullmatch(r"\$\{TOLLGATE_ADMIN_TOKEN:\?.+\}", token)  # never a default secret
    environment["TOLLGATE_ADMIN__TOKEN"] = "x" * 32
    settings = load_settings(REPO_ROOT / "config" / "tollgate.yaml", environment)
    workers = {service for service in SERVICES if service.startswith("worker-")}
    for pool in settings.pools.values():
        assert {worker.url for worker in pool.workers} == {f"http://{name}:8000" for name in workers}
    for name in workers:
        assert "--port=8000" in SERVICES[name]["command"] and "--host=0.0.0.0" in SERVICES[name]["command"]
    assert settings.redis.url == "redis://redis:6379/0" and "redis" in SERVICES
    assert SERVICES["gateway"]["ports"] == ["8080:8080"]  # the image serves on 8080 (Dockerfile)
    assert set(SERVICES["gateway"]["depends_on"]) == {"redis", *workers}


def test_redis_keeps_every_acknowledged_bill_on_a_volume_and_never_evicts() -> None:
    redis = SERVICES["redis"]
    options = dict(zip(redis["command"][1::2], redis["command"][2::2], strict=True))
    assert options == {"--appendonly": "yes", "--appendfsync": "always", "--maxmemory-policy": "noeviction"}
    assert any(volume.endswith(":/data") for volume in redis["volumes"])


def test_prometheus_scrapes_compose_services_at_their_ports() -> None:
    assert bind_mounts("prometheus") == {
        "/etc/prometheus/prometheus.yml": REPO_ROOT / "config/prometheus/prometheus.yml"
    }
    for job in PROMETHEUS["scrape_configs"]:
        for config in job["static_configs"]:
            for target in config["targets"]:
                host, port = target.split(":")
                assert host in SERVICES, target
                expected = "8080" if host == "gateway" else "8000"
                assert port == expected, target


def test_prometheus_and_grafana_listen_on_the_host_only() -> None:
    for service in ("prometheus", "grafana"):  # they show every tenant's spend
        assert all(port.startswith("127.0.0.1:") for port in SERVICES[service]["ports"]), service


def test_grafana_gets_the_provisioning_and_the_charts_dashboard() -> None:
    mounts = bind_mounts("grafana")
    assert mounts["/etc/grafana/provisioning"] == REPO_ROOT / "config" / "grafana" / "provisioning"
    dashboards = mounts["/var/lib/grafana/dashboards"]
    assert dashboards == DASHBOARD_PATH.parent and DASHBOARD_PATH.exists()
    home = SERVICES["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == "/var/lib/grafana/dashboards/" + DASHBOARD_PATH.name
    for path in mounts.values():
        assert path.exists(), path


def test_the_tollgate_services_share_one_image_built_from_the_dockerfile() -> None:
    tollgate = [name for name, service in SERVICES.items() if service.get("image") == "tollgate:local"]
    assert set(tollgate) == {"gateway", "worker-1", "worker-2"}
    assert all(SERVICES[name]["build"] == "." for name in tollgate)
    dockerfile = (REPO_ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert "USER tollgate" in dockerfile and "HEALTHCHECK" in dockerfile and "EXPOSE 8080" in dockerfile


def test_the_gateway_gets_time_to_drain_before_compose_kills_it() -> None:
    settings = load_settings(REPO_ROOT / "config" / "tollgate.yaml", {})
    grace = SERVICES["gateway"]["stop_grace_period"]
    assert grace.endswith("s")
    # tollgate serve gives uvicorn the drain, the hang-up drain and 5 s (gateway/cli.py); compose must wait longer.
    assert int(grace[:-1]) > settings.server.drain_seconds + settings.upstream.hang_up_drain_seconds + 5
