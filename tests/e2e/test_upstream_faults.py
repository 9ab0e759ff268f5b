"""Upstreams and clients that misbehave, against the real proxy process: answers uvicorn
cannot send as they are, header bytes outside ASCII, streams the upstream breaks off,
timeouts, and clients that stop reading. docs/reliability.md lists each case."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.support.proxy_process import TEST_AUTH, ProxyProcess, StartProxy
from tests.support.raw_upstream import RawUpstream, Responder
from tests.support.upstream_stub import UpstreamStub

pytestmark = pytest.mark.e2e

MESSAGES: list[Any] = [{"role": "user", "content": "Hi."}]
CHAT = {"model": "gpt-4o-mini", "messages": MESSAGES}
STREAM = {**CHAT, "stream": True}


def stub_config(base_url: str, upstream: str = "") -> str:
    return f'[upstream]\n{upstream}\n[[providers]]\nname = "stub"\nbase_url = "{base_url}"\n'


def client(timeout: float = 20.0) -> httpx.Client:
    return httpx.Client(trust_env=False, timeout=timeout)


def metric_lines(proxy: ProxyProcess) -> list[str]:
    with client() as http:
        text = http.get(f"{proxy.url}/metrics").text
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def access_lines(proxy: ProxyProcess, *fragments: str) -> list[str]:
    return [
        line
        for line in proxy.log_text().splitlines()
        if "sentinel_proxy.access" in line and all(f in line for f in fragments)
    ]


def cut_stream(proxy: ProxyProcess) -> bytes:
    """The bytes of a 200 stream that the proxy cuts short: without the terminating chunk,
    so the client can tell the body is incomplete."""
    received = b""
    with (
        client() as http,
        http.stream(
            "POST", f"{proxy.base_url}/chat/completions", json=STREAM, headers=TEST_AUTH
        ) as response,
    ):
        assert response.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            for chunk in response.iter_raw():
                received += chunk
    return received


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.02)  # polling with a deadline


def test_header_bytes_outside_ascii_reach_the_upstream_as_sent(
    start_proxy: StartProxy, upstream: UpstreamStub
) -> None:
    proxy = start_proxy(stub_config(upstream.base_url))
    headers = [
        (b"authorization", b"Bearer sk-test"),
        (b"x-note", "café".encode()),
        (b"x-latin", b"caf\xe9"),
    ]
    with client() as http:
        response = http.post(f"{proxy.base_url}/chat/completions", json=CHAT, headers=headers)
    assert response.status_code == 200, response.text

    [received] = upstream.requests
    # The stub decodes header bytes as latin-1, which gives the bytes back unchanged.
    assert received.header("x-note").encode("latin-1") == b"caf\xc3\xa9"  # type: ignore[union-attr]
    assert received.header("x-latin").encode("latin-1") == b"caf\xe9"  # type: ignore[union-attr]


def _answer_by_path(conn: socket.socket, request: bytes) -> None:
    path = request.split(b" ", 2)[1]
    close = b"Connection: close\r\n"
    answers = {
        b"/v1/not-modified": b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 10\r\n'
        + close
        + b"\r\n",
        b"/v1/no-content": b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n" + close + b"\r\n",
        b"/v1/status-600": b"HTTP/1.1 600 Beyond\r\nContent-Length: 2\r\n" + close + b"\r\nok",
        b"/v1/status-999": b"HTTP/1.1 999 Beyond\r\nContent-Length: 2\r\n" + close + b"\r\nok",
        b"/v1/many-headers": b"HTTP/1.1 200 OK\r\n"
        + b"".join(b"x-h%d: %d\r\n" % (i, i) for i in range(200))
        + b"Content-Length: 2\r\n"
        + close
        + b"\r\nok",
        b"/v1/long-header": b"HTTP/1.1 200 OK\r\nx-long: "
        + b"a" * (40 * 1024)
        + b"\r\nContent-Length: 2\r\n"
        + close
        + b"\r\nok",
        b"/v1/garbage": b"HTTP/1.1 200 OK\r\nthis is no header\r\n\r\n",
    }
    conn.sendall(answers[path])


def test_upstream_answers_uvicorn_cannot_send_as_they_are_never_end_in_a_traceback(
    start_proxy: StartProxy, raw_upstream: Callable[[bytes | Responder], RawUpstream]
) -> None:
    server = raw_upstream(_answer_by_path)
    proxy = start_proxy(stub_config(server.base_url))

    with client() as http:

        def get(path: str) -> httpx.Response:
            return http.get(f"{proxy.base_url}/{path}", headers=TEST_AUTH)

        not_modified = get("not-modified")
        assert not_modified.status_code == 304
        assert not_modified.headers["etag"] == '"v1"' and not_modified.content == b""
        no_content = get("no-content")
        assert no_content.status_code == 204 and no_content.content == b""

        for path in ("status-600", "status-999", "garbage"):
            response = get(path)
            assert response.status_code == 502, (path, response.text)
            error = response.json()["error"]
            assert (error["code"], error["type"]) == ("upstream_bad_response", "server_error")

        many = get("many-headers")
        assert many.status_code == 200 and many.content == b"ok"
        assert [many.headers[f"x-h{i}"] for i in range(200)] == [str(i) for i in range(200)]
        long = get("long-header")
        assert long.status_code == 200 and long.headers["x-long"] == "a" * (40 * 1024)

    assert proxy.terminate() == 0
    log = proxy.log_text()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log


def test_a_stream_the_upstream_breaks_off_is_cut_for_the_client_and_counted_as_broken(
    start_proxy: StartProxy, upstream: UpstreamStub
) -> None:
    upstream.break_stream(after_events=2)
    proxy = start_proxy(stub_config(upstream.base_url))
    sent = b"".join(UpstreamStub.stream_events("gpt-4o-mini")[:2])

    assert cut_stream(proxy) == sent

    assert 'sentinel_broken_streams_total{provider="stub"} 1.0' in metric_lines(proxy)
    counted = [line for line in metric_lines(proxy) if line.startswith("sentinel_requests_total")]
    assert any('status="5xx"' in line for line in counted), counted
    assert not any('status="2xx"' in line for line in counted), counted
    assert proxy.terminate() == 0
    [line] = access_lines(proxy, "error=broken_stream")
    assert "status=502" in line and "upstream_status=200" in line, line


def test_the_open_streams_gauge_counts_a_stream_while_it_is_relayed(
    start_proxy: StartProxy, upstream: UpstreamStub
) -> None:
    upstream.configure_stream(chunks=3, delay=0.3)
    proxy = start_proxy(stub_config(upstream.base_url))
    assert "sentinel_open_streams 0.0" in metric_lines(proxy)

    with (
        client() as http,
        http.stream(
            "POST", f"{proxy.base_url}/chat/completions", json=STREAM, headers=TEST_AUTH
        ) as response,
    ):
        chunks = response.iter_raw()  # one iterator: dropping one closes the connection
        first = next(chunks)
        assert first.startswith(b"data: ")
        assert "sentinel_open_streams 1.0" in metric_lines(proxy)
        rest = b"".join(chunks)
    assert first + rest == UpstreamStub.stream_body("gpt-4o-mini", 3)

    wait_until(
        lambda: "sentinel_open_streams 0.0" in metric_lines(proxy), 5.0, "the gauge back at 0"
    )


def test_an_upstream_slower_than_the_first_byte_timeout_is_a_504(
    start_proxy: StartProxy, upstream: UpstreamStub
) -> None:
    upstream.delay_response(5.0)
    proxy = start_proxy(stub_config(upstream.base_url, "first_byte_timeout = 0.5"))

    started = time.monotonic()
    with client() as http:
        response = http.post(f"{proxy.base_url}/chat/completions", json=CHAT, headers=TEST_AUTH)
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "upstream_timeout"
    assert time.monotonic() - started < 4.0


def test_a_stream_silent_past_the_chunk_timeout_is_cut_and_counted_as_broken(
    start_proxy: StartProxy, upstream: UpstreamStub
) -> None:
    upstream.configure_stream(chunks=3, delay=4.0)
    proxy = start_proxy(
        stub_config(upstream.base_url, "first_byte_timeout = 1.0\nchunk_timeout = 0.3")
    )
    first_event = UpstreamStub.stream_events("gpt-4o-mini", 3)[0]

    started = time.monotonic()
    assert cut_stream(proxy) == first_event
    assert time.monotonic() - started < 3.5, "cut only when the next event came"

    assert 'sentinel_broken_streams_total{provider="stub"} 1.0' in metric_lines(proxy)
    assert proxy.terminate() == 0
    [line] = access_lines(proxy, "error=broken_stream")
    assert "status=504" in line, line


def _open_stream_and_stop_reading(proxy: ProxyProcess) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # A small receive window, so the proxy's writes back up soon.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", proxy.port))
    body = json.dumps(STREAM).encode()
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n"
        b"Authorization: Bearer sk-test\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    return sock


TCP_ESTABLISHED = 1


def _tcp_state(sock: socket.socket) -> int:
    # struct tcp_info begins with tcpi_state (Linux).
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


def _closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Whether the proxy ends the connection while the client still reads nothing. Reading
    would make it a reader again, and a proxy that only closes (waiting for the unread bytes
    to drain) would then seem to have closed it too."""
    deadline = time.monotonic() + timeout
    while _tcp_state(sock) == TCP_ESTABLISHED:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)  # polling with a deadline
    return True


def test_clients_that_stop_reading_hold_upstream_connections_only_for_stream_idle_seconds(
    start_proxy: StartProxy, upstream: UpstreamStub
) -> None:
    # About 6 s: stream_idle_seconds must outlast the pool timeout and the 503 by a margin
    # that holds on a loaded machine.
    upstream.flood_stream()
    proxy = start_proxy(
        stub_config(
            upstream.base_url, "max_connections = 4\npool_timeout = 0.5\nstream_idle_seconds = 3"
        )
    )
    stalled = [_open_stream_and_stop_reading(proxy) for _ in range(4)]
    try:
        upstream.wait_for_requests(4, timeout=10)

        # Meanwhile every upstream connection is taken: the next client is told so at once.
        started = time.monotonic()
        with client() as http:
            busy = http.post(f"{proxy.base_url}/chat/completions", json=CHAT, headers=TEST_AUTH)
        assert busy.status_code == 503, busy.text
        assert busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["code"] == "upstream_pool_exhausted"
        assert time.monotonic() - started < 2.5, "answered by the pool timeout, not a free slot"

        # Then each stalled stream is closed on both sides.
        wait_until(lambda: upstream.disconnected_count() == 4, 15.0, "4 upstreams released")
        for sock in stalled:
            assert _closed_by_peer(sock, 5.0), "the stalled client's connection is still open"

        with client() as http:
            served = http.post(f"{proxy.base_url}/chat/completions", json=CHAT, headers=TEST_AUTH)
        assert served.status_code == 200, served.text
        assert "sentinel_open_streams 0.0" in metric_lines(proxy)
    finally:
        for sock in stalled:
            with contextlib.suppress(OSError):
                sock.close()
    assert proxy.terminate() == 0
    assert len(access_lines(proxy, "error=client_stalled", "status=499")) == 4
    assert len(access_lines(proxy, "error=upstream_pool_exhausted", "status=503")) == 1
