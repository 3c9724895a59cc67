"""Routing (gateway/route.py) and worker checks (gateway/health.py) as units: power of two choices by load and
weight, capacity and the FIFO queue, the circuit breaker on a fake clock, catalogs and LoRA adapters, prefix
affinity, reloads, and the parsing of vLLM's ``/v1/models`` and ``/metrics``.

Randomness is a seeded ``random.Random`` and time a :class:`FakeClock`: nothing asserts on wall-clock time (one
queue timeout waits 0.05 s).
"""

from __future__ import annotations

import asyncio
import collections
import random
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from billing import Tokenizer
from config import RoutingSettings, WorkerSettings
from gateway.health import PoolMonitor, _parse_catalog, _parse_load
from gateway.route import (
    CapacityError,
    Catalog,
    Demand,
    Health,
    NoWorkerError,
    UnknownAdapterError,
    Worker,
    WorkerLoad,
    WorkerPool,
)
from tests.conftest import BF16_NAME, FP8_NAME, sim_worker

DEMAND = Demand("served-a", 4096)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_pool(
    *workers: str | WorkerSettings, clock: Callable[[], float] | None = None, seed: int = 0, **routing: Any
) -> WorkerPool:
    configs = [WorkerSettings(url=w) if isinstance(w, str) else w for w in workers]
    return WorkerPool("bf16", configs, RoutingSettings(**routing), clock=clock or FakeClock(), rng=random.Random(seed))


def by_url(pool: WorkerPool) -> dict[str, Worker]:
    return {worker.url: worker for worker in pool.workers}


async def take(pool: WorkerPool, demand: Demand = DEMAND, **kwargs: Any) -> Worker:
    return await pool.acquire(demand, timeout_seconds=kwargs.pop("timeout_seconds", 5.0), **kwargs)


async def take_and_release(pool: WorkerPool, demand: Demand = DEMAND) -> Worker:
    worker = await take(pool, demand)
    pool.release(worker)
    return worker


async def count_picks(pool: WorkerPool, n: int = 2000, demand: Demand = DEMAND) -> collections.Counter[str]:
    """Where ``n`` acquire/release pairs go (each pick sees the same in-flight counts)."""
    picks: collections.Counter[str] = collections.Counter()
    for _ in range(n):
        picks[(await take_and_release(pool, demand)).url] += 1
    return picks


async def queued(pool: WorkerPool, n: int) -> None:
    """Let tasks run until ``n`` requests wait in the pool's queue."""
    for _ in range(100):
        if pool.waiting == n:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{pool.waiting} waiting, expected {n}")


def spawn(pool: WorkerPool, demand: Demand = DEMAND, **kwargs: Any) -> asyncio.Task[Worker]:
    return asyncio.create_task(take(pool, demand, **kwargs))


def assert_idle(pool: WorkerPool) -> None:
    assert [w.in_flight for w in pool.workers] == [0] * len(pool.workers)
    assert pool.waiting == 0


# -- power of two choices ------------------------------------------------------------------------------------------


async def test_a_loaded_worker_is_rarely_chosen() -> None:
    pool = make_pool("http://w1", "http://w2", "http://w3")
    by_url(pool)["http://w1"].in_flight = 10
    picks = await count_picks(pool, 3000)
    assert picks["http://w1"] < 0.05 * 3000
    assert 0.4 < picks["http://w2"] / (picks["http://w2"] + picks["http://w3"]) < 0.6
    by_url(pool)["http://w1"].in_flight = 0
    assert_idle(pool)


async def test_held_requests_spread_in_proportion_to_weight() -> None:
    pool = make_pool(WorkerSettings(url="http://heavy", weight=3), "http://light")
    held = [await take(pool) for _ in range(40)]
    heavy, light = by_url(pool)["http://heavy"].in_flight, by_url(pool)["http://light"].in_flight
    assert 2.5 <= heavy / light <= 3.5
    for worker in held:
        pool.release(worker)
    assert_idle(pool)


async def test_weight_3_gets_about_3x_the_picks_at_equal_load() -> None:
    pool = make_pool(WorkerSettings(url="http://heavy", weight=3), "http://l1", "http://l2")
    picks = await count_picks(pool, 3000)
    light = (picks["http://l1"] + picks["http://l2"]) / 2
    assert 2.4 <= picks["http://heavy"] / light <= 3.6


# -- scraped load --------------------------------------------------------------------------------------------------


def test_score_counts_scraped_load_less_own_share_and_kv_pressure() -> None:
    pool = make_pool("http://w1")
    worker = pool.workers[0]
    assert worker.score() == (0.0, 0.0)
    worker.load = WorkerLoad(running=10, waiting=5, kv_cache_usage=0, own_in_flight=0)
    assert worker.score() == (15.0, 0.0)
    worker.in_flight = 2  # the scrape saw these two among its running requests: counted once
    worker.load = WorkerLoad(running=2, waiting=0, kv_cache_usage=0, own_in_flight=2)
    assert worker.score() == (2.0, 0.0)
    worker.load = WorkerLoad(running=2, waiting=0, kv_cache_usage=0.5, own_in_flight=2)
    assert worker.score() == (3.0, 0.5)  # KV-cache pressure raises the load; idle, it still breaks ties
    worker.in_flight = 0
    worker.load = WorkerLoad(running=0, waiting=0, kv_cache_usage=0.5, own_in_flight=0)
    assert worker.score() == (0.0, 0.5) > make_pool("http://w2").workers[0].score()


@pytest.mark.parametrize(
    "load",
    [WorkerLoad(running=10, waiting=5, kv_cache_usage=0, own_in_flight=0), WorkerLoad(0, 0, 0.9, 0)],
    ids=["queued", "kv-cache"],
)
async def test_scraped_load_makes_a_worker_less_preferred(load: WorkerLoad) -> None:
    pool = make_pool("http://busy", "http://w2", "http://w3")
    by_url(pool)["http://busy"].load = load
    picks = await count_picks(pool, 1000)
    assert picks["http://busy"] < 50


# -- capacity and the queue ----------------------------------------------------------------------------------------


async def test_full_workers_serve_waiters_in_arrival_order() -> None:
    pool = make_pool("http://w1", "http://w2", max_in_flight_per_worker=1)
    first, second = await take(pool), await take(pool)
    assert {first.url, second.url} == {"http://w1", "http://w2"}
    early = spawn(pool)
    await queued(pool, 1)
    late = spawn(pool)
    await queued(pool, 2)
    pool.release(second)
    assert await early is second
    assert not late.done() and pool.waiting == 1
    pool.release(first)
    assert await late is first
    pool.release(first)
    pool.release(second)
    assert_idle(pool)


async def test_full_queue_timeout_and_reject_if_busy_raise_capacity_error() -> None:
    pool = make_pool("http://w1", max_in_flight_per_worker=1, queue_size=1)
    held = await take(pool)
    with pytest.raises(CapacityError):
        await take(pool, reject_if_busy=True)
    with pytest.raises(CapacityError):
        pool.check(DEMAND, reject_if_busy=True)
    with pytest.raises(CapacityError):
        await take(pool, timeout_seconds=0.05)
    assert pool.waiting == 0
    waiter = spawn(pool)
    await queued(pool, 1)
    with pytest.raises(CapacityError):  # the queue (of one) is full: no wait at all
        await take(pool, timeout_seconds=60)
    pool.release(held)
    pool.release(await waiter)
    assert_idle(pool)


@pytest.mark.parametrize("handed_over", [False, True], ids=["waiting", "just-handed-over"])
async def test_cancelled_waiter_leaves_the_queue_without_leaking(handed_over: bool) -> None:
    pool = make_pool("http://w1", max_in_flight_per_worker=1)
    held = await take(pool)
    waiter = spawn(pool)
    await queued(pool, 1)
    if handed_over:
        pool.release(held)  # the place goes to the waiter, which is cancelled before it resumes
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    if not handed_over:
        pool.release(held)
    assert_idle(pool)


async def test_a_waiter_for_one_worker_does_not_block_requests_another_can_serve() -> None:
    pool = make_pool("http://w1", "http://w2", max_in_flight_per_worker=1)
    w1, w2 = by_url(pool)["http://w1"], by_url(pool)["http://w2"]
    held = await take(pool, exclude=[w2])
    retry = spawn(pool, exclude=[w2])  # a retry that already failed on w2 waits for w1
    await queued(pool, 1)
    try:
        taken = await take(pool, timeout_seconds=0.05)  # not stuck behind the retry: w2 is free for it
        assert taken is w2
        pool.release(taken)
    finally:
        pool.release(held)
        pool.release(await retry)
        assert w1.in_flight == w2.in_flight == 0


# -- the circuit breaker ---------------------------------------------------------------------------------------------


def breaker() -> tuple[WorkerPool, Worker, FakeClock]:
    clock = FakeClock()
    pool = make_pool("http://w1", clock=clock, eject_after_failures=3, eject_seconds=5, max_eject_seconds=12)
    return pool, pool.workers[0], clock


def test_consecutive_failures_eject_and_a_success_resets_the_count() -> None:
    _, worker, _ = breaker()
    worker.failed("5xx")
    worker.failed("5xx")
    worker.succeeded()
    worker.failed("5xx")
    worker.failed("5xx")
    assert worker.health is Health.UP and worker.is_routable()
    worker.failed("5xx")
    assert worker.health is Health.EJECTED and worker.ejections == 1 and not worker.is_routable()


def test_refused_connection_ejects_at_once() -> None:
    pool, worker, _ = breaker()
    worker.failed("refused", eject=True)
    assert worker.health is Health.EJECTED and not worker.is_routable()
    with pytest.raises(NoWorkerError):
        pool.check(DEMAND)


async def test_half_open_trial_backs_off_doubling_up_to_the_cap() -> None:
    pool, worker, clock = breaker()
    worker.failed("refused", eject=True)
    for eject_seconds in (5, 10, 12, 12):
        clock.advance(eject_seconds - 0.1)
        assert not worker.is_routable()
        clock.advance(0.1)
        trial = await take(pool)
        assert trial is worker and worker.health is Health.HALF_OPEN
        with pytest.raises(NoWorkerError):  # one trial at a time
            pool.check(DEMAND)
        worker.failed("still broken")
        pool.release(trial)
        assert worker.health is Health.EJECTED
    clock.advance(12)
    trial = await take(pool)
    worker.succeeded()
    pool.release(trial)
    assert worker.health is Health.UP and worker.failures == 0
    worker.failed("refused", eject=True)  # the back-off starts over
    clock.advance(5)
    assert worker.is_routable()


async def test_waiters_fail_when_the_last_worker_is_ejected() -> None:
    pool = make_pool("http://w1", "http://w2", max_in_flight_per_worker=1)
    held = [await take(pool), await take(pool)]
    waiters = [spawn(pool), spawn(pool)]
    await queued(pool, 2)
    for worker in pool.workers:
        worker.failed("refused", eject=True)
    pool.dispatch(workers_changed=True)  # as the health checks do after a round
    for waiter in waiters:
        with pytest.raises(NoWorkerError):
            await waiter
    with pytest.raises(NoWorkerError):
        pool.check(DEMAND)
    with pytest.raises(NoWorkerError):
        await take(pool)
    for worker in held:
        pool.release(worker)
    assert_idle(pool)


# -- catalogs and LoRA adapters --------------------------------------------------------------------------------------


def test_catalog_limits_served_names_windows_and_adapters() -> None:
    worker = make_pool("http://w1").workers[0]
    assert worker.serves(Demand("anything", 10**6, lora="ad9"))  # not read yet: assumed to serve its pool
    worker.catalog = Catalog(models={"served-a": 8192, "served-c": None}, adapters=frozenset({"ad1"}))
    assert worker.serves(Demand("served-a", 8192, lora="ad1"))
    assert worker.serves(Demand("served-c", 10**6))
    assert not worker.serves(Demand("served-b", 10))
    assert not worker.serves(Demand("served-a", 9000))
    assert not worker.serves(Demand("served-a", 10, lora="ad2"))


async def test_adapter_requests_go_only_to_workers_with_the_adapter() -> None:
    pool = make_pool(WorkerSettings(url="http://configured", lora=("ad1",)), "http://listed", "http://plain")
    workers = by_url(pool)
    workers["http://listed"].catalog = Catalog({"served-a": 8192}, frozenset({"ad1"}))
    workers["http://plain"].catalog = Catalog({"served-a": 8192}, frozenset())
    picks = await count_picks(pool, 300, Demand("served-a", 4096, lora="ad1"))
    assert set(picks) == {"http://configured", "http://listed"}
    workers["http://configured"].failed("refused", eject=True)
    workers["http://listed"].failed("refused", eject=True)
    with pytest.raises(NoWorkerError) as down:
        pool.check(Demand("served-a", 4096, lora="ad1"))
    assert not isinstance(down.value, UnknownAdapterError)  # served, but by workers that are down


def test_unknown_adapter_only_when_every_catalog_denies_it() -> None:
    pool = make_pool("http://w1", "http://w2")
    pool.check(Demand("served-a", 4096, lora="ad1"))  # no catalog, no configured adapters: it may be served
    for worker in pool.workers:
        worker.catalog = Catalog({"served-a": 8192}, frozenset({"ad2"}))
    with pytest.raises(UnknownAdapterError):
        pool.check(Demand("served-a", 4096, lora="ad1"))
    pool.check(Demand("served-a", 4096, lora="ad2"))


# -- prefix affinity -----------------------------------------------------------------------------------------------


async def test_prefix_affinity_sticks_until_the_imbalance_limit() -> None:
    pool = make_pool("http://w1", "http://w2", "http://w3", prefix_affinity=True, affinity_max_imbalance=2)
    demand = Demand("served-a", 4096, affinity=b"system-prompt-hash")
    picks = await count_picks(pool, 50, demand)
    assert len(picks) == 1
    [preferred] = picks
    keys = [Demand("served-a", 4096, affinity=bytes([i])) for i in range(30)]
    assert len({(await take_and_release(pool, key)).url for key in keys}) > 1  # other keys prefer other workers
    held = [await take(pool, demand) for _ in range(3)]  # 0, 1 and 2 more than the others: still preferred
    assert {w.url for w in held} == {preferred}
    moved = await count_picks(pool, 50, demand)  # 3 more than the least loaded: load wins
    assert preferred not in moved
    for worker in held:
        pool.release(worker)
    assert_idle(pool)


# -- reload --------------------------------------------------------------------------------------------------------


async def test_reload_keeps_adds_and_retires_workers() -> None:
    pool = make_pool("http://w1", "http://w2", "http://w3")
    w1, w2, w3 = pool.workers
    on_w1 = await take(pool, exclude=[w2, w3])
    on_w2 = await take(pool, exclude=[w1, w3])
    w3.failed("refused", eject=True)
    pool.reload(
        [WorkerSettings(url="http://w1/"), WorkerSettings(url="http://w3", weight=2), WorkerSettings(url="http://w4")]
    )
    assert [w.url for w in pool.workers] == ["http://w1", "http://w3", "http://w4"]
    assert pool.workers[:2] == (w1, w3)
    assert (w1.in_flight, w3.health, w3.weight) == (1, Health.EJECTED, 2)
    assert pool.workers[2].health is Health.UP and pool.workers[2].in_flight == 0
    assert w2.removed and not w2.is_routable()
    assert [w["url"] for w in pool.status()["removed_with_requests"]] == ["http://w2"]
    assert "http://w2" not in await count_picks(pool, 100)
    pool.release(on_w2)
    pool.release(on_w1)
    assert w2.in_flight == 0 and pool.status()["removed_with_requests"] == []
    assert_idle(pool)


# -- health.py: parsing, and the checks against a simulated worker ---------------------------------------------------

METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
vllm:num_requests_waiting{engine="1",model_name="m"} 4.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.75
# TYPE vllm:prompt_tokens counter
vllm:prompt_tokens_total{engine="0",model_name="m"} 1234.0
"""


def test_parse_catalog_of_a_vllm_models_list() -> None:
    card = {"object": "model", "owned_by": "vllm", "created": 0}
    body = {
        "object": "list",
        "data": [
            {**card, "id": "served-a", "root": "/models/a", "parent": None, "max_model_len": 8192},
            {**card, "id": "ad1", "root": "/lora/ad1", "parent": "served-a", "max_model_len": None},
            {**card, "id": "served-b", "root": "/models/a", "parent": None},
        ],
    }
    catalog = _parse_catalog(httpx.Response(200, json=body))
    assert catalog == Catalog({"served-a": 8192, "served-b": None}, frozenset({"ad1"}))
    with pytest.raises(ValueError):
        _parse_catalog(httpx.Response(503, json=body))
    with pytest.raises(ValueError):
        _parse_catalog(httpx.Response(200, json={"object": "list"}))


def test_parse_load_sums_engines_and_takes_the_fullest_kv_cache() -> None:
    assert _parse_load(METRICS, 7) == WorkerLoad(running=5, waiting=5, kv_cache_usage=0.75, own_in_flight=7)
    assert _parse_load("# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 1.5\n", 0) is None


def monitored(pool: WorkerPool, http: httpx.AsyncClient, clock: FakeClock, **routing: Any) -> PoolMonitor:
    return PoolMonitor(lambda: {pool.name: pool}, http, RoutingSettings(**routing), clock=clock)


async def test_monitor_reads_a_simulated_worker_and_ejects_it_when_unhealthy(tokenizer: Tokenizer) -> None:
    clock = FakeClock()
    async with sim_worker(tokenizer, lora_adapters=("ad1",)) as sim, httpx.AsyncClient(trust_env=False) as http:
        pool = make_pool(sim.url, clock=clock)
        monitor = monitored(pool, http, clock)
        [worker] = pool.workers
        await monitor.check_now()
        assert worker.catalog is not None and set(worker.catalog.models) == {BF16_NAME, FP8_NAME}
        assert worker.catalog.adapters == {"ad1"}
        assert worker.load is not None and worker.health is Health.UP
        pool.check(Demand(BF16_NAME, 4096, lora="ad1"))
        sim.faults.unhealthy = True
        clock.advance(RoutingSettings().health_interval_seconds + 0.1)
        await monitor.check_now()
        assert worker.health is Health.EJECTED
        with pytest.raises(NoWorkerError):
            pool.check(Demand(BF16_NAME, 4096))


async def test_failed_health_check_after_the_ejection_ejects_again() -> None:
    clock, healthy = FakeClock(), [True]

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200 if healthy[0] else 503)
        return httpx.Response(200, json={"data": [{"id": "served-a", "parent": None, "max_model_len": 8192}]})

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        pool = make_pool("http://w1", clock=clock, eject_seconds=5)
        monitor = monitored(pool, http, clock, health_interval_seconds=1, eject_seconds=5)
        [worker] = pool.workers
        await monitor.check_now()
        healthy[0] = False
        clock.advance(1)
        await monitor.check_now()
        assert worker.health is Health.EJECTED and worker.ejections == 1
        clock.advance(5)  # the ejection ran out; no request came meanwhile; the next check is its trial
        await monitor.check_now()
        assert worker.ejections == 2  # observed: 1, the failed probe's eject() returned early
        assert not worker.is_routable()  # observed: routable (half-open) for a worker just found down
