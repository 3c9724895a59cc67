"""Step 5, relay: send an admitted job to a worker and bring its answer back in Workers AI shape.

:class:`Relay` is the ASGI app that owns one request from the worker call to the bill. It watches for the client
going away the whole time, retries another worker only before any byte was sent, and bills from one shielded
``finally`` whatever happened: success, worker failure, timeout, client disconnect or shutdown (RELIABILITY §4.1:
never from a background task or from code after the loop).

When a streaming client hangs up, the relay hangs up on the worker at once, by half-closing the connection: the
worker sees its client leave and aborts the generation, exactly as on a close, while what it sent before it noticed
can still be read. The relay reads it (sending nothing more) until the worker closes, for at most
``upstream.hang_up_drain_seconds``, so the bill holds every token the worker generated for the request (the billing
policy, billing/usage.py). Before the stream started, or where half-closing is impossible, the work is cancelled
and the connection closed instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final

import anyio
import httpx
from httpx_sse import EventSource, ServerSentEvent, SSEError
from starlette.types import Message, Receive, Scope, Send

from billing import (
    Usage,
    UsageRecord,
    cost_nano_usd,
    price_of,
    settle_usage,
)
from gateway import _answers, _sse
from gateway._transport import hang_up, set_read_timeout
from gateway.admit import Admission, count_prompt_async
from gateway.errors import (
    CapacityExceededError,
    InvalidRequestError,
    JsonModeError,
    ShuttingDownError,
    TollgateError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from gateway.meter import Meter, usage_headers, usage_with_cost
from gateway.observe import GatewayMetrics
from gateway.route import CapacityError, Demand, NoWorkerError, UnknownAdapterError, Worker
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
_STATUS_BY_ERROR: Final = (
    (ShuttingDownError, "shutdown"),
    (UpstreamTimeoutError, "upstream_timeout"),
    (UpstreamUnavailableError, "upstream_unavailable"),
    (UpstreamError, "upstream_error"),
    (InvalidRequestError, "rejected_by_worker"),
    (CapacityExceededError, "capacity"),
)
_JSON_HEADERS: Final = ((b"content-type", b"application/json"),)


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
class _Opened:
    """A worker's answer, as far as it was read to know the worker serves the request: a non-streaming answer's
    whole body, or a stream's first event (with the events that follow)."""

    response: httpx.Response
    body: bytes = b""
    first: ServerSentEvent | None = None
    events: AsyncIterator[ServerSentEvent] | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Caller:
    """Who asked, and when: the request's identity for the ledger."""

    request_id: str
    tenant: str
    key_id: str
    started_at: float
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)  # rate-limit state, for every response


class Relay:
    """Serves one admitted request as an ASGI app, from the worker call to the bill."""

    def __init__(self, admission: Admission, caller: Caller, deps: Dependencies) -> None:
        self.job = job = admission.job
        self._prompt_tokens = admission.prompt_tokens
        self.caller = caller
        self.deps = deps
        self.model = deps.settings.models[job.model]
        self.pool = deps.pools[self.model.pool]
        affinity = _affinity(job) if deps.settings.routing.prefix_affinity else None
        self.demand = Demand(self.model.served_name, self.model.context_window_tokens, job.lora, affinity)
        self.meter = Meter(job.max_tokens)
        self.status = "ok"
        self._complete = False
        self._client_gone = False
        self._started = False  # the response's headers went out: from here on, errors are in-band
        self._cut_error: TollgateError | None = None
        self._cancel = anyio.CancelScope()
        self._usage: Usage | None = None
        self._response: httpx.Response | None = None
        self._worker: Worker | None = None
        self._exits = contextlib.ExitStack()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        cancel = self._cancel
        watcher = asyncio.create_task(self._watch_disconnect(receive, cancel))

        async def send_while_connected(message: Message) -> None:
            if not self._client_gone:
                await send(message)

        try:
            with self.deps.drain.track(self):
                with cancel:
                    cancel.deadline = anyio.current_time() + self.deps.settings.upstream.total_timeout_seconds
                    await (self._stream if self.job.stream else self._respond)(send_while_connected)
                if cancel.cancelled_caught and not self._client_gone and not self._complete:
                    await self._end_cut(send_while_connected)
        except TollgateError as exc:
            self.status = _status_of(exc)
            exc.extra_headers.update(self.caller.headers)
            raise
        except asyncio.CancelledError:
            self.status = "cancelled"  # the server is shutting down past its grace period: bill what was relayed
            raise
        except BaseException:
            self.status = "internal_error"
            raise
        finally:
            watcher.cancel()
            # The bill runs in a task of its own: a plain task.cancel() (uvicorn's shutdown past its grace period)
            # can interrupt this await, but not the bill, and shutdown waits for pending bills (deps.aclose).
            bill = self.deps.bills.start(self._finish())
            with anyio.CancelScope(shield=True):
                await asyncio.shield(bill)

    def cut(self) -> None:
        """End the request now (the drain deadline at shutdown): a stream gets a final error event, a request not
        yet answered a 503; either is billed for what it delivered."""
        if not self._complete:
            self._cut_error = ShuttingDownError()
            self._cancel.cancel()

    async def _end_cut(self, send: Send) -> None:
        """The request was cut (shutdown) or ran out of ``upstream.total_timeout_seconds``: end it cleanly."""
        error = self._cut_error or UpstreamTimeoutError(
            f"The answer took longer than {self.deps.settings.upstream.total_timeout_seconds:g} seconds"
        )
        if not self._started:
            raise error
        self.meter.delivered()
        await self._fail_in_band(error, send)

    def _completing(self) -> None:
        """The answer is in hand and only sending is left: no deadline or drain may cut it any more."""
        self._complete = True
        self._cancel.deadline = math.inf

    async def _fail_in_band(self, error: TollgateError, send: Send) -> None:
        """End a stream whose headers went out with a final error event (Workers AI's shape) and ``[DONE]``."""
        self.status = "shutdown" if isinstance(error, ShuttingDownError) else _status_of(error)
        self._completing()
        await send(_more(_sse.error_frame(error.code, error.message)))
        await send({"type": "http.response.body", "body": _sse.DONE_FRAME})

    async def _watch_disconnect(self, receive: Receive, cancel: anyio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if self._complete:
            return
        self.status = "client_disconnected"
        self._client_gone = True
        if self.job.stream and self._response is not None and hang_up(self._response):
            # The worker stops by itself now; the stream reads what it sent meanwhile, within the drain deadline.
            drain_until = anyio.current_time() + self.deps.settings.upstream.hang_up_drain_seconds
            cancel.deadline = min(cancel.deadline, drain_until)
        else:
            cancel.cancel()

    # -- the worker call ------------------------------------------------------------------------------------

    async def _open(self, accept: Callable[[], Awaitable[None]] | None = None) -> _Opened:
        """Serve the job from the first worker that can: retries happen only here, before any of the answer reached
        the client, each on another worker, at most ``routing.retries`` of them. ``accept`` (streams, with
        ``upstream.stream_headers: on_accept``) runs once, when a first worker takes the request."""
        routing = self.deps.settings.routing
        path, body = to_vllm_request(self.job, self.model.served_name)
        content = json.dumps(body, ensure_ascii=False).encode()
        headers = {"content-type": "application/json", "x-request-id": self.caller.request_id}
        tried: list[Worker] = []
        failures: list[_Retry] = []
        for _ in range(routing.retries + 1):
            if self._client_gone:
                break
            try:
                worker = await self.pool.acquire(
                    self.demand,
                    exclude=tried,
                    reject_if_busy=self.job.reject_if_busy,
                    timeout_seconds=routing.queue_timeout_seconds,
                )
            except (NoWorkerError, CapacityError) as exc:
                if failures:
                    break
                raise routing_error(exc, self.pool.name, self.deps.metrics) from None
            tried.append(worker)
            request = self.deps.http.build_request(
                "POST", worker.url + path, content=content, headers=headers, timeout=self._timeout()
            )
            try:
                opened = await self._attempt(worker, request, accept)
            except _Retry as retry:
                self.pool.release(worker)
                failures.append(retry)
                self.deps.metrics.upstream_retries.labels(self.pool.name).inc()
                cause = retry.error.__cause__ or retry  # the transport's own error says more than ours
                logger.warning("worker %s failed before serving %s: %s", worker.url, self.caller.request_id, cause)
                continue
            except BaseException:
                self.pool.release(worker)
                raise
            self._exits.callback(self.pool.release, worker)
            self._worker = worker
            self._response = opened.response
            return opened
        if not failures:  # the client left before any attempt
            raise UpstreamUnavailableError("The client left before a worker took the request")
        if all(failure.worker_status == 429 for failure in failures):
            raise routing_error(CapacityError(), self.pool.name, self.deps.metrics)
        if self.job.lora and all(failure.worker_status == 404 for failure in failures):
            raise InvalidRequestError(f"'/lora': no worker serves the adapter '{self.job.lora}'")
        raise failures[-1].error

    async def _attempt(
        self, worker: Worker, request: httpx.Request, accept: Callable[[], Awaitable[None]] | None
    ) -> _Opened:
        """One worker's try. Raises :class:`_Retry` for what another worker may not share (a refused connection,
        5xx, a busy answer, a stream that fails before its first token); records the worker's health either way."""
        try:
            with map_upstream_errors():
                response = await self.deps.http.send(request, stream=True)
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
                self._response = response  # a client leaving from now on is a hang-up: read what the worker sent
                if not self._started:
                    await accept()
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

    async def _whole_answer(self, response: httpx.Response) -> _Opened:
        try:
            with map_upstream_errors():
                body = await _read_capped(response, self.deps.settings.upstream.max_response_bytes)
        except UpstreamTimeoutError:
            raise
        except UpstreamError as exc:  # the worker died before its answer was complete: the client has seen nothing
            raise _Retry(exc) from None
        return _Opened(response, body=body)

    async def _first_event(self, response: httpx.Response) -> _Opened:
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
        set_read_timeout(response, self.deps.settings.upstream.between_tokens_timeout_seconds)
        return _Opened(response, first=first, events=events)

    def _timeout(self) -> httpx.Timeout:
        """A stream's head and first event may take ``first_token_timeout_seconds`` (then reads between events are
        bounded more tightly); a non-streaming answer arrives only when the whole generation is done, so its wait is
        bounded by ``total_timeout_seconds``."""
        config = self.deps.settings.upstream
        read = config.first_token_timeout_seconds if self.job.stream else config.total_timeout_seconds
        return httpx.Timeout(read, connect=config.connect_timeout_seconds, pool=config.connect_timeout_seconds)

    # -- non-streaming ----------------------------------------------------------------------------------------

    async def _respond(self, send: Send) -> None:
        opened = await self._open()
        data = _answers.parse_object(opened.body)
        text, tool_calls = _answers.whole_answer(data)
        self.meter.observe_usage(data.get("usage"))
        answer: Any = _parse_json_mode(text) if self.job.is_json_mode else text
        self._completing()
        self.meter.delivered(text + _answers.tool_calls_text(tool_calls))
        self.meter.answered = True
        usage = await self._settle()
        cost = self._cost(usage)
        result = {"response": answer, "tool_calls": tool_calls, "usage": usage_with_cost(usage, cost)}
        payload = {"result": result, "success": True, "errors": [], "messages": []}
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        headers = [
            *_JSON_HEADERS,
            (b"content-length", str(len(body)).encode()),
            *_encode(usage_headers(usage, cost)),
            *_encode(self.caller.headers),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    # -- streaming ----------------------------------------------------------------------------------------------

    async def _stream(self, send: Send) -> None:
        opened = await self._start_stream(send)
        if opened is None:
            return
        self.meter.answered = True  # a worker's first event is in hand
        tool_calls = _answers.ToolCallBuffer()
        try:
            with map_upstream_errors():
                if not await self._pump(opened, send, tool_calls):
                    raise UpstreamError("The inference worker closed the stream before it was complete")
        except UpstreamError as exc:
            if self._client_gone:
                return  # the worker closed because the gateway hung up on it: everything it sent is counted
            if self._worker is not None:
                self._worker.failed(f"stream failed: {exc.message}")
            logger.warning("stream %s failed mid-way: %r", self.caller.request_id, exc)
            await self._fail_in_band(exc, send)
            return
        self._completing()
        if self._worker is not None:
            self._worker.succeeded()
        if tool_calls:
            calls = tool_calls.as_workers_ai()
            await send(_more(_sse.frame({"response": "", "tool_calls": calls})))
            self.meter.delivered(_answers.tool_calls_text(calls))
        else:
            self.meter.delivered()  # the final usage report covers only what was delivered
        usage = await self._settle()
        usage_frame = _sse.frame({"response": "", "usage": usage_with_cost(usage, self._cost(usage))})
        await send(_more(usage_frame))
        await send({"type": "http.response.body", "body": _sse.DONE_FRAME})

    async def _start_stream(self, send: Send) -> _Opened | None:
        """Find a worker for the stream and send the headers; ``None`` if the stream ended in-band meanwhile."""
        # The prompt is counted (for the headers and the bill) while the request goes out to a worker.
        counting = asyncio.ensure_future(self._count_prompt()) if self._prompt_tokens is None else None

        async def send_headers() -> None:
            if counting is not None:
                self._prompt_tokens = await counting
            # The final usage event carries the completion tokens and the cost; the headers, the prompt tokens.
            headers = [
                *_sse.SSE_HEADERS,
                (b"x-tollgate-prompt-tokens", str(self._prompt_tokens).encode()),
                *_encode(self.caller.headers),
            ]
            self._started = True
            await send({"type": "http.response.start", "status": 200, "headers": headers})

        # "on_accept": the headers go out once a worker takes the stream, not with its first token (handling them
        # then would add to the client's time to first token); they depend on no worker, so until the first token a
        # failing worker is still replaced unseen, but a stream no worker starts then ends with an in-band error.
        early = self.deps.settings.upstream.stream_headers == "on_accept"
        try:
            opened = await self._open(send_headers if early else None)
            if not early:
                await send_headers()
            return opened
        except TollgateError as exc:
            if not self._started:
                raise
            if not self._client_gone:
                logger.warning("stream %s found no worker after its headers: %r", self.caller.request_id, exc)
                await self._fail_in_band(exc, send)
            return None
        finally:
            if counting is not None and not counting.done():
                counting.cancel()

    async def _pump(self, opened: _Opened, send: Send, tool_calls: _answers.ToolCallBuffer) -> bool:
        """Relay content events until ``[DONE]`` (``True``) or the end of the worker's stream (``False``)."""
        assert opened.first is not None and opened.events is not None
        rng = random.Random()
        with_tool_calls = self.job.form == "messages"
        event: ServerSentEvent | None = opened.first
        while event is not None:
            if event.data == "[DONE]":
                return True
            chunk = _answers.parse_object(event.data)
            if "error" in chunk:
                raise UpstreamError(f"The inference worker failed: {_answers.error_text(chunk)}")
            self.meter.observe_usage(chunk.get("usage"))
            text, fragments = _answers.stream_delta(chunk)
            tool_calls.add(fragments)
            if text:
                await send(_more(_sse.content_frame(text, with_tool_calls=with_tool_calls, rng=rng)))
            # A chunk without text (half a character, a tool-call fragment) has nothing to wait for: its tokens
            # count now, as the worker generated them before any cut that may follow. Once the client is gone,
            # sending does nothing and every chunk still arriving counts.
            self.meter.delivered(text)
            event = await anext(opened.events, None)
        return False

    # -- settle and bill ------------------------------------------------------------------------------------

    async def _settle(self) -> Usage:
        if self._usage is None:
            delivery = self.meter.delivery()
            if delivery.answered and self._prompt_tokens is None:
                self._prompt_tokens = await self._count_prompt()
            settlement = settle_usage(delivery, lambda: self._prompt_tokens or 0, self.deps.tokenizer.count)
            for kind in settlement.mismatches:
                self.deps.metrics.token_count_mismatches.labels(self.job.model, kind).inc()
                logger.warning("worker's %s count for %s differs from ours: %r", kind, self.caller.request_id, delivery)
            self._usage = settlement.usage
        return self._usage

    def _cost(self, usage: Usage) -> int:
        return cost_nano_usd(price_of(self.model), usage.prompt_tokens, usage.completion_tokens)

    async def _count_prompt(self) -> int:
        """The gateway's own prompt count (admission skips it when a cheap bound proves the prompt fits)."""
        counter = self.deps.counters[self.job.model]
        try:
            return await count_prompt_async(self.job, counter, size_bytes=_text_size(self.job))
        except InvalidRequestError:  # the template refuses it, yet a worker answered: bill no prompt, say so
            logger.warning("cannot render the prompt of %s to count it", self.caller.request_id)
            return 0

    async def _finish(self) -> None:
        self._complete = True
        if self._response is not None:
            await self._response.aclose()  # mid-stream this drops the connection: the worker aborts
        self._exits.close()
        usage = await self._settle()
        record = UsageRecord(
            request_id=self.caller.request_id,
            tenant=self.caller.tenant,
            key_id=self.caller.key_id,
            model=self.job.model,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cost_nano_usd=self._cost(usage),
            status=self.status,
            started_at=self.caller.started_at,
            duration_seconds=max(0.0, self.deps.clock() - self.caller.started_at),
        )
        try:
            await self.deps.durable_ledger.record(record)  # spools the record if Redis cannot take it
        except OSError:
            logger.critical("cannot bill %r: Redis and the spool both failed", record, exc_info=True)


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


def _encode(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.encode(), value.encode()) for name, value in headers.items()]


def _text_size(job: InferenceJob) -> int:
    return len(job.prompt or "") + sum(len(str(message.get("content") or "")) for message in job.messages)


def _more(body: bytes) -> dict[str, Any]:
    return {"type": "http.response.body", "body": body, "more_body": True}


async def _read_capped(response: httpx.Response, max_bytes: int) -> bytes:
    chunks, size = [], 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > max_bytes:
            raise UpstreamError(f"The inference worker's answer exceeds {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_json_mode(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise JsonModeError() from None


def _status_of(exc: TollgateError) -> str:
    for cls, status in _STATUS_BY_ERROR:
        if isinstance(exc, cls):
            return status
    return "error"
