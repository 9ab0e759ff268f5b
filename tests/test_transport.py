"""The upstream transport against real servers on sockets."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from sentinel_proxy.transport import (
    MAX_RESPONSE_HEAD_BYTES,
    READ_HIGH_WATER,
    UpstreamTransport,
    _Slots,
)
from tests.support.ports import free_port
from tests.support.raw_upstream import RawUpstream, Responder
from tests.support.upstream_stub import UpstreamStub


async def test_forwards_exactly_the_headers_it_is_given(upstream: UpstreamStub) -> None:
    transport = UpstreamTransport(max_connections=4)
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
    transport = UpstreamTransport(max_connections=4)
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
    transport = UpstreamTransport(max_connections=4)
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
    transport = UpstreamTransport(max_connections=4)
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


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


async def test_header_bytes_outside_ascii_reach_the_upstream_as_sent(
    raw_upstream: Callable[[bytes | Responder], RawUpstream],
) -> None:
    server = raw_upstream(OK)
    transport = UpstreamTransport(max_connections=4)
    utf8 = "café ☕".encode()
    request = httpx.Request(
        "GET",
        f"{server.base_url}/models",
        headers=[(b"x-note", utf8), (b"x-latin", b"caf\xe9"), (b"x-plain", b"ascii")],
    )
    try:
        response = await transport.handle_async_request(request)
        await response.aclose()
        plain = httpx.Request("GET", f"{server.base_url}/models", headers=[(b"x-a", b"b")])
        await (await transport.handle_async_request(plain)).aclose()
    finally:
        await transport.aclose()
    first, second = server.wait_for_requests(2)
    assert b"\r\nx-note: " + utf8 + b"\r\n" in first
    assert b"\r\nx-latin: caf\xe9\r\n" in first
    assert b"\r\nx-plain: ascii\r\n" in first
    assert first.startswith(b"GET /v1/models HTTP/1.1\r\n")
    assert b"\r\nx-a: b\r\n" in second


@pytest.mark.parametrize("value", [b"a\x01b", b"\xe9\x01"])
async def test_control_characters_in_header_values_are_refused(
    raw_upstream: Callable[[bytes | Responder], RawUpstream], value: bytes
) -> None:
    server = raw_upstream(OK)
    transport = UpstreamTransport(max_connections=1)
    request = httpx.Request("GET", f"{server.base_url}/models", headers=[(b"x", value)])
    try:
        with pytest.raises(httpx.LocalProtocolError):
            await transport.handle_async_request(request)
        # The slot taken for the refused request was given back.
        assert transport._slots.free == 1
    finally:
        await transport.aclose()


async def test_accepts_response_headers_as_large_as_the_proxy_accepts_from_clients(
    raw_upstream: Callable[[bytes | Responder], RawUpstream],
) -> None:
    many = b"".join(b"x-h%d: v\r\n" % i for i in range(300))
    big = b"x-big: " + b"a" * (40 * 1024) + b"\r\n"
    server = raw_upstream(b"HTTP/1.1 200 OK\r\n" + many + big + OK.split(b"\r\n", 1)[1])
    transport = UpstreamTransport(max_connections=4)
    try:
        response = await transport.handle_async_request(
            httpx.Request("GET", f"{server.base_url}/models")
        )
        body = b"".join([chunk async for chunk in response.aiter_raw()])
        await response.aclose()
    finally:
        await transport.aclose()
    assert response.status_code == 200 and body == b"ok"
    assert len(response.headers.get_list("x-h7") + response.headers.get_list("x-h299")) == 2
    assert response.headers["x-big"] == "a" * (40 * 1024)


async def test_waiting_for_a_free_connection_is_bounded_by_the_pool_timeout(
    upstream: UpstreamStub,
) -> None:
    upstream.slow_stream(seconds=30, interval=0.05)
    transport = UpstreamTransport(max_connections=1)
    timeout = {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": 0.2}

    def chat() -> httpx.Request:
        return httpx.Request(
            "POST",
            f"{upstream.base_url}/chat/completions",
            headers=[(b"content-type", b"application/json")],
            content=b'{"model": "m", "stream": true}',
            extensions={"timeout": timeout},
        )

    try:
        holding = await transport.handle_async_request(chat())
        started = time.monotonic()
        with pytest.raises(httpx.PoolTimeout):
            await transport.handle_async_request(chat())
        assert time.monotonic() - started < 3.0
        await holding.aclose()
        await holding.aclose()  # closing twice gives the slot back once
        after = await transport.handle_async_request(chat())
        assert after.status_code == 200
        await after.aclose()
        assert transport._slots.free == 1
    finally:
        await transport.aclose()


async def test_the_pool_lends_no_more_slots_than_it_has_and_gets_each_back() -> None:
    slots = _Slots(2)
    holders = 0
    most = 0

    async def use(hold: float) -> None:
        nonlocal holders, most
        if slots.free:
            slots.free -= 1
        else:
            await slots.wait(10.0)
        holders += 1
        most = max(most, holders)
        try:
            await asyncio.sleep(hold)  # the request in flight
        finally:
            holders -= 1
            slots.release()

    users = [asyncio.create_task(use(0.02)) for _ in range(10)]
    leaving = asyncio.create_task(use(0.02))
    await asyncio.sleep(0)
    leaving.cancel()  # a client that leaves while it waits for a slot
    with pytest.raises(httpx.PoolTimeout):
        await slots.wait(0.001)  # gives up at once: every slot is lent
    await asyncio.gather(*users)
    assert leaving.cancelled()
    assert most == 2
    assert slots.free == 2


async def test_a_slot_handed_to_a_waiter_that_leaves_at_that_moment_is_not_lost() -> None:
    slots = _Slots(1)
    slots.free -= 1
    waiter = asyncio.create_task(slots.wait(10.0))
    await asyncio.sleep(0)
    slots.release()  # hands the slot over...
    waiter.cancel()  # ...to a waiter cancelled before it could run
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert slots.free == 1


def _respond_in_steps(*steps: bytes | float) -> Responder:
    """Write each bytes step, wait each float step (seconds) as a slow upstream would."""

    def respond(conn: socket.socket, request: bytes) -> None:
        for step in steps:
            if isinstance(step, bytes):
                conn.sendall(step)
            else:
                time.sleep(step)

    return respond


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
EVENT = b"10\r\ndata: thinking\n\n\r\n"


async def test_after_the_first_body_bytes_silence_is_bounded_by_the_chunk_timeout(
    raw_upstream: Callable[[bytes | Responder], RawUpstream],
) -> None:
    server = raw_upstream(_respond_in_steps(SSE_HEAD, 0.1, EVENT, 30.0))
    transport = UpstreamTransport(max_connections=4)
    timeout = {"connect": 5.0, "read": 20.0, "write": 5.0, "pool": 5.0, "chunk": 0.3}
    request = httpx.Request("GET", f"{server.base_url}/stream", extensions={"timeout": timeout})
    received: list[bytes] = []
    try:
        response = await transport.handle_async_request(request)
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            async for chunk in response.aiter_raw():
                received.append(chunk)
        assert time.monotonic() - started < 10.0, "the first-byte timeout applied, not chunk"
        await response.aclose()
    finally:
        await transport.aclose()
    assert b"".join(received) == b"data: thinking\n\n"


async def test_until_the_first_body_bytes_the_first_byte_timeout_applies(
    raw_upstream: Callable[[bytes | Responder], RawUpstream],
) -> None:
    # Headers at once, then a model that thinks longer than the chunk timeout.
    server = raw_upstream(_respond_in_steps(SSE_HEAD, 1.0, EVENT + b"0\r\n\r\n"))
    transport = UpstreamTransport(max_connections=4)
    timeout = {"connect": 5.0, "read": 20.0, "write": 5.0, "pool": 5.0, "chunk": 0.3}
    request = httpx.Request("GET", f"{server.base_url}/stream", extensions={"timeout": timeout})
    try:
        response = await transport.handle_async_request(request)
        body = b"".join([chunk async for chunk in response.aiter_raw()])
        await response.aclose()
    finally:
        await transport.aclose()
    assert body == b"data: thinking\n\n"


async def _get(transport: UpstreamTransport, url: str, method: str = "GET") -> httpx.Response:
    """A request's response, its body read whole."""
    timeout = {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": 5.0}
    request = httpx.Request(method, url, extensions={"timeout": timeout})
    response = await transport.handle_async_request(request)
    try:
        response._content = b"".join([chunk async for chunk in response.aiter_raw()])
    finally:
        await response.aclose()
    return response


async def test_a_finished_response_leaves_its_connection_to_the_next_request() -> None:
    writers: list[asyncio.StreamWriter] = []

    async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    server = await asyncio.start_server(keep_alive, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport = UpstreamTransport(max_connections=4)
    try:
        answers = [await _get(transport, f"http://127.0.0.1:{port}/v1/models") for _ in range(3)]
    finally:
        await transport.aclose()
        server.close()
        for writer in writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await server.wait_closed()
    assert [(r.status_code, r.content) for r in answers] == [(200, b"ok")] * 3
    assert len(writers) == 1  # one connection


@pytest.mark.parametrize(
    ("method", "answer", "body"),
    [
        # No length: the body runs to the end of the connection.
        (
            "GET",
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end",
            b"until the end",
        ),
        # A HEAD response's length is the GET's; no body follows it.
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", b""),
        # An interim response before the final one is not the response.
        ("GET", b"HTTP/1.1 100 Continue\r\n\r\n" + OK, b"ok"),
        ("GET", b"HTTP/1.1 204 No Content\r\n\r\n", b""),
    ],
)
async def test_where_a_response_ends(
    raw_upstream: Callable[[bytes | Responder], RawUpstream],
    method: str,
    answer: bytes,
    body: bytes,
) -> None:
    server = raw_upstream(answer)
    transport = UpstreamTransport(max_connections=4)
    try:
        response = await _get(transport, f"{server.base_url}/models", method)
    finally:
        await transport.aclose()
    assert response.content == body


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * (MAX_RESPONSE_HEAD_BYTES + 1) + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",  # then the connection ends
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",  # no last chunk
        b"NOT HTTP AT ALL\r\n\r\n",
    ],
)
async def test_a_response_that_is_not_whole_http_is_a_protocol_error(
    raw_upstream: Callable[[bytes | Responder], RawUpstream], answer: bytes
) -> None:
    server = raw_upstream(answer)
    transport = UpstreamTransport(max_connections=1)
    try:
        with pytest.raises(httpx.RemoteProtocolError):
            await _get(transport, f"{server.base_url}/models")
        assert transport._slots.free == 1
    finally:
        await transport.aclose()


async def test_an_upstream_that_closes_without_answering_is_a_read_error(
    raw_upstream: Callable[[bytes | Responder], RawUpstream],
) -> None:
    server = raw_upstream(b"")
    transport = UpstreamTransport(max_connections=1)
    try:
        with pytest.raises(httpx.ReadError):
            await _get(transport, f"{server.base_url}/models")
    finally:
        await transport.aclose()


async def test_a_body_nobody_reads_stops_the_reading_and_resumes_it(
    raw_upstream: Callable[[bytes | Responder], RawUpstream],
) -> None:
    sent = bytes(range(256)) * 4096  # 1 MiB
    server = raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(sent) + sent)
    transport = UpstreamTransport(max_connections=1)
    try:
        response = await transport.handle_async_request(
            httpx.Request("GET", f"{server.base_url}/models")
        )
        connection = response.stream._connection  # type: ignore[attr-defined]
        deadline = time.monotonic() + 10
        while not connection._paused:
            assert time.monotonic() < deadline, "reading never paused"
            await asyncio.sleep(0.01)  # polling with a deadline: the upstream is sending
        # Paused at the high mark: what is held is bounded by it and one read.
        assert connection._buffered <= READ_HIGH_WATER + 256 * 1024
        body = b"".join([chunk async for chunk in response.aiter_raw()])
        await response.aclose()
    finally:
        await transport.aclose()
    assert body == sent


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1, and its key."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_https_upstreams_are_reached_over_verified_tls(
    tls_files: tuple[Path, Path],
) -> None:
    cert, key = tls_files
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    seen: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            while head := await reader.readuntil(b"\r\n\r\n"):
                seen.append(head)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecret")
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    trusting = UpstreamTransport(
        max_connections=2, ssl_context=ssl.create_default_context(cafile=cert)
    )
    default = UpstreamTransport(max_connections=2)  # httpx's default CAs: not this one
    try:
        first = await _get(trusting, f"https://localhost:{port}/v1/models")
        second = await _get(trusting, f"https://localhost:{port}/v1/models")
        with pytest.raises(httpx.ConnectError):
            await _get(default, f"https://localhost:{port}/v1/models")
    finally:
        await trusting.aclose()
        await default.aclose()
        server.close()
        await server.wait_closed()
    assert (first.content, second.content) == (b"secret", b"secret")
    assert [h.split(b"\r\n", 1)[0] for h in seen] == [b"GET /v1/models HTTP/1.1"] * 2
