"""Metrics and access logs through the real routes: requests by route, model and status class; billed tokens and
money equal to the ledger's; latency histograms; refusals; workers; Redis errors; bounded labels; log lines."""

from __future__ import annotations

import asyncio
import json
import logging
import logging.config
import tempfile
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from billing import DurableLedger, KeyLimits, Ledger, Retention, Spool, Tokenizer
from config import LoggingSettings, WorkerSettings
from gateway._processes import free_port
from gateway.logs import ACCESS_LOGGER, logging_config
from gateway.observe import GatewayMetrics, ProcessSampler, route_label
from gateway.route import WorkerPool
from tests.conftest import (
    FP8_MODEL,
    MODEL,
    TENANT,
    Gateway,
    SimWorker,
    gateway_for,
    make_settings,
    sim_worker,
    wait_for,
)
from tests.grafana import DASHBOARD_PATH, GATEWAY_METRIC_LABELS, GATEWAY_METRIC_NAMES, dashboard_metric_names
from tests.promtext import Sample, label_values, samples, total

CHAT = {"messages": [{"role": "user", "content": "Name three rivers."}], "max_tokens": 20}
ROUTES = {"native", "openai_chat", "openai_completions", "models", "usage", "admin", "dashboard", "health", "metrics"}


async def scrape_until(gateway: Gateway, name: str, count: float) -> list[Sample]:
    """A live server records a request's metrics just after its last byte (and its bill): scrape until ``name``
    sums to ``count``."""
    for _ in range(100):
        page = await scrape(gateway)
        if total(page, name) >= count:
            return page
        await asyncio.sleep(0.02)
    return page


async def scrape(gateway: Gateway) -> list[Sample]:
    response = await gateway.client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return samples(response.text)


@pytest.mark.parametrize(
    ("path", "label"),
    [
        ("/client/v4/accounts/a/ai/run/@cf/meta/llama-3.1-8b-instruct", "native"),
        ("/accounts/a/ai/run/anything/at/all", "native"),
        ("/client/v4/accounts/a/ai/v1/chat/completions", "openai_chat"),
        ("/v1/chat/completions", "openai_chat"),
        ("/v1/completions", "openai_completions"),
        ("/v1/models/@cf/meta/llama-3.1-8b-instruct", "models"),
        ("/client/v4/accounts/a/ai/usage", "usage"),
        ("/accounts/a/ai/budget", "usage"),
        ("/client/v4/user/tokens/verify", "usage"),
        ("/admin/v1/keys/abc", "admin"),
        ("/dashboard", "dashboard"),
        ("/dashboard/static/dashboard.js", "dashboard"),
        ("/healthz", "health"),
        ("/readyz", "health"),
        ("/metrics", "metrics"),
        ("/", "other"),
        ("/wp-login.php", "other"),
        ("/v1/chat/completions/../../etc", "openai_chat"),
        ("/metrics/x", "other"),
    ],
)
def test_every_path_gets_one_of_a_fixed_set_of_route_labels(path: str, label: str) -> None:
    assert route_label(path) == label
    assert label in ROUTES | {"other"}


async def test_requests_are_counted_by_route_model_and_status_class(gateway: Gateway) -> None:
    assert (await gateway.run(CHAT)).status_code == 200
    assert (await gateway.run({"messages": "not a list"})).status_code == 400
    assert (await gateway.run(CHAT, model="@cf/none/such")).status_code == 400
    assert (
        await gateway.client.post("/v1/chat/completions", json={"model": MODEL, **CHAT}, headers=gateway.auth)
    ).status_code == 200
    assert (await gateway.client.get("/nowhere")).status_code == 404
    assert (await gateway.client.get("/healthz")).status_code == 200

    page = await scrape(gateway)
    name = "tollgate_requests_total"
    assert total(page, name, route="native", model=MODEL, status_class="2xx") == 1
    assert total(page, name, route="native", model=MODEL, status_class="4xx") == 1
    assert total(page, name, route="native", model="", status_class="4xx") == 1  # a model that is not configured
    assert total(page, name, route="openai_chat", model=MODEL, status_class="2xx") == 1
    assert total(page, name, route="other", status_class="4xx") == 1
    assert total(page, name, route="health", status_class="2xx") == 1
    assert label_values(page, name, "model") <= {MODEL, FP8_MODEL, ""}
    assert total(page, "tollgate_request_duration_seconds_count", route="native") == 3
    assert total(page, "tollgate_requests_in_flight", route="native") == 0
    assert total(page, "tollgate_requests_in_flight", route="metrics") == 1  # this scrape


async def test_billed_tokens_and_money_equal_the_ledger(gateway: Gateway) -> None:
    for body, model in [(CHAT, MODEL), ({**CHAT, "stream": True}, MODEL), (CHAT, FP8_MODEL), ({"prompt": "Hi"}, MODEL)]:
        response = await gateway.run(body, model=model)
        assert response.status_code == 200
        await response.aread()
    assert (await gateway.run({**CHAT, "max_tokens": 7_968})).status_code == 413  # refused: costs nothing

    report = await gateway.client.get(
        f"/client/v4/accounts/{TENANT}/ai/usage",
        params={"granularity": "day", "group_by": "model"},
        headers=gateway.auth,
    )
    ledger: dict[str, Any] = {}
    for bucket in report.json()["result"]["data"]:
        for result in bucket["results"]:
            if result["requests"]:
                ledger[result["model"]] = result
    assert set(ledger) == {MODEL, FP8_MODEL}

    page = await scrape(gateway)
    for model, counters in ledger.items():
        assert total(page, "tollgate_prompt_tokens_total", model=model) == counters["prompt_tokens"]
        assert total(page, "tollgate_completion_tokens_total", model=model) == counters["completion_tokens"]
        assert total(page, "tollgate_cost_nano_usd_total", model=model) == counters["cost_nano_usd"]
        assert total(page, "tollgate_billed_requests_total", model=model, outcome="ok") == counters["requests"]
    assert label_values(page, "tollgate_cost_nano_usd_total", "tenant") == {"other"}  # no allow-list: no tenant ids


async def test_streams_observe_the_time_to_first_token_and_what_the_gateway_added(
    redis: Redis, redis_url: str, tokenizer: Tokenizer
) -> None:
    async with (
        sim_worker(tokenizer, tokens_per_second=100, time_to_first_token_seconds=0.02, completion_tokens=12) as slow,
        gateway_for(redis_url, tokenizer, [slow.url], live=True) as gw,
    ):
        body = {**CHAT, "stream": True}
        async with gw.client.stream("POST", gw.run_path(), json=body, headers=gw.auth) as stream:
            assert stream.status_code == 200
            in_flight = total(await scrape(gw), "tollgate_streams_in_flight", model=MODEL)
            await stream.aread()
        assert (await gw.run(CHAT)).status_code == 200
        page = await scrape_until(gw, "tollgate_gateway_added_latency_seconds_count", 2)  # recorded after the bill
    assert in_flight == 1
    assert total(page, "tollgate_time_to_first_token_seconds_count", route="native", model=MODEL) == 1  # streams only
    assert total(page, "tollgate_gateway_added_latency_seconds_count", route="native", model=MODEL) == 2
    added = total(page, "tollgate_gateway_added_latency_seconds_sum", route="native")
    first_token = total(page, "tollgate_time_to_first_token_seconds_sum", route="native")
    assert 0 < added < first_token  # the worker's own 20 ms to the first token are not the gateway's
    assert total(page, "tollgate_streams_in_flight", model=MODEL) == 0


async def test_rate_limit_and_budget_refusals_are_counted_by_reason(gateway: Gateway) -> None:
    limited = await gateway.deps.keys.create(TENANT, "one a minute", limits=KeyLimits(requests_per_minute=1))
    poor = await gateway.deps.keys.create(TENANT, "a nano-dollar", monthly_budget_nano_usd=1)
    path = gateway.run_path()
    for key, statuses in [(limited, [200, 429, 429]), (poor, [429])]:
        for status in statuses:
            response = await gateway.client.post(path, json=CHAT, headers={"Authorization": f"Bearer {key.secret_key}"})
            assert response.status_code == status

    page = await scrape(gateway)
    assert total(page, "tollgate_refusals_total", model=MODEL, reason="requests_per_minute") == 2
    assert total(page, "tollgate_refusals_total", model=MODEL, reason="budget_key") == 1
    assert total(page, "tollgate_billed_requests_total") == 1  # refusals are never billed


async def test_allow_listed_tenants_get_their_own_label_and_keys_never_appear(
    redis: Redis, redis_url: str, tokenizer: Tokenizer, worker: SimWorker
) -> None:
    async with gateway_for(redis_url, tokenizer, [worker.url], TOLLGATE_METRICS__TENANT_LABELS=TENANT) as gw:
        other = await gw.deps.keys.create("acct-other", "elsewhere")
        assert (await gw.run(CHAT)).status_code == 200
        other_path = gw.run_path(account="acct-other")
        headers = {"Authorization": f"Bearer {other.secret_key}"}
        assert (await gw.client.post(other_path, json=CHAT, headers=headers)).status_code == 200
        text = (await gw.client.get("/metrics")).text
    page = samples(text)
    assert label_values(page, "tollgate_prompt_tokens_total", "tenant") == {TENANT, "other"}
    assert total(page, "tollgate_billed_requests_total", tenant=TENANT) == 1
    assert total(page, "tollgate_billed_requests_total", tenant="other") == 1
    for secret in (gw.key.secret_key, gw.key.record.key_id, other.secret_key, other.record.key_id, "acct-other"):
        assert secret not in text


async def test_worker_state_and_ejections_are_published(
    redis: Redis, redis_url: str, tokenizer: Tokenizer, worker: SimWorker
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    async with gateway_for(redis_url, tokenizer, [dead, worker.url]) as gw:
        for _ in range(20):  # the pool picks by load: soon one request tries the dead worker, then another
            assert (await gw.run(CHAT)).status_code == 200
            page = await scrape(gw)
            if total(page, "tollgate_worker_ejections_total", pool="bf16", worker=dead):
                break
    assert total(page, "tollgate_worker_ejections_total", pool="bf16", worker=dead) == 1
    assert total(page, "tollgate_worker_up", pool="bf16", worker=dead) == 0
    assert total(page, "tollgate_worker_up", pool="bf16", worker=worker.url) == 1
    assert total(page, "tollgate_worker_in_flight", pool="bf16") == 0
    assert total(page, "tollgate_upstream_retries_total", pool="bf16") == 1


async def test_redis_errors_are_counted_by_operation(redis_url: str, tokenizer: Tokenizer, worker: SimWorker) -> None:
    down = f"redis://127.0.0.1:{free_port()}/0"
    async with gateway_for(down, tokenizer, [worker.url], skip_key=True, TOLLGATE_REDIS__RETRIES="0") as gw:
        response = await gw.client.post(
            gw.run_path(), json=CHAT, headers={"Authorization": "Bearer tg_" + "a" * 12 + "_" + "b" * 43}
        )
        assert response.status_code == 503
        page = await scrape(gw)
    assert total(page, "tollgate_redis_errors_total", operation="auth") == 1


async def test_each_request_writes_one_access_log_line_with_its_facts_and_no_secret(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    response = await gateway.run({**CHAT, "stream": True})
    await response.aread()
    refused = await gateway.client.post(gateway.run_path(), json=CHAT, headers={"Authorization": "Bearer tg_wrong"})
    assert refused.status_code == 401

    lines = [record for record in caplog.records if record.name == ACCESS_LOGGER]
    assert len(lines) == 2
    served, denied = (vars(record) for record in lines)
    usage = [event for event in _events(response.text) if isinstance(event, dict) and "usage" in event][-1]["usage"]
    assert served["request_id"] == response.headers["x-request-id"]
    assert (served["status"], served["outcome"], served["route"], served["stream"]) == (200, "ok", "native", True)
    assert (served["tenant"], served["key_id"], served["model"]) == (TENANT, gateway.key.record.key_id, MODEL)
    assert served["prompt_tokens"] == usage["prompt_tokens"]
    assert served["completion_tokens"] == usage["completion_tokens"]
    assert served["cost_nano_usd"] == usage["cost_nano_usd"]
    assert served["worker"] and 0 < served["time_to_first_token_ms"] <= served["duration_ms"]
    assert (denied["status"], denied["error_code"], denied["tenant"], denied["prompt_tokens"]) == (
        401,
        10000,
        None,
        None,
    )
    for record in caplog.records:
        text = record.getMessage() + json.dumps(vars(record), default=str)
        assert gateway.key.secret_key not in text and "tg_wrong" not in text and "Bearer" not in text


def test_json_logs_are_one_object_per_line_with_the_record_fields() -> None:
    config = logging_config(LoggingSettings(format="json", level="warning"))
    formatter = logging.config.DictConfigurator(config).configure_formatter(config["formatters"]["default"])
    record = logging.LogRecord(ACCESS_LOGGER, logging.INFO, __file__, 1, "POST /x 200", None, None)
    record.request_id, record.prompt_tokens = "abc", 12
    record.color_message = "\x1b[32mPOST\x1b[0m %s"  # uvicorn's coloured copy: noise in a log collector
    line = json.loads(formatter.format(record))
    assert "color_message" not in line
    assert line["level"] == "INFO" and line["logger"] == ACCESS_LOGGER and line["message"] == "POST /x 200"
    assert line["request_id"] == "abc" and line["prompt_tokens"] == 12 and line["time"].startswith("20")
    assert config["root"]["level"] == "WARNING" and config["loggers"][ACCESS_LOGGER]["level"] == "INFO"
    quiet = logging_config(LoggingSettings(access_log=False))
    assert quiet["loggers"][ACCESS_LOGGER]["level"] == "CRITICAL"


def _events(text: str) -> list[Any]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


async def test_the_grafana_dashboard_queries_only_what_the_gateway_exports(gateway: Gateway) -> None:
    assert (await gateway.run({**CHAT, "stream": True})).status_code == 200
    text = (await gateway.client.get("/metrics")).text
    exported: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):  # labelled families with no series yet still have a type
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        for suffix in suffixes:
            exported[family.name + suffix] = set()
        for sample in family.samples:
            exported.setdefault(sample.name, set()).update(sample.labels)
    exported = {name: labels for name, labels in exported.items() if not name.endswith("_created")}
    assert set(exported) == GATEWAY_METRIC_NAMES
    for name, labels in exported.items():
        assert labels <= GATEWAY_METRIC_LABELS[name], name
    assert dashboard_metric_names(DASHBOARD_PATH) <= set(exported)


async def test_a_client_that_leaves_before_the_answer_is_counted_as_499_not_as_a_gateway_error(
    redis: Redis, redis_url: str, tokenizer: Tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with (
        sim_worker(tokenizer, tokens_per_second=20, time_to_first_token_seconds=0, completion_tokens=40) as slow,
        gateway_for(redis_url, tokenizer, [slow.url], live=True) as gw,
    ):
        with pytest.raises(httpx.ReadTimeout):
            await gw.client.post(gw.run_path(), json=CHAT, headers=gw.auth, timeout=0.3)
        await wait_for(lambda: any(record.name == ACCESS_LOGGER for record in caplog.records), timeout_seconds=5)
        page = await scrape(gw)
    [line] = [vars(record) for record in caplog.records if record.name == ACCESS_LOGGER and "/ai/run/" in record.path]
    assert (line["status"], line["outcome"]) == (499, "client_disconnected")
    assert total(page, "tollgate_requests_total", route="native", status_class="4xx") == 1
    assert total(page, "tollgate_requests_total", route="native", status_class="5xx") == 0
    assert total(page, "tollgate_billed_requests_total", outcome="client_disconnected") == 1


async def test_a_text_log_line_cannot_be_forged_through_the_path(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    assert (await gateway.client.get("/x%0A2026-01-01 INFO forged%1B[31m")).status_code == 404
    [line] = [record for record in caplog.records if record.name == ACCESS_LOGGER]
    assert line.path == "/x\n2026-01-01 INFO forged\x1b[31m"  # the structured field keeps it (JSON escapes it)
    message = line.getMessage()
    assert "\n" not in message and "\x1b" not in message and "/x\\x0a2026-01-01 INFO forged\\x1b[31m" in message


def test_a_worker_removed_from_its_pool_leaves_the_metrics(tokenizer: Tokenizer) -> None:
    settings = make_settings("redis://127.0.0.1:9/0", ["http://a:8000", "http://b:8000"])
    metrics = GatewayMetrics(CollectorRegistry())
    pool = WorkerPool("bf16", settings.pools["bf16"].workers, settings.routing)
    ledger = Ledger(Redis.from_url("redis://127.0.0.1:9/0"), Retention())
    durable = DurableLedger(ledger, Spool(Path(tempfile.mkdtemp())), replay_interval_seconds=1)
    sampler = ProcessSampler(metrics, {"bf16": pool}, durable, interval_seconds=1)
    sampler.sample()
    assert label_values(samples(metrics.exposition().decode()), "tollgate_worker_up", "worker") == {
        "http://a:8000",
        "http://b:8000",
    }
    pool.reload([WorkerSettings(url="http://a:8000")])
    sampler.sample()
    page = samples(metrics.exposition().decode())
    assert label_values(page, "tollgate_worker_up", "worker") == {"http://a:8000"}
    assert label_values(page, "tollgate_worker_in_flight", "worker") == {"http://a:8000"}


async def test_error_and_refusal_series_start_at_zero(gateway: Gateway) -> None:
    page = await scrape(gateway)
    reasons = {"requests_per_minute", "tokens_per_minute", "concurrent_streams", "budget_key", "budget_tenant"}
    for model in (MODEL, FP8_MODEL):
        found = {
            labels["reason"]
            for name, labels, value in page
            if name == "tollgate_refusals_total" and labels["model"] == model and value == 0
        }
        assert found == reasons, model
    zeros = {(name, tuple(sorted(labels.items()))) for name, labels, value in page if value == 0}
    assert ("tollgate_redis_errors_total", (("operation", "bill"),)) in zeros
    assert ("tollgate_routing_refusals_total", (("pool", "fp8"), ("reason", "no_worker"))) in zeros
    assert ("tollgate_token_count_mismatches_total", (("kind", "prompt"), ("model", MODEL))) in zeros


async def test_a_metrics_token_keeps_metrics_to_its_bearer(redis: Redis, redis_url: str, tokenizer: Tokenizer) -> None:
    token = "m" * 40
    async with gateway_for(redis_url, tokenizer, ["http://127.0.0.1:9"], TOLLGATE_METRICS__TOKEN=token) as gateway:
        for headers in ({}, {"Authorization": "Bearer " + "m" * 39}, gateway.auth, {"Authorization": token}):
            refused = await gateway.client.get("/metrics", headers=headers)
            assert refused.status_code == 401, headers
            assert refused.json()["errors"][0]["code"] == 10000 and "tollgate_" not in refused.text
        allowed = await gateway.client.get("/metrics", headers={"Authorization": "Bearer " + token})
        assert allowed.status_code == 200 and "tollgate_requests_total" in allowed.text
        assert (await gateway.client.get("/healthz")).status_code == 200  # probes need no token
