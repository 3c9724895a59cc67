"""The process's life around the requests: draining on shutdown, and pool reloads while running.

**Drain.** On SIGTERM (or SIGINT) the server stops listening and closes idle connections (uvicorn); the app, which
chains its own handler in front of uvicorn's (:func:`watch_signals`, from the lifespan, in every worker process),
starts draining at the same moment: a request still arriving on an open connection gets 503, and requests in flight
go on for up to ``server.drain_seconds``. Past that, each is ended cleanly: a stream gets a final SSE error event
and ``[DONE]``, a request not yet answered gets 503, and each is billed for what it delivered (the relay's
``finally``); one that gets this far only after the deadline is ended at once. ``tollgate serve`` sets uvicorn's own
grace period past the deadline, so uvicorn never has to cancel a request the drain could end cleanly. Behind a load
balancer, take the replica out first (a Kubernetes ``preStop`` pause): a closed listener refuses new connections.

**Pool reload.** :class:`PoolReloader` re-reads the pools from the configuration every
``routing.reload_interval_seconds`` (and on ``POST /admin/v1/pools/reload``) and applies a changed worker list
without dropping anything: see :meth:`gateway.route.WorkerPool.reload`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import weakref
from collections.abc import Callable, Coroutine, Iterator, Mapping
from types import FrameType
from typing import Any, Protocol

from config import PoolSettings, Settings, SettingsError
from gateway.route import WorkerPool

logger = logging.getLogger(__name__)

_DRAINS: weakref.WeakSet[Drain] = weakref.WeakSet()


class Cuttable(Protocol):
    def cut(self) -> None:
        """End the request now, cleanly, and bill what it delivered."""


class Drain:
    """Tracks the requests in flight, and ends them at the drain deadline once shutdown began."""

    def __init__(self, drain_seconds: float) -> None:
        self.drain_seconds = drain_seconds
        self.draining = False
        self.deadline_passed = False
        self._running: set[Cuttable] = set()
        self._deadline: asyncio.TimerHandle | None = None

    def register(self) -> None:
        """Take part in this process's shutdown (:func:`begin_shutdown`); done by the app's lifespan."""
        _DRAINS.add(self)
        watch_signals()

    def unregister(self) -> None:
        _DRAINS.discard(self)
        if self._deadline is not None:
            self._deadline.cancel()

    @contextlib.contextmanager
    def track(self, request: Cuttable) -> Iterator[None]:
        """Count ``request`` in flight while the block runs; past the drain deadline it is ended at once."""
        if self.deadline_passed:
            request.cut()
        self._running.add(request)
        try:
            yield
        finally:
            self._running.discard(request)

    @property
    def in_flight(self) -> int:
        return len(self._running)

    def begin(self) -> None:
        """Refuse new requests from now on, and end those in flight at the deadline (unless they finish first)."""
        if self.draining:
            return
        self.draining = True
        level = logging.WARNING if self._running else logging.INFO  # nothing to wait for is a normal stop
        in_flight = len(self._running)
        logger.log(level, "draining: %d requests in flight get %.0f s to finish", in_flight, self.drain_seconds)
        self._deadline = asyncio.get_running_loop().call_later(self.drain_seconds, self.cut_all)

    def cut_all(self) -> None:
        self.deadline_passed = True
        if self._running:
            logger.warning("drain deadline: ending %d requests", len(self._running))
        for request in list(self._running):
            request.cut()


def shutdown_seconds(settings: Settings) -> float:
    """The longest a process takes to stop cleanly after SIGTERM: the drain, the hang-up drain of the streams it
    ended, and 5 s for the bills and the spool. uvicorn's grace period is set to this, so it never cuts a request the
    drain could end cleanly; a supervisor must wait at least this long (plus any pause before SIGTERM)."""
    return settings.server.drain_seconds + settings.upstream.hang_up_drain_seconds + 5


def begin_shutdown() -> None:
    """Start draining every app of this process (in its event loop)."""
    for drain in list(_DRAINS):
        drain.begin()


def watch_signals() -> None:
    """Start draining on SIGTERM and SIGINT, then let the server's own handler (uvicorn's, installed before the
    lifespan starts) stop it. Called from the lifespan; only the main thread can handle signals."""
    if threading.current_thread() is not threading.main_thread():
        return
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(signum)
        # Only in front of a server's own handler (a default one would kill the process without a drain anyway).
        if callable(previous) and not getattr(previous, "_tollgate_drain", False):
            signal.signal(signum, _chained(previous, loop))


def _chained(previous: Callable[[int, FrameType | None], Any], loop: asyncio.AbstractEventLoop) -> Any:
    def handler(signum: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(begin_shutdown)
        previous(signum, frame)

    handler._tollgate_drain = True  # type: ignore[attr-defined]
    return handler


class BackgroundTask:
    """A named task of this process's event loop, started once and cancelled by :meth:`aclose`."""

    def __init__(self, name: str, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._name = name
        self._run = run
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self._name)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class PoolReloader:
    """Applies changes to the configured pools while running. ``load`` returns the configuration's current pools
    (raising :class:`SettingsError` on a bad file, which leaves the pools as they are)."""

    def __init__(
        self,
        pools: Mapping[str, WorkerPool],
        current: Mapping[str, PoolSettings],
        load: Callable[[], Mapping[str, PoolSettings]],
        interval_seconds: float,
    ) -> None:
        self._pools = pools
        self._current = current
        self._load = load
        self._interval = interval_seconds
        self._task = BackgroundTask("tollgate-pool-reloader", self._run)

    def start(self) -> None:
        if self._interval > 0:
            self._task.start()

    async def aclose(self) -> None:
        await self._task.aclose()

    def reload(self) -> bool:
        """Re-read the pools now; ``True`` if they changed. Raises :class:`SettingsError` for a bad configuration."""
        fresh = self._load()
        missing = sorted(set(self._pools) - set(fresh))
        if missing:
            raise SettingsError(f"pools.{missing[0]}: a running gateway cannot drop a pool (restart it instead)")
        added = sorted(set(fresh) - set(self._pools))
        if added:
            logger.warning("pools.%s: new pools take effect on restart", added[0])
        if all(fresh[name] == self._current[name] for name in self._pools):
            return False
        for name, pool in self._pools.items():
            if fresh[name] != self._current[name]:
                pool.reload(fresh[name].workers)
        self._current = {name: fresh[name] for name in self._pools}
        return True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                self.reload()
            except SettingsError as exc:
                logger.error("pools not reloaded: %s", exc)
            except Exception:
                logger.exception("pools not reloaded")
