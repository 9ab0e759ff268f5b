"""The near-cache in the real process: replicas over one Redis see each other's pins and
unpins at once, a demoted primary empties the cache, and the hits are counted."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.support.proxy_process import TEST_AUTH, ProxyProcess, StartProxy
from tests.support.redis_server import RedisServer
from tests.support.upstream_stub import UpstreamStub

pytestmark = pytest.mark.e2e

DEBUG_TOKEN = "near-cache-debug-token-0123"
MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]


def config(redis_url: str, a: UpstreamStub, b: UpstreamStub) -> str:
    return (
        f'[session]\nredis_url = "{redis_url}"\n'
        f'[debug]\nenabled = true\ntoken = "{DEBUG_TOKEN}"\n'
        f'[[providers]]\nname = "a"\nbase_url = "{a.base_url}"\n'
        f'[[providers]]\nname = "b"\nbase_url = "{b.base_url}"\n'
        '[models.fast]\ntargets = [{ provider = "a", model = "m-a" },'
        ' { provider = "b", model = "m-b" }]\n'
    )


def chat(proxy: ProxyProcess, conversation_id: str) -> httpx.Response:
    body = {"model": "fast", "messages": MESSAGES, "conversation_id": conversation_id}
    with httpx.Client(trust_env=False, timeout=20.0) as client:
        return client.post(f"{proxy.base_url}/chat/completions", json=body, headers=TEST_AUTH)


def eventually(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)  # polling a deadline
    return True


def metric(proxy: ProxyProcess, line_start: str) -> float:
    text = httpx.get(f"{proxy.url}/metrics", trust_env=False).text
    (line,) = [line for line in text.splitlines() if line.startswith(line_start)]
    return float(line.rsplit(" ", 1)[1])


def test_an_unpin_through_one_replica_is_seen_by_the_other_at_once(
    start_proxy: StartProxy,
    upstream: UpstreamStub,
    second_upstream: UpstreamStub,
    redis_url: str,
) -> None:
    text = config(redis_url, upstream, second_upstream)
    one, other = start_proxy(text), start_proxy(text)
    for conversation_id in (f"c{n}" for n in range(8)):
        first = chat(one, conversation_id)
        pinned = first.headers["x-sentinel-provider"]
        # Both replicas hold the pin in their near-caches now.
        for proxy in (one, other, one, other):
            answer = chat(proxy, conversation_id)
            assert answer.headers["x-sentinel-session"] == "hit"
            assert answer.headers["x-sentinel-provider"] == pinned
        deleted = httpx.delete(
            f"{other.url}/debug/session/{conversation_id}",
            headers={"authorization": f"Bearer {DEBUG_TOKEN}"},
            trust_env=False,
        )
        assert deleted.json() == {"id": conversation_id, "deleted": True}
        # Within milliseconds the first replica has been told: no stale pin is served.
        assert chat(one, conversation_id).headers["x-sentinel-session"] == "created"
    assert metric(one, 'sentinel_near_cache_total{event="hit"}') >= 8
    assert metric(one, 'sentinel_near_cache_total{event="invalidation"}') >= 8


def test_a_demoted_primary_empties_the_cache_within_a_heartbeat(
    start_proxy: StartProxy,
    upstream: UpstreamStub,
    second_upstream: UpstreamStub,
    own_redis: tuple[RedisServer, RedisServer],
) -> None:
    """A demoted primary keeps answering reads, and sends no invalidation for what the new
    primary changes: within a heartbeat (1 s) the cache is emptied and requests get 503."""
    demoted, primary = own_redis
    proxy = start_proxy(config(demoted.url, upstream, second_upstream))
    assert chat(proxy, "d1").headers["x-sentinel-session"] == "created"
    assert chat(proxy, "d1").headers["x-sentinel-session"] == "hit"
    with demoted.client() as client:
        client.replicaof(primary.host, primary.port)
    demoted_at = time.monotonic()
    assert eventually(lambda: chat(proxy, "d1").status_code == 503, 5)
    assert time.monotonic() - demoted_at < 3
    answer = chat(proxy, "d1")
    assert answer.json()["error"]["code"] == "session_store_unavailable"
    with demoted.client() as client:
        client.replicaof("NO", "ONE")
    assert eventually(lambda: chat(proxy, "d2").status_code == 200, 10)
