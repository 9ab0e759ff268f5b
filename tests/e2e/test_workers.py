"""`--workers N`: each worker process listens on a socket of its own (SO_REUSEPORT), a worker
that dies is replaced, and SIGTERM stops them all cleanly."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.ports import free_port
from tests.support.procs import listeners_by_process
from tests.support.proxy_process import (
    TEST_AUTH,
    ProxyProcess,
    StartProxy,
    run_proxy_to_exit,
)
from tests.support.upstream_stub import UpstreamStub

pytestmark = pytest.mark.e2e


def config(upstream: UpstreamStub, redis_url: str) -> str:
    return (
        f'[session]\nredis_url = "{redis_url}"\n\n'
        f'[[providers]]\nname = "stub"\nbase_url = "{upstream.base_url}"\n'
    )


def wait_for(what: str, check: Callable[[], Any], timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)  # polling a deadline: the workers start on their own
    return result


def worker_listeners(proxy: ProxyProcess, count: int) -> dict[int, set[int]]:
    def ready() -> dict[int, set[int]] | None:
        found = listeners_by_process(proxy.pid, proxy.port)
        return found if len(found) == count else None

    return wait_for(f"{count} listening workers", ready)  # type: ignore[no-any-return]


def chat_on_fresh_connections(proxy: ProxyProcess, n: int) -> list[int]:
    statuses = []
    for i in range(n):
        with httpx.Client(trust_env=False, timeout=20.0) as client:
            response = client.post(
                f"{proxy.base_url}/chat/completions",
                json={"model": "m", "messages": [], "conversation_id": f"w-{i}"},
                headers=TEST_AUTH,
            )
            statuses.append(response.status_code)
    return statuses


def test_each_worker_listens_on_its_own_socket(
    start_proxy: StartProxy, upstream: UpstreamStub, redis_url: str
) -> None:
    proxy = start_proxy(config(upstream, redis_url), extra_args=("--workers", "2"))
    listeners = worker_listeners(proxy, 2)
    assert proxy.pid not in listeners, "the supervisor must not hold a listening socket"
    first, second = listeners.values()
    assert len(first) == len(second) == 1 and first != second
    assert chat_on_fresh_connections(proxy, 20) == [200] * 20
    assert proxy.terminate() == 0


def test_a_worker_that_dies_is_replaced(
    start_proxy: StartProxy, upstream: UpstreamStub, redis_url: str
) -> None:
    proxy = start_proxy(config(upstream, redis_url), extra_args=("--workers", "2"))
    before = worker_listeners(proxy, 2)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)

    def replaced() -> bool:
        now = listeners_by_process(proxy.pid, proxy.port)
        return len(now) == 2 and victim not in now

    wait_for("a replacement worker", replaced)
    assert chat_on_fresh_connections(proxy, 10) == [200] * 10
    assert "starting another" in proxy.stderr_text()
    assert proxy.terminate() == 0


def test_a_taken_port_stops_it_at_once(
    upstream: UpstreamStub, redis_url: str, tmp_path: Path
) -> None:
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        path = tmp_path / "sentinel.toml"
        path.write_text(config(upstream, redis_url))
        done = run_proxy_to_exit(
            ["--config", str(path), "--host", "127.0.0.1", "--port", str(port), "--workers", "2"]
        )
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1 port {port}" in done.stderr
