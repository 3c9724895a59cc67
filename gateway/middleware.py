"""Pure ASGI middleware: request id, metrics and access log, body-size cap (no BaseHTTPMiddleware on the streaming
path)."""

from __future__ import annotations

import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import InvalidRequestError, PayloadTooLargeError, TollgateError, is_openai_path, render_error
from gateway.logs import log_access
from gateway.observe import GatewayMetrics, RequestFacts, route_label, safe_observe

REQUEST_ID_HEADER = b"x-request-id"
CLIENT_CLOSED_REQUEST = 499  # the status logged and counted for a client that left before any response


class RequestIdMiddleware:
    """Gives every request a fresh id (``scope["state"]["request_id"]``) and returns it as ``x-request-id``.

    The id is the ledger's deduplication key, so it is always generated here and never taken from the client.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        header = (REQUEST_ID_HEADER, request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        await self.app(scope, receive, send_with_id)


class ObserveMiddleware:
    """Counts and times every request by route, model and status class, and writes its access log line once the
    last byte is sent (for an inference request, after its bill). Handlers fill in ``scope["state"]["facts"]``
    (:class:`~gateway.observe.RequestFacts`): tenant, model, tokens, cost, first token. Sits inside
    :class:`RequestIdMiddleware`."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        facts = RequestFacts(
            request_id=state.get("request_id", ""), route=route_label(scope["path"]), started=time.perf_counter()
        )
        state["facts"] = facts
        status: int | None = None

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        in_flight = self.metrics.in_flight.labels(facts.route)
        safe_observe(in_flight.inc)
        try:
            await self.app(scope, receive, observed_send)
        finally:
            safe_observe(in_flight.dec)
            if status is None:  # no response: the client left first (499, as nginx logs it), or an error escaped
                status = CLIENT_CLOSED_REQUEST if facts.outcome == "client_disconnected" else 500
            finished = time.perf_counter()
            safe_observe(self.metrics.record_request, facts, status, finished)
            client = scope.get("client")
            safe_observe(
                log_access, facts, scope["method"], scope["path"], status, client[0] if client else "", finished
            )


class BodySizeLimitMiddleware:
    """Refuses bodies over ``max_body_bytes`` with 413 before they are parsed, whether or not they declare a
    ``content-length`` (uvicorn has no body limit of its own)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        openai = is_openai_path(scope["path"])
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit():
                    error: TollgateError = InvalidRequestError("the content-length header is not a number")
                    await render_error(error, openai=openai)(scope, receive, send)
                    return
                if int(value) > self.max_body_bytes:
                    await render_error(PayloadTooLargeError(), openai=openai)(scope, receive, send)
                    return
        received = 0

        async def capped_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise PayloadTooLargeError()
            return message

        await self.app(scope, capped_receive, send)
