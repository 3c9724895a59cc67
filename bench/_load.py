"""The closed-loop load generator: C client tasks, each with its own connection, sending requests back to back.

It shares the CPU with the worker and the gateway, so the per-request work is kept small: the request body is
encoded once, JSON is parsed only until the first token and once more for the final usage event, and every other
``data:`` line is only kept as a string.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import httpx

_DATA_PREFIX: Final = "data:"
_DONE: Final = "[DONE]"
_TIMEOUT: Final = httpx.Timeout(30.0)
_ONE_CONNECTION: Final = httpx.Limits(max_connections=1, max_keepalive_connections=1)


@dataclass(frozen=True, slots=True)
class Target:
    """One way to ask for the same answer: ``is_first_token`` tells a content event from the others."""

    name: str
    url: str
    headers: Mapping[str, str]
    body: bytes
    is_first_token: Callable[[Any], bool]


@dataclass(frozen=True, slots=True)
class Outcome:
    """One request. Times are ``time.perf_counter()`` seconds; ``error`` is ``None`` for a complete answer."""

    started: float
    finished: float
    first_token: float | None
    completion_tokens: int
    error: str | None


@dataclass(slots=True)
class Phase:
    """The requests that finished inside the measured window of one (target, concurrency) run."""

    target: str
    concurrency: int
    duration_seconds: float
    outcomes: list[Outcome] = field(default_factory=list)


def is_openai_content(chunk: Any) -> bool:
    """A chat completion chunk whose first choice carries non-empty ``delta.content``."""
    if not isinstance(chunk, dict):
        return False
    choices = chunk.get("choices")
    if not choices or not isinstance(choices[0], dict):
        return False
    delta = choices[0].get("delta")
    return isinstance(delta, dict) and bool(delta.get("content"))


def is_workers_ai_content(event: Any) -> bool:
    """A Workers AI stream event with a non-empty ``response``."""
    return isinstance(event, dict) and bool(event.get("response"))


async def run_closed_loop(
    target: Target,
    concurrency: int,
    *,
    warmup_seconds: float,
    duration_seconds: float,
    expected_tokens: int,
    on_window: Callable[[str], None] | None = None,
) -> Phase:
    """Run ``concurrency`` clients for ``warmup_seconds + duration_seconds``; keep what finished in the window.

    No client starts a request after the window closes; requests still in flight then are awaited (so the next
    run starts on a quiet machine) but not counted. ``on_window`` is called with ``"start"`` and ``"end"``.
    """
    phase = Phase(target.name, concurrency, duration_seconds)
    async with contextlib.AsyncExitStack() as stack:
        ssl_context = _ssl_context()
        clients = [await stack.enter_async_context(_client(ssl_context)) for _ in range(concurrency)]
        window_start = time.perf_counter() + warmup_seconds
        window_end = window_start + duration_seconds

        async def client_loop(client: httpx.AsyncClient) -> None:
            while time.perf_counter() < window_end:
                outcome = await _send(client, target, expected_tokens)
                if window_start <= outcome.finished <= window_end:
                    phase.outcomes.append(outcome)

        tasks = [asyncio.create_task(client_loop(client)) for client in clients]
        tasks.append(asyncio.create_task(_mark_window(window_start, window_end, on_window)))
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
    return phase


def _client(ssl_context: ssl.SSLContext) -> httpx.AsyncClient:
    """A single-connection client. One per client task rather than one pool of C connections: httpcore 1.0.9's pool
    bookkeeping costs O(connections x requests) per request (encode/httpcore#1035), which made the bench itself
    the bottleneck from concurrency 32 on (its CPU per request more than doubled between 16 and 64).
    """
    return httpx.AsyncClient(limits=_ONE_CONNECTION, timeout=_TIMEOUT, trust_env=False, verify=ssl_context)


def _ssl_context() -> ssl.SSLContext:
    """Unused on plain-HTTP URLs, but every client would otherwise load the CA bundle itself (about 30 ms each,
    which blocked the event loop for 2 s at concurrency 64)."""
    return ssl.create_default_context()


async def _mark_window(window_start: float, window_end: float, on_window: Callable[[str], None] | None) -> None:
    if on_window is None:
        return
    await asyncio.sleep(max(window_start - time.perf_counter(), 0))
    on_window("start")
    await asyncio.sleep(max(window_end - time.perf_counter(), 0))
    on_window("end")


async def _send(client: httpx.AsyncClient, target: Target, expected_tokens: int) -> Outcome:
    started = time.perf_counter()
    try:
        async with client.stream("POST", target.url, content=target.body, headers=target.headers) as response:
            if response.status_code != 200:
                await response.aread()
                return Outcome(started, time.perf_counter(), None, 0, f"HTTP {response.status_code}")
            first_token, last_data, done = await _read_stream(response, target.is_first_token)
    except httpx.HTTPError as exc:
        return Outcome(started, time.perf_counter(), None, 0, type(exc).__name__)
    finished = time.perf_counter()
    tokens = _completion_tokens(last_data)
    if not done:
        error: str | None = "no [DONE]"
    elif first_token is None:
        error = "no content"
    elif tokens < expected_tokens:
        error = f"fewer than {expected_tokens} tokens"
    else:
        error = None
    return Outcome(started, finished, first_token, tokens, error)


async def _read_stream(
    response: httpx.Response, is_first_token: Callable[[Any], bool]
) -> tuple[float | None, str, bool]:
    """Read to the end of the body (so the connection goes back to the pool) and return the first-token time, the
    last ``data:`` payload before ``[DONE]``, and whether ``[DONE]`` came."""
    first_token: float | None = None
    last_data = ""
    done = False
    async for line in response.aiter_lines():
        if not line.startswith(_DATA_PREFIX):
            continue
        data = line[len(_DATA_PREFIX) :].strip()
        if data == _DONE:
            done = True
            continue
        last_data = data
        if first_token is None and is_first_token(_loads(data)):
            first_token = time.perf_counter()
    return first_token, last_data, done


def _completion_tokens(data: str) -> int:
    """``usage.completion_tokens`` of the final event (the worker's usage chunk, or the gateway's usage event)."""
    event = _loads(data)
    usage = event.get("usage") if isinstance(event, dict) else None
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return tokens if isinstance(tokens, int) else 0


def _loads(data: str) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return None
