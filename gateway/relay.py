"""Step 5, relay: send an admitted job to a worker and bring its answer back in Workers AI shape.

:class:`Relay` is the ASGI app that owns one request from the worker call to the bill. The call itself (which
worker, retries before any of the answer was sent) is gateway/upstream.py. The relay watches for the client
going away the whole time, ends the request cleanly at a deadline or the drain, and bills from one shielded
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
import dataclasses
import logging
import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

import anyio
from httpx_sse import ServerSentEvent
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
    CapacityExceededError,
    InvalidRequestError,
    ShuttingDownError,
    TollgateError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from gateway.meter import Meter, usage_headers
from gateway.observe import RequestFacts, safe_observe
from gateway.shapes import AnswerShape
from gateway.upstream import Opened, WorkerCall, map_upstream_errors
from gateway.validate import InferenceJob

if TYPE_CHECKING:
    from gateway.deps import Dependencies

logger = logging.getLogger(__name__)

_STATUS_BY_ERROR: Final = (
    (ShuttingDownError, "shutdown"),
    (UpstreamTimeoutError, "upstream_timeout"),
    (UpstreamUnavailableError, "upstream_unavailable"),
    (UpstreamError, "upstream_error"),
    (InvalidRequestError, "rejected_by_worker"),
    (CapacityExceededError, "capacity"),
)
_JSON_HEADERS: Final = ((b"content-type", b"application/json"),)


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

    def __init__(
        self, admission: Admission, caller: Caller, deps: Dependencies, shape: AnswerShape, facts: RequestFacts
    ) -> None:
        self.job = job = admission.job
        self.shape = shape  # the route's answer format (gateway/shapes.py)
        self.facts = facts  # for the request's metrics and access log line
        self._prompt_tokens = admission.prompt_tokens
        self.caller = caller
        self.deps = deps
        self.model = deps.settings.models[job.model]
        self.meter = Meter(job.max_tokens)
        self.status = "ok"
        self._complete = False
        self._client_gone = False
        self._started = False  # the response's headers went out: from here on, errors are in-band
        self._cut_error: TollgateError | None = None
        self._cancel = anyio.CancelScope()
        self._usage: Usage | None = None
        self._finish_reason = "stop"
        self._stop_reason: str | None = None
        self._call = WorkerCall(job, caller.request_id, deps, lambda: self._client_gone)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        cancel = self._cancel
        watcher = asyncio.create_task(self._watch_disconnect(receive, cancel))

        async def send_while_connected(message: Message) -> None:
            if not self._client_gone:
                await send(message)

        streams = self.deps.metrics.streams_in_flight.labels(self.job.model) if self.job.stream else None
        if streams is not None:
            safe_observe(streams.inc)
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
            if streams is not None:
                safe_observe(streams.dec)
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
        """End a stream whose headers went out with a final error event (in the route's shape) and ``[DONE]``."""
        self.status = "shutdown" if isinstance(error, ShuttingDownError) else _status_of(error)
        self._completing()
        await send({"type": "http.response.body", "body": self.shape.error(error)})

    async def _watch_disconnect(self, receive: Receive, cancel: anyio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if self._complete:
            return
        self.status = "client_disconnected"
        self._client_gone = True
        if self.job.stream and self._call.response is not None and hang_up(self._call.response):
            # The worker stops by itself now; the stream reads what it sent meanwhile, within the drain deadline.
            drain_until = anyio.current_time() + self.deps.settings.upstream.hang_up_drain_seconds
            cancel.deadline = min(cancel.deadline, drain_until)
        else:
            cancel.cancel()

    # -- non-streaming ----------------------------------------------------------------------------------------

    async def _respond(self, send: Send) -> None:
        opened = await self._call.open()
        data = _answers.parse_object(opened.body)
        answer = _answers.whole_answer(data)
        self.meter.observe_usage(data.get("usage"))
        prepared = self.shape.prepare(answer)  # JSON mode on the native route: refused here, before the bill
        self._completing()
        self.meter.delivered(answer.text + self._unseen_text(answer.stop_reason, answer.tool_calls))
        self.meter.answered = True
        usage = await self._settle()
        cost = self._cost(usage)
        body = self.shape.whole(prepared, usage, cost)
        headers = [
            *_JSON_HEADERS,
            (b"content-length", str(len(body)).encode()),
            *_encode(usage_headers(usage, cost)),
            *_encode(self.caller.headers),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        self._first_token_sent()

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
            worker = self._call.worker
            if worker is not None:
                worker.failed(f"stream failed: {exc.message}")
            cause = exc.__cause__ or exc
            where = worker.url if worker is not None else "?"
            logger.warning("stream %s failed mid-way at worker %s: %r", self.caller.request_id, where, cause)
            await self._fail_in_band(exc, send)
            return
        self._completing()
        if self._call.worker is not None:
            self._call.worker.succeeded()
        calls = tool_calls.as_openai()
        self.meter.delivered(self._unseen_text(self._stop_reason, calls))  # the final usage covers what was delivered
        usage = await self._settle()
        ending = self.shape.end(calls, self._finish_reason, usage, self._cost(usage))
        await send({"type": "http.response.body", "body": ending})

    async def _start_stream(self, send: Send) -> Opened | None:
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
            opened = await self._call.open(send_headers if early else None)
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

    async def _pump(self, opened: Opened, send: Send, tool_calls: _answers.ToolCallBuffer) -> bool:
        """Relay content events until ``[DONE]`` (``True``) or the end of the worker's stream (``False``)."""
        assert opened.first is not None and opened.events is not None
        event: ServerSentEvent | None = opened.first
        while event is not None:
            if event.data == "[DONE]":
                return True
            chunk = _answers.parse_object(event.data)
            if "error" in chunk:
                raise UpstreamError(f"The inference worker failed: {_answers.error_text(chunk)}")
            self.meter.observe_usage(chunk.get("usage"))
            delta = _answers.stream_delta(chunk)
            tool_calls.add(delta.fragments)
            self._finish_reason = delta.finish_reason or self._finish_reason
            self._stop_reason = delta.stop_reason or self._stop_reason
            frames = self.shape.content(delta.text) if delta.text else b""
            if delta.fragments:
                frames += self.shape.tool_fragments(delta.fragments)
            if frames:
                await send(_more(frames))
                if self.facts.first_token is None:
                    self._first_token_sent()
            # A chunk without text (half a character, a tool-call fragment) has nothing to wait for: its tokens
            # count now, as the worker generated them before any cut that may follow. Once the client is gone,
            # sending does nothing and every chunk still arriving counts.
            self.meter.delivered(delta.text)
            event = await anext(opened.events, None)
        return False

    def _first_token_sent(self) -> None:
        self.facts.first_token = time.perf_counter()
        self.facts.worker_first_token_seconds = self._call.first_token_seconds

    def _unseen_text(self, stop_reason: str | None, tool_calls: list[dict[str, Any]]) -> str:
        """What the model generated that the text does not show, for the gateway's own count: the stop string that
        ended the answer (vLLM counts its tokens but cuts it from the text), and tool calls as the model wrote them."""
        stop = stop_reason if stop_reason in self.job.stop else ""
        if isinstance(self.job.tool_choice, Mapping):  # a named tool: the model wrote only the arguments
            return stop + "".join(call["function"]["arguments"] for call in tool_calls)
        return stop + (_answers.tool_calls_text(tool_calls) if tool_calls else "")

    # -- settle and bill ------------------------------------------------------------------------------------

    async def _settle(self) -> Usage:
        if self._usage is None:
            delivery = self.meter.delivery()
            if delivery.answered and self._prompt_tokens is None:
                self._prompt_tokens = await self._count_prompt()
            settlement = settle_usage(delivery, lambda: self._prompt_tokens or 0, self.deps.tokenizer.count)
            for kind in settlement.mismatches:
                safe_observe(self.deps.metrics.token_count_mismatches.labels(self.job.model, kind).inc)
                logger.warning(
                    "worker's %s count for %s differs from ours (worker: %s prompt, %s completion tokens)",
                    kind,
                    self.caller.request_id,
                    delivery.reported_prompt_tokens,
                    delivery.reported_completion_tokens,
                )
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
        await self._call.close()
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
        facts = self.facts
        facts.worker = self._call.worker_url
        try:
            billed = await self.deps.durable_ledger.record(record)  # spools the record if Redis cannot take it
        except OSError:
            logger.critical("cannot bill %r: Redis and the spool both failed", record, exc_info=True)
            facts.outcome = "not_billed"
            return
        if billed == "refused":  # set aside for an operator: not in the ledger, so not in the metrics either
            facts.outcome = "not_billed"
            return
        facts.outcome = record.status
        facts.prompt_tokens, facts.completion_tokens = record.prompt_tokens, record.completion_tokens
        facts.cost_nano_usd = record.cost_nano_usd
        if billed == "spooled":  # the ledger has it once the spool is replayed
            safe_observe(self.deps.metrics.redis_errors.labels("bill").inc)
        # "duplicate" too: request ids are never reused, so only this bill's own earlier attempt (a reply lost to a
        # timeout, then retried) can have written it, and the ledger holds it once.
        safe_observe(self.deps.metrics.record_bill, record)


def _encode(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.encode(), value.encode()) for name, value in headers.items()]


def _text_size(job: InferenceJob) -> int:
    return len(job.prompt or "") + sum(len(str(message.get("content") or "")) for message in job.messages)


def _more(body: bytes) -> dict[str, Any]:
    return {"type": "http.response.body", "body": body, "more_body": True}


def _status_of(exc: TollgateError) -> str:
    for cls, status in _STATUS_BY_ERROR:
        if isinstance(exc, cls):
            return status
    return "error"
