"""Slow and greedy clients against the real proxy process, on raw sockets: the head deadline,
the head size limit, the body rate, the connection cap, and clients these must not touch."""

from __future__ import annotations

import contextlib
import http.client
import json
import select
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.support.proxy_process import ProxyProcess, StartProxy
from tests.support.upstream_stub import UpstreamStub

pytestmark = pytest.mark.e2e

HEADER_TIMEOUT = 1.0
MIN_RATE = 500
# Long enough for a loaded machine to notice a close that is due, short of a hanging test.
PATIENCE = 8.0
CHAT_HEAD = (
    b"POST /v1/chat/completions HTTP/1.1\r\nhost: proxy\r\ncontent-type: application/json\r\n"
)


def config(upstream: UpstreamStub, **server: Any) -> str:
    settings = {
        "header_timeout_seconds": HEADER_TIMEOUT,
        "body_rate_window_seconds": 1.0,
        "body_min_rate_bytes_per_second": MIN_RATE,
        **server,
    }
    lines = "".join(f"{key} = {value}\n" for key, value in settings.items())
    return f'[server]\n{lines}\n[[providers]]\nname = "stub"\nbase_url = "{upstream.base_url}"\n'


Connect = Callable[[ProxyProcess], socket.socket]
HTTPConnect = Callable[[ProxyProcess], http.client.HTTPConnection]


@pytest.fixture
def connect() -> Iterator[Connect]:
    """Factory: a raw socket connected to the proxy, closed at teardown."""
    with contextlib.ExitStack() as stack:

        def factory(proxy: ProxyProcess) -> socket.socket:
            sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=PATIENCE)
            stack.callback(sock.close)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock

        yield factory


@pytest.fixture
def http_connect() -> Iterator[HTTPConnect]:
    """Factory: an http.client connection (one socket, kept alive), closed at teardown."""
    with contextlib.ExitStack() as stack:

        def factory(proxy: ProxyProcess) -> http.client.HTTPConnection:
            connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=PATIENCE)
            stack.callback(connection.close)
            return connection

        yield factory


def read_to_close(sock: socket.socket) -> bytes:
    """Everything the proxy sends until it closes (fails if it does not, within PATIENCE)."""
    received = b""
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not data:
            return received
        received += data


def closed_or_answered(sock: socket.socket) -> bool:
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


def trickle(sock: socket.socket, data: bytes, interval: float) -> float:
    """Send `data` a piece every `interval` s until the proxy answers or closes; the seconds
    that took (fails if the proxy does neither within PATIENCE)."""
    start = time.monotonic()
    for piece in data:
        try:
            sock.sendall(bytes([piece]) if isinstance(piece, int) else piece)
        except (BrokenPipeError, ConnectionResetError):
            break
        readable, _, _ = select.select([sock], [], [], interval)
        if readable:
            break
        assert time.monotonic() - start < PATIENCE, "the proxy is still reading"
    return time.monotonic() - start


def error_of(raw: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {name.lower(): value for name, value in (line.split(": ", 1) for line in lines)}
    payload: dict[str, Any] = json.loads(body)
    return int(status_line.split()[1]), headers, payload["error"]


def chat_body(size: int) -> bytes:
    start = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "'
    end = b'"}]}'
    return start + b"a" * (size - len(start) - len(end)) + end


def test_a_head_not_complete_at_the_deadline_gets_408_and_is_closed(
    start_proxy: StartProxy, upstream: UpstreamStub, connect: Connect
) -> None:
    proxy = start_proxy(config(upstream))
    half, silent = connect(proxy), connect(proxy)
    start = time.monotonic()
    half.sendall(CHAT_HEAD)

    raw = read_to_close(half)

    assert time.monotonic() - start >= HEADER_TIMEOUT - 0.05
    status, headers, error = error_of(raw)
    assert status == 408
    assert headers["connection"] == "close"
    assert error["code"] == "request_timeout"
    assert error["type"] == "invalid_request_error"
    # A connection that sent nothing at all is closed without an answer.
    assert read_to_close(silent) == b""
    assert upstream.requests == []


def test_a_head_trickled_a_byte_at_a_time_does_not_outlive_the_deadline(
    start_proxy: StartProxy, upstream: UpstreamStub, connect: Connect
) -> None:
    proxy = start_proxy(config(upstream))
    sock = connect(proxy)

    seconds = trickle(sock, CHAT_HEAD + b"x-slow: " + b"z" * 1000, interval=0.1)

    assert HEADER_TIMEOUT - 0.05 <= seconds < HEADER_TIMEOUT + 2.0
    status, _, error = error_of(read_to_close(sock))
    assert (status, error["code"]) == (408, "request_timeout")


def test_a_head_growing_past_64_kib_gets_431_before_it_ends(
    start_proxy: StartProxy, upstream: UpstreamStub, connect: Connect
) -> None:
    proxy = start_proxy(config(upstream, header_timeout_seconds=30))
    sock = connect(proxy)
    lines = [b"x-big-%d: %s\r\n" % (i, b"v" * 1000) for i in range(200)]

    # About 200 KB of header lines, a line at a time, never the blank line that would end them.
    trickle(sock, [CHAT_HEAD, *lines], interval=0)
    raw = read_to_close(sock)

    status, headers, error = error_of(raw)
    assert status == 431
    assert headers["connection"] == "close"
    assert error["code"] == "request_headers_too_large"
    assert upstream.requests == []


def test_a_body_trickle_gets_408_and_is_closed(
    start_proxy: StartProxy, upstream: UpstreamStub, connect: Connect
) -> None:
    proxy = start_proxy(config(upstream))
    sock = connect(proxy)
    body = chat_body(50_000)
    sock.sendall(CHAT_HEAD + b"content-length: %d\r\n\r\n" % len(body))

    # 100 bytes per second, a fifth of the minimum.
    seconds = trickle(sock, [body[i : i + 10] for i in range(0, len(body), 10)], interval=0.1)

    assert seconds < 1.0 + 2.0
    status, _, error = error_of(read_to_close(sock))
    assert (status, error["code"]) == (408, "request_timeout")
    assert "slower than 500 bytes per second" in error["message"]
    assert upstream.requests == []


def test_a_slow_but_steady_body_is_served(
    start_proxy: StartProxy, upstream: UpstreamStub, http_connect: HTTPConnect
) -> None:
    proxy = start_proxy(config(upstream))
    body = chat_body(15_000)
    connection = http_connect(proxy)
    connection.putrequest("POST", "/v1/chat/completions")
    connection.putheader("content-type", "application/json")
    connection.putheader("content-length", str(len(body)))
    connection.endheaders()

    # 10 KB/s, twenty times the minimum, across two windows of the rate check.
    for start in range(0, len(body), 1000):
        connection.send(body[start : start + 1000])
        time.sleep(0.1)  # the pace of the upload under test
    response = connection.getresponse()

    assert response.status == 200, response.read()
    assert upstream.requests[0].body == body


def test_stalled_connections_neither_delay_others_nor_stay_open(
    start_proxy: StartProxy, upstream: UpstreamStub, connect: Connect
) -> None:
    proxy = start_proxy(config(upstream, header_timeout_seconds=2))
    stalled = [connect(proxy) for _ in range(200)]
    for sock in stalled:
        sock.sendall(CHAT_HEAD)

    with httpx.Client(trust_env=False, timeout=PATIENCE) as client:
        for _ in range(20):
            response = client.post(
                f"{proxy.base_url}/chat/completions",
                json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
            )
            assert response.status_code == 200, response.text

    # Served while every stalled connection was still open...
    assert not any(closed_or_answered(sock) for sock in stalled)
    # ...and each of those is answered and closed at its deadline.
    for sock in stalled:
        assert error_of(read_to_close(sock))[0] == 408
    assert len(upstream.requests) == 20


def test_the_connection_past_the_cap_gets_503(
    start_proxy: StartProxy,
    upstream: UpstreamStub,
    connect: Connect,
    http_connect: HTTPConnect,
) -> None:
    proxy = start_proxy(config(upstream, header_timeout_seconds=30, max_connections=4))
    holders = [http_connect(proxy) for _ in range(4)]
    for holder in holders:  # each connection in use, and known to the proxy
        holder.request("GET", "/healthz")
        assert holder.getresponse().read() == b'{"status":"ok"}'

    sock = connect(proxy)
    sock.sendall(b"GET /v1/models HTTP/1.1\r\nhost: proxy\r\n\r\n")
    status, headers, error = error_of(read_to_close(sock))

    assert status == 503
    assert headers["retry-after"] == "1"
    assert error == {
        "message": "The server has too many open connections; retry shortly.",
        "type": "server_error",
        "param": None,
        "code": "server_overloaded",
        "request_id": headers["x-request-id"],
    }
    assert upstream.requests == []
    holders[0].close()
    deadline = time.monotonic() + PATIENCE
    with httpx.Client(trust_env=False, timeout=PATIENCE) as client:
        while client.get(f"{proxy.base_url}/models").status_code != 200:
            assert time.monotonic() < deadline, "a freed place was not taken"
            time.sleep(0.05)  # polling for the proxy to notice the close


def test_a_keep_alive_client_is_not_cut_by_the_deadlines(
    start_proxy: StartProxy, upstream: UpstreamStub, http_connect: HTTPConnect
) -> None:
    proxy = start_proxy(config(upstream))
    connection = http_connect(proxy)
    body = chat_body(200)
    headers = {"content-type": "application/json"}
    ports = set()
    requests = 0
    start = time.monotonic()

    # Longer than the head deadline, request after request on one connection...
    while time.monotonic() - start < 1.5 * HEADER_TIMEOUT:
        connection.request("POST", "/v1/chat/completions", body=body, headers=headers)
        assert connection.getresponse().read()
        ports.add(connection.sock.getsockname()[1])
        requests += 1
    # ...then idle past it, within uvicorn's keep-alive timeout (5 s).
    time.sleep(1.2 * HEADER_TIMEOUT)  # the idleness under test
    connection.request("POST", "/v1/chat/completions", body=body, headers=headers)
    response = connection.getresponse()

    assert response.status == 200
    assert ports == {connection.sock.getsockname()[1]}, "the connection was replaced"
    assert len(upstream.requests) == requests + 1
