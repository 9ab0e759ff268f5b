"""Scale-out: two proxy replicas over one session store, a Redis Cluster of three masters with
a replica each (`cluster`) or a primary behind three sentinels (`sentinels`). Stickiness
through either replica, one pin for a conversation started on both at once, an unpin seen at
once, and a master's death costing only its own conversations."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.support.proxy_process import TEST_AUTH, ProxyProcess, StartProxy
from tests.support.redis_cluster import RedisCluster
from tests.support.redis_sentinel import SERVICE, RedisSentinels
from tests.support.upstream_stub import UpstreamStub

pytestmark = pytest.mark.e2e

DEBUG_TOKEN = "debug-token-0123456789abcdef"
BUDGET = 0.25
MESSAGES: list[Any] = [{"role": "user", "content": "Still there?"}]


def config(upstream: UpstreamStub, store: str) -> str:
    """Four providers of one alias `fast` (so that pins differ), the debug endpoint on."""
    providers = "".join(
        f'[[providers]]\nname = "p{i}"\nbase_url = "{upstream.base_url}"\n\n' for i in range(4)
    )
    targets = ", ".join(f'{{ provider = "p{i}", model = "m{i}" }}' for i in range(4))
    return (
        f"[session]\n{store}\ntimeout_seconds = {BUDGET}\nbreaker_reset_seconds = 0.5\n\n"
        f"{providers}[models.fast]\ntargets = [{targets}]\n\n"
        f'[debug]\nenabled = true\ntoken = "{DEBUG_TOKEN}"\n'
    )


def cluster_config(upstream: UpstreamStub, cluster: RedisCluster) -> str:
    return config(upstream, f'redis_url = "{cluster.url}"\ncluster = true')


def chat(proxy: ProxyProcess, conversation_id: str) -> httpx.Response:
    body = {"model": "fast", "messages": MESSAGES, "conversation_id": conversation_id}
    with httpx.Client(trust_env=False, timeout=20.0) as client:
        return client.post(f"{proxy.base_url}/chat/completions", json=body, headers=TEST_AUTH)


def outcome(response: httpx.Response) -> tuple[int, str, str]:
    headers = response.headers
    return (
        response.status_code,
        headers.get("x-sentinel-session", ""),
        headers.get("x-sentinel-model", ""),
    )


def conversations_by_master(cluster: RedisCluster, count: int) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {master.port: [] for master in cluster.masters()}
    number = 0
    while any(len(ids) < count for ids in found.values()):
        cid = f"conv-{number}"
        ids = found[cluster.owner(f"sentinel:session:{cid}").port]
        if len(ids) < count:
            ids.append(cid)
        number += 1
    return found


def test_conversations_stick_through_either_replica_with_keys_on_every_master(
    start_proxy: StartProxy, upstream: UpstreamStub, cluster: RedisCluster
) -> None:
    first = start_proxy(cluster_config(upstream, cluster))
    second = start_proxy(cluster_config(upstream, cluster))
    by_master = conversations_by_master(cluster, 4)
    ids = [cid for cids in by_master.values() for cid in cids]
    pins = {}
    for number, cid in enumerate(ids):
        status, session, model = outcome(chat((first, second)[number % 2], cid))
        assert (status, session) == (200, "created")
        pins[cid] = model
    assert len(set(pins.values())) > 1, "the pins differ, so a hit means something"
    for _ in range(2):
        for number, cid in enumerate(ids):
            assert outcome(chat((second, first)[number % 2], cid)) == (200, "hit", pins[cid])
    for port, cids in by_master.items():
        with cluster.node_at(port).client() as client:
            assert sorted(k.decode() for k in client.keys("sentinel:session:*")) == sorted(
                f"sentinel:session:{cid}" for cid in cids
            )


def test_a_conversation_started_on_both_replicas_at_once_gets_one_pin(
    start_proxy: StartProxy, upstream: UpstreamStub, cluster: RedisCluster
) -> None:
    proxies = [start_proxy(cluster_config(upstream, cluster)) for _ in range(2)]
    for attempt in range(3):
        cid = f"race-{attempt}"
        barrier = threading.Barrier(20)

        def one(number: int, cid: str = cid, barrier: threading.Barrier = barrier) -> Any:
            barrier.wait(timeout=10)
            return outcome(chat(proxies[number % 2], cid))

        with ThreadPoolExecutor(20) as pool:
            results = list(pool.map(one, range(20)))
        assert {status for status, _, _ in results} == {200}
        assert [session for _, session, _ in results].count("created") == 1, results
        assert len({model for _, _, model in results}) == 1, results


def test_an_unpin_through_one_replica_is_seen_by_the_other_at_once(
    start_proxy: StartProxy, upstream: UpstreamStub, cluster: RedisCluster
) -> None:
    first = start_proxy(cluster_config(upstream, cluster))
    second = start_proxy(cluster_config(upstream, cluster))
    auth = {"authorization": f"Bearer {DEBUG_TOKEN}"}
    assert outcome(chat(first, "unpin-me"))[:2] == (200, "created")
    with httpx.Client(trust_env=False, timeout=10.0) as client:
        shown = client.get(f"{second.url}/debug/session/unpin-me", headers=auth)
        assert shown.status_code == 200 and shown.json()["id"] == "unpin-me"
        deleted = client.delete(f"{second.url}/debug/session/unpin-me", headers=auth)
        assert deleted.json() == {"id": "unpin-me", "deleted": True}
        assert client.get(f"{first.url}/debug/session/unpin-me", headers=auth).status_code == 404
    assert outcome(chat(first, "unpin-me"))[:2] == (200, "created")


def test_a_dead_master_costs_only_its_conversations_until_its_replica_takes_over(
    start_proxy: StartProxy, upstream: UpstreamStub, cluster: RedisCluster
) -> None:
    """One master is killed: its conversations get 503 within the store budget, through
    either replica, while the others' stay hits and /readyz stays 200. Its replica is
    promoted: both proxies use it by themselves, with the pins it had. The old master
    comes back (as a replica): everything is served."""
    proxies = [start_proxy(cluster_config(upstream, cluster)) for _ in range(2)]
    by_master = conversations_by_master(cluster, 3)
    pins = {}
    for number, cid in enumerate(cid for cids in by_master.values() for cid in cids):
        status, _, pins[cid] = outcome(chat(proxies[number % 2], cid))
        assert status == 200
    cluster.wait_replicated()
    victim = cluster.masters()[0]
    replica = cluster.replica_of(victim)
    cluster.kill(victim)

    for proxy in proxies:
        for port, cids in by_master.items():
            for cid in cids:
                started = time.monotonic()
                response = chat(proxy, cid)
                elapsed = time.monotonic() - started
                if port == victim.port:
                    assert response.status_code == 503, response.text
                    assert response.json()["error"]["code"] == "session_store_unavailable"
                    assert response.headers["retry-after"] == "1"
                    assert elapsed < BUDGET + 1.0
                else:
                    assert outcome(response) == (200, "hit", pins[cid])
        with httpx.Client(trust_env=False, timeout=10.0) as client:
            assert client.get(f"{proxy.url}/readyz").json() == {"status": "ready", "store": "ok"}

    cluster.promote(replica)
    for proxy in proxies:
        deadline = time.monotonic() + 15
        for cid in by_master[victim.port]:
            while (response := chat(proxy, cid)).status_code == 503:
                assert time.monotonic() < deadline, "the promoted replica was never used"
                time.sleep(0.05)  # polling for the pickup, with the deadline above
            assert outcome(response) == (200, "hit", pins[cid])

    cluster.wait_healthy()  # the old master is back, as a replica of the new one
    for proxy in proxies:
        for cid, model in pins.items():
            assert outcome(chat(proxy, cid)) == (200, "hit", model)


def test_replicas_on_sentinel_survive_the_primarys_death(
    start_proxy: StartProxy, upstream: UpstreamStub, sentinels: RedisSentinels
) -> None:
    """`sentinels` and `sentinel_service` instead of a URL: both replicas find the primary;
    it is killed, the sentinels promote its replica, and both proxies serve every
    conversation again with its pin, by themselves."""
    addresses = ", ".join(f'"{address}"' for address in sentinels.addresses)
    store = f'sentinels = [{addresses}]\nsentinel_service = "{SERVICE}"'
    proxies = [start_proxy(config(upstream, store)) for _ in range(2)]
    pins = {}
    for number in range(6):
        status, _, pins[f"s{number}"] = outcome(chat(proxies[number % 2], f"s{number}"))
        assert status == 200
    primary = sentinels.primary()
    with primary.client() as client:
        assert client.execute_command("WAIT", 1, 5000) == 1
    sentinels.kill(primary)
    for proxy in proxies:
        deadline = time.monotonic() + 20
        for cid, model in pins.items():
            while (response := chat(proxy, cid)).status_code == 503:
                assert response.json()["error"]["code"] == "session_store_unavailable"
                assert time.monotonic() < deadline, "the new primary was never used"
                time.sleep(0.05)  # polling for the failover, with the deadline above
            assert outcome(response) == (200, "hit", model)
