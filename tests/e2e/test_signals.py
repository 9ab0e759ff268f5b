"""Stopping the proxy: SIGTERM drains (readiness fails at once, new connections are refused,
open streams finish within `server.shutdown_grace_seconds`, exit 0), a second SIGTERM ends
at once, Ctrl-C is a clean stop too; with and without `--workers`."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from tests.support.proxy_process import ProxyProcess, StartProxy
from tests.support.streams import start_stream
from tests.support.upstream_stub import UpstreamStub
from tests.support.waiting import wait_for
from tests.support.workers import ready_workers

pytestmark = pytest.mark.e2e

MODEL = "m"


def config(upstream: UpstreamStub, redis_url: str | None = None, server: str = "") -> str:
    session = f'[session]\nredis_url = "{redis_url}"\n\n' if redis_url else ""
    return (
        f"[server]\n{server}\n\n{session}"
        f'[[providers]]\nname = "stub"\nbase_url = "{upstream.base_url}"\n'
    )


def get_on(conn: socket.socket, path: str) -> tuple[int, dict[str, str], bytes]:
    """GET `path` on an open keep-alive connection; raises ConnectionError if it was closed."""
    conn.sendall(f"GET {path} HTTP/1.1\r\nhost: proxy\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed; got {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    while len(body) < int(headers["content-length"]):
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed in the body")
        body += chunk
    return int(status_line.split()[1]), headers, body


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_sigterm_drains_the_workers(
    start_proxy: StartProxy, upstream: UpstreamStub, redis_url: str
) -> None:
    chunks = 20
    upstream.configure_stream(chunks=chunks, delay=0.1)  # about 2 s a stream
    proxy = start_proxy(config(upstream, redis_url), extra_args=("--workers", "2"))
    pids = ready_workers(proxy, 2)
    streams = [start_stream(proxy, MODEL, pids)]
    while {s.owner for s in streams} != set(pids):  # an open stream on every worker
        assert len(streams) < 30, "no stream reached one of the workers"
        streams.append(start_stream(proxy, MODEL, pids))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as probe:
        assert get_on(probe, "/readyz")[0] == 200
        proxy.sigterm()
        status, headers, body = wait_for(
            "/readyz to fail", lambda: (answer := get_on(probe, "/readyz"))[0] != 200 and answer
        )
    assert (status, json.loads(body)) == (503, {"status": "draining"})
    assert headers["connection"] == "close"
    wait_for("new connections to be refused", lambda: refused(proxy.port))
    assert any(s.is_alive() for s in streams), "the streams ended before the checks"
    expected = UpstreamStub.stream_body(MODEL, chunks)
    for stream in streams:
        assert stream.finish().error is None
        assert stream.body == expected, "a stream was cut"
    assert proxy.wait() == 0


def test_a_second_sigterm_ends_at_once(
    start_proxy: StartProxy, upstream: UpstreamStub, redis_url: str
) -> None:
    upstream.slow_stream(seconds=30)  # as long as the default grace period
    proxy = start_proxy(config(upstream, redis_url), extra_args=("--workers", "2"))
    ready_workers(proxy, 2)
    stream = start_stream(proxy, MODEL)
    proxy.sigterm()
    wait_for("the drain to start", lambda: refused(proxy.port))
    assert stream.is_alive()
    proxy.sigterm()
    assert proxy.wait(timeout=5) == 0
    stream.finish(timeout=5)
    assert stream.error is not None, "the stream was cut: the client must not see it complete"
    assert upstream.upstream_disconnected.wait(5)


def test_shutdown_grace_seconds_cuts_a_stream_that_outlasts_it(
    start_proxy: StartProxy, upstream: UpstreamStub
) -> None:
    upstream.slow_stream(seconds=30)
    proxy = start_proxy(config(upstream, server="shutdown_grace_seconds = 1.5"))
    stream = start_stream(proxy, MODEL)
    signalled = time.monotonic()
    proxy.sigterm()
    assert proxy.wait(timeout=15) == 0
    waited = time.monotonic() - signalled
    # The grace period as configured, to the fraction: neither at once nor the default 30 s.
    assert 1.5 <= waited < 10
    stream.finish(timeout=5)
    assert stream.error is not None
    assert upstream.upstream_disconnected.wait(5), "the upstream request was left open"


@pytest.mark.parametrize("workers_arg", [(), ("--workers", "2")], ids=["single", "workers"])
def test_ctrl_c_drains_quietly(
    upstream: UpstreamStub, redis_url: str, tmp_path: Path, workers_arg: tuple[str, ...]
) -> None:
    chunks = 20
    upstream.configure_stream(chunks=chunks, delay=0.1)
    proxy = ProxyProcess(
        config(upstream, redis_url), tmp_path, extra_args=workers_arg, process_group=True
    )
    try:
        proxy.start()
        if workers_arg:
            ready_workers(proxy, 2)
        stream = start_stream(proxy, MODEL)
        # A terminal's Ctrl-C goes to every process of the foreground group.
        os.killpg(proxy.pid, signal.SIGINT)
        assert proxy.wait() == 0
        assert stream.finish().error is None
        assert stream.body == UpstreamStub.stream_body(MODEL, chunks)
        log = proxy.stderr_text()
        assert "Traceback" not in log and "KeyboardInterrupt" not in log, log
    finally:
        proxy.stop()
