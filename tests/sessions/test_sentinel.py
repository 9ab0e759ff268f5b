"""The Redis store on the primary that Redis Sentinel names: a real primary, replica and three
sentinels (the `sentinels` fixture), failovers forced or caused by a killed primary."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import orjson
import pytest
import redis

from sentinel_proxy.exceptions import StoreUnavailable
from sentinel_proxy.sessions import CircuitBreaker, RedisSentinelStore, Session
from tests.support.ports import free_port
from tests.support.redis_sentinel import SERVICE, RedisSentinels
from tests.support.redis_server import RedisServer
from tests.support.sessions import get_or_create

BUDGET = 0.2


def make_store(
    addresses: list[str], url: str = "redis://", *, failures: int = 3
) -> RedisSentinelStore:
    pairs = [(host, int(port)) for host, port in (a.rsplit(":", 1) for a in addresses)]
    return RedisSentinelStore(
        url,
        sentinels=pairs,
        service=SERVICE,
        ttl_seconds=100,
        timeout=BUDGET,
        max_connections=16,
        breaker=CircuitBreaker(failures=failures, reset_seconds=0.3),
    )


@pytest.fixture
async def store(sentinels: RedisSentinels) -> AsyncIterator[RedisSentinelStore]:
    store = make_store(sentinels.addresses)
    assert await store.ping()
    yield store
    await store.aclose()


def session(cid: str, provider: str = "a", model: str = "m") -> Session:
    return Session(cid, provider, model, int(time.time()))


def stored_on(server: RedisServer, cid: str) -> bytes | None:
    with server.client() as client:
        value: bytes | None = client.get(f"sentinel:session:{cid}")
        return value


async def pins(store: RedisSentinelStore, count: int) -> dict[str, Session]:
    made = {}
    for i in range(count):
        made[f"c{i}"], _ = await get_or_create(store, session(f"c{i}", "a", f"m{i}"))
    return made


async def served_again(
    store: RedisSentinelStore, expected: dict[str, Session], timeout: float
) -> int:
    """Ask for every pinned conversation until all are hits with their pins; returns how
    many lookups failed meanwhile (each with StoreUnavailable, nothing else)."""
    failures = 0
    deadline = time.monotonic() + timeout
    while True:
        try:
            results = [await get_or_create(store, session(cid, "b", "x")) for cid in expected]
        except StoreUnavailable:
            failures += 1
            assert time.monotonic() < deadline, f"not served again after {timeout} s"
            await asyncio.sleep(0.05)
            continue
        assert results == [(pin, False) for pin in expected.values()]
        return failures


async def test_sessions_go_to_the_primary_the_sentinels_name(
    store: RedisSentinelStore, sentinels: RedisSentinels
) -> None:
    primary = sentinels.primary()
    created, is_new = await get_or_create(store, session("c1", "a", "m-a"))
    assert is_new and store.primary == (primary.host, primary.port)
    raw = stored_on(primary, "c1")
    assert raw is not None and orjson.loads(raw)["model"] == "m-a"
    assert await get_or_create(store, session("c1", "b", "m-b")) == (created, False)


async def test_a_demoted_primary_answering_readonly_sends_the_store_to_the_new_one(
    store: RedisSentinelStore, sentinels: RedisSentinels
) -> None:
    """The sentinels promote the replica and the old primary becomes its replica (READONLY
    to the store's commands): the first lookup that meets READONLY fails, the store asks
    the sentinels again, and the next ones are served by the new primary, pins intact."""
    pinned = await pins(store, 5)
    old = sentinels.primary()
    with old.client() as client:
        assert client.execute_command("WAIT", 1, 5000) == 1
    new = sentinels.failover(demote=True)
    failures = await served_again(store, pinned, timeout=10)
    assert 1 <= failures <= 3, failures
    assert store.primary == (new.host, new.port)
    assert store.breaker.state == "closed"


async def test_the_readiness_probe_finds_a_new_primary_before_anything_fails(
    store: RedisSentinelStore, sentinels: RedisSentinels
) -> None:
    """An operator's failover leaves the old primary taking writes until the sentinels
    demote it, up to 10 s later: the probe asks the sentinels, and new sessions go to the
    new primary at once."""
    old = sentinels.primary()
    new = sentinels.failover(demote=False)
    try:
        assert await store.ping()
        assert store.primary == (new.host, new.port)
        await get_or_create(store, session("after", "a", "m-a"))
        assert stored_on(new, "after") is not None
        assert stored_on(old, "after") is None
    finally:
        with old.client() as client:
            client.replicaof(new.host, new.port)


async def test_a_killed_primary_is_replaced_by_the_one_the_sentinels_promote(
    store: RedisSentinelStore, sentinels: RedisSentinels
) -> None:
    """The primary dies: lookups fail, each within the budget, until the sentinels have
    promoted the replica (about 2 s here); then the store uses it by itself, pins intact."""
    pinned = await pins(store, 5)
    old = sentinels.primary()
    with old.client() as client:
        assert client.execute_command("WAIT", 1, 5000) == 1
    replica = sentinels.replica()
    sentinels.kill(old)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await get_or_create(store, session("c0"))
    assert time.monotonic() - started < BUDGET + 0.3
    await served_again(store, pinned, timeout=20)
    assert store.primary == (replica.host, replica.port)


async def test_no_sentinel_answering_costs_a_lookup_one_budget(
    sentinels: RedisSentinels,
) -> None:
    store = make_store([f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"])
    try:
        assert not await store.ping()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="could be found"):
            await get_or_create(store, session("c1"))
        assert time.monotonic() - started < BUDGET + 0.3
    finally:
        await store.aclose()


async def test_the_urls_database_and_password_apply_to_the_primary(
    store: RedisSentinelStore, sentinels: RedisSentinels
) -> None:
    """`redis_url` with sentinels: its host is not used, its database is."""
    other = make_store(sentinels.addresses, "redis://ignored.invalid:1/3")
    try:
        await get_or_create(other, session("in-db-3"))
    finally:
        await other.aclose()
    primary = sentinels.primary()
    with redis.Redis(host=primary.host, port=primary.port, db=3, socket_timeout=5) as client:
        assert client.get("sentinel:session:in-db-3") is not None
        client.flushdb()
