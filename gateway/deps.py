"""The gateway's dependencies: everything a request needs, built once from the settings."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import CollectorRegistry
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError, TimeoutError as RedisTimeoutError

from billing import (
    Budgets,
    DurableLedger,
    JinjaChatTemplate,
    KeyStore,
    Ledger,
    Limiter,
    PromptCounter,
    Retention,
    Spool,
    Tokenizer,
)
from config import ModelSettings, PoolSettings, Settings
from gateway._transport import WorkerTransport
from gateway.auth import Authenticator
from gateway.health import PoolMonitor
from gateway.lifecycle import Drain, PoolReloader
from gateway.observe import GatewayMetrics, ProcessSampler, SpoolCollector
from gateway.openai_compat import OpenAiSchemas
from gateway.route import WorkerPool
from gateway.validate import InputSchema, special_token_pattern

logger = logging.getLogger(__name__)


class PendingBills:
    """Bills being written, each in a task of its own, so that neither a client disconnect nor the server's
    shutdown cancelling a request can stop one half-way; shutdown waits for them before it closes Redis."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, bill: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(bill)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain(self, timeout_seconds: float) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_seconds)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Dependencies:
    """What ``create_app`` hands every request through ``app.state.deps``; closed by :meth:`aclose`."""

    settings: Settings
    http: httpx.AsyncClient
    redis: Redis
    keys: KeyStore
    auth: Authenticator
    ledger: Ledger
    durable_ledger: DurableLedger  # the bill step's ledger: spools what cannot reach Redis, replays it later
    budgets: Budgets
    limiter: Limiter  # admission: Redis time, budgets and rate limits in one round trip
    tokenizer: Tokenizer
    counters: Mapping[str, PromptCounter]  # per model: its workers' chat template + the tokenizer
    metrics: GatewayMetrics
    sampler: ProcessSampler  # publishes this process's view of the workers and its spool counts to the metrics
    schemas: Mapping[str, InputSchema]
    openai_schemas: OpenAiSchemas  # the OpenAI-compatible routes' request schemas
    forbidden_text: re.Pattern[str] | None  # special-token text refused in chat content (validation.special_tokens)
    pools: Mapping[str, WorkerPool]
    monitor: PoolMonitor  # health, catalog and load of every worker, in the background
    reloader: PoolReloader  # pool changes in the configuration, applied while running
    drain: Drain  # the requests in flight, ended cleanly at the drain deadline on shutdown
    clock: Callable[[], float] = time.time
    bills: PendingBills = dataclasses.field(default_factory=PendingBills)

    def start(self) -> None:
        """Start background work (replaying bills spooled by an earlier run, worker checks, pool reloads) and take
        part in the process's shutdown; needs the running event loop."""
        self.durable_ledger.start()
        self.monitor.start()
        self.sampler.start()
        self.reloader.start()
        self.drain.register()

    async def aclose(self) -> None:
        self.drain.unregister()
        await self.reloader.aclose()
        await self.monitor.aclose()
        await self.bills.drain(timeout_seconds=30)
        await self.durable_ledger.aclose()
        await self.sampler.aclose()  # after the spool's last replay, so that its counts are published
        await self.http.aclose()
        await self.redis.aclose()


def build_redis(settings: Settings) -> Redis:
    """A Redis client with explicit timeouts and retry policy (redis-py's defaults differ between majors).

    The pool blocks (up to the socket timeout) when all ``max_connections`` are busy: redis-py's default pool
    raises ``MaxConnectionsError`` instead, which would fail requests under a burst.
    """
    config = settings.redis
    pool = BlockingConnectionPool.from_url(
        config.url,
        max_connections=config.max_connections,
        timeout=config.socket_timeout_seconds,
        socket_timeout=config.socket_timeout_seconds,
        socket_connect_timeout=config.connect_timeout_seconds,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), config.retries),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        health_check_interval=30,
    )
    return Redis(connection_pool=pool)


def build_http_client(settings: Settings) -> httpx.AsyncClient:
    """The pooled client for worker calls, on :class:`WorkerTransport` (the hot path's own transport).
    ``trust_env=False``: no proxy variables on the path to the workers."""
    config = settings.upstream
    timeout = httpx.Timeout(
        connect=config.connect_timeout_seconds,
        read=config.between_tokens_timeout_seconds,
        write=config.between_tokens_timeout_seconds,
        pool=config.connect_timeout_seconds,
    )
    transport = WorkerTransport(
        max_connections=config.max_connections, max_keepalive_connections=config.max_keepalive_connections
    )
    return httpx.AsyncClient(transport=transport, timeout=timeout, trust_env=False)


def build_check_client(settings: Settings) -> httpx.AsyncClient:
    """The background checks' own small client: never queued behind requests for the workers' connections."""
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    timeout = httpx.Timeout(settings.routing.health_timeout_seconds)
    return httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False)


def build_dependencies(
    settings: Settings,
    *,
    tokenizer: Tokenizer | None = None,
    clock: Callable[[], float] = time.time,
    pool_source: Callable[[], Mapping[str, PoolSettings]] | None = None,
    metrics_dir: str | None = None,
) -> Dependencies:
    """Build every dependency from ``settings``. Loads the tokenizer and schemas; opens no connection yet.
    ``pool_source`` re-reads the configured pools for reloads (default: ``settings.pools`` never change).
    ``metrics_dir``: prometheus-client's multiprocess directory, when this is one of several processes serving one
    port (``PROMETHEUS_MULTIPROC_DIR``, which must then have been set before prometheus-client was imported)."""
    redis = build_redis(settings)
    keys = KeyStore(redis, clock=clock)
    ledger = Ledger(redis, retention_for(settings))
    if tokenizer is None:
        path = settings.tokenizer.path
        tokenizer = Tokenizer.from_file(Path(path)) if path else Tokenizer.default()
    durable_ledger = DurableLedger(
        ledger,
        Spool(Path(settings.ledger.spool_dir)),
        replay_interval_seconds=settings.ledger.spool_replay_interval_seconds,
    )
    http = build_http_client(settings)
    pools = {name: WorkerPool(name, pool.workers, settings.routing) for name, pool in settings.pools.items()}
    _warn_if_connections_run_short(settings)
    metrics = GatewayMetrics(
        CollectorRegistry(auto_describe=True),
        spool=SpoolCollector(durable_ledger),
        tenant_labels=settings.metrics.tenant_labels,
        multiprocess_dir=metrics_dir,
    )
    metrics.start_at_zero(settings.models, pools)
    return Dependencies(
        settings=settings,
        http=http,
        redis=redis,
        keys=keys,
        auth=Authenticator(
            keys,
            cache_ttl_seconds=settings.auth.cache_ttl_seconds,
            clock=clock,
            admin_token=settings.admin.token,
            stale_if_error_seconds=settings.auth.stale_if_error_seconds,
            on_redis_error=metrics.redis_errors.labels("auth").inc,
        ),
        ledger=ledger,
        durable_ledger=durable_ledger,
        budgets=Budgets(redis, default_monthly_nano_usd=settings.budgets.default_monthly_nano_usd or None),
        limiter=Limiter(redis, slot_ttl_seconds=settings.limits.slot_ttl_seconds),
        tokenizer=tokenizer,
        counters={name: _prompt_counter(tokenizer, model) for name, model in settings.models.items()},
        metrics=metrics,
        sampler=ProcessSampler(metrics, pools, durable_ledger, settings.metrics.sample_interval_seconds),
        schemas={name: InputSchema.from_file(model.input_schema_path) for name, model in settings.models.items()},
        openai_schemas=OpenAiSchemas.load(),
        forbidden_text=(
            special_token_pattern(tokenizer.special_tokens) if settings.validation.special_tokens == "reject" else None
        ),
        pools=pools,
        monitor=PoolMonitor(lambda: pools, build_check_client(settings), settings.routing, clock=time.monotonic),
        reloader=PoolReloader(
            pools, settings.pools, pool_source or (lambda: settings.pools), settings.routing.reload_interval_seconds
        ),
        drain=Drain(settings.server.drain_seconds),
        clock=clock,
    )


def _warn_if_connections_run_short(settings: Settings) -> None:
    """Every request in flight holds a connection to its worker: the pool of them should cover the workers' caps."""
    cap = settings.routing.max_in_flight_per_worker
    needed = cap * sum(len(pool.workers) for pool in settings.pools.values())
    if cap and needed > settings.upstream.max_connections:
        logger.warning(
            "upstream.max_connections (%d) is below the %d requests the pools' workers may have in flight "
            "(routing.max_in_flight_per_worker x workers): requests past it wait for a connection",
            settings.upstream.max_connections,
            needed,
        )


def retention_for(settings: Settings) -> Retention:
    """The ledger's retention, as the ``ledger:`` settings give it."""
    config = settings.ledger
    return Retention(
        seen_seconds=config.seen_ttl_seconds,
        events_seconds=config.events_retention_seconds,
        hourly_seconds=config.hourly_retention_seconds,
        daily_seconds=config.daily_retention_seconds,
    )


def _prompt_counter(tokenizer: Tokenizer, model: ModelSettings) -> PromptCounter:
    path = model.chat_template_path
    return PromptCounter(tokenizer, JinjaChatTemplate.from_file(path) if path is not None else None)
