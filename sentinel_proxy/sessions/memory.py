"""The in-memory session store: the embedded default, for one process only."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from sentinel_proxy.sessions.base import Acceptor, Maker, Session, session_key


class MemoryStore:
    """Sessions in a dict, with a sliding TTL and at most `max_sessions` kept: past that,
    the least recently used goes first."""

    def __init__(
        self,
        *,
        ttl_seconds: int,
        max_sessions: int,
        accept: Acceptor = lambda session: True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = ttl_seconds
        self._max = max_sessions
        self._accept = accept
        self._clock = clock
        self._items: OrderedDict[str, tuple[Session, float]] = OrderedDict()

    def set_ttl(self, seconds: int) -> None:
        self._ttl = seconds

    def __len__(self) -> int:
        return len(self._items)

    async def get_or_create(
        self, conversation_id: str, external_id: str | None, make: Maker
    ) -> tuple[Session, bool]:
        key = session_key(conversation_id, external_id)
        now = self._clock()
        found = self._live(key, now)
        if found is not None and self._accept(found):
            self._items[key] = (found, now + self._ttl)
            self._items.move_to_end(key)
            return found, False
        candidate = make()
        self._items[key] = (candidate, now + self._ttl)
        self._items.move_to_end(key)
        while len(self._items) > self._max:
            self._items.popitem(last=False)
        return candidate, True

    async def repin(self, failed: Session, replacement: Session) -> Session:
        key = failed.key
        now = self._clock()
        found = self._live(key, now)
        if found is not None and (found.provider, found.model) != (failed.provider, failed.model):
            self._items[key] = (found, now + self._ttl)
            return found
        self._items[key] = (replacement, now + self._ttl)
        self._items.move_to_end(key)
        return replacement

    async def get(self, conversation_id: str, external_id: str | None = None) -> Session | None:
        return self._live(session_key(conversation_id, external_id), self._clock())

    async def delete(self, conversation_id: str, external_id: str | None = None) -> bool:
        return self._items.pop(session_key(conversation_id, external_id), None) is not None

    async def ping(self) -> bool:
        return True

    async def aclose(self) -> None:
        self._items.clear()

    def ttl(self, conversation_id: str, external_id: str | None = None) -> float | None:
        """Seconds left before the session expires, or None when there is none."""
        item = self._items.get(session_key(conversation_id, external_id))
        if item is None:
            return None
        left = item[1] - self._clock()
        return left if left > 0 else None

    def _live(self, key: str, now: float) -> Session | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item[1] <= now:
            del self._items[key]
            return None
        return item[0]
