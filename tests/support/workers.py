"""The workers of a `--workers N` proxy, and which of them serves a connection."""

from __future__ import annotations

import os
import signal

import httpx

from tests.support.procs import connection_owner, worker_pids
from tests.support.proxy_process import ProxyProcess
from tests.support.waiting import wait_for


def client_port(response: httpx.Response) -> int:
    """The local port of the (still open) connection that carried `response`."""
    port: int = response.extensions["network_stream"].get_extra_info("client_addr")[1]
    return port


def ready_workers(proxy: ProxyProcess, count: int, timeout: float = 20.0) -> list[int]:
    """The PIDs of the proxy's `count` workers, once each has answered a new connection."""

    def found() -> list[int] | None:
        pids = worker_pids(proxy.pid, proxy.port)
        return pids if len(pids) == count else None

    pids = wait_for(f"{count} workers", found, timeout)
    answered: set[int | None] = set()

    def all_answered() -> bool:
        with httpx.Client(trust_env=False, timeout=5.0) as client:
            response = client.get(f"{proxy.url}/healthz")
            assert response.status_code == 200
            answered.add(connection_owner(pids, proxy.port, client_port(response)))
        return answered >= set(pids)

    wait_for(f"each of {count} workers to answer", all_answered, timeout)
    return pids


def kill_a_worker(proxy: ProxyProcess, pids: list[int]) -> tuple[list[int], int]:
    """SIGKILL the first of the proxy's workers `pids`; once its replacement answers, the
    workers' PIDs and the replacement's."""
    os.kill(pids[0], signal.SIGKILL)

    def replaced() -> bool:
        now = worker_pids(proxy.pid, proxy.port)
        return len(now) == len(pids) and now != pids

    wait_for("a replacement", replaced)
    after = ready_workers(proxy, len(pids))
    (replacement,) = set(after) - set(pids)
    return after, replacement
