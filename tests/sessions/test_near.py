"""The near-cache in front of the Redis store, against a real redis-server: hits answered
from memory, invalidations pushed by Redis, nothing stale after a lost connection."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest

from sentinel_proxy.sessions import CircuitBreaker, RedisClusterStore, RedisStore, Session
from sentinel_proxy.sessions.near import NearCache
from tests.support.fault_relay import FaultRelay
from tests.support.redis_cluster import RedisCluster
from tests.support.redis_server import RedisServer

TTL = 100


def near(url: str, **options: float) -> NearCache:
    store = RedisStore(
        url,
        ttl_seconds=TTL,
        timeout=0.5,
        max_connections=8,
        breaker=CircuitBreaker(failures=3, reset_seconds=0.3),
    )
    settings = {"renew_interval": 60.0, "max_entries": 1000, "max_bytes": 1 << 20}
    settings.update(options)
    return NearCache(
        store,
        ttl_seconds=TTL,
        renew_interval=settings["renew_interval"],
        max_entries=int(settings["max_entries"]),
        max_bytes=int(settings["max_bytes"]),
        timeout=0.5,
        accept=lambda session: True,
    )


async def tracking(cache: NearCache) -> NearCache:
    await cache.ping()  # starts tracking
    assert await eventually(lambda: cache.tracking, 5), "tracking never came up"
    return cache


@pytest.fixture
async def replicas(redis_url: str) -> AsyncIterator[tuple[NearCache, NearCache]]:
    """Two near-caches over one Redis, as two proxy replicas have."""
    first, second = await tracking(near(redis_url)), await tracking(near(redis_url))
    yield first, second
    await first.aclose()
    await second.aclose()


async def eventually(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)  # polling a deadline: pushes arrive on their own
    return True


def pin(cid: str, provider: str = "a") -> Session:
    return Session(cid, provider, f"m-{provider}", 1)


async def lookup(cache: NearCache, cid: str, provider: str = "a") -> tuple[Session, bool]:
    return await cache.get_or_create(cid, None, lambda: pin(cid, provider))


def commands(server: RedisServer, name: str) -> int:
    with server.client() as client:
        stats = client.info("commandstats")
    return int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))


async def test_a_hit_costs_no_redis_command(
    replicas: tuple[NearCache, NearCache], redis_server: RedisServer
) -> None:
    cache, _ = replicas
    created, is_new = await lookup(cache, "c1")
    assert is_new and len(cache) == 0  # a created pin is cached once read back, tracked
    read, is_new = await lookup(cache, "c1", "b")
    assert (read, is_new) == (created, False) and len(cache) == 1
    reads = [commands(redis_server, name) for name in ("get", "getex", "pttl")]
    for _ in range(200):
        assert await lookup(cache, "c1", "b") == (created, False)
    assert [commands(redis_server, name) for name in ("get", "getex", "pttl")] == reads


async def test_a_re_pin_on_one_replica_reaches_the_other_at_once(
    replicas: tuple[NearCache, NearCache],
) -> None:
    first, second = replicas
    pinned, _ = await lookup(first, "c2")
    await lookup(first, "c2")
    await lookup(second, "c2")
    assert len(first) == len(second) == 1
    started = time.monotonic()
    moved = await second.repin(pinned, pin("c2", "b"))
    assert await eventually(lambda: len(first) == 0, 1), "the invalidation never came"
    arrived = time.monotonic() - started
    assert arrived < 0.5, arrived
    assert (await lookup(first, "c2"))[0] == moved


async def test_a_delete_on_one_replica_is_seen_by_all(
    replicas: tuple[NearCache, NearCache],
) -> None:
    first, second = replicas
    await lookup(first, "c3")
    await lookup(first, "c3")
    await lookup(second, "c3")
    assert await second.delete("c3")
    assert await eventually(lambda: len(first) == 0, 1)
    again, created = await lookup(first, "c3", "b")
    assert created and again.provider == "b"


async def test_a_lost_tracking_connection_flushes_the_cache_and_reads_go_through(
    redis_server: RedisServer, redis_relay: FaultRelay, redis_url: str
) -> None:
    cache = await tracking(near(redis_relay.url("redis", "/0")))
    try:
        await lookup(cache, "c4")
        await lookup(cache, "c4")
        assert len(cache) == 1
        redis_relay.reset()
        assert await eventually(lambda: not cache.tracking, 2)
        assert len(cache) == 0
        # Meanwhile Redis changes the pin: read through, the change is seen.
        with redis_server.client() as client:
            client.set("sentinel:session:c4", pin("c4", "b").to_json())
        assert (await lookup(cache, "c4"))[0].provider == "b"
        redis_relay.pass_through()
        assert await eventually(lambda: cache.tracking, 5)
        await lookup(cache, "c4")
        assert len(cache) == 1
    finally:
        await cache.aclose()


async def test_an_entry_is_never_served_past_its_expiry_in_redis(
    replicas: tuple[NearCache, NearCache],
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache, _ = replicas
    # A renewal that never reaches Redis: only the entry's own expiry stands in the way.
    monkeypatch.setattr(cache, "_renew_if_due", lambda key, entry, now: None)
    await lookup(cache, "c5")
    with redis_server.client() as client:
        client.pexpire("sentinel:session:c5", 300)
    # The PEXPIRE is a change: read the key again, with its short TTL.
    await eventually(lambda: len(cache) == 0, 1)
    await lookup(cache, "c5")
    assert len(cache) == 1
    await asyncio.sleep(0.35)  # the key's TTL runs out in Redis
    again, created = await lookup(cache, "c5", "b")
    assert created and again.provider == "b"


async def test_ttl_is_renewed_at_most_once_per_interval(
    redis_url: str, redis_server: RedisServer
) -> None:
    cache = await tracking(near(redis_url, renew_interval=0.3))
    key = "sentinel:session:c6"
    try:
        await lookup(cache, "c6")
        with redis_server.client() as client:
            client.expire(key, 50)  # as if fifty seconds had passed since the last renewal
            await lookup(cache, "c6")
            # Read back with 50 s left: due, so renewed in the background.
            assert await eventually(lambda: client.pttl(key) > 99_000, 2)
            renewed = client.pttl(key)
            started = time.monotonic()
            for _ in range(50):
                await lookup(cache, "c6")
            assert time.monotonic() - started < 0.3, "too slow to stay within the interval"
            assert client.pttl(key) <= renewed  # no renewal within the interval
            await asyncio.sleep(0.35)  # past the renew interval
            await lookup(cache, "c6")
            # Without a renewal it would be 350 ms or more below `renewed` by now.
            assert await eventually(lambda: client.pttl(key) > renewed - 100, 2)
    finally:
        await cache.aclose()


async def test_the_cache_is_bounded(redis_url: str) -> None:
    cache = await tracking(near(redis_url, max_entries=3))
    try:
        for index in range(6):
            await lookup(cache, f"b{index}")
            await lookup(cache, f"b{index}")
        assert len(cache) == 3
    finally:
        await cache.aclose()


async def test_fifty_concurrent_first_requests_agree_through_the_cache(
    replicas: tuple[NearCache, NearCache],
) -> None:
    first, second = replicas
    results = await asyncio.gather(
        *(lookup(cache, "race", provider) for cache, provider in [(first, "a"), (second, "b")] * 25)
    )
    assert len({session for session, _ in results}) == 1
    assert sum(created for _, created in results) == 1


def near_cluster(url: str) -> NearCache:
    store = RedisClusterStore(
        url,
        ttl_seconds=TTL,
        timeout=0.5,
        max_connections=8,
        breakers=lambda: CircuitBreaker(failures=3, reset_seconds=0.3),
    )
    return NearCache(
        store,
        ttl_seconds=TTL,
        renew_interval=60,
        max_entries=1000,
        max_bytes=1 << 20,
        timeout=0.5,
        accept=lambda session: True,
    )


def cluster_ids(cluster: RedisCluster, per_master: int) -> list[str]:
    found: dict[int, list[str]] = {master.port: [] for master in cluster.masters()}
    number = 0
    while any(len(ids) < per_master for ids in found.values()):
        cid = f"near-{number}"
        ids = found[cluster.owner(f"sentinel:session:{cid}").port]
        if len(ids) < per_master:
            ids.append(cid)
        number += 1
    return [cid for ids in found.values() for cid in ids]


async def test_on_a_cluster_each_master_tracks_its_own_keys(cluster: RedisCluster) -> None:
    first, second = near_cluster(cluster.url), near_cluster(cluster.url)
    try:
        await tracking(first)
        await tracking(second)
        ids = cluster_ids(cluster, 3)
        for cid in ids:
            await lookup(first, cid)
            await lookup(first, cid)
        assert len(first) == len(ids)
        reads = {m.port: commands(m, "get") + commands(m, "getex") for m in cluster.masters()}
        for cid in ids * 10:
            assert (await lookup(first, cid))[0].provider == "a"
        after = {m.port: commands(m, "get") + commands(m, "getex") for m in cluster.masters()}
        assert after == reads, "a hit asked a master"
        # A re-pin through the other replica, on every master, reaches the first at once.
        for cid in ids:
            found, _ = await lookup(second, cid)
            await second.repin(found, pin(cid, "b"))
        assert await eventually(lambda: len(first) == 0, 2)
        assert {(await lookup(first, cid))[0].provider for cid in ids} == {"b"}
    finally:
        await first.aclose()
        await second.aclose()
