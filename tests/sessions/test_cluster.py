"""The Redis store on a real three-master Redis Cluster (the `cluster` fixture): slot routing,
MOVED and ASK, a dead or frozen master, a promoted replica."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator

import orjson
import pytest
from redis.crc import key_slot

from sentinel_proxy.exceptions import StoreUnavailable
from sentinel_proxy.sessions import CircuitBreaker, RedisClusterStore, RedisStore, Session
from tests.support.redis_cluster import RedisCluster
from tests.support.redis_server import RedisServer
from tests.support.sessions import get_or_create

BUDGET = 0.2


def make_store(url: str, *, failures: int = 3, budget: float = BUDGET) -> RedisClusterStore:
    return RedisClusterStore(
        url,
        ttl_seconds=100,
        timeout=budget,
        max_connections=64,
        breakers=lambda: CircuitBreaker(failures=failures, reset_seconds=0.3),
    )


@pytest.fixture
async def store(cluster: RedisCluster) -> AsyncIterator[RedisClusterStore]:
    store = make_store(cluster.url)
    assert await store.ping()
    yield store
    await store.aclose()


def session(cid: str, provider: str = "a", model: str = "m") -> Session:
    return Session(cid, provider, model, int(time.time()))


def ids_by_master(cluster: RedisCluster, count: int) -> dict[int, list[str]]:
    """`count` conversation ids for each master, by the master's port."""
    found: dict[int, list[str]] = {master.port: [] for master in cluster.masters()}
    number = 0
    while any(len(ids) < count for ids in found.values()):
        cid = f"conv-{number}"
        ids = found[cluster.owner(f"sentinel:session:{cid}").port]
        if len(ids) < count:
            ids.append(cid)
        number += 1
    return found


def stored(server: RedisServer, cid: str) -> dict[str, object] | None:
    with server.client() as client:
        raw = client.get(f"sentinel:session:{cid}")
    return None if raw is None else orjson.loads(raw)


def command_calls(server: RedisServer) -> dict[str, int]:
    """Commands run by `server` (calls), and those it refused with a redirection or an
    error (rejected_calls, counted as `name!`)."""
    with server.client() as client:
        stats = client.info("commandstats")
    counts = {}
    for name, values in stats.items():
        counts[name.removeprefix("cmdstat_")] = int(values["calls"])
        counts[name.removeprefix("cmdstat_") + "!"] = int(values.get("rejected_calls", 0))
    return counts


def reset_stats(cluster: RedisCluster) -> None:
    for master in cluster.masters():
        with master.client() as client:
            client.config_resetstat()


async def test_each_session_lives_on_the_master_of_its_slot(
    store: RedisClusterStore, cluster: RedisCluster
) -> None:
    by_master = ids_by_master(cluster, 5)
    assert len(by_master) == 3
    for port, ids in by_master.items():
        for cid in ids:
            created, is_new = await get_or_create(store, session(cid, "a", f"m-{cid}"))
            assert is_new and created.model == f"m-{cid}"
            assert stored(cluster.node_at(port), cid) == {
                "id": cid,
                "provider": "a",
                "model": f"m-{cid}",
                "external_id": None,
                "created_at": created.created_at,
            }
    for ids in by_master.values():
        for cid in ids:
            found, is_new = await get_or_create(store, session(cid, "b", "other"))
            assert (found.model, is_new) == (f"m-{cid}", False)


async def test_a_hit_is_one_getex_on_its_master_and_nothing_else(
    store: RedisClusterStore, cluster: RedisCluster
) -> None:
    by_master = ids_by_master(cluster, 10)
    every = [cid for ids in by_master.values() for cid in ids]
    await asyncio.gather(*(get_or_create(store, session(cid)) for cid in every))
    # One admin connection per master, opened before the counts start.
    admins = {port: cluster.node_at(port).client() for port in by_master}
    try:
        for admin in admins.values():
            admin.config_resetstat()
        results = await asyncio.gather(*(get_or_create(store, session(cid, "b")) for cid in every))
        calls = {port: admin.info("commandstats") for port, admin in admins.items()}
    finally:
        for admin in admins.values():
            admin.close()
    assert [(s.id, created) for s, created in results] == [(cid, False) for cid in every]
    for port, stats in calls.items():
        assert {name: int(v["calls"]) for name, v in stats.items()} == {
            "cmdstat_getex": 10,
            "cmdstat_config|resetstat": 1,
        }, port


async def test_concurrent_first_requests_agree_on_one_session(
    store: RedisClusterStore, cluster: RedisCluster
) -> None:
    candidates = [session("race", random.choice("abcdef"), f"m{i}") for i in range(50)]
    results = await asyncio.gather(*(get_or_create(store, c) for c in candidates))
    assert len({(s.provider, s.model) for s, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    saved = stored(cluster.owner("sentinel:session:race"), "race")
    assert saved is not None and saved["model"] == results[0][0].model


async def test_get_delete_and_repin_go_to_the_keys_master(
    store: RedisClusterStore, cluster: RedisCluster
) -> None:
    for ids in ids_by_master(cluster, 2).values():
        cid = ids[0]
        pinned, _ = await get_or_create(store, session(cid, "a", "m-a"))
        moved = await store.repin(pinned, session(cid, "b", "m-b"))
        assert (moved.provider, moved.model) == ("b", "m-b")
        assert await store.get(cid) == moved
        assert await store.delete(cid)
        assert await store.get(cid) is None
        assert stored(cluster.owner(f"sentinel:session:{cid}"), cid) is None


async def test_users_keys_are_routed_by_their_whole_key(
    store: RedisClusterStore, cluster: RedisCluster
) -> None:
    candidate = Session("c1", "a", "m", int(time.time()), "team-a")
    created, _ = await get_or_create(store, candidate)
    with cluster.owner("sentinel:session:team-a:c1").client() as client:
        assert orjson.loads(client.get("sentinel:session:team-a:c1"))["external_id"] == "team-a"
    found, is_new = await get_or_create(store, Session("c1", "b", "x", 0, "team-a"))
    assert (found, is_new) == (created, False)


async def test_a_moved_slot_is_followed_and_remembered(
    store: RedisClusterStore, cluster: RedisCluster
) -> None:
    """The slot of a stored session is moved to another master behind the store's back:
    the next lookup follows MOVED to it (still a hit), and the one after goes straight
    there."""
    cid = "moving"
    key = f"sentinel:session:{cid}"
    pinned, _ = await get_or_create(store, session(cid, "a", "m-a"))
    source = cluster.owner(key)
    target = next(m for m in cluster.masters() if m.port != source.port)
    slot = key_slot(key.encode())
    try:
        migrate(cluster, slot, source, target, [key], finish=True)
        assert cluster.owner(key).port == target.port
        reset_stats(cluster)
        found, is_new = await get_or_create(store, session(cid, "b", "m-b"))
        again, _ = await get_or_create(store, session(cid, "b", "m-b"))
        assert (found, is_new) == (pinned, False) and again == pinned
        # One GETEX at the old master (answered MOVED), then only the new one.
        assert (command_calls(source)["getex"], command_calls(source)["getex!"]) == (0, 1)
        assert (command_calls(target)["getex"], command_calls(target)["getex!"]) == (2, 0)
    finally:
        migrate(cluster, slot, target, source, [key], finish=True)


async def test_a_slot_being_migrated_is_served_with_asking(
    store: RedisClusterStore, cluster: RedisCluster
) -> None:
    """While a slot migrates, a key already moved is answered ASK by the old master: the
    lookup follows it with ASKING and finds the session, and a conversation that has none
    is created on the new master; the map is left as it was."""
    key = "sentinel:session:asked"
    await get_or_create(store, session("asked", "a", "m-a"))
    slot = key_slot(key.encode())
    source = cluster.owner(key)
    target = next(m for m in cluster.masters() if m.port != source.port)
    # A new conversation in the same slot: a hash tag with the slot's own bytes.
    tagged = f"{{{first_tag_for(slot)}}}new"
    try:
        migrate(cluster, slot, source, target, [key], finish=False)
        found, is_new = await get_or_create(store, session("asked", "b", "m-b"))
        created, created_new = await get_or_create(store, session(tagged, "b", "m-b"))
        assert (found.model, is_new) == ("m-a", False)
        assert (created.model, created_new) == ("m-b", True)
        with target.client() as client:
            client.execute_command("ASKING")
            assert client.exists(f"sentinel:session:{tagged}") == 1
        assert store._route(key).name == f"127.0.0.1:{source.port}"  # type: ignore[union-attr]
    finally:
        give_slot(cluster, slot, target)
        with target.client() as client:
            keys = [k.decode() for k in client.keys("*") if key_slot(k) == slot]
        migrate(cluster, slot, target, source, keys, finish=True)


async def test_a_dead_master_fails_only_its_conversations_within_the_budget(
    store: RedisClusterStore, cluster: RedisCluster
) -> None:
    """A master is killed: lookups of its conversations fail after at most one budget (its
    breaker opens), the others' keep working. Its replica is promoted: the store finds it
    by itself, with the pins it had; the old master comes back as a replica."""
    by_master = ids_by_master(cluster, 4)
    pins = {}
    for ids in by_master.values():
        for cid in ids:
            pins[cid], _ = await get_or_create(store, session(cid, "a", f"m-{cid}"))
    cluster.wait_replicated()
    victim = cluster.masters()[0]
    replica = cluster.replica_of(victim)
    cluster.kill(victim)

    for _ in range(3):  # enough failures (3) to open its breaker
        for port, ids in by_master.items():
            for cid in ids:
                started = time.monotonic()
                if port == victim.port:
                    with pytest.raises(StoreUnavailable):
                        await get_or_create(store, session(cid, "b"))
                    assert time.monotonic() - started < BUDGET + 0.3
                else:
                    assert await get_or_create(store, session(cid, "b")) == (pins[cid], False)
    assert store.breakers[f"127.0.0.1:{victim.port}"].state == "open"
    assert all(
        b.state == "closed"
        for name, b in store.breakers.items()
        if name != f"127.0.0.1:{victim.port}"
    )
    assert await store.ping()  # two masters of three serve: ready

    cluster.promote(replica)
    victims = by_master[victim.port]

    async def served() -> bool:
        try:
            return await get_or_create(store, session(victims[0], "b")) == (pins[victims[0]], False)
        except StoreUnavailable:
            await asyncio.sleep(0.05)
            return False

    deadline = time.monotonic() + 10
    while not await served():
        assert time.monotonic() < deadline, "the promoted replica was never used"
    for ids in by_master.values():
        for cid in ids:
            assert await get_or_create(store, session(cid, "b")) == (pins[cid], False)
    cluster.wait_healthy()  # the old master back, as a replica
    for cid, pin in pins.items():
        assert await get_or_create(store, session(cid, "b")) == (pin, False)


async def test_a_restarted_master_is_used_again_by_itself(
    store: RedisClusterStore, cluster: RedisCluster
) -> None:
    """A master dies and comes back on its own (no promotion): its conversations fail
    meanwhile, the store opens its breaker, and uses it again once it is back. Without
    persistence it comes back empty: its conversations are pinned afresh, the others keep
    their pins."""
    by_master = ids_by_master(cluster, 3)
    pins = {}
    for ids in by_master.values():
        for cid in ids:
            pins[cid], _ = await get_or_create(store, session(cid, "a", f"m-{cid}"))
    victim = cluster.masters()[2]
    cluster.kill(victim)
    for cid in by_master[victim.port]:
        with pytest.raises(StoreUnavailable):
            await get_or_create(store, session(cid, "b", "m-b"))
    assert store.breakers[f"127.0.0.1:{victim.port}"].state == "open"
    victim.start()
    deadline = time.monotonic() + 10
    while True:
        try:
            again = [await get_or_create(store, session(cid, "b", "m-b")) for cid in pins]
            break
        except StoreUnavailable:
            assert time.monotonic() < deadline, "the restarted master was never used"
            await asyncio.sleep(0.05)
    for cid, (found, created) in zip(pins, again, strict=True):
        if cid in by_master[victim.port]:
            assert (found.model, created) == ("m-b", True)
        else:
            assert (found, created) == (pins[cid], False)


async def test_a_frozen_master_costs_its_conversations_one_budget(
    store: RedisClusterStore, cluster: RedisCluster
) -> None:
    by_master = ids_by_master(cluster, 3)
    for ids in by_master.values():
        for cid in ids:
            await get_or_create(store, session(cid))
    victim = cluster.masters()[1]
    victim.pause()
    try:
        for port, ids in by_master.items():
            results = await asyncio.gather(
                *(timed(get_or_create(store, session(cid, "b"))) for cid in ids)
            )
            for elapsed, outcome in results:
                if port == victim.port:
                    assert isinstance(outcome, StoreUnavailable), outcome
                    assert BUDGET <= elapsed < BUDGET + 0.4
                else:
                    assert not isinstance(outcome, BaseException), outcome
                    assert elapsed < BUDGET
    finally:
        victim.resume()
    cid = by_master[victim.port][0]
    deadline = time.monotonic() + 10
    while True:
        try:
            found, _ = await get_or_create(store, session(cid, "b"))
            break
        except StoreUnavailable:
            assert time.monotonic() < deadline, "the thawed master was never used again"
            await asyncio.sleep(0.05)
    assert found.provider == "a"


async def test_a_url_that_names_no_cluster_node_serves_nothing_and_says_why(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, "sentinel_proxy.sessions")
    store = make_store(redis_url)
    try:
        assert not await store.ping()
        with pytest.raises(StoreUnavailable, match="could be found"):
            await get_or_create(store, session("c1"))
    finally:
        await store.aclose()
    assert "is it a cluster node?" in caplog.text


async def test_a_cluster_node_behind_a_single_node_url_says_so(
    cluster: RedisCluster, caplog: pytest.LogCaptureFixture
) -> None:
    by_master = ids_by_master(cluster, 1)
    elsewhere = next(ids[0] for port, ids in by_master.items() if port != cluster.nodes[0].port)
    store = RedisStore(
        cluster.url,
        ttl_seconds=100,
        timeout=BUDGET,
        max_connections=8,
        breaker=CircuitBreaker(failures=3, reset_seconds=1),
    )
    caplog.set_level(logging.WARNING, "sentinel_proxy.sessions")
    try:
        with pytest.raises(StoreUnavailable, match="refused"):
            await get_or_create(store, session(elsewhere))
    finally:
        await store.aclose()
    assert "set session.cluster = true" in caplog.text


async def timed(call: object) -> tuple[float, object]:
    started = time.monotonic()
    try:
        outcome = await call  # type: ignore[misc]
    except Exception as exc:
        outcome = exc
    return time.monotonic() - started, outcome


def node_id(server: RedisServer) -> str:
    with server.client() as client:
        return str(client.execute_command("CLUSTER MYID").decode())


def migrate(
    cluster: RedisCluster,
    slot: int,
    source: RedisServer,
    target: RedisServer,
    keys: list[str],
    *,
    finish: bool,
) -> None:
    """Move `keys` of `slot` from `source` to `target`; with `finish`, give the slot to
    `target` (else it stays migrating from `source`, importing into `target`)."""
    with source.client() as src, target.client() as dst:
        dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", node_id(source))
        src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", node_id(target))
        if keys:
            src.execute_command("MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *keys)
    if finish:
        give_slot(cluster, slot, target)


def give_slot(cluster: RedisCluster, slot: int, owner: RedisServer) -> None:
    for master in cluster.masters():
        with master.client() as client:
            client.execute_command("CLUSTER SETSLOT", slot, "NODE", node_id(owner))


def first_tag_for(slot: int) -> str:
    tag = 0
    while key_slot(str(tag).encode()) != slot:
        tag += 1
    return str(tag)
