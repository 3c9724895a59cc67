"""Step 4, route: which worker of a model's pool serves a request, and when none can, how long it waits.

Each :class:`WorkerPool` holds its workers' state as this replica sees it:

- **load**: the replica's own requests in flight on the worker (exact and instant) plus, from the worker's
  ``/metrics`` (read in the background by gateway/health.py), the requests everyone else has there: vLLM's
  running and waiting counts less this replica's share at the time of the scrape. KV-cache pressure raises it.
  A request goes to the less loaded of two workers drawn at random by weight (power of two choices), which keeps
  a slow or busy worker's share low without herding every replica onto the same idle worker.
- **prefix affinity** (optional): requests with the same system prompt prefer one worker (rendezvous hashing), for
  its prefix cache, as long as that worker has at most ``affinity_max_imbalance`` more requests than the least
  loaded one; past that, load wins.
- **health**: a circuit breaker per worker. A refused connection (or ``/health`` 503, gateway/health.py) ejects it
  at once; ``eject_after_failures`` consecutive failures (5xx, timeouts, dropped streams, failed checks) eject it
  too. After ``eject_seconds`` it is half-open: one request may try it (and a failing check ejects it again);
  success takes it back, failure ejects it for twice as long, up to ``max_eject_seconds``.
- **what it serves**: the models, context window and LoRA adapters its ``/v1/models`` lists (plus adapters named
  in the config). Until it was first read, a worker is assumed to serve its pool's models.
- **capacity**: at most ``max_in_flight_per_worker`` requests of this replica per worker. When every suitable worker
  is full, requests wait in a FIFO queue of ``queue_size`` for at most ``queue_timeout_seconds``; a full queue,
  the timeout or ``options.rejectIfBusy`` answers 429 / 3040.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import hashlib
import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

from config import RoutingSettings, WorkerSettings

logger = logging.getLogger(__name__)

_KV_PRESSURE_WEIGHT: Final = 1.0  # a full KV cache doubles a worker's load


class CapacityError(Exception):
    """Every worker that could serve the request is full, and it could not wait (queue full, timeout, rejectIfBusy)."""


class NoWorkerError(Exception):
    """No worker of the pool can serve the request now: all are ejected, or none serves the model or adapter."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnknownAdapterError(NoWorkerError):
    """No worker of the pool serves the requested LoRA adapter."""


@dataclasses.dataclass(frozen=True, slots=True)
class Demand:
    """What a request needs from a worker: a served model name with a context window at least ``window``, an
    optional LoRA adapter, and an optional affinity key (its system prompt's hash)."""

    served_name: str
    window: int
    lora: str | None = None
    affinity: bytes | None = None


class Health(enum.Enum):
    UP = "up"
    EJECTED = "ejected"
    HALF_OPEN = "half_open"  # ejected, and its trial is due: one request (or health check) may try it


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerLoad:
    """A worker's load as its ``/metrics`` reported it, and this replica's requests on it at that moment."""

    running: float
    waiting: float
    kv_cache_usage: float
    own_in_flight: int


@dataclasses.dataclass(frozen=True, slots=True)
class Catalog:
    """What a worker's ``/v1/models`` lists: served model names with their context windows, and LoRA adapters."""

    models: dict[str, int | None]
    adapters: frozenset[str]


class Worker:
    """One vLLM worker as this replica sees it: its requests in flight, health, load and catalog."""

    def __init__(
        self, config: WorkerSettings, routing: RoutingSettings, clock: Callable[[], float], *, pool: str = ""
    ) -> None:
        self.url = config.url.rstrip("/")
        self.pool = pool  # for the logs: a URL listed in two pools is one Worker in each
        self.weight = config.weight
        self.configured_adapters = frozenset(config.lora)
        self.in_flight = 0
        self.health = Health.UP
        self.removed = False  # dropped from the config: takes no new requests, its streams finish
        self.failures = 0  # consecutive
        self.ejections = 0
        self.load: WorkerLoad | None = None
        self.catalog: Catalog | None = None
        self._routing = routing
        self._clock = clock
        self._retry_at = 0.0
        self._eject_seconds = routing.eject_seconds

    # -- health: the circuit breaker ----------------------------------------------------------------------

    def current_health(self) -> Health:
        """Its health now: an ejection whose time is up turns half-open."""
        if self.health is Health.EJECTED and self._clock() >= self._retry_at:
            self.health = Health.HALF_OPEN
        return self.health

    def is_routable(self) -> bool:
        """Can take a request now: up, or half-open with no trial running."""
        if self.removed:
            return False
        health = self.current_health()
        return health is Health.UP or (health is Health.HALF_OPEN and self.in_flight == 0)

    def is_probe_due(self) -> bool:
        """Should the background check probe it now? Not while it sits out its ejection."""
        return not (self.health is Health.EJECTED and self._clock() < self._retry_at)

    def succeeded(self) -> None:
        """A request went well: the worker is (back) up. One that started before an ejection and ends well while
        the worker sits it out changes nothing. (Health checks never call this: passing one proves too little.)"""
        if self.health is Health.EJECTED and self._clock() < self._retry_at:
            return
        self.failures = 0
        self._eject_seconds = self._routing.eject_seconds
        if self.health is not Health.UP:
            logger.warning("pool %s: worker %s is back", self.pool, self.url)
            self.health = Health.UP

    def failed(self, reason: str, *, eject: bool = False) -> None:
        """A request failed because of the worker; ``eject`` when it cannot serve at all (connection refused)."""
        self.failures += 1
        if eject or self.failures >= self._routing.eject_after_failures or self.health is not Health.UP:
            self.eject(reason)

    def eject(self, reason: str) -> None:
        """Take the worker out for its current ejection time (doubling the next); no-op while it sits one out."""
        now = self._clock()
        if self.health is Health.EJECTED and now < self._retry_at:
            return
        self.health = Health.EJECTED
        self.ejections += 1
        self._retry_at = now + self._eject_seconds
        logger.warning("pool %s: worker %s ejected for %.1f s: %s", self.pool, self.url, self._eject_seconds, reason)
        self._eject_seconds = min(self._eject_seconds * 2, self._routing.max_eject_seconds)

    # -- what it serves, and how loaded it is ----------------------------------------------------------------

    def serves(self, demand: Demand) -> bool:
        catalog = self.catalog
        if catalog is None:  # not read yet: trust the config
            return demand.lora is None or not self.configured_adapters or demand.lora in self.configured_adapters
        if demand.served_name not in catalog.models:
            return False
        window = catalog.models[demand.served_name]
        if window is not None and window < demand.window:
            return False
        return demand.lora is None or demand.lora in catalog.adapters or demand.lora in self.configured_adapters

    def knows_of(self, lora: str) -> bool | None:
        """Whether it serves adapter ``lora``; ``None`` when nothing tells (no catalog and no adapters configured)."""
        if lora in self.configured_adapters or (self.catalog is not None and lora in self.catalog.adapters):
            return True
        if self.catalog is None and not self.configured_adapters:
            return None
        return False

    def has_room(self) -> bool:
        cap = self._routing.max_in_flight_per_worker
        return cap == 0 or self.in_flight < cap

    def pending(self) -> float:
        """Requests ahead of a new one here: this replica's in flight, plus everyone else's as last scraped."""
        pending = float(self.in_flight)
        if self.load is not None:
            pending += max(0.0, self.load.running + self.load.waiting - self.load.own_in_flight)
        return pending

    def score(self) -> tuple[float, float]:
        """Lower is better: pending requests per unit of weight, raised by KV-cache pressure; then the pressure."""
        kv = self.load.kv_cache_usage if self.load is not None else 0.0
        return self.pending() * (1.0 + _KV_PRESSURE_WEIGHT * kv) / self.weight, kv

    def status(self) -> dict[str, Any]:
        """The worker's state as ``GET /admin/v1/pools`` shows it."""
        return {
            "url": self.url,
            "weight": self.weight,
            "health": self.current_health().value,
            "in_flight": self.in_flight,
            "consecutive_failures": self.failures,
            "ejections": self.ejections,
            "load": dataclasses.asdict(self.load) if self.load is not None else None,
            "models": dict(self.catalog.models) if self.catalog is not None else None,
            "lora": sorted(self.configured_adapters | (self.catalog.adapters if self.catalog else frozenset())),
        }

    def __repr__(self) -> str:
        return f"Worker({self.url!r}, {self.health.value}, in_flight={self.in_flight})"


@dataclasses.dataclass(eq=False, slots=True)
class _Waiter:
    demand: Demand
    exclude: frozenset[Worker]
    future: asyncio.Future[Worker]


class WorkerPool:
    """The workers of one pool, and the queue of requests waiting for one of them.

    Usage::

        worker = await pool.acquire(demand, timeout_seconds=10)   # counts the request in flight on it
        try:
            ...                                                     # call worker.url
        finally:
            pool.release(worker)
    """

    def __init__(
        self,
        name: str,
        workers: Sequence[WorkerSettings],
        routing: RoutingSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self._routing = routing
        self._clock = clock
        self._rng = rng or random.Random()
        self.workers: tuple[Worker, ...] = tuple(Worker(config, routing, clock, pool=name) for config in workers)
        self._retired: list[Worker] = []  # removed by a reload, with requests still running
        self._waiters: collections.deque[_Waiter] = collections.deque()

    # -- taking and giving back a worker ------------------------------------------------------------------

    def check(self, demand: Demand, *, reject_if_busy: bool = False) -> None:
        """Fail fast, before admission, if the request cannot be served now: :class:`UnknownAdapterError`,
        :class:`NoWorkerError`, or :class:`CapacityError` for ``rejectIfBusy`` when every suitable worker is full."""
        if demand.lora is not None:
            known = [worker.knows_of(demand.lora) for worker in self.workers]
            if known and all(answer is False for answer in known):
                raise UnknownAdapterError(f"no worker of pool {self.name!r} serves the adapter {demand.lora!r}")
        suitable = self._suitable(demand, frozenset())
        if not suitable:
            raise NoWorkerError(self._why_none(demand))
        if reject_if_busy and not any(worker.has_room() for worker in suitable):
            raise CapacityError()

    async def acquire(
        self,
        demand: Demand,
        *,
        exclude: Iterable[Worker] = (),
        reject_if_busy: bool = False,
        timeout_seconds: float,
    ) -> Worker:
        """A worker for ``demand`` (not one of ``exclude``), counted in flight until :meth:`release`. Waits in the
        pool's queue while every suitable worker is full; raises :class:`NoWorkerError` or :class:`CapacityError`."""
        excluded = frozenset(exclude)
        if not self._waiters:
            worker = self._pick(demand, excluded)
            if worker is not None:
                worker.in_flight += 1
                return worker
        if not self._suitable(demand, excluded):
            raise NoWorkerError(self._why_none(demand))
        # Join the queue, then hand out what is free in arrival order: a place earlier waiters cannot use (another
        # model, adapter or worker) may go to this request at once, but it never overtakes one that could.
        waiter = _Waiter(demand, excluded, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        self.dispatch()
        handed_over = False
        try:
            if not waiter.future.done() and (reject_if_busy or len(self._waiters) > self._routing.queue_size):
                raise CapacityError()
            async with asyncio.timeout(timeout_seconds):
                worker = await asyncio.shield(waiter.future)
            handed_over = True
            return worker
        except TimeoutError:
            raise CapacityError() from None
        finally:
            if not handed_over:
                self._withdraw(waiter)

    def release(self, worker: Worker) -> None:
        """The request on ``worker`` is over; its place goes to the first waiter it suits."""
        worker.in_flight -= 1
        if worker.removed and worker.in_flight == 0 and worker in self._retired:
            self._retired.remove(worker)
        self.dispatch(workers_changed=worker.health is Health.EJECTED)  # its request may have ejected it

    def dispatch(self, *, workers_changed: bool = False) -> None:
        """Hand free places to waiting requests, in arrival order. Called when a request ends or joins the queue;
        with ``workers_changed`` (health checks, reloads), also fail the waiters no worker can serve any more."""
        for waiter in list(self._waiters):
            if waiter.future.done():
                self._waiters.remove(waiter)
                continue
            if not workers_changed and not any(worker.has_room() for worker in self.workers):
                return  # a long queue costs nothing while every worker is full
            worker = self._pick(waiter.demand, waiter.exclude)
            if worker is not None:
                worker.in_flight += 1
                waiter.future.set_result(worker)
                self._waiters.remove(waiter)
            elif workers_changed and not self._suitable(waiter.demand, waiter.exclude):
                waiter.future.set_exception(NoWorkerError(self._why_none(waiter.demand)))
                self._waiters.remove(waiter)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _withdraw(self, waiter: _Waiter) -> None:
        future = waiter.future
        if future.done() and not future.cancelled() and future.exception() is None:
            self.release(future.result())  # handed over just as the wait ended: give it back
        elif not future.done():
            future.cancel()
        if waiter in self._waiters:
            self._waiters.remove(waiter)

    # -- choosing -----------------------------------------------------------------------------------------

    def _suitable(self, demand: Demand, exclude: frozenset[Worker]) -> list[Worker]:
        return [w for w in self.workers if w not in exclude and w.is_routable() and w.serves(demand)]

    def _pick(self, demand: Demand, exclude: frozenset[Worker]) -> Worker | None:
        suitable = self._suitable(demand, exclude)
        free = [worker for worker in suitable if worker.has_room()]
        if len(free) <= 1:
            return free[0] if free else None
        if demand.affinity is not None and self._routing.prefix_affinity:
            preferred = max(suitable, key=lambda worker: _rendezvous(demand.affinity or b"", worker))
            if preferred in free:
                least = min(worker.pending() for worker in free)
                if preferred.pending() - least <= self._routing.affinity_max_imbalance:
                    return preferred
        # The first draw wins ties, so that idle workers get traffic in proportion to their weights.
        first = self._draw(free)
        second = self._draw([worker for worker in free if worker is not first])
        return first if first.score() <= second.score() else second

    def _draw(self, workers: Sequence[Worker]) -> Worker:
        return self._rng.choices(workers, weights=[worker.weight for worker in workers])[0]

    def _why_none(self, demand: Demand) -> str:
        if not any(worker.serves(demand) for worker in self.workers):
            what = f"adapter {demand.lora!r} of " if demand.lora else ""
            return f"no worker of pool {self.name!r} serves {what}{demand.served_name!r}"
        return f"every worker of pool {self.name!r} that serves {demand.served_name!r} is down"

    # -- configuration ------------------------------------------------------------------------------------

    def reload(self, workers: Sequence[WorkerSettings]) -> None:
        """Take a new worker list: kept workers (by URL) keep their state and requests, new ones start up, removed
        ones take no new requests while theirs finish."""
        current = {worker.url: worker for worker in self.workers}
        kept: list[Worker] = []
        retired = {worker.url: worker for worker in self._retired}
        for config in workers:
            url = config.url.rstrip("/")
            worker = current.pop(url, None)
            if worker is None and url in retired:  # back before its last requests ended: the same worker again
                worker = retired[url]
                self._retired.remove(worker)
                worker.removed = False
            if worker is None:
                worker = Worker(config, self._routing, self._clock, pool=self.name)
                logger.warning("pool %s: worker %s added", self.name, url)
            else:
                worker.weight = config.weight
                worker.configured_adapters = frozenset(config.lora)
            kept.append(worker)
        for worker in current.values():
            logger.warning(
                "pool %s: worker %s removed (%d requests finish there)", self.name, worker.url, worker.in_flight
            )
            worker.removed = True
            if worker.in_flight:
                self._retired.append(worker)
        self.workers = tuple(kept)
        self.dispatch(workers_changed=True)

    def status(self) -> dict[str, Any]:
        return {
            "pool": self.name,
            "waiting": len(self._waiters),
            "workers": [worker.status() for worker in self.workers],
            "removed_with_requests": [worker.status() for worker in self._retired],
        }


def _rendezvous(key: bytes, worker: Worker) -> float:
    digest = hashlib.blake2b(key + worker.url.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") * worker.weight
