"""The aiohttp-backed transport against a real server on a socket."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from sentinel_proxy.transport import AiohttpTransport
from tests.support.ports import free_port
from tests.support.upstream_stub import UpstreamStub


async def test_forwards_exactly_the_headers_it_is_given(upstream: UpstreamStub) -> None:
    transport = AiohttpTransport(max_connections=4)
    request = httpx.Request(
        "POST",
        f"{upstream.base_url}/chat/completions",
        headers=[(b"authorization", b"Bearer sk-test"), (b"x-trace", b"t1")],
        content=b'{"model": "m"}',
    )
    try:
        response = await transport.handle_async_request(request)
        body = b"".join([chunk async for chunk in response.aiter_raw()])
        await response.aclose()
    finally:
        await transport.aclose()
    assert response.status_code == 200
    assert body == UpstreamStub.chat_completion_body("m")
    (received,) = upstream.requests
    assert received.header_names == {"host", "content-length", "authorization", "x-trace"}
    assert received.body == b'{"model": "m"}'


async def test_refused_connection_is_a_connect_error() -> None:
    transport = AiohttpTransport(max_connections=4)
    request = httpx.Request("GET", f"http://127.0.0.1:{free_port()}/v1/models")
    try:
        with pytest.raises(httpx.ConnectError):
            await transport.handle_async_request(request)
    finally:
        await transport.aclose()


async def test_closing_an_unfinished_response_closes_the_upstream_connection(
    upstream: UpstreamStub,
) -> None:
    upstream.slow_stream(seconds=30, interval=0.05)
    transport = AiohttpTransport(max_connections=4)
    request = httpx.Request(
        "POST",
        f"{upstream.base_url}/chat/completions",
        headers=[(b"content-type", b"application/json")],
        content=b'{"model": "m", "stream": true}',
    )
    try:
        response = await transport.handle_async_request(request)
        async for _ in response.aiter_raw():
            break
        await response.aclose()
        # Wait in a thread: the loop must keep running to close the socket.
        assert await asyncio.to_thread(upstream.upstream_disconnected.wait, 1.0)
    finally:
        await transport.aclose()


async def test_an_upstream_that_never_answers_is_a_read_timeout() -> None:
    silent: list[asyncio.StreamWriter] = []
    done = asyncio.Event()

    async def accept_and_stay_silent(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        silent.append(writer)
        await reader.read(65536)
        await done.wait()

    server = await asyncio.start_server(accept_and_stay_silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport = AiohttpTransport(max_connections=4)
    request = httpx.Request(
        "GET",
        f"http://127.0.0.1:{port}/v1/models",
        extensions={"timeout": {"connect": 1.0, "read": 0.2, "write": 1.0, "pool": 1.0}},
    )
    try:
        with pytest.raises(httpx.ReadTimeout):
            await transport.handle_async_request(request)
    finally:
        await transport.aclose()
        done.set()
        for writer in silent:
            writer.close()
            await writer.wait_closed()
        server.close()
        await server.wait_closed()
