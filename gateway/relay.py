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
import json
import logging
import random
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final

import anyio
import httpx
from httpx_sse import EventSource, SSEError
from starlette.types import Message, Receive, Scope, Send

from billing import (
    Usage,
    UsageRecord,
    cost_nano_usd,
    price_of,
    settle_usage,
)
from gateway import _answers, _sse
from gateway._transport import hang_up
from gateway.admit import Admission, count_prompt_async
from gateway.errors import (
    InvalidRequestError,
    JsonModeError,
    TollgateError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from gateway.meter import Meter, usage_headers, usage_with_cost
from gateway.route import Worker
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
    (UpstreamTimeoutError, "upstream_timeout"),
    (UpstreamUnavailableError, "upstream_unavailable"),
    (UpstreamError, "upstream_error"),
    (InvalidRequestError, "rejected_by_worker"),
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


class RetryableUpstreamError(UpstreamError):
    """A worker refused the request before serving it (5xx, 404): another worker may be tried."""

    def __init__(self, status: int) -> None:
        super().__init__(f"The inference worker answered HTTP {status}")
        self.status = status


async def _raise_for_worker_status(response: httpx.Response) -> None:
    """Classify a worker's non-200 answer by its status (never by its text): 400 is the client's, the rest retryable."""
    try:
        with map_upstream_errors():
            raw = await _read_capped(response, 65536)
    finally:
        await response.aclose()
    if response.status_code == 400:
        try:
            detail = _answers.error_text(_answers.parse_object(raw))
        except UpstreamError:
            detail = "the worker refused the request"
        raise InvalidRequestError(detail)
    raise RetryableUpstreamError(response.status_code)


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
        self.meter = Meter(job.max_tokens)
        self.status = "ok"
        self._complete = False
        self._client_gone = False
        self._usage: Usage | None = None
        self._response: httpx.Response | None = None
        self._exits = contextlib.ExitStack()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        cancel = anyio.CancelScope()
        watcher = asyncio.create_task(self._watch_disconnect(receive, cancel))

        async def send_while_connected(message: Message) -> None:
            if not self._client_gone:
                await send(message)

        try:
            with cancel:
                await (self._stream(send_while_connected) if self.job.stream else self._respond(send_while_connected))
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

    async def _watch_disconnect(self, receive: Receive, cancel: anyio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if self._complete:
            return
        self.status = "client_disconnected"
        self._client_gone = True
        if self.job.stream and self._response is not None and hang_up(self._response):
            # The worker stops by itself now; the stream reads what it sent meanwhile, within the drain deadline.
            cancel.deadline = anyio.current_time() + self.deps.settings.upstream.hang_up_drain_seconds
        else:
            cancel.cancel()

    # -- the worker call ------------------------------------------------------------------------------------

    async def _open(self) -> httpx.Response:
        """Send the job to the first worker that takes it; retries happen only here, before any byte is sent."""
        path, body = to_vllm_request(self.job, self.model.served_name)
        content = json.dumps(body, ensure_ascii=False).encode()
        headers = {"content-type": "application/json", "x-request-id": self.caller.request_id}
        candidates = self.deps.pools[self.model.pool].candidates()
        errors: list[UpstreamError] = []
        for worker in candidates:
            request = self.deps.http.build_request(
                "POST", worker.url + path, content=content, headers=headers, timeout=self._timeout()
            )
            with worker.track():
                try:
                    with map_upstream_errors():
                        response = await self.deps.http.send(request, stream=True)
                    if response.status_code == 200:
                        self._hold(worker, response)
                        return response
                    await _raise_for_worker_status(response)
                except (UpstreamUnavailableError, RetryableUpstreamError) as exc:
                    logger.warning("worker %s failed before serving %s: %r", worker.url, self.caller.request_id, exc)
                    errors.append(exc)
        if self.job.lora and errors and all(getattr(error, "status", 0) == 404 for error in errors):
            raise InvalidRequestError(f"'/lora': no worker serves the adapter '{self.job.lora}'")
        raise errors[-1] if errors else UpstreamUnavailableError()

    def _timeout(self) -> httpx.Timeout:
        """Streams use the client's read timeout between chunks; a non-streaming answer arrives only when the
        whole generation is done, so its wait is bounded by ``upstream.response_timeout_seconds`` instead."""
        if self.job.stream:
            return self.deps.http.timeout
        config = self.deps.settings.upstream
        return httpx.Timeout(config.response_timeout_seconds, connect=config.connect_timeout_seconds)

    def _hold(self, worker: Worker, response: httpx.Response) -> None:
        self._exits.enter_context(worker.track())
        self._response = response

    # -- non-streaming ----------------------------------------------------------------------------------------

    async def _respond(self, send: Send) -> None:
        response = await self._open()
        with map_upstream_errors():
            raw = await _read_capped(response, self.deps.settings.upstream.max_response_bytes)
        data = _answers.parse_object(raw)
        text, tool_calls = _answers.whole_answer(data)
        self.meter.observe_usage(data.get("usage"))
        answer: Any = _parse_json_mode(text) if self.job.is_json_mode else text
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
        self._complete = True
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    # -- streaming ----------------------------------------------------------------------------------------------

    async def _stream(self, send: Send) -> None:
        response = await self._open()
        if self._prompt_tokens is None:  # counted while the worker starts generating; the bill needs it anyway
            self._prompt_tokens = await self._count_prompt()
        # The stream's final usage event carries the completion tokens and the cost; the headers, the prompt tokens.
        headers = [
            *_sse.SSE_HEADERS,
            (b"x-tollgate-prompt-tokens", str(self._prompt_tokens).encode()),
            *_encode(self.caller.headers),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        self.meter.answered = True
        tool_calls = _answers.ToolCallBuffer()
        try:
            with map_upstream_errors():
                if not await self._pump(response, send, tool_calls):
                    raise UpstreamError("The inference worker closed the stream before it was complete")
        except UpstreamError as exc:
            if self._client_gone:
                return  # the worker closed because the gateway hung up on it: everything it sent is counted
            self.status = _status_of(exc)
            logger.warning("stream %s failed mid-way: %r", self.caller.request_id, exc)
            self._complete = True
            await send(_more(_sse.error_frame(exc.code, exc.message)))
            await send({"type": "http.response.body", "body": _sse.DONE_FRAME})
            return
        if tool_calls:
            calls = tool_calls.as_workers_ai()
            await send(_more(_sse.frame({"response": "", "tool_calls": calls})))
            self.meter.delivered(_answers.tool_calls_text(calls))
        else:
            self.meter.delivered()  # the final usage report covers only what was delivered
        usage = await self._settle()
        usage_frame = _sse.frame({"response": "", "usage": usage_with_cost(usage, self._cost(usage))})
        self._complete = True
        await send(_more(usage_frame))
        await send({"type": "http.response.body", "body": _sse.DONE_FRAME})

    async def _pump(self, response: httpx.Response, send: Send, tool_calls: _answers.ToolCallBuffer) -> bool:
        """Relay content events until ``[DONE]`` (``True``) or the end of the worker's stream (``False``)."""
        rng = random.Random()
        with_tool_calls = self.job.form == "messages"
        async for event in EventSource(response).aiter_sse():
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
