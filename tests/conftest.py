"""Shared fixtures: a private redis-server, the tokenizer, settings, simulated workers and the app.

Redis is a real ``redis-server`` started once per run on a free port and flushed before each test that uses it;
a missing binary makes the fixture error, never skip. No test touches a Redis it did not start.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from redis.asyncio import BlockingConnectionPool, Redis
from starlette.types import ASGIApp

from billing import ApiKey, IssuedKey, Tokenizer, UsageRecord
from config import Settings, load_settings
from gateway import Dependencies, build_dependencies, create_app
from gateway._processes import free_port, redis_server as start_redis_server
from gateway.sim import Faults, SimConfig, create_sim_app

REPO = Path(__file__).resolve().parents[1]
MODEL = "@cf/meta/llama-3.1-8b-instruct"
FP8_MODEL = "@cf/meta/llama-3.1-8b-instruct-fp8"
BF16_NAME = "meta-llama/Llama-3.1-8B-Instruct"
FP8_NAME = "meta-llama/Llama-3.1-8B-Instruct-FP8"
TENANT = "acct-test"
# The tool of prompt-tokens.md example C, in the OpenAI shape the worker's template receives.
OPENAI_WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}}},
    },
}
# The same kind of tool as a client sends it to the native route (flat shape, with the required list).
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Get weather for a city",
    "parameters": {
        "type": "object",
        "required": ["city"],
        "properties": {"city": {"type": "string", "description": "City name"}},
    },
}


# The columns of a usage report's CSV (billing/reports.py), spelled out as a user's spreadsheet would expect them.
USAGE_CSV_COLUMNS = [
    "start",
    "end",
    "model",
    "tenant",
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost_nano_usd",
    "cost_usd",
    "errors",
]


def usage_record(request_id: str = "req-1", tenant: str = "acct-a", **changes: Any) -> UsageRecord:
    """A bill: 1,234 prompt and 567 completion tokens of the 8b model (816,130 nano-dollars at 280 and 830 per token),
    started 2025-11-22 02:00:00.5 UTC; ``changes`` replace any field. The cost follows the tokens unless given."""
    prompt = changes.get("prompt_tokens", 1234)
    completion = changes.get("completion_tokens", 567)
    record = UsageRecord(
        request_id=request_id,
        tenant=tenant,
        key_id="keyid",
        model=MODEL,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cost_nano_usd=280 * prompt + 830 * completion,
        status="ok",
        started_at=1_763_776_800.5,
        duration_seconds=1.25,
    )
    return dataclasses.replace(record, **changes)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with start_redis_server() as url:
        yield url


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis(connection_pool=BlockingConnectionPool.from_url(redis_url, max_connections=50, timeout=10))
    await client.flushall()  # our own private server, started by this test run
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.default()


def make_settings(redis_url: str, workers: list[str] | None = None, config: Path | None = None, **env: str) -> Settings:
    urls = ",".join(workers or ["http://127.0.0.1:9"])
    environ = {
        "TOLLGATE_REDIS__URL": redis_url,
        "TOLLGATE_LEDGER__SPOOL_DIR": tempfile.mkdtemp(prefix="tollgate-spool-"),
        "TOLLGATE_POOLS__BF16__WORKERS": urls,
        "TOLLGATE_POOLS__FP8__WORKERS": urls,
        **env,
    }
    return load_settings(config or REPO / "config" / "tollgate.yaml", environ)


@contextlib.asynccontextmanager
async def live_server(app: ASGIApp) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port, in this event loop."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on", log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@dataclasses.dataclass
class SimWorker:
    url: str
    app: Any

    @property
    def faults(self) -> Faults:
        return self.app.state.faults

    @property
    def served(self) -> list[dict[str, Any]]:
        return list(self.app.state.served)

    def record_for(self, request_id: str) -> dict[str, Any]:
        records = [record for record in self.app.state.served if record["request_id"] == request_id]
        assert len(records) == 1, f"{len(records)} records for {request_id}"
        return records[0]


@contextlib.asynccontextmanager
async def sim_worker(tokenizer: Tokenizer, **config: Any) -> AsyncIterator[SimWorker]:
    app = create_sim_app(SimConfig(served_model_names=(BF16_NAME, FP8_NAME), **config), tokenizer)
    async with live_server(app) as url:
        yield SimWorker(url, app)


@pytest.fixture
async def worker(tokenizer: Tokenizer) -> AsyncIterator[SimWorker]:
    """A fast simulated worker whose answers stop by themselves after 12 tokens (the end-of-turn token included)."""
    async with sim_worker(tokenizer, tokens_per_second=0, time_to_first_token_seconds=0, completion_tokens=12) as sim:
        yield sim


@dataclasses.dataclass
class Gateway:
    """A gateway under test: its HTTP client, dependencies and a key for :data:`TENANT`."""

    client: httpx.AsyncClient
    deps: Dependencies
    key: IssuedKey

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key.secret_key}"}

    def run_path(self, model: str = MODEL, account: str = TENANT) -> str:
        return f"/client/v4/accounts/{account}/ai/run/{model}"

    async def run(self, body: Mapping[str, Any], model: str = MODEL, **kwargs: Any) -> httpx.Response:
        return await self.client.post(self.run_path(model), json=body, headers=self.auth, **kwargs)


@contextlib.asynccontextmanager
async def gateway_for(
    redis_url: str,
    tokenizer: Tokenizer,
    workers: list[str],
    *,
    live: bool = False,
    http: httpx.AsyncClient | None = None,
    skip_key: bool = False,
    config: Path | None = None,
    **env: str,
) -> AsyncIterator[Gateway]:
    """A gateway in front of ``workers``: in process (``ASGITransport``) or, with ``live``, on a real socket.
    ``http`` replaces the client the gateway calls workers with (e.g. an ``httpx.MockTransport``); ``skip_key``
    creates no key (for a Redis that is down on purpose); ``config`` replaces the default YAML file."""
    settings = make_settings(redis_url, workers, config, **env)
    deps = build_dependencies(settings, tokenizer=tokenizer)
    if http is not None:
        await deps.http.aclose()
        deps = dataclasses.replace(deps, http=http)
    key = IssuedKey(ApiKey("none", TENANT, "", 0.0, False), "") if skip_key else await deps.keys.create(TENANT, "test")
    app = create_app(settings, deps)
    if live:
        async with live_server(app) as url, httpx.AsyncClient(base_url=url, timeout=30, trust_env=False) as client:
            yield Gateway(client, deps, key)
        return
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=30) as client:
        yield Gateway(client, deps, key)
    await deps.aclose()


@pytest.fixture
async def gateway(redis: Redis, redis_url: str, tokenizer: Tokenizer, worker: SimWorker) -> AsyncIterator[Gateway]:
    async with gateway_for(redis_url, tokenizer, [worker.url]) as gw:
        yield gw


async def wait_for(predicate: Any, timeout_seconds: float = 3.0) -> None:
    """Poll ``predicate`` until it is true; fail after ``timeout_seconds``."""
    deadline = asyncio.get_running_loop().time() + timeout_seconds
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def sse_events(text: str) -> list[Any]:
    """The data of every event of a server-sent-events body (Workers AI or OpenAI); ``[DONE]`` stays a string."""
    events = []
    for block in text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            data = block[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def content_tokens(served: Mapping[str, Any]) -> int:
    """Tokens a worker streamed as text: its completion tokens less the end-of-turn token, which vLLM counts."""
    return int(served["completion_tokens"]) - (served["finish_reason"] == "stop")
