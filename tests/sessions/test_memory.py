from __future__ import annotations

from sentinel_proxy.sessions import MemoryStore, Session
from tests.support.sessions import get_or_create


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def session(cid: str, provider: str = "a") -> Session:
    return Session(cid, provider, "m", 1)


async def test_create_then_hit() -> None:
    store = MemoryStore(ttl_seconds=10, max_sessions=10)
    first, created = await get_or_create(store, session("c", "a"))
    again, created_again = await get_or_create(store, session("c", "b"))
    assert created and not created_again
    assert first.provider == again.provider == "a"


async def test_ttl_slides_with_every_request() -> None:
    clock = Clock()
    store = MemoryStore(ttl_seconds=10, max_sessions=10, clock=clock)
    await get_or_create(store, session("c"))
    clock.now += 8
    _, created = await get_or_create(store, session("c", "b"))
    assert not created
    assert store.ttl("c") == 10
    clock.now += 9.5  # 17.5 s after creation, 9.5 s after the last request
    assert await store.get("c") is not None
    clock.now += 0.5
    assert await store.get("c") is None
    _, created = await get_or_create(store, session("c", "b"))
    assert created


async def test_bounded_least_recently_used_goes_first() -> None:
    store = MemoryStore(ttl_seconds=100, max_sessions=2)
    await get_or_create(store, session("old"))
    await get_or_create(store, session("mid"))
    await get_or_create(store, session("old"))  # used again: now the newest
    await get_or_create(store, session("new"))
    assert len(store) == 2
    assert await store.get("mid") is None
    assert await store.get("old") is not None


async def test_unacceptable_session_is_replaced() -> None:
    store = MemoryStore(ttl_seconds=100, max_sessions=10, accept=lambda s: s.provider != "gone")
    await get_or_create(store, session("c", "gone"))
    replaced, created = await get_or_create(store, session("c", "a"))
    assert created and replaced.provider == "a"


async def test_delete_and_external_ids_are_separate() -> None:
    store = MemoryStore(ttl_seconds=100, max_sessions=10)
    await get_or_create(store, Session("c", "a", "m", 1, external_id="u1"))
    assert await store.get("c") is None
    assert await store.get("c", "u1") is not None
    assert await store.delete("c", "u1")
    assert not await store.delete("c", "u1")


async def test_repin_keeps_the_first_move() -> None:
    store = MemoryStore(ttl_seconds=60, max_sessions=10)
    pinned, _ = await get_or_create(store, session("c", "a"))
    first = await store.repin(pinned, session("c", "b"))
    second = await store.repin(pinned, session("c", "c"))
    assert first == second and first.provider == "b"
    assert (await store.get("c")) == first
