"""The Redis session store misbehaving under the real proxy process: connections closed
while idle, a black-holed Redis and the circuit breaker, a demoted primary, and replies that
come after their callers gave up. Redis is the private redis-server, reached directly or
through a fault relay (tests/support/fault_relay.py); every case is a row of
docs/reliability.md."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.support.fault_relay import FaultRelay
from tests.support.proxy_process import TEST_AUTH, ProxyProcess, StartProxy
from tests.support.redis_server import RedisServer
from tests.support.upstream_stub import UpstreamStub

pytestmark = pytest.mark.e2e

MESSAGES: list[Any] = [{"role": "user", "content": "Still there?"}]


def config(redis_url: str, upstream: UpstreamStub, **session: float) -> str:
    """Providers `a` (model m-a) and `b` (m-b) behind the alias `fast`, and `session` keys."""
    keys = "\n".join(f"{key} = {value}" for key, value in session.items())
    # The store's own behaviour, every lookup a Redis command: the near-cache in front of it
    # has its own tests (tests/e2e/test_near_cache.py).
    return f"""
[session]
redis_url = "{redis_url}"
near_cache = false
{keys}

[[providers]]
name = "a"
base_url = "{upstream.base_url}"

[[providers]]
name = "b"
base_url = "{upstream.base_url}"

[models.fast]
targets = [
  {{ provider = "a", model = "m-a", weight = 1 }},
  {{ provider = "b", model = "m-b", weight = 1 }},
]
"""


def chat(proxy: ProxyProcess, conversation_id: str) -> httpx.Response:
    body = {"model": "fast", "messages": MESSAGES, "conversation_id": conversation_id}
    with httpx.Client(trust_env=False, timeout=20.0) as client:
        return client.post(f"{proxy.base_url}/chat/completions", json=body, headers=TEST_AUTH)


def burst(proxy: ProxyProcess, conversation_ids: list[str]) -> list[httpx.Response]:
    """One request per id, all released at once; the responses in the order of the ids."""
    count = len(conversation_ids)
    barrier = threading.Barrier(count)
    limits = httpx.Limits(max_connections=count)
    with httpx.Client(trust_env=False, timeout=20.0, limits=limits) as client:

        def one(conversation_id: str) -> httpx.Response:
            body = {"model": "fast", "messages": MESSAGES, "conversation_id": conversation_id}
            barrier.wait(timeout=10.0)
            return client.post(f"{proxy.base_url}/chat/completions", json=body, headers=TEST_AUTH)

        with ThreadPoolExecutor(count) as pool:
            return list(pool.map(one, conversation_ids))


def outcome(response: httpx.Response) -> tuple[int, str, str, str]:
    headers = response.headers
    return (
        response.status_code,
        headers.get("x-sentinel-session", ""),
        headers.get("x-sentinel-provider", ""),
        headers.get("x-sentinel-model", ""),
    )


def assert_store_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "session_store_unavailable", response.text


def eventually(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll `condition` until it holds (True) or `timeout` seconds have passed (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def stored(redis_server: RedisServer, conversation_ids: list[str]) -> dict[str, bytes | None]:
    with redis_server.client() as client:
        return {cid: client.get(f"sentinel:session:{cid}") for cid in conversation_ids}


@pytest.mark.parametrize("fault", ["client-kill", "reset"])
def test_connections_closed_while_idle_cost_no_request(
    fault: str,
    start_proxy: StartProxy,
    upstream: UpstreamStub,
    redis_url: str,
    redis_relay: FaultRelay,
    redis_server: RedisServer,
) -> None:
    """`CLIENT KILL TYPE normal` (as a restart or an idle timeout does) or a reset of every
    connection (as a failover or a load balancer does) between two bursts of 20 requests,
    then before a single request: every request succeeds. One store failure would open the
    breaker (`breaker_failures = 1`) for a minute."""
    url = redis_url if fault == "client-kill" else redis_relay.url("redis", "/0")
    # A generous budget: only a lost connection may fail a request here, not a slow machine.
    proxy = start_proxy(
        config(url, upstream, timeout_seconds=1, breaker_failures=1, breaker_reset_seconds=60)
    )
    ids = [f"c{i}" for i in range(20)]

    def close_every_connection() -> None:
        if fault == "client-kill":
            with redis_server.client() as client:
                assert client.execute_command("CLIENT", "KILL", "TYPE", "normal") >= 1
        else:
            redis_relay.reset()

    first = [outcome(r) for r in burst(proxy, ids)]
    assert {status for status, *_ in first} == {200}, first
    pinned = {
        cid: (provider, model) for cid, (_, _, provider, model) in zip(ids, first, strict=True)
    }

    close_every_connection()
    again = [outcome(r) for r in burst(proxy, ids)]
    assert again == [(200, "hit", *pinned[cid]) for cid in ids]

    close_every_connection()
    assert outcome(chat(proxy, "c0")) == (200, "hit", *pinned["c0"])
    assert outcome(chat(proxy, "c1")) == (200, "hit", *pinned["c1"])


def test_black_holed_redis_fails_in_the_budget_opens_the_breaker_and_recovers(
    start_proxy: StartProxy, upstream: UpstreamStub, redis_relay: FaultRelay
) -> None:
    """`timeout_seconds`, `breaker_failures` and `breaker_reset_seconds`, each set apart from
    its default, are what the proxy does: a request fails after one budget, the breaker opens
    at the second failure, later requests fail at once without a byte to Redis, even once
    Redis is back, until the reset time has passed; then a trial goes through."""
    budget, failures, reset = 0.5, 2, 1.0
    proxy = start_proxy(
        config(
            redis_relay.url("redis", "/0"),
            upstream,
            timeout_seconds=budget,
            breaker_failures=failures,
            breaker_reset_seconds=reset,
        )
    )
    assert outcome(chat(proxy, "c-warm"))[:2] == (200, "created")

    redis_relay.black_hole()
    for _ in range(failures):
        started = time.monotonic()
        response = chat(proxy, "c-hole")
        elapsed = time.monotonic() - started
        assert_store_unavailable(response)
        assert "in time" in response.json()["error"]["message"]
        assert budget <= elapsed < 2 * budget, elapsed
    opened_by = started  # the last failure, so the breaker's opening, came after this

    touched = (redis_relay.accepted, redis_relay.bytes_from_clients)
    started = time.monotonic()
    response = chat(proxy, "c-hole")
    assert time.monotonic() - started < budget
    assert_store_unavailable(response)
    assert "circuit open" in response.json()["error"]["message"]
    assert (redis_relay.accepted, redis_relay.bytes_from_clients) == touched

    redis_relay.pass_through()
    assert_store_unavailable(chat(proxy, "c-hole"))  # Redis is back, the breaker still open
    assert (redis_relay.accepted, redis_relay.bytes_from_clients) == touched
    while (response := chat(proxy, "c-hole")).status_code == 503:
        assert time.monotonic() - opened_by < reset + 2 * budget + 1.5, response.text
        time.sleep(0.05)  # polling for the breaker's trial, with the deadline above
    assert time.monotonic() - opened_by >= reset
    assert outcome(response)[:2] == (200, "created")
    assert outcome(chat(proxy, "c-hole"))[:2] == (200, "hit")
    assert outcome(chat(proxy, "c-warm"))[:2] == (200, "hit")


def test_a_demoted_primary_is_a_store_failure_and_not_ready(
    start_proxy: StartProxy,
    upstream: UpstreamStub,
    own_redis: tuple[RedisServer, RedisServer],
) -> None:
    """After a failover the old primary answers PING and reads but refuses writes
    (READONLY): conversation requests get 503, /readyz says not ready, and both recover
    once it is a primary again."""
    demoted, primary = own_redis
    proxy = start_proxy(config(demoted.url, upstream, breaker_reset_seconds=0.5))
    ready = f"{proxy.url}/readyz"
    assert outcome(chat(proxy, "c1"))[:2] == (200, "created")

    with demoted.client() as client:
        client.replicaof(primary.host, primary.port)
        assert client.ping()
    for conversation_id in ("c1", "c2"):
        response = chat(proxy, conversation_id)
        assert_store_unavailable(response)
        assert "cannot serve" in response.json()["error"]["message"]
    assert httpx.get(ready, trust_env=False).status_code == 503
    assert not upstream.requests[1:], "no conversation request went upstream"

    with demoted.client() as client:
        client.replicaof("NO", "ONE")
    assert httpx.get(ready, trust_env=False).status_code == 200
    assert outcome(chat(proxy, "c2"))[:2] == (200, "created")


def test_replies_that_come_after_their_callers_gave_up_reach_nobody(
    start_proxy: StartProxy,
    upstream: UpstreamStub,
    redis_relay: FaultRelay,
    redis_server: RedisServer,
) -> None:
    """Redis freezes (SIGSTOP) with 40 lookups in flight; their requests get 503 and their
    batches are abandoned at the batch cap; Redis wakes and answers all of them; the pool's
    connections are used again by 40 requests in another order. Every request gets its own
    conversation's session, and no stored session changes."""
    budget = 0.2
    cap = 10 * budget  # the batch cap
    proxy = start_proxy(
        config(
            redis_relay.url("redis", "/0"), upstream, timeout_seconds=budget, breaker_failures=1000
        )
    )
    ids = [f"conv-{i}" for i in range(40)]
    created = [outcome(r) for r in burst(proxy, ids)]
    assert {status for status, *_ in created} == {200}, created
    pinned = {
        cid: (provider, model) for cid, (_, _, provider, model) in zip(ids, created, strict=True)
    }
    before = stored(redis_server, ids)

    redis_server.pause()
    try:
        for response in burst(proxy, ids):
            assert_store_unavailable(response)
        # Past the cap the proxy closes the connections of the abandoned batches. One that
        # kept them would hand them out again with the late replies still to come: wait for
        # the close, or for the cap to have passed many times over.
        closed = eventually(lambda: redis_relay.awaiting_connections == 0, 6 * cap)
    finally:
        redis_server.resume()

    shuffled = random.Random(5).sample(ids, len(ids))
    again = [outcome(r) for r in burst(proxy, shuffled)]
    assert again == [(200, "hit", *pinned[cid]) for cid in shuffled]
    assert stored(redis_server, ids) == before
    assert closed, "the abandoned batches' connections were never closed"
