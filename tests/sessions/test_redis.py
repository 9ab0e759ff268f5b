"""The Redis store against a real redis-server started by the fixtures."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import AsyncIterator, Callable

import orjson
import pytest

from sentinel_proxy.exceptions import InvalidRequest, StoreUnavailable
from sentinel_proxy.sessions import CircuitBreaker, RedisStore, Session
from tests.support.fault_relay import FaultRelay
from tests.support.redis_server import RedisServer
from tests.support.sessions import get_or_create

BUDGET = 0.2


def make_store(
    url: str,
    *,
    ttl: int = 100,
    failures: int = 3,
    budget: float = BUDGET,
    connections: int = 64,
    **kw: object,
) -> RedisStore:
    return RedisStore(
        url,
        ttl_seconds=ttl,
        timeout=budget,
        max_connections=connections,
        breaker=CircuitBreaker(failures=failures, reset_seconds=0.3),
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisStore]:
    store = make_store(redis_url)
    yield store
    await store.aclose()


def session(cid: str, provider: str = "a", model: str = "m") -> Session:
    return Session(cid, provider, model, int(time.time()))


async def eventually(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll `condition` until it holds (True) or `timeout` seconds have passed (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def connections_received(server: RedisServer) -> int:
    with server.client() as r:
        return int(r.info("stats")["total_connections_received"])


async def test_first_request_stores_the_session_as_json_with_the_ttl(
    store: RedisStore, redis_server: RedisServer
) -> None:
    created, is_new = await get_or_create(store, session("c1", "a", "m-a"))
    assert is_new and created.provider == "a"
    with redis_server.client() as r:
        stored = orjson.loads(r.get("sentinel:session:c1"))
        ttl = r.ttl("sentinel:session:c1")
    assert stored == {
        "id": "c1",
        "provider": "a",
        "model": "m-a",
        "external_id": None,
        "created_at": created.created_at,
    }
    assert 90 < ttl <= 100


async def test_hit_returns_the_stored_session_and_renews_its_ttl(
    store: RedisStore, redis_server: RedisServer
) -> None:
    await get_or_create(store, session("c1", "a", "m-a"))
    with redis_server.client() as r:
        r.expire("sentinel:session:c1", 5)
    found, is_new = await get_or_create(store, session("c1", "b", "m-b"))
    assert not is_new and (found.provider, found.model) == ("a", "m-a")
    with redis_server.client() as r:
        assert r.ttl("sentinel:session:c1") > 90


async def test_fifty_concurrent_first_requests_agree_on_one_session(
    store: RedisStore, redis_server: RedisServer
) -> None:
    candidates = [session("race", random.choice("abcdef"), f"m{i}") for i in range(50)]
    results = await asyncio.gather(*(get_or_create(store, c) for c in candidates))
    assert len({(s.provider, s.model) for s, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    with redis_server.client() as r:
        assert r.keys("sentinel:session:*") == [b"sentinel:session:race"]
        stored = orjson.loads(r.get("sentinel:session:race"))
    assert (stored["provider"], stored["model"]) == (results[0][0].provider, results[0][0].model)


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[1, 2]",
        b'{"id": "c1", "provider": "a"}',
        b'{"id": "other", "provider": "a", "model": "m", "external_id": null, "created_at": 1}',
    ],
)
async def test_unusable_stored_value_is_a_miss_and_is_overwritten(
    store: RedisStore, redis_server: RedisServer, raw: bytes
) -> None:
    with redis_server.client() as r:
        r.set("sentinel:session:c1", raw)
    found, is_new = await get_or_create(store, session("c1", "b", "m-b"))
    assert is_new and found.provider == "b"
    with redis_server.client() as r:
        assert orjson.loads(r.get("sentinel:session:c1"))["provider"] == "b"
        assert r.ttl("sentinel:session:c1") > 90


async def test_session_of_a_removed_provider_is_replaced(
    redis_url: str, redis_server: RedisServer
) -> None:
    store = make_store(redis_url, accept=lambda s: s.provider != "gone")
    try:
        await get_or_create(store, session("c1", "gone"))
        found, is_new = await get_or_create(store, session("c1", "a"))
    finally:
        await store.aclose()
    assert is_new and found.provider == "a"


async def test_get_and_delete(store: RedisStore) -> None:
    await get_or_create(store, session("c1", "a"))
    found = await store.get("c1")
    assert found is not None and found.provider == "a"
    assert await store.delete("c1")
    assert await store.get("c1") is None
    assert not await store.delete("c1")


async def test_redis_down_fails_within_budget_then_breaker_opens_then_recovers(
    redis_url: str, redis_server: RedisServer
) -> None:
    store = make_store(redis_url, failures=2)
    try:
        redis_server.stop()
        for _ in range(2):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await get_or_create(store, session("c1"))
            assert time.monotonic() - started < 1.0
        assert store.breaker.state == "open"
        with pytest.raises(StoreUnavailable, match="circuit open"):
            await get_or_create(store, session("c1"))
        assert not await store.ping()
        redis_server.start()
        # The breaker lets a trial through once its reset time has passed; poll for it.
        deadline = time.monotonic() + 5
        while True:
            try:
                found, _ = await get_or_create(store, session("c1"))
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline, "the store never recovered"
                await asyncio.sleep(0.05)
        assert found.id == "c1" and store.breaker.state == "closed"
    finally:
        redis_server.ensure_running()
        await store.aclose()


async def test_black_holed_redis_costs_at_most_the_budget(
    redis_url: str, redis_server: RedisServer
) -> None:
    store = make_store(redis_url)
    try:
        await get_or_create(store, session("warm"))  # a pooled connection exists
        redis_server.pause()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="in time"):
            await get_or_create(store, session("c1"))
        assert time.monotonic() - started < BUDGET + 0.5
    finally:
        redis_server.resume()
        await store.aclose()


async def test_a_busy_proxy_waits_longer_than_the_budget_while_redis_answers(
    redis_url: str,
) -> None:
    """Calls whose replies wait on this process, not on Redis, outlast their 150 ms budget:
    the event loop is held for three budgets while Redis answers their batches, and none
    fails nor counts against the breaker (which opens at the first failure)."""
    store = make_store(redis_url, budget=0.15, connections=1, failures=1)
    try:
        await get_or_create(store, session("warm"))  # connected, so only waiting remains
        calls = [
            asyncio.ensure_future(get_or_create(store, session(f"busy-{i}"))) for i in range(50)
        ]
        await asyncio.sleep(0)  # the batch is written
        started = time.monotonic()
        time.sleep(0.45)  # the process busy with other work, as a saturated loop is
        results = await asyncio.gather(*calls, return_exceptions=True)
        elapsed = time.monotonic() - started
    finally:
        await store.aclose()
    assert elapsed > 0.3, "the calls must outlast the budget for this test to mean anything"
    failures = [r for r in results if isinstance(r, BaseException)]
    assert failures == [], f"{len(failures)} failed in {elapsed:.3f} s: {failures[:2]}"
    assert store.breaker.state == "closed"


async def test_cancelled_commands_never_hand_their_reply_to_another_request(
    redis_url: str, redis_server: RedisServer
) -> None:
    """CVE-2023-28858/28859: many sessions with distinct providers, a share of the callers
    cancelled at random points; every call that completes gets its own session."""
    store = make_store(redis_url)
    ids = [f"conv-{i}" for i in range(200)]
    try:
        for cid in ids:
            await get_or_create(store, session(cid, f"provider-{cid}", f"model-{cid}"))
        rng = random.Random(7)
        completed = 0
        for _ in range(5):
            tasks = []
            for cid in ids:
                task = asyncio.ensure_future(get_or_create(store, session(cid, "wrong", "wrong")))
                tasks.append((cid, task))
            for _, task in rng.sample(tasks, len(tasks) // 3):
                asyncio.get_running_loop().call_later(rng.random() * 0.003, task.cancel)
            await asyncio.gather(*(t for _, t in tasks), return_exceptions=True)
            for cid, task in tasks:
                if task.cancelled():
                    continue
                found, created = task.result()
                assert (found.id, found.provider, found.model, created) == (
                    cid,
                    f"provider-{cid}",
                    f"model-{cid}",
                    False,
                )
                completed += 1
        assert completed >= len(ids) * 5 // 2
    finally:
        await store.aclose()


async def test_concurrent_calls_are_pipelined_on_one_connection(
    store: RedisStore, redis_server: RedisServer
) -> None:
    for i in range(50):
        await get_or_create(store, session(f"c{i}", "a", f"m{i}"))  # one connection, warm
    with redis_server.client() as r:
        before = r.info("stats")["total_connections_received"]
    results = await asyncio.gather(
        *(get_or_create(store, session(f"c{i}", "b", "other")) for i in range(50))
    )
    with redis_server.client() as r:
        # Our own admin connection is the only new one.
        assert r.info("stats")["total_connections_received"] == before + 1
    assert [(s.id, s.model, created) for s, created in results] == [
        (f"c{i}", f"m{i}", False) for i in range(50)
    ]


async def test_an_error_reply_fails_only_its_own_call(
    redis_url: str, redis_server: RedisServer
) -> None:
    store = make_store(redis_url, failures=1)
    with redis_server.client() as r:
        r.rpush("sentinel:session:wrong-type", "x")  # GETEX on a list: WRONGTYPE
    try:
        calls = [get_or_create(store, session(f"c{i}", "a", f"m{i}")) for i in range(10)]
        calls.insert(5, get_or_create(store, session("wrong-type")))
        results = await asyncio.gather(*calls, return_exceptions=True)
        with pytest.raises(StoreUnavailable, match="refused"):
            await get_or_create(store, session("wrong-type"))
    finally:
        await store.aclose()
    assert isinstance(results.pop(5), StoreUnavailable)
    assert [(s.id, s.model) for s, _ in results] == [  # type: ignore[misc]
        (f"c{i}", f"m{i}") for i in range(10)
    ]
    # Redis answered: a command's own error is no sign of a store that is down.
    assert store.breaker.state == "closed"


async def test_a_reply_that_comes_after_its_caller_gave_up_goes_to_nobody(
    redis_relay: FaultRelay, redis_server: RedisServer
) -> None:
    """Redis freezes with a batch of lookups in flight; their callers give up, the batch is
    abandoned at its cap, then Redis wakes and answers every one of them. The next batch,
    in another order, must read none of those late replies: every caller gets its own
    session, and no stored session changes."""
    budget = 0.1
    cap = budget * 10  # the batch cap: _BUSY_BUDGETS budgets
    store = make_store(redis_relay.url("redis", "/0"), budget=budget, failures=1000)
    ids = [f"conv-{i}" for i in range(50)]
    try:
        for cid in ids:
            await get_or_create(store, session(cid, f"provider-{cid}", f"model-{cid}"))
        with redis_server.client() as r:
            stored = {cid: r.get(f"sentinel:session:{cid}") for cid in ids}
        assert redis_relay.open_connections == 1
        redis_server.pause()
        try:
            gave_up = await asyncio.gather(
                *(get_or_create(store, session(cid, "wrong", "wrong")) for cid in ids),
                return_exceptions=True,
            )
            assert all(isinstance(r, StoreUnavailable) for r in gave_up), gave_up
            # Past the cap, the abandoned batch's connection is closed; a connection layer
            # that kept it would hand it out again with 50 replies still to come. Wait for
            # the close, or long enough for the cap to have passed many times over.
            closed = await eventually(lambda: redis_relay.open_connections == 0, cap * 6)
        finally:
            redis_server.resume()
        shuffled = random.Random(3).sample(ids, len(ids))
        results = await asyncio.gather(
            *(get_or_create(store, session(cid, "wrong", "wrong")) for cid in shuffled)
        )
    finally:
        redis_server.ensure_running()
        await store.aclose()
    assert [(s.id, s.provider, s.model, created) for s, created in results] == [
        (cid, f"provider-{cid}", f"model-{cid}", False) for cid in shuffled
    ]
    with redis_server.client() as r:
        assert {cid: r.get(f"sentinel:session:{cid}") for cid in ids} == stored
    assert closed, "the abandoned batch's connection was never closed"


@pytest.mark.parametrize("fault", ["client-kill", "reset"])
async def test_connections_closed_while_idle_are_replaced_at_no_failure(
    fault: str, redis_url: str, redis_relay: FaultRelay, redis_server: RedisServer
) -> None:
    """A restart, a failover, `CLIENT KILL` or an idle timeout leaves idle connections that
    fail their next command. A batch that fails so, before any reply, goes again on a fresh
    connection: a burst of 20 calls and a single call after it all succeed, and the breaker
    (here opened by one failure) stays closed."""
    url = redis_url if fault == "client-kill" else redis_relay.url("redis", "/0")
    store = make_store(url, failures=1, budget=1.0)  # only a lost connection may fail here
    ids = [f"c{i}" for i in range(20)]

    def close_idle_connections() -> None:
        if fault == "client-kill":
            with redis_server.client() as r:
                assert r.execute_command("CLIENT", "KILL", "TYPE", "normal") >= 1
        else:
            redis_relay.reset()

    try:
        await asyncio.gather(*(get_or_create(store, session(cid, "a", f"m-{cid}")) for cid in ids))
        close_idle_connections()
        before = connections_received(redis_server)
        burst = await asyncio.gather(
            *(get_or_create(store, session(cid, "b", "other")) for cid in ids)
        )
        assert connections_received(redis_server) > before + 1  # it did connect afresh
        close_idle_connections()
        single, created = await get_or_create(store, session("c0", "b", "other"))
    finally:
        await store.aclose()
    assert [(s.id, s.model, new) for s, new in burst] == [(cid, f"m-{cid}", False) for cid in ids]
    assert (single.id, single.model, created) == ("c0", "m-c0", False)
    assert store.breaker.state == "closed"


async def test_a_fresh_connection_that_fails_the_same_way_is_a_store_failure(
    redis_relay: FaultRelay,
) -> None:
    store = make_store(redis_relay.url("redis", "/0"), failures=1)
    try:
        await get_or_create(store, session("warm"))
        accepted = redis_relay.accepted
        redis_relay.cut()  # every connection is reset as soon as it sends anything
        with pytest.raises(StoreUnavailable, match="unreachable"):
            await get_or_create(store, session("c1"))
    finally:
        await store.aclose()
    assert redis_relay.accepted == accepted + 1, "one fresh connection, and one only"
    assert store.breaker.state == "open"


async def test_the_fresh_connection_stays_within_the_call_budget(
    redis_relay: FaultRelay,
) -> None:
    store = make_store(redis_relay.url("redis", "/0"), failures=1)
    try:
        await get_or_create(store, session("warm"))
        accepted = redis_relay.accepted
        redis_relay.reset()
        redis_relay.black_hole()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="in time"):
            await get_or_create(store, session("c1"))
        elapsed = time.monotonic() - started
    finally:
        await store.aclose()
    assert BUDGET <= elapsed < BUDGET + 0.5
    assert redis_relay.accepted == accepted + 1
    assert store.breaker.state == "open"


async def test_a_demoted_primary_fails_calls_drops_its_connections_and_is_not_ready(
    own_redis: tuple[RedisServer, RedisServer],
) -> None:
    """After a failover the old primary answers PING but refuses every write (READONLY):
    a call fails and counts against the breaker, every connection to that server is
    dropped, and the readiness probe says no until it is a primary again."""
    demoted, primary = own_redis
    relay = FaultRelay((demoted.host, demoted.port))
    relay.start()
    store = make_store(relay.url("redis", "/0"), failures=1, budget=1.0)
    try:
        # Three connections, each opened while the one before is busy (a slow network).
        relay.delay(0.05)
        calls = []
        for i in range(3):
            calls.append(asyncio.ensure_future(get_or_create(store, session(f"warm-{i}"))))
            assert await eventually(lambda: relay.accepted == len(calls), 5.0)
        await asyncio.gather(*calls)
        relay.pass_through()
        assert relay.open_connections == 3
        assert await store.ping()
        with demoted.client() as r:
            r.replicaof(primary.host, primary.port)
            assert r.ping()
        with pytest.raises(StoreUnavailable, match="cannot serve"):
            await get_or_create(store, session("c1"))
        assert store.breaker.state == "open"
        assert await eventually(lambda: relay.open_connections == 0, 5.0)
        assert not await store.ping()
        with demoted.client() as r:
            r.replicaof("NO", "ONE")
        assert await store.ping()
        assert store.breaker.state == "closed"
        found, created = await get_or_create(store, session("c1", "b"))
    finally:
        await store.aclose()
        relay.stop()
    assert (found.id, found.provider, created) == ("c1", "b", True)


async def test_a_url_that_asks_for_decoded_replies_still_gets_bytes(
    redis_url: str, redis_server: RedisServer
) -> None:
    """`decode_responses=True` in the URL would turn replies into str, which never equal
    the bytes the store wrote: a replaced session would be reported as a hit."""
    store = make_store(redis_url + "?decode_responses=True")
    with redis_server.client() as r:
        r.set("sentinel:session:c1", b"not json")
    try:
        replaced, replaced_new = await get_or_create(store, session("c1", "b", "m-b"))
        found, found_new = await get_or_create(store, session("c1", "x", "x"))
        assert await store.ping()
    finally:
        await store.aclose()
    assert (replaced.provider, replaced_new) == ("b", True)
    assert (found.provider, found_new) == ("b", False)


async def test_repin_moves_a_conversation_once_when_two_fail_over_at_once(
    store: RedisStore, redis_server: RedisServer
) -> None:
    pinned, _ = await get_or_create(store, session("c1", "a", "m-a"))
    results = await asyncio.gather(
        store.repin(pinned, session("c1", "b", "m-b")),
        store.repin(pinned, session("c1", "c", "m-c")),
    )
    assert results[0] == results[1]
    assert (results[0].provider, results[0].model) == ("b", "m-b")
    with redis_server.client() as redis:
        stored = orjson.loads(redis.get("sentinel:session:c1"))
        assert (stored["provider"], stored["model"]) == ("b", "m-b")
        assert 0 < redis.ttl("sentinel:session:c1") <= 100


async def test_repin_of_a_vanished_session_stores_the_replacement(store: RedisStore) -> None:
    replacement = session("gone", "b", "m-b")
    assert await store.repin(session("gone", "a", "m-a"), replacement) == replacement
    assert await store.get("gone") == replacement


def open_sockets() -> int:
    """Sockets this process holds open, connected or not (a socket the peer reset stays an
    open file until it is closed here)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:[")
    return count


async def test_idle_connections_closed_with_one_that_was_found_dead_are_dropped(
    redis_url: str, redis_server: RedisServer
) -> None:
    """After a restart every idle connection is dead (the server closed them: CLOSE_WAIT
    here, the file still open); once one is found so, the others are closed too, rather
    than held open until the pool happens to reach them."""
    baseline = open_sockets()
    store = make_store(redis_url, failures=1, budget=2.0)
    try:
        redis_server.pause()  # the batches wait, each on a connection of its own
        calls = []
        for index in range(8):
            calls.append(asyncio.ensure_future(get_or_create(store, session(f"d{index}"))))
            await asyncio.sleep(0.01)
        redis_server.resume()
        await asyncio.gather(*calls)
        assert open_sockets() - baseline >= 4, "the batches should have used several"
        with redis_server.client() as client:
            client.execute_command("CLIENT", "KILL", "TYPE", "normal")
        await get_or_create(store, session("d0"))
        assert open_sockets() - baseline == 1
    finally:
        redis_server.ensure_running()
        await store.aclose()


async def test_a_trial_call_that_ends_in_the_request_s_own_error_closes_the_breaker(
    redis_relay: FaultRelay,
) -> None:
    store = make_store(redis_relay.url("redis", "/0"), failures=1, budget=0.2)
    try:
        redis_relay.black_hole()
        with pytest.raises(StoreUnavailable):
            await get_or_create(store, session("t1"))
        assert store.breaker.state == "open"
        redis_relay.pass_through()
        redis_relay.reset()
        assert await eventually(lambda: store.breaker.state == "half-open", 2)

        def refuse() -> Session:
            raise InvalidRequest("model field is required")

        # The trial: Redis answers (no session), the request itself is refused.
        with pytest.raises(InvalidRequest):
            await store.get_or_create("t2", None, refuse)
        assert store.breaker.state == "closed"
        assert (await get_or_create(store, session("t3")))[1]
    finally:
        await store.aclose()
