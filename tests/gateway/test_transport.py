"""The workers' HTTP/1.1 transport against real sockets: a scripted raw server for the edge cases, and the
simulated worker under uvloop (production's loop)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
import uvloop

from billing import Tokenizer
from gateway._transport import WorkerTransport
from tests.conftest import BF16_NAME, sim_worker

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK_BODY = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-type: text/plain\r\n\r\nhello"


class ScriptedServer:
    """A loopback server that runs ``handler`` per connection and counts connections and requests."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.closed_by_client = asyncio.Event()

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def scripted(handler: Handler) -> AsyncIterator[tuple[str, ScriptedServer]]:
    state = ScriptedServer(handler)
    server = await asyncio.start_server(state, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        server.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


def client(**timeouts: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=WorkerTransport(max_connections=4), timeout=httpx.Timeout(2.0, **timeouts))


async def keep_answering(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        try:
            await read_request(reader)
        except asyncio.IncompleteReadError:
            return
        writer.write(OK_BODY)
        await writer.drain()


async def test_transport_reuses_keep_alive_connections() -> None:
    async with scripted(keep_answering) as (url, server), client() as http:
        for _ in range(3):
            response = await http.post(url + "/x", content=b'{"a": 1}')
            assert (response.status_code, response.text) == (200, "hello")
            assert response.headers["content-type"] == "text/plain"
        assert server.connections == 1


async def test_transport_sends_the_request_as_given() -> None:
    seen: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_request(reader))
        writer.write(OK_BODY)

    async with scripted(record) as (url, _), client() as http:
        await http.post(url + "/v1/chat/completions?q=1", content=b"{}", headers={"x-request-id": "abc"})
    head, body = seen[0].split(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    assert lines[0] == b"post /v1/chat/completions?q=1 http/1.1"
    assert b"x-request-id: abc" in lines and b"content-length: 2" in lines and body == b"{}"


async def test_transport_reads_chunked_bodies_piece_by_piece() -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for piece in (b"data: 1\n\n", b"data: 2\n\n"):
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.02)
        writer.write(b"0\r\n\r\n")
        await keep_answering(reader, writer)

    async with scripted(chunked) as (url, server), client() as http:
        async with http.stream("POST", url + "/s", content=b"{}") as response:
            pieces = [piece async for piece in response.aiter_raw()]
        assert pieces == [b"data: 1\n\n", b"data: 2\n\n"]
        assert (await http.post(url + "/again", content=b"{}")).text == "hello"
        assert server.connections == 1


async def test_transport_server_closing_mid_body_is_a_remote_protocol_error() -> None:
    async def die(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
        await writer.drain()

    async with scripted(die) as (url, _), client() as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.post(url + "/x", content=b"{}")


async def test_transport_silence_is_a_read_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(5)

    async with scripted(silent) as (url, _), client(read=0.2) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post(url + "/x", content=b"{}")


async def test_transport_refused_connection_is_a_connect_error() -> None:
    async with client() as http:
        with pytest.raises(httpx.ConnectError):
            await http.post("http://127.0.0.1:9/x", content=b"{}")


async def test_transport_closing_a_stream_early_closes_the_connection() -> None:
    closed = asyncio.Event()

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        try:
            while True:
                writer.write(b"5\r\nhello\r\n")
                await writer.drain()
                await asyncio.sleep(0.01)
        except (ConnectionError, OSError):
            closed.set()

    async with scripted(endless) as (url, server), client() as http:
        async with http.stream("POST", url + "/s", content=b"{}") as response:
            async for _ in response.aiter_raw():
                break
        await asyncio.wait_for(closed.wait(), 2)
        assert server.connections == 1


async def test_transport_retries_once_when_an_idle_connection_was_closed_by_the_server() -> None:
    async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK_BODY)  # keep-alive by HTTP/1.1 default, then close as an idle timeout would
        await writer.drain()

    async with scripted(answer_once) as (url, server), client() as http:
        assert (await http.post(url + "/1", content=b"{}")).text == "hello"
        await asyncio.sleep(0.1)
        assert (await http.post(url + "/2", content=b"{}")).text == "hello"
        assert server.connections == 2


async def test_transport_waits_for_a_free_connection_up_to_the_pool_timeout() -> None:
    release = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await release.wait()
        writer.write(OK_BODY)

    async with scripted(slow) as (url, _):
        http = httpx.AsyncClient(transport=WorkerTransport(max_connections=1), timeout=httpx.Timeout(2.0, pool=0.2))
        async with http:
            first = asyncio.create_task(http.post(url + "/1", content=b"{}"))
            await asyncio.sleep(0.05)
            with pytest.raises(httpx.PoolTimeout):
                await http.post(url + "/2", content=b"{}")
            release.set()
            assert (await first).status_code == 200


def test_transport_streams_from_the_simulated_worker_under_uvloop(tokenizer: Tokenizer) -> None:
    async def main() -> list[str]:
        async with sim_worker(tokenizer, tokens_per_second=0, completion_tokens=5) as worker, client() as http:
            body = {"model": BF16_NAME, "messages": [{"role": "user", "content": "Hi"}], "stream": True}
            async with http.stream("POST", worker.url + "/v1/chat/completions", json=body) as response:
                return [line async for line in response.aiter_lines() if line]

    lines = uvloop.run(main())
    assert lines[-1] == "data: [DONE]" and len(lines) >= 5
