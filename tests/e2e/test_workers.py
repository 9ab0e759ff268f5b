"""`--workers N`: the supervisor owns the port and hands each worker one of its sockets and
its loaded configuration; a worker that dies is replaced, one that keeps failing stops the
supervisor, and workers do not outlive it."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis

from tests.support.ports import free_port
from tests.support.procs import (
    alive,
    children,
    connection_owner,
    listeners_by_process,
)
from tests.support.proxy_process import (
    TEST_AUTH,
    ProxyProcess,
    StartProxy,
    run_proxy_to_exit,
)
from tests.support.upstream_stub import UpstreamStub
from tests.support.waiting import wait_for
from tests.support.workers import client_port, kill_a_worker, ready_workers

pytestmark = pytest.mark.e2e


def config(upstream: UpstreamStub, redis_url: str) -> str:
    return (
        f'[session]\nredis_url = "{redis_url}"\n\n'
        f'[[providers]]\nname = "stub"\nbase_url = "{upstream.base_url}"\n'
    )


def chat(
    proxy: ProxyProcess, pids: list[int], conversation_id: str, model: str = "m"
) -> tuple[httpx.Response, int | None]:
    """One chat request on a fresh connection, and the worker that served it."""
    with httpx.Client(trust_env=False, timeout=20.0) as client:
        response = client.post(
            f"{proxy.base_url}/chat/completions",
            json={"model": model, "messages": [], "conversation_id": conversation_id},
            headers=TEST_AUTH,
        )
        return response, connection_owner(pids, proxy.port, client_port(response))


def test_each_worker_serves_one_of_the_supervisors_sockets(
    start_proxy: StartProxy, upstream: UpstreamStub, redis_url: str
) -> None:
    proxy = start_proxy(config(upstream, redis_url), extra_args=("--workers", "2"))
    pids = ready_workers(proxy, 2)
    held = listeners_by_process(proxy.pid, proxy.port)
    first, second = (held[pid] for pid in pids)
    assert len(first) == len(second) == 1 and first != second
    assert held[proxy.pid] == first | second, "the supervisor holds every worker's socket"
    served = [chat(proxy, pids, f"w-{i}") for i in range(30)]
    assert [response.status_code for response, _ in served] == [200] * 30
    assert {owner for _, owner in served} == set(pids), "both workers take connections"
    assert proxy.terminate() == 0


def test_a_replacement_worker_serves_the_supervisors_config_not_the_edited_file(
    start_proxy: StartProxy, upstream: UpstreamStub, redis_url: str
) -> None:
    proxy = start_proxy(config(upstream, redis_url), extra_args=("--workers", "2"))
    before = ready_workers(proxy, 2)
    other = UpstreamStub()
    other.start()
    try:
        assert proxy.config_path is not None
        proxy.config_path.write_text(config(other, redis_url))
        after, replacement = kill_a_worker(proxy, before)
        served_by_it = 0
        deadline = time.monotonic() + 20
        while served_by_it < 5:
            assert time.monotonic() < deadline, "the replacement served no requests"
            response, owner = chat(proxy, after, f"r-{time.monotonic()}")
            assert response.status_code == 200
            served_by_it += owner == replacement
        assert other.requests == [], "a worker routed by the edited file"
    finally:
        other.stop()
    assert "starting another in 0.5 s" in proxy.stderr_text()
    assert proxy.terminate() == 0


def test_a_worker_that_keeps_failing_stops_the_supervisor_after_backoff(
    start_proxy: StartProxy, upstream: UpstreamStub, redis_url: str
) -> None:
    # Backoff 0.5, 1, 2, 4 s between the five quick failures: about 8 s by design.
    proxy = start_proxy(config(upstream, redis_url), extra_args=("--workers", "2"))
    victim, survivor = ready_workers(proxy, 2)
    known = {victim, survivor, *children(proxy.pid)}
    gaps = []
    for _ in range(5):
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        if len(gaps) == 4:
            break

        def replacement() -> int | None:
            new = [pid for pid in children(proxy.pid) if pid not in known]
            return new[0] if new else None

        victim = wait_for("a replacement", replacement)
        gaps.append(time.monotonic() - killed_at)
        known.add(victim)
    assert [gap >= delay for gap, delay in zip(gaps, [0.5, 1, 2, 4], strict=True)] == [True] * 4
    assert proxy.wait(timeout=15) == 1
    assert not alive(survivor)
    giving_up = [line for line in proxy.stderr_text().splitlines() if "in a row" in line]
    assert len(giving_up) == 1 and "failed 5 times in a row" in giving_up[0]


def test_workers_exit_when_the_supervisor_is_killed(
    start_proxy: StartProxy, upstream: UpstreamStub, redis_url: str
) -> None:
    proxy = start_proxy(config(upstream, redis_url), extra_args=("--workers", "2"))
    pids = ready_workers(proxy, 2)
    proxy.send_signal(signal.SIGKILL)
    wait_for("the workers to exit", lambda: not any(alive(pid) for pid in pids))
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=5).close()


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
    assert f"cannot listen on 127.0.0.1 port {port}: [Errno 98]" in done.stderr


def test_no_other_process_gets_a_share_of_the_port(
    start_proxy: StartProxy, upstream: UpstreamStub, redis_url: str
) -> None:
    proxy = start_proxy(config(upstream, redis_url), extra_args=("--workers", "2"))
    pids = ready_workers(proxy, 2)
    # A second instance on the port stops at once, with one line.
    assert proxy.config_path is not None
    args = ["--config", str(proxy.config_path), "--host", "127.0.0.1", "--port", str(proxy.port)]
    done = run_proxy_to_exit([*args, "--workers", "2"])
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot listen on 127.0.0.1 port {proxy.port}" in lines[0]
    # A plain process that joins the port later (the kernel lets the same user) gets nothing.
    with socket.socket() as intruder:
        intruder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        intruder.bind(("127.0.0.1", proxy.port))
        intruder.listen(128)
        intruder.setblocking(False)
        served = [chat(proxy, pids, f"p-{i}") for i in range(40)]  # a 20 s timeout each
        assert {owner for _, owner in served} == set(pids)
        with pytest.raises(BlockingIOError):
            intruder.accept()
    assert proxy.terminate() == 0


def test_a_conversation_sticks_to_one_target_across_workers(
    start_proxy: StartProxy, upstream: UpstreamStub, redis_url: str
) -> None:
    other = UpstreamStub()
    other.start()
    try:
        proxy = start_proxy(
            f'[session]\nredis_url = "{redis_url}"\n\n'
            f'[[providers]]\nname = "a"\nbase_url = "{upstream.base_url}"\n\n'
            f'[[providers]]\nname = "b"\nbase_url = "{other.base_url}"\n\n'
            "[models.duo]\ntargets = [\n"
            '  { provider = "a", model = "m-a", weight = 1 },\n'
            '  { provider = "b", model = "m-b", weight = 1 },\n]\n',
            extra_args=("--workers", "2"),
        )
        pids = ready_workers(proxy, 2)
        # Concurrent first requests on fresh connections, so both workers race to create it.
        with ThreadPoolExecutor(max_workers=8) as pool:
            served = list(pool.map(lambda _: chat(proxy, pids, "sticky-1", "duo"), range(24)))
        responses = [response for response, _ in served]
        assert [r.status_code for r in responses] == [200] * 24
        assert {owner for _, owner in served} == set(pids), "both workers served the conversation"
        targets = {
            (r.headers["x-sentinel-provider"], r.headers["x-sentinel-model"]) for r in responses
        }
        assert len(targets) == 1
        ((provider, model),) = targets
        outcomes = sorted(r.headers["x-sentinel-session"] for r in responses)
        assert outcomes == ["created"] + ["hit"] * 23
        stored = json.loads(redis.Redis.from_url(redis_url).get("sentinel:session:sticky-1") or "")
        assert (stored["provider"], stored["model"]) == (provider, model)
        chosen, unused = (upstream, other) if provider == "a" else (other, upstream)
        assert len(chosen.requests) == 24 and unused.requests == []
        assert {r.json()["model"] for r in chosen.requests} == {model}
    finally:
        other.stop()


def test_workers_that_die_together_are_all_replaced(
    start_proxy: StartProxy, upstream: UpstreamStub, redis_url: str
) -> None:
    # Both exits are handled in one turn of the supervisor, which then has no worker left.
    proxy = start_proxy(config(upstream, redis_url), extra_args=("--workers", "2"))
    before = ready_workers(proxy, 2)
    for pid in before:
        os.kill(pid, signal.SIGKILL)
    wait_for("both workers to exit", lambda: not any(alive(pid) for pid in before))
    after = ready_workers(proxy, 2)
    assert not set(after) & set(before)
    response, _ = chat(proxy, after, "together")
    assert response.status_code == 200
    assert proxy.running
    assert proxy.terminate() == 0
