"""A lean HTTP/1.1 transport for httpx, for the hot path to the workers.

httpx's default transport (httpcore over anyio, with h11 in pure Python) costs about 1.5 ms per request and
~150 µs per streamed chunk on these machines; a token stream is one chunk per token, so on a 2-core box it was
the gateway's largest cost (bench/README.md). This transport keeps httpx's API and exception tree, and does the
wire work with an ``asyncio.Protocol`` per connection and the C parser from ``httptools`` (uvicorn's own):

- keep-alive connections per origin, at most ``max_connections`` open (waiting up to the pool timeout) and
  ``max_keepalive_connections`` idle;
- timeouts from the request (``connect``, ``read`` between two reads, ``pool``), as httpx passes them;
- closing a response before its end closes the connection, so the worker sees the client leave and aborts;
  :func:`hang_up` instead half-closes it: the worker aborts just the same, and what it sent until then can still
  be read (how the gateway bills exactly what a worker generated for a client that left);
- a request on a reused keep-alive connection that the server closed before answering is retried once on a new
  connection (the server cannot have read it); nothing else is ever retried here;
- reading pauses while more than ``_HIGH_WATER_BYTES`` wait unread.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import typing
from collections.abc import AsyncIterator
from typing import Any, Final

import httptools
import httpx

_HIGH_WATER_BYTES: Final = 256 * 1024
_Origin = tuple[bytes, bytes, int]
_HANG_UP: Final = "tollgate.hang_up"  # response extension: half-closes the connection (see hang_up)
_SET_READ_TIMEOUT: Final = "tollgate.set_read_timeout"  # response extension (see set_read_timeout)


class _StaleConnectionError(Exception):
    """A reused connection was closed by the server before any byte of the answer."""


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: feeds bytes to httptools and hands parsed pieces to one waiting reader."""

    def __init__(self, origin: _Origin) -> None:
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.is_reused = False
        self._parser = httptools.HttpResponseParser(self)
        self._headers: list[tuple[bytes, bytes]] = []
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._status = 0
        self._has_head = False
        self._is_complete = False
        self._keep_alive = False
        self._got_bytes = False
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._hung_up = False

    # -- asyncio.Protocol -------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"malformed response from the worker: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._is_complete and self._error is None:
            if not self._got_bytes and self.is_reused:
                self._fail(_StaleConnectionError())
            else:
                self._fail(httpx.RemoteProtocolError("peer closed connection without sending complete message body"))
        self._wake()

    # -- httptools callbacks ---------------------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        self._has_head = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER_BYTES and self.transport is not None and not self._paused:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self._is_complete = True
        self._keep_alive = self._parser.should_keep_alive()  # httptools forgets it once feed_data returns
        self._wake()

    # -- used by the transport -------------------------------------------------------------------------------

    @property
    def is_usable(self) -> bool:
        """Idle, open, and with nothing unexpected received."""
        return (
            self.transport is not None and not self.transport.is_closing() and self._error is None and not self._hung_up
        )

    @property
    def can_keep_alive(self) -> bool:
        return self._is_complete and self._keep_alive and self.is_usable

    def start(self, head_and_body: bytes) -> None:
        """Begin an exchange on this (fresh or idle) connection."""
        self._parser = httptools.HttpResponseParser(self)
        self._headers, self._status, self._has_head, self._is_complete, self._got_bytes = [], 0, False, False, False
        assert self.transport is not None
        self.transport.write(head_and_body)

    async def read_head(self, timeout_seconds: float | None) -> tuple[int, list[tuple[bytes, bytes]]]:
        while not self._has_head:
            await self._wait(timeout_seconds)
        return self._status, self._headers

    async def read_body(self, timeout_seconds: float | None) -> bytes | None:
        """The next piece of the body, or ``None`` at its end."""
        while not self._chunks:
            if self._is_complete:
                return None
            await self._wait(timeout_seconds)
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._paused and self._buffered <= _HIGH_WATER_BYTES // 2 and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return chunk

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def half_close(self) -> bool:
        """Send end-of-input while keeping the read side open; ``False`` (and closed) where that is impossible."""
        transport = self.transport
        if transport is None or transport.is_closing() or self._is_complete:
            return False
        self._hung_up = True
        if not transport.can_write_eof():
            transport.close()
            return False
        transport.write_eof()
        return True

    async def _wait(self, timeout_seconds: float | None) -> None:
        if self._error is not None:
            raise self._error
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        timer = loop.call_later(timeout_seconds, _expire, waiter) if timeout_seconds is not None else None
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
        if self._error is not None:
            raise self._error

    def _fail(self, error: Exception) -> None:
        self._error = error
        self.close()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(httpx.ReadTimeout("timed out waiting for the worker"))


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, transport: WorkerTransport, connection: _Connection, read_timeout_seconds: float | None) -> None:
        self._transport = transport
        self._connection = connection
        self._read_timeout = read_timeout_seconds
        self._is_done = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while (chunk := await self._connection.read_body(self._read_timeout)) is not None:
            yield chunk
        self._finish()

    async def aclose(self) -> None:
        self._finish()

    def hang_up(self) -> bool:
        return self._connection.half_close()

    def set_read_timeout(self, seconds: float | None) -> None:
        self._read_timeout = seconds

    def _finish(self) -> None:
        if not self._is_done:
            self._is_done = True
            self._transport._release(self._connection)


class WorkerTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 to the workers over asyncio and httptools (see the module docstring).

    Usage::

        client = httpx.AsyncClient(transport=WorkerTransport(max_connections=1024), timeout=httpx.Timeout(60))
    """

    def __init__(self, *, max_connections: int = 1024, max_keepalive_connections: int = 256) -> None:
        self._slots = asyncio.Semaphore(max_connections)
        self._max_idle = max_keepalive_connections
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._idle_count = 0
        self._ssl: ssl.SSLContext | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        payload = _encode(request, await request.aread())
        await self._acquire_slot(timeouts.get("pool"))
        try:
            connection = await self._connection_for(request, timeouts.get("connect"))
            try:
                status, headers = await self._exchange(connection, payload, timeouts.get("read"))
            except _StaleConnectionError:
                connection = await self._open(request, timeouts.get("connect"))
                status, headers = await self._exchange(connection, payload, timeouts.get("read"))
        except BaseException:
            self._slots.release()
            raise
        stream = _ResponseStream(self, connection, timeouts.get("read"))
        extensions = {"http_version": b"HTTP/1.1", _HANG_UP: stream.hang_up, _SET_READ_TIMEOUT: stream.set_read_timeout}
        return httpx.Response(status, headers=headers, stream=stream, extensions=extensions)

    async def aclose(self) -> None:
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()
        self._idle_count = 0

    async def _exchange(
        self, connection: _Connection, payload: bytes, read_timeout_seconds: float | None
    ) -> tuple[int, list[tuple[bytes, bytes]]]:
        connection.start(payload)
        try:
            return await connection.read_head(read_timeout_seconds)
        except BaseException:
            connection.close()
            raise

    async def _acquire_slot(self, timeout_seconds: float | None) -> None:
        if not self._slots.locked():
            await self._slots.acquire()  # immediate: skip wait_for's task on the common path
            return
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout_seconds)
        except TimeoutError:
            raise httpx.PoolTimeout("no free connection to the workers") from None

    async def _connection_for(self, request: httpx.Request, timeout_seconds: float | None) -> _Connection:
        idle = self._idle.get(_origin(request.url))
        while idle:
            connection = idle.pop()
            self._idle_count -= 1
            if connection.is_usable:
                connection.is_reused = True
                return connection
            connection.close()
        return await self._open(request, timeout_seconds)

    async def _open(self, request: httpx.Request, timeout_seconds: float | None) -> _Connection:
        scheme, host, port = _origin(request.url)
        loop = asyncio.get_running_loop()
        context = None
        if scheme == b"https":
            context = self._ssl = self._ssl or ssl.create_default_context()
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection((scheme, host, port)), host.decode(), port, ssl=context),
                timeout_seconds,
            )
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {request.url.host}:{port} timed out") from None
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {request.url.host}:{port}: {exc}") from exc
        return connection

    def _release(self, connection: _Connection) -> None:
        self._slots.release()
        if connection.can_keep_alive and self._idle_count < self._max_idle:
            self._idle.setdefault(connection.origin, []).append(connection)
            self._idle_count += 1
        else:
            connection.close()


def hang_up(response: httpx.Response) -> bool:
    """Half-close the connection of a streaming ``response`` from :class:`WorkerTransport`: the worker sees the
    client leave and stops, while the rest of what it already sent stays readable. ``False`` if the response is not
    one of ours or cannot be half-closed (then reading it ends soon, or the caller should close it)."""
    half_close = response.extensions.get(_HANG_UP)
    return bool(half_close()) if half_close is not None else False


def set_read_timeout(response: httpx.Response, seconds: float | None) -> None:
    """From now on, wait at most ``seconds`` between two reads of ``response``'s body (a stream's first token may take
    longer than the gap between two tokens). Does nothing for responses of other transports."""
    change = response.extensions.get(_SET_READ_TIMEOUT)
    if change is not None:
        change(seconds)


def _origin(url: httpx.URL) -> _Origin:
    port = url.port or (443 if url.scheme == "https" else 80)
    return url.raw_scheme, url.raw_host, port


def _encode(request: httpx.Request, body: bytes) -> bytes:
    target = request.url.raw_path
    lines = [request.method.encode() + b" " + target + b" HTTP/1.1"]
    headers: Any = request.headers.raw
    chunked = False
    for name, value in headers:
        if name.lower() == b"transfer-encoding":
            chunked = True
            continue
        lines.append(name + b": " + value)
    if chunked:  # the whole body is in hand: send it with its length
        lines.append(b"content-length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body
