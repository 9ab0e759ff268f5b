"""The Redis session store: one round trip for a hit, atomic creation for a miss."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import RedisError

from sentinel_proxy.exceptions import StoreUnavailable
from sentinel_proxy.sessions.base import Acceptor, Session, decode_session, session_key
from sentinel_proxy.sessions.breaker import CircuitBreaker

logger = logging.getLogger("sentinel_proxy.sessions")
T = TypeVar("T")

# Replace a value we found unusable, unless another request got there first: then that
# request's session wins and is returned, as for a lost SET NX.
_REPLACE = """
local current = redis.call('GET', KEYS[1])
if current == false or current == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return ARGV[2]
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return current
"""

# A stored value may be replaced at most this often within one call before we give up.
_ATTEMPTS = 3
# While Redis keeps answering, a call may wait this many budgets for its own reply.
_BUSY_BUDGETS = 10


class _Connections:
    """redis-py connections, at most `size` at once, one command in flight on each.

    redis-py's own pools cost more per command than the command itself (locks, metrics
    hooks, a readiness probe, a wait_for task per write); every call here already runs
    under the store's deadline, so a semaphore and a list do. A connection whose command
    did not finish, for whatever reason (cancellation included), is disconnected before
    it is reused, so a late reply can never be read as the answer to another command
    (CVE-2023-28858/28859).
    """

    def __init__(self, url: str, *, size: int, connect_timeout: float) -> None:
        # A pool used only to parse the URL into a connection class and its arguments.
        # No socket timeout: the store's deadline bounds every call, and redis-py would
        # otherwise wrap each write in a task of its own.
        template = ConnectionPool.from_url(
            url, socket_timeout=None, socket_connect_timeout=connect_timeout
        )
        self._connection_class = template.connection_class
        self._connection_kwargs = template.connection_kwargs
        self._slots = asyncio.Semaphore(size)
        self._idle: list[AbstractConnection] = []
        self._all: list[AbstractConnection] = []
        # Loop time of the latest reply on any connection: proof that Redis is alive.
        self.last_reply = 0.0

    async def call(self, *args: Any) -> Any:
        async with self._slots:
            if self._idle:
                connection = self._idle.pop()
            else:
                connection = self._connection_class(**self._connection_kwargs)
                self._all.append(connection)
            try:
                await connection.send_command(*args, check_health=False)
                reply = await connection.read_response()
                self.last_reply = asyncio.get_running_loop().time()
                return reply
            except BaseException:
                await connection.disconnect(nowait=True)
                raise
            finally:
                self._idle.append(connection)

    async def aclose(self) -> None:
        for connection in self._all:
            await connection.disconnect(nowait=True)
        self._idle.clear()
        self._all.clear()


class RedisStore:
    """Sessions in Redis under `sentinel:session:{id}` with a sliding TTL.

    Every call has one time budget (connect, pool wait and reply together) and goes
    through a circuit breaker, so a dead or black-holed Redis costs a request at most
    the budget, and nothing at all while the breaker is open.
    """

    def __init__(
        self,
        url: str,
        *,
        ttl_seconds: int,
        timeout: float,
        max_connections: int,
        breaker: CircuitBreaker,
        accept: Acceptor = lambda session: True,
    ) -> None:
        self._redis = _Connections(url, size=max_connections, connect_timeout=timeout)
        self._ttl = ttl_seconds
        self._timeout = timeout
        self._breaker = breaker
        self._accept = accept

    @property
    def breaker(self) -> CircuitBreaker:
        return self._breaker

    async def get_or_create(self, candidate: Session) -> tuple[Session, bool]:
        return await self._guarded(self._get_or_create, candidate)

    async def get(self, conversation_id: str, external_id: str | None = None) -> Session | None:
        probe = Session(conversation_id, "", "", 0, external_id)
        key = session_key(conversation_id, external_id)
        raw = await self._guarded(self._redis.call, "GET", key)
        return None if raw is None else decode_session(raw, expected=probe)

    async def delete(self, conversation_id: str, external_id: str | None = None) -> bool:
        key = session_key(conversation_id, external_id)
        return bool(await self._guarded(self._redis.call, "DEL", key))

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(self._timeout):
                await self._redis.call("PING")
        except (RedisError, OSError, TimeoutError):
            return False
        self._breaker.success()
        return True

    async def aclose(self) -> None:
        await self._redis.aclose()

    async def _get_or_create(self, candidate: Session) -> tuple[Session, bool]:
        key = candidate.key
        call = self._redis.call
        raw = await call("GETEX", key, "EX", self._ttl)
        for _ in range(_ATTEMPTS):
            if raw is None:
                value = candidate.to_json()
                if await call("SET", key, value, "NX", "EX", self._ttl) is not None:
                    return candidate, True
                # Another request created it between our GETEX and SET: use theirs.
                raw = await call("GETEX", key, "EX", self._ttl)
                continue
            found = decode_session(raw, expected=candidate)
            if found is not None and self._accept(found):
                return found, False
            logger.warning("replacing unusable session value for conversation %s", candidate.id)
            value = candidate.to_json()
            stored = await call("EVAL", _REPLACE, 1, key, raw, value, self._ttl)
            if stored == value:
                return candidate, True
            raw = stored
        raise StoreUnavailable("the session store keeps returning unusable values")

    async def _guarded(self, work: Callable[..., Awaitable[T]], *args: Any) -> T:
        """`work(*args)` under the breaker and the deadline, Redis errors made ours."""
        if not self._breaker.allow():
            raise StoreUnavailable("the session store is unavailable (circuit open)")
        deadline: _Deadline | None = None
        try:
            async with asyncio.timeout(None) as timeout:
                deadline = _Deadline(timeout, budget=self._timeout, store=self._redis)
                try:
                    result = await work(*args)
                finally:
                    deadline.cancel()
        except TimeoutError as exc:
            if deadline is not None and deadline.silent:
                self._breaker.failure()
                raise StoreUnavailable("the session store did not answer in time") from exc
            raise StoreUnavailable("the proxy is too busy to wait for the session store") from exc
        except (RedisError, OSError) as exc:
            self._breaker.failure()
            raise StoreUnavailable("the session store is unreachable") from exc
        self._breaker.success()
        return result


class _Deadline:
    """Ends a store call once Redis has been silent for a whole budget.

    A call that waits while replies to other calls keep arriving is waiting on this
    process (a saturated event loop, every connection busy), not on Redis: it is given
    another budget, up to a cap, and does not count against the circuit breaker. A dead or
    black-holed Redis sends nothing, so its calls end after one budget."""

    __slots__ = (
        "_timeout",
        "_budget",
        "_store",
        "_loop",
        "_checked",
        "_cap",
        "_handle",
        "_grace",
        "silent",
    )

    def __init__(self, timeout: asyncio.Timeout, *, budget: float, store: _Connections) -> None:
        self._timeout = timeout
        self._budget = budget
        self._store = store
        self._loop = asyncio.get_running_loop()
        self._checked = self._loop.time()
        self._cap = self._checked + budget * _BUSY_BUDGETS
        self._handle = self._loop.call_at(self._checked + budget, self._check)
        self._grace = False
        self.silent = False

    def _check(self) -> None:
        now = self._loop.time()
        if self._store.last_reply > self._checked:
            if now < self._cap:
                self._checked, self._grace = now, False
                self._handle = self._loop.call_at(min(now + self._budget, self._cap), self._check)
                return
        elif not self._grace:
            # After a stall of this process, replies that did arrive are handled only after
            # this timer: look once more, a little later, before calling Redis silent.
            self._grace = True
            self._handle = self._loop.call_at(now + self._budget / 10, self._check)
            return
        else:
            self.silent = True
        self._timeout.reschedule(now)

    def cancel(self) -> None:
        self._handle.cancel()
