"""The worker call: one admitted job to the first worker of its pool that serves it, before any of the answer reached
the client.

:class:`WorkerCall` takes a worker from the pool (gateway/route.py: load, health, capacity and the wait queue), sends
the job in vLLM's shape, and reads just enough of the answer to know the worker serves it: a non-streaming answer
whole, a stream up to its first event. Whatever fails before that (a refused connection, 5xx, a busy 429, a 404,
a worker dying, no first token in time) moves the job to another worker, at most ``routing.retries`` times, and is
recorded against the worker's health. The relay (gateway/relay.py) takes it from there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Final

import httpx
from httpx_sse import EventSource, ServerSentEvent, SSEError

from config import Settings
from gateway import _answers
from gateway._transport import set_read_timeout
from gateway.errors import (
    CapacityExceededError,
    InvalidRequestError,
    TollgateError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from gateway.observe import GatewayMetrics
from gateway.route import CapacityError, Demand, NoWorkerError, UnknownAdapterError, Worker, WorkerPool
from gateway.translate import to_vllm_request
from gateway.validate import InferenceJob

if TYPE_CHECKING:
    from gateway.deps import Dependencies

logger = logging.getLogger(__name__)

# Most specific first: connect-level failures mean the worker never saw the request, so another may be tried.
_UPSTREAM_ERRORS: Final = (
    (httpx.ConnectTimeout, UpstreamUnavailableError),
    (httpx.PoolTimeout, UpstreamUnavailableError),
    (httpx.ConnectError, UpstreamUnavailableError),
    (httpx.TimeoutException, UpstreamTimeoutError),
    (httpx.TransportError, UpstreamError),
    (SSEError, UpstreamError),
)


@contextlib.contextmanager
def map_upstream_errors() -> Iterator[None]:
    """Translate httpx's errors into the gateway's tree; the one place that knows httpx's exceptions."""
    try:
        yield
    except (httpx.HTTPError, SSEError) as exc:
        for source, target in _UPSTREAM_ERRORS:
            if isinstance(exc, source):
                raise target() from exc
        raise UpstreamError() from exc


class _Retry(Exception):
    """The attempt on one worker failed before any byte reached the client: another worker may be tried."""

    def __init__(self, error: UpstreamError, *, worker_status: int = 0) -> None:
        super().__init__(error.message)
        self.error = error
        self.worker_status = worker_status


@dataclasses.dataclass(slots=True)
class Opened:
    """A worker's answer, as far as it was read to know the worker serves the request: a non-streaming answer's
    whole body, or a stream's first event (with the events that follow)."""

    response: httpx.Response
    body: bytes = b""
    first: ServerSentEvent | None = None
    events: AsyncIterator[ServerSentEvent] | None = None


class WorkerCall:
    """One job's call to its pool: :meth:`open` finds the worker and opens its answer; :attr:`worker` and
    :attr:`response` are the ones serving it; :meth:`close` ends the call and gives the worker back."""

    def __init__(self, job: InferenceJob, request_id: str, deps: Dependencies, client_gone: Callable[[], bool]) -> None:
        model = deps.settings.models[job.model]
        self.job = job
        self.worker: Worker | None = None
        self.response: httpx.Response | None = None  # the attempt's answer, once a worker took the request
        self.first_token_seconds: float | None = None  # the serving worker's time to its first event (or answer)
        self.worker_url = ""  # the serving worker's, kept after close()
        self._request_id = request_id
        self._settings: Settings = deps.settings
        self._http = deps.http
        self._metrics: GatewayMetrics = deps.metrics
        self._pool: WorkerPool = deps.pools[model.pool]
        self._served_name = model.served_name
        self._client_gone = client_gone
        self._accepted = False
        self._accept_seconds = 0.0  # of the current attempt: the time its accept() took
        affinity = _affinity(job) if deps.settings.routing.prefix_affinity else None
        self.demand = Demand(model.served_name, model.context_window_tokens, job.lora, affinity)

    async def close(self) -> None:
        """Close the answer (mid-stream this drops the connection: the worker aborts) and give the worker back."""
        if self.response is not None:
            await self.response.aclose()
        if self.worker is not None:
            self._pool.release(self.worker)
            self.worker = None

    async def open(self, accept: Callable[[], Awaitable[None]] | None = None) -> Opened:
        """Serve the job from the first worker that can: retries happen only here, before any of the answer reached
        the client, each on another worker, at most ``routing.retries`` of them. ``accept`` (streams, with
        ``upstream.stream_headers: on_accept``) runs once, when a first worker takes the request."""
        routing = self._settings.routing
        path, body = to_vllm_request(self.job, self._served_name)
        content = json.dumps(body, ensure_ascii=False).encode()
        headers = {"content-type": "application/json", "x-request-id": self._request_id}
        tried: list[Worker] = []
        failures: list[_Retry] = []
        for _ in range(routing.retries + 1):
            if self._client_gone():
                break
            try:
                worker = await self._pool.acquire(
                    self.demand,
                    exclude=tried,
                    reject_if_busy=self.job.reject_if_busy,
                    timeout_seconds=routing.queue_timeout_seconds,
                )
            except (NoWorkerError, CapacityError) as exc:
                if failures:
                    break
                raise routing_error(exc, self._pool.name, self._metrics) from None
            tried.append(worker)
            request = self._http.build_request(
                "POST", worker.url + path, content=content, headers=headers, timeout=self._timeout()
            )
            attempt_started, self._accept_seconds = time.perf_counter(), 0.0
            try:
                opened = await self._attempt(worker, request, accept)
            except _Retry as retry:
                self._pool.release(worker)
                failures.append(retry)
                self._metrics.upstream_retries.labels(self._pool.name).inc()
                cause = retry.error.__cause__ or retry  # the transport's own error says more than ours
                logger.warning("worker %s failed before serving %s: %s", worker.url, self._request_id, cause)
                continue
            except BaseException:
                self._pool.release(worker)
                raise
            # The worker's own time: sending the stream's headers to the client (``accept``) is the gateway's.
            self.first_token_seconds = time.perf_counter() - attempt_started - self._accept_seconds
            self.worker, self.worker_url = worker, worker.url
            self.response = opened.response
            return opened
        if not failures:  # the client left before any attempt
            raise UpstreamUnavailableError("The client left before a worker took the request")
        if all(failure.worker_status == 429 for failure in failures):
            raise routing_error(CapacityError(), self._pool.name, self._metrics)
        if self.job.lora and all(failure.worker_status == 404 for failure in failures):
            raise InvalidRequestError(f"'/lora': no worker serves the adapter '{self.job.lora}'")
        raise failures[-1].error

    async def _attempt(
        self, worker: Worker, request: httpx.Request, accept: Callable[[], Awaitable[None]] | None
    ) -> Opened:
        """One worker's try. Raises :class:`_Retry` for what another worker may not share (a refused connection,
        5xx, a busy answer, a stream that fails before its first token); records the worker's health either way."""
        try:
            with map_upstream_errors():
                response = await self._http.send(request, stream=True)
        except UpstreamTimeoutError as exc:  # no answer head in time
            if not self.job.stream:
                raise  # a non-streamed answer's head comes after the whole generation: the total time ran out
            worker.failed("no first token in time")
            raise _Retry(exc) from None
        except UpstreamUnavailableError as exc:  # the connection could not be made (or our own pool is exhausted)
            if not isinstance(exc.__cause__, httpx.PoolTimeout):
                worker.failed(f"cannot connect: {exc.__cause__!r}", eject=True)
            raise _Retry(exc) from None
        except UpstreamError as exc:  # the connection broke before the head: the worker died or restarted
            worker.failed(repr(exc.__cause__))
            raise _Retry(exc) from None
        try:
            if response.status_code != 200:
                await self._refused(worker, response)
            if accept is not None:
                self.response = response  # a client leaving from now on is a hang-up: read what the worker sent
                if not self._accepted:
                    self._accepted = True
                    accepting = time.perf_counter()
                    await accept()
                    self._accept_seconds = time.perf_counter() - accepting
            opened = await (self._first_event(response) if self.job.stream else self._whole_answer(response))
        except _Retry as retry:
            await response.aclose()
            if retry.worker_status not in (404, 429) or (retry.worker_status == 404 and not self.job.lora):
                worker.failed(str(retry))  # a busy worker, or one without the adapter asked for, is not broken
            raise
        except BaseException:
            await response.aclose()
            raise
        if not self.job.stream:
            worker.succeeded()  # a stream's worker succeeds when the stream completes
        return opened

    async def _refused(self, worker: Worker, response: httpx.Response) -> None:
        """A worker's non-200 answer, classified by status (never by its text): 400 and 422 are the client's; 5xx,
        a busy 429 and a 404 (model or adapter missing there) send the request to another worker; any other status
        is a misconfigured worker, answered 502 at once."""
        try:
            with map_upstream_errors():
                raw = await _read_capped(response, 65536)
        except UpstreamError as exc:
            raise _Retry(exc) from None
        status = response.status_code
        if status in (400, 422):
            try:
                detail = _answers.error_text(_answers.parse_object(raw))
            except UpstreamError:
                detail = "the worker refused the request"
            raise InvalidRequestError(detail)
        error = UpstreamError(f"The inference worker answered HTTP {status}")
        if status >= 500 or status in (404, 429):
            raise _Retry(error, worker_status=status)
        raise error

    async def _whole_answer(self, response: httpx.Response) -> Opened:
        try:
            with map_upstream_errors():
                body = await _read_capped(response, self._settings.upstream.max_response_bytes)
        except UpstreamTimeoutError:
            raise
        except UpstreamError as exc:  # the worker died before its answer was complete: the client has seen nothing
            raise _Retry(exc) from None
        return Opened(response, body=body)

    async def _first_event(self, response: httpx.Response) -> Opened:
        """Read a stream up to its first event (the first token, with vLLM), so that a worker failing before it
        can still be replaced; then allow only ``between_tokens_timeout_seconds`` between events."""
        events = EventSource(response).aiter_sse()
        try:
            with map_upstream_errors():
                first = await anext(events, None)
        except UpstreamError as exc:
            raise _Retry(exc) from None
        if first is None:
            raise _Retry(UpstreamError("The inference worker closed the stream before its first token"))
        if first.data != "[DONE]":
            try:
                chunk = _answers.parse_object(first.data)
            except UpstreamError as exc:
                raise _Retry(exc) from None
            if "error" in chunk:
                raise _Retry(UpstreamError(f"The inference worker failed: {_answers.error_text(chunk)}"))
        set_read_timeout(response, self._settings.upstream.between_tokens_timeout_seconds)
        return Opened(response, first=first, events=events)

    def _timeout(self) -> httpx.Timeout:
        """A stream's head and first event may take ``first_token_timeout_seconds`` (then reads between events are
        bounded more tightly); a non-streaming answer arrives only when the whole generation is done, so its wait is
        bounded by ``total_timeout_seconds``."""
        config = self._settings.upstream
        read = config.first_token_timeout_seconds if self.job.stream else config.total_timeout_seconds
        return httpx.Timeout(read, connect=config.connect_timeout_seconds, pool=config.connect_timeout_seconds)


def routing_error(exc: NoWorkerError | CapacityError, pool: str, metrics: GatewayMetrics) -> TollgateError:
    """The client-facing error for a request no worker can take (counted by reason): 429 / 3040 when all are busy,
    400 for an adapter no worker serves, 503 when none is up."""
    if isinstance(exc, CapacityError):
        reason, error = "capacity", CapacityExceededError()
    elif isinstance(exc, UnknownAdapterError):
        reason, error = "unknown_adapter", InvalidRequestError(f"'/lora': {exc.reason}")
    else:
        reason, error = "no_worker", UpstreamUnavailableError(f"No inference worker is available: {exc.reason}")
    metrics.routing_refusals.labels(pool, reason).inc()
    return error


def _affinity(job: InferenceJob) -> bytes | None:
    """The request's prefix-affinity key: its leading system message (with the tools, which the template renders
    next to it), if any."""
    if not job.messages or job.messages[0].get("role") != "system":
        return None
    system = json.dumps([job.messages[0].get("content"), job.tools], sort_keys=True, default=str)
    return hashlib.blake2b(system.encode(), digest_size=16).digest()


async def _read_capped(response: httpx.Response, max_bytes: int) -> bytes:
    chunks, size = [], 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > max_bytes:
            raise UpstreamError(f"The inference worker's answer exceeds {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
