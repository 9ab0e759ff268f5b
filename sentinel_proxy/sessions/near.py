"""The near-cache: recently used pins kept in this process, so a hit costs no Redis round
trip, invalidated by Redis itself (client tracking, see tracking.py).

- A pin is cached only from a read made on the tracking connection to the server that holds
  its key (one per Redis Cluster master; the primary under Sentinel), so Redis tracks every
  cached key for this process: a re-pin, a delete or an expiry anywhere invalidates it.
- An entry is served only while its key is still held by the server it was read from: a
  moved slot or a new primary makes it a miss.
- When a tracking connection goes down the whole cache is flushed (an invalidation may have
  been lost on it); until it is back, lookups of its server's keys read through the store.
- The sliding TTL is renewed at most once per `renew_interval` per key per process, in the
  background (EXPIRE, then GET to read the key back and track it again), so it is accurate
  to within that interval. Each entry also keeps the time its key expires in Redis at the
  latest, as last read, and is never served past it.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from sentinel_proxy.exceptions import StoreUnavailable
from sentinel_proxy.sessions.base import Acceptor, Maker, Session, decode_session, session_key
from sentinel_proxy.sessions.breaker import CircuitBreaker
from sentinel_proxy.sessions.redis import Node, RedisStore
from sentinel_proxy.sessions.tracking import ReplyError, Tracker, TrackerDown

# Renewals due are sent together this long after the first of them.
_RENEW_BATCH_DELAY = 0.05
# What an entry costs beside its strings (the dict slot, the object, the floats).
_ENTRY_OVERHEAD = 200


class _Entry:
    __slots__ = ("session", "expires", "size", "server", "renewing")

    def __init__(self, session: Session, expires: float, size: int, server: str) -> None:
        self.session = session
        self.expires = expires
        self.size = size
        # The server the entry was read from, tracked on its tracking connection.
        self.server = server
        self.renewing = False


class NearCache:
    """A SessionStore that answers hits from memory and everything else from `store`."""

    def __init__(
        self,
        store: RedisStore,
        *,
        ttl_seconds: int,
        renew_interval: float,
        max_entries: int,
        max_bytes: int,
        timeout: float,
        accept: Acceptor,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._ttl = ttl_seconds
        self._renew_setting = renew_interval
        self._renew_interval = min(renew_interval, ttl_seconds / 2)
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._timeout = timeout
        self._accept = accept
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        self._trackers: dict[str, Tracker] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._due: dict[str, _Entry] = {}
        self._renewal: asyncio.TimerHandle | None = None
        self._renewals: set[asyncio.Task[None]] = set()
        # Told of each "hit", "miss" and "invalidation" (the metrics).
        self.count: Callable[[str], None] = _ignore

    @property
    def breaker(self) -> CircuitBreaker:
        return self._store.breaker

    @property
    def tracking(self) -> bool:
        """Whether every server's tracking connection is up."""
        servers = self._store.servers()
        return bool(servers) and all(
            (tracker := self._trackers.get(node.name)) is not None and tracker.live
            for node in servers
        )

    def __len__(self) -> int:
        return len(self._entries)

    async def get_or_create(
        self, conversation_id: str, external_id: str | None, make: Maker
    ) -> tuple[Session, bool]:
        key = session_key(conversation_id, external_id)
        node = self._store.server_of(key)
        # A failing server is asked, not bypassed: its failures are what the client hears.
        if node is None or node.breaker.state != "closed":
            return await self._store.get_or_create(conversation_id, external_id, make)
        entry = self._entries.get(key)
        if entry is not None:
            now = self._clock()
            if now < entry.expires and entry.server == node.name:
                self._entries.move_to_end(key)
                self.count("hit")
                self._renew_if_due(key, entry, now)
                return entry.session, False
            self._drop(key)
        self.count("miss")
        tracker = self._tracker_for(node)
        if tracker.live:
            entry = await self._read(tracker, node, key, conversation_id, external_id)
            if entry is not None:
                self._renew_if_due(key, entry, self._clock())
                return entry.session, False
        return await self._store.get_or_create(conversation_id, external_id, make)

    async def repin(self, failed: Session, replacement: Session) -> Session:
        self._drop(failed.key)
        return await self._store.repin(failed, replacement)

    async def get(self, conversation_id: str, external_id: str | None = None) -> Session | None:
        return await self._store.get(conversation_id, external_id)

    async def delete(self, conversation_id: str, external_id: str | None = None) -> bool:
        self._drop(session_key(conversation_id, external_id))
        return await self._store.delete(conversation_id, external_id)

    async def ping(self) -> bool:
        served = await self._store.ping()
        # The lifespan's first call: tracking starts here, inside the running loop.
        for node in self._store.servers():
            self._tracker_for(node)
        return served

    def set_ttl(self, seconds: int) -> None:
        self._renew_interval = min(self._renew_setting, seconds / 2)
        self._ttl = seconds
        self._store.set_ttl(seconds)

    async def aclose(self) -> None:
        if self._renewal is not None:
            self._renewal.cancel()
        for task in list(self._renewals):
            task.cancel()
        await asyncio.gather(*self._renewals, return_exceptions=True)
        trackers, self._trackers = list(self._trackers.values()), {}
        for tracker in trackers:
            await tracker.aclose()
        await asyncio.gather(*self._closing, return_exceptions=True)
        self._flush()
        await self._store.aclose()

    def _tracker_for(self, node: Node) -> Tracker:
        tracker = self._trackers.get(node.name)
        if tracker is None:
            tracker = self._trackers[node.name] = Tracker(
                node.connections.settings,
                timeout=self._timeout,
                heartbeat_key=lambda: node.probe_key,
                on_invalidate=self._invalidate,
                on_down=self._flush,
            )
            tracker.start()
            self._forget_trackers_of_old_servers()
        return tracker

    def _forget_trackers_of_old_servers(self) -> None:
        """Close the tracking connections of servers the store no longer uses (a slot map
        or a primary changed); their entries go with them."""
        current = {node.name for node in self._store.servers()}
        for name in [name for name in self._trackers if name not in current]:
            task = asyncio.get_running_loop().create_task(self._trackers.pop(name).aclose())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _read(
        self,
        tracker: Tracker,
        node: Node,
        key: str,
        conversation_id: str,
        external_id: str | None,
    ) -> _Entry | None:
        """The stored session, read on the tracking connection and cached; None when there
        is none to serve (missing, unusable) or the read failed."""
        sent = self._clock()
        read: list[Any] = []

        def fill(ttl_ms: Any) -> None:
            # Runs as the reply is read, before any later invalidation is looked at.
            raw = read[0] if read else None
            if raw is None or not isinstance(ttl_ms, int) or ttl_ms <= 0:
                return
            session = decode_session(raw, conversation_id, external_id)
            if session is not None and self._accept(session):
                self._put(key, session, sent + ttl_ms / 1000, node.name)

        try:
            async with asyncio.timeout(self._timeout):
                tracker.call("GET", key, apply=read.append)
                await tracker.call("PTTL", key, apply=fill)
        except (TrackerDown, ReplyError):
            return None
        except TimeoutError as exc:
            # A silent Redis costs one budget, as a store call does; the connection goes
            # (and with it the cache), so the next calls read through the store.
            tracker.drop()
            node.breaker.failure()
            raise StoreUnavailable("the session store did not answer in time") from exc
        except OSError:
            tracker.drop()
            return None
        return self._entries.get(key)

    def _renew_if_due(self, key: str, entry: _Entry, now: float) -> None:
        # Last renewed in Redis more than renew_interval ago, going by its TTL: renew it.
        if entry.expires - now < self._ttl - self._renew_interval and not entry.renewing:
            entry.renewing = True
            self._due[key] = entry
            if self._renewal is None:
                loop = asyncio.get_running_loop()
                self._renewal = loop.call_later(_RENEW_BATCH_DELAY, self._send_renewals)

    def _send_renewals(self) -> None:
        self._renewal = None
        due, self._due = self._due, {}
        task = asyncio.get_running_loop().create_task(self._renew_all(due))
        self._renewals.add(task)
        task.add_done_callback(self._renewals.discard)

    async def _renew_all(self, due: dict[str, _Entry]) -> None:
        sent = self._clock()
        replies: list[asyncio.Future[Any]] = []
        try:
            for key, entry in due.items():
                tracker = self._trackers.get(entry.server)
                if tracker is None or not tracker.live:
                    continue
                replies.append(tracker.call("EXPIRE", key, self._ttl))
                replies.append(tracker.call("GET", key, apply=self._refill(key, entry, sent)))
            async with asyncio.timeout(self._timeout * 4):
                await asyncio.gather(*replies, return_exceptions=True)
        except TimeoutError:
            for entry in due.values():
                tracker = self._trackers.get(entry.server)
                if tracker is not None:
                    tracker.drop()
        finally:
            for key in due:
                current = self._entries.get(key)
                if current is not None:
                    current.renewing = False

    def _refill(self, key: str, old: _Entry, sent: float) -> Callable[[Any], None]:
        def refill(raw: Any) -> None:
            if raw is None:
                self._drop(key)
                return
            session = decode_session(raw, old.session.id, old.session.external_id)
            if session is None or not self._accept(session):
                self._drop(key)
            else:
                self._put(key, session, sent + self._ttl, old.server)

        return refill

    def _put(self, key: str, session: Session, expires: float, server: str) -> None:
        self._drop(key)
        size = _ENTRY_OVERHEAD + len(key) + len(session.provider) + len(session.model)
        self._entries[key] = _Entry(session, expires, size, server)
        self._bytes += size
        while len(self._entries) > self._max_entries or self._bytes > self._max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.size

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry.size

    def _invalidate(self, keys: list[bytes] | None) -> None:
        if keys is None:
            self._flush()
            return
        for key in keys:
            self.count("invalidation")
            self._drop(key.decode("utf-8", "surrogateescape"))

    def _flush(self) -> None:
        self._entries.clear()
        self._bytes = 0


def _ignore(event: str) -> None:
    pass
