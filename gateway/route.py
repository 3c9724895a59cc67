"""Step 4, route: a model's worker pool, and the order in which to try its workers.

Workers are tried least-outstanding first (the gateway's own in-flight count is fresher than any scrape); ties are
broken by rotation so that an idle pool spreads load evenly. The relay moves to the next candidate only before
any byte reached the client.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence


class Worker:
    """One vLLM worker, by base URL, with the number of requests this process has in flight on it."""

    __slots__ = ("in_flight", "url")

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.in_flight = 0

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Count a request as in flight for as long as the block runs."""
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    def __repr__(self) -> str:
        return f"Worker({self.url!r}, in_flight={self.in_flight})"


class WorkerPool:
    """The workers that serve one pool of models."""

    def __init__(self, name: str, urls: Sequence[str]) -> None:
        self.name = name
        self.workers = tuple(Worker(url) for url in urls)
        self._turn = itertools.count()

    def candidates(self) -> list[Worker]:
        """Every worker, in the order to try them: least in flight first, ties rotated."""
        if not self.workers:
            return []
        start = next(self._turn) % len(self.workers)
        rotated = self.workers[start:] + self.workers[:start]
        return sorted(rotated, key=lambda worker: worker.in_flight)
