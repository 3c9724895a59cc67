"""vLLM's load and token metrics for one simulated worker, on the app's own registry."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge

# The simulated KV cache holds this many full-length sequences: usage = tokens held by running requests /
# (max_model_len * _KV_CACHE_SEQUENCES), capped at 1.
_KV_CACHE_SEQUENCES = 8
_LABELS = ("model_name", "engine")


class SimMetrics:
    """``vllm:num_requests_running``/``_waiting``, ``vllm:kv_cache_usage_perc`` and the token counters.

    Labels are ``model_name`` (the first served name) and ``engine="0"``, as ``vllm/v1/metrics/loggers.py``. The
    request counts come from the batch scheduler (`set_load`); the tokens from each generation (`generating`).
    """

    def __init__(self, registry: CollectorRegistry, model_name: str, max_model_len: int) -> None:
        labels = {"model_name": model_name, "engine": "0"}
        self._running = Gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches.", _LABELS, registry=registry
        ).labels(**labels)
        self._waiting = Gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed.", _LABELS, registry=registry
        ).labels(**labels)
        self._kv_usage = Gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", _LABELS, registry=registry
        ).labels(**labels)
        self._prompt_tokens = Counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", _LABELS, registry=registry
        ).labels(**labels)
        self._generation_tokens = Counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", _LABELS, registry=registry
        ).labels(**labels)
        self.set_load(running=0, waiting=0)
        self._kv_capacity_tokens = max_model_len * _KV_CACHE_SEQUENCES
        self._kv_tokens = 0

    def set_load(self, *, running: int, waiting: int) -> None:
        """Report how many requests are generating and how many wait for a place in the batch."""
        self._running.set(running)
        self._waiting.set(waiting)

    @contextlib.contextmanager
    def generating(self, prompt_tokens: int) -> Iterator[Callable[[int], None]]:
        """Hold one running request's tokens in the KV cache; the yielded callable records tokens as generated."""
        held = prompt_tokens
        self._prompt_tokens.inc(prompt_tokens)
        self._hold(prompt_tokens)

        def add_generated(tokens: int) -> None:
            nonlocal held
            held += tokens
            self._generation_tokens.inc(tokens)
            self._hold(tokens)

        try:
            yield add_generated
        finally:
            self._hold(-held)

    def _hold(self, tokens: int) -> None:
        self._kv_tokens += tokens
        self._kv_usage.set(min(self._kv_tokens / self._kv_capacity_tokens, 1.0))
