"""One request on the wire: the client-disconnect watch, the served record, and raw ASGI sends."""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import Any, Final

from starlette.types import Receive, Scope, Send

# The server's own send callable, stored by the app before Starlette's middleware wraps it (see drop_connection).
RAW_SEND_SCOPE_KEY: Final = "tollgate.sim.raw_send"
_DROP_WAIT_SECONDS: Final = 1.0


class ClientWatch:
    """Reads ``receive()`` in a background task and notes the client's ``http.disconnect``.

    Start it only once the request body has been read: after that, the only message left is the disconnect.
    """

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._gone = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def is_gone(self) -> bool:
        return self._gone.is_set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self._gone.set()

    async def sleep(self, seconds: float) -> bool:
        """Wait ``seconds`` (at least one turn of the loop, so that a pending disconnect is seen).

        Returns False, at once, when the client goes away.
        """
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self._gone.wait()
        else:
            await asyncio.sleep(0)
        return not self._gone.is_set()

    async def wait_gone(self, timeout_seconds: float | None = None) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_seconds):
                await self._gone.wait()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


@dataclass(slots=True)
class Tally:
    """The ``/sim/served`` record of one request, appended to ``served`` exactly once by `commit`.

    ``completion_tokens`` counts generated tokens whose frame (or whole body) was handed to the server, and
    ``status`` is the status sent in the response headers, 0 when none were sent.
    """

    served: list[dict[str, Any]]
    request_id: str | None
    endpoint: str
    model: str | None = None
    stream: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "abort"
    status: int = 0
    _committed: bool = field(default=False, repr=False)

    def commit(self, *, client_disconnected: bool) -> None:
        if self._committed:
            return
        self._committed = True
        self.served.append(
            {
                "request_id": self.request_id,
                "endpoint": self.endpoint,
                "model": self.model,
                "stream": self.stream,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "finish_reason": self.finish_reason,
                "client_disconnected": client_disconnected,
                "status": self.status,
            }
        )


@dataclass(slots=True)
class Exchange:
    """The ASGI side of one generation request."""

    scope: Scope
    send: Send
    watch: ClientWatch
    tally: Tally

    def commit(self) -> None:
        self.tally.commit(client_disconnected=self.watch.is_gone)

    async def start_response(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.tally.status = status
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def send_body(self, body: bytes, *, more_body: bool) -> bool:
        """Hand ``body`` to the server unless the client is already gone; False when it was not sent.

        The server may know before the app does (uvicorn marks its request cycle ``disconnected`` when the connection
        is lost, and drops whatever is sent after that): a frame counts as served only if it really went out."""
        if self.watch.is_gone or getattr(_server_cycle(self.scope.get(RAW_SEND_SCOPE_KEY)), "disconnected", False):
            return False
        await self.send({"type": "http.response.body", "body": body, "more_body": more_body})
        return True

    async def respond_json(self, status: int, payload: Any) -> None:
        """A whole JSON response. The record is committed first, so it exists once the client has the answer."""
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        self.tally.status = status
        self.commit()
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        await self.send({"type": "http.response.body", "body": body, "more_body": False})

    async def drop_connection(self) -> None:
        """Close the TCP connection under the server: the client sees a reset or a truncated body.

        ASGI has no abort message, and an exception or an unfinished response makes uvicorn log an error (or send a
        500 before the headers). uvicorn's ``send`` is a bound method of its request cycle, which holds the asyncio
        transport; closing that transport is what a crashed worker looks like. Other servers: the drop is raised.
        """
        transport = _transport_of(self.scope.get(RAW_SEND_SCOPE_KEY))
        if transport is None:
            raise ConnectionAbortedError("the simulated worker dropped the connection")
        transport.close()
        # uvicorn marks the cycle disconnected in connection_lost, a loop turn later; returning before that would
        # make it complain that the app returned without a response.
        await self.watch.wait_gone(_DROP_WAIT_SECONDS)


def _server_cycle(send: Any) -> Any:
    return getattr(send, "__self__", None)


def _transport_of(send: Any) -> Any:
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if callable(getattr(transport, "close", None)) and callable(getattr(transport, "is_closing", None)):
        return transport
    return None
