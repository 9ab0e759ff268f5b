"""The Redis session store: one round trip for a hit, atomic creation for a miss."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from sentinel_proxy.exceptions import StoreUnavailable
from sentinel_proxy.sessions.base import (
    KEY_PREFIX,
    Acceptor,
    Maker,
    Session,
    decode_session,
    session_key,
)
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

# Move a conversation off a failed target, unless another request already did: then the
# pin it made wins and is returned. A session gone meanwhile is stored anew.
_REPIN = """
local current = redis.call('GET', KEYS[1])
if current ~= false then
  local ok, stored = pcall(cjson.decode, current)
  if ok and type(stored) == 'table' and (stored.provider ~= ARGV[1] or stored.model ~= ARGV[2])
  then
    redis.call('EXPIRE', KEYS[1], ARGV[4])
    return current
  end
end
redis.call('SET', KEYS[1], ARGV[3], 'EX', ARGV[4])
return ARGV[3]
"""

# A stored value may be replaced at most this often within one call before we give up.
_ATTEMPTS = 3
# While Redis keeps answering, a call may wait this many budgets for its own reply.
_BUSY_BUDGETS = 10
# Error replies that say the server cannot serve us now, whatever the command: a demoted
# primary (READONLY), a server loading its data, a primary or cluster that is down, writes
# stopped for want of a disk or of replicas, a script running. (OOM is left out: it refuses
# only the creation of sessions, and hits go on working.)
_UNSERVED = frozenset(
    "READONLY LOADING MASTERDOWN CLUSTERDOWN TRYAGAIN MISCONF NOREPLICAS BUSY".split()
)
# The readiness probe asks what every lookup asks, of a key no conversation id can name (ids
# are printable): a replica refuses it as it would refuse the lookups.
_PROBE_KEY = KEY_PREFIX + "\x00readyz"


def _unserved(error: RedisError) -> bool:
    """Whether an error reply says that the server cannot serve us now, whatever the command."""
    code = error.status_code or str(error).partition(" ")[0]
    return code in _UNSERVED


class _Connections:
    """redis-py connections that pipeline the commands of concurrent requests.

    A command is queued and answered through a future. The first command queued starts a
    batch task; once it holds one of `size` connections, it writes every command queued
    by then in one go and reads the replies back in order. Under load a request then
    costs no write, read or wake-up of its own: at 64 client connections batches held 14
    commands on average, and the proxy served 7% more requests on the same CPU.

    redis-py's own pools cost more per command than the command itself (locks, metrics
    hooks, a readiness probe); a semaphore and a list do. The batch task always reads
    every reply, whether or not its caller is still waiting, and a connection whose batch
    did not finish (an error, the batch's time cap, cancellation) is disconnected before
    reuse, so a late reply can never be read as the answer to another command
    (CVE-2023-28858/28859).

    An idle connection is reused unchecked (a check would cost a round trip per batch).
    One that the server closed meanwhile (a restart, a failover, `CLIENT KILL`, an idle
    timeout here or in a load balancer) fails the batch's write or first read; the batch
    then goes again, once, on a fresh connection: nothing of it was answered, and every
    command the store sends is safe to repeat. An error reply that says the server cannot
    serve (`_UNSERVED`: a demoted primary's READONLY, ...) fails the batch and disconnects
    every idle connection too, which lead to the same server, so that the next batches
    connect afresh (to the new primary, where a name or a load balancer points there).
    """

    def __init__(self, url: str, *, size: int, connect_timeout: float, cap: float) -> None:
        # A pool used only to parse the URL into a connection class and its arguments.
        # No socket timeout: the batch's cap bounds it, and redis-py would otherwise wrap
        # each write in a task of its own.
        template = ConnectionPool.from_url(
            url, socket_timeout=None, socket_connect_timeout=connect_timeout
        )
        self._connection_class = template.connection_class
        # Replies stay bytes whatever the URL says (`decode_responses`): the store compares
        # them with the bytes it wrote.
        self._connection_kwargs = {**template.connection_kwargs, "decode_responses": False}
        self._cap = cap
        self._slots = asyncio.Semaphore(size)
        self._idle: list[AbstractConnection] = []
        self._all: list[AbstractConnection] = []
        self._queue: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._batches: set[asyncio.Task[None]] = set()
        # For each batch on a connection: loop time since which Redis has owed it an
        # answer (the connection, or the next reply).
        self._owed: dict[int, float] = {}

    def call(self, *args: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.append((args, future))
        if len(self._queue) == 1:
            batch = loop.create_task(self._run())
            self._batches.add(batch)
            batch.add_done_callback(self._batches.discard)
        return future

    def owed_since(self) -> float | None:
        """Since when Redis has kept a batch waiting, or None when no batch waits on it."""
        return min(self._owed.values(), default=None)

    async def _run(self) -> None:
        batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        try:
            async with self._slots:
                # Everything queued while this task waited for a connection goes too.
                batch, self._queue = self._queue, []
                if self._idle:
                    connection = self._idle.pop()
                    reused = connection.is_connected
                else:
                    connection, reused = self._connect(), False
                try:
                    async with asyncio.timeout(self._cap):
                        await self._exchange(connection, batch, reused=reused)
                except BaseException as exc:
                    await connection.disconnect(nowait=True)
                    if isinstance(exc, RedisError) and _unserved(exc):
                        for idle in list(self._idle):
                            await idle.disconnect(nowait=True)
                    raise
                finally:
                    self._idle.append(connection)
        except BaseException as exc:
            if not batch:  # ended before it had a connection: the queue was its batch
                batch, self._queue = self._queue, []
            for _, future in batch:
                if future.done():
                    continue
                if isinstance(exc, Exception):
                    future.set_exception(exc)
                else:
                    future.cancel()
            if not isinstance(exc, Exception):
                raise

    def _connect(self) -> AbstractConnection:
        connection = self._connection_class(**self._connection_kwargs)
        self._all.append(connection)
        return connection

    async def _exchange(
        self,
        connection: AbstractConnection,
        batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]],
        *,
        reused: bool,
    ) -> None:
        packed = connection.pack_commands([args for args, _ in batch])
        loop = asyncio.get_running_loop()
        key = id(batch)
        self._owed[key] = loop.time()
        answered = False
        try:
            await connection.send_packed_command(packed, check_health=False)
            for _, future in batch:
                error: ResponseError | None = None
                try:
                    reply = await connection.read_response()
                except ResponseError as exc:
                    if _unserved(exc):
                        raise
                    # A command's own error: its reply has been read, the connection is sound.
                    reply, error = None, exc
                answered = True
                self._owed[key] = loop.time()
                if future.done():
                    continue
                if error is None:
                    future.set_result(reply)
                else:
                    future.set_exception(error)
        except RedisConnectionError as exc:
            # Exactly ConnectionError: the connection was lost (its subclasses are replies
            # such as LOADING, or a refused handshake).
            if answered or not reused or type(exc) is not RedisConnectionError:
                raise
        else:
            return
        finally:
            del self._owed[key]
        # A connection closed while it was idle: nothing of this batch was answered.
        await connection.disconnect(nowait=True)
        pending = [item for item in batch if not item[1].done()]
        if pending:
            await self._exchange(connection, pending, reused=False)

    async def aclose(self) -> None:
        for batch in list(self._batches):
            batch.cancel()
        await asyncio.gather(*self._batches, return_exceptions=True)
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
        self._redis = _Connections(
            url, size=max_connections, connect_timeout=timeout, cap=timeout * _BUSY_BUDGETS
        )
        self._ttl = ttl_seconds
        self._timeout = timeout
        self._breaker = breaker
        self._accept = accept

    @property
    def breaker(self) -> CircuitBreaker:
        return self._breaker

    def set_ttl(self, seconds: int) -> None:
        self._ttl = seconds

    async def get_or_create(
        self, conversation_id: str, external_id: str | None, make: Maker
    ) -> tuple[Session, bool]:
        return await self._guarded(self._get_or_create, conversation_id, external_id, make)

    async def repin(self, failed: Session, replacement: Session) -> Session:
        return await self._guarded(self._repin, failed, replacement)

    async def get(self, conversation_id: str, external_id: str | None = None) -> Session | None:
        key = session_key(conversation_id, external_id)
        raw = await self._guarded(self._redis.call, "GET", key)
        return None if raw is None else decode_session(raw, conversation_id, external_id)

    async def delete(self, conversation_id: str, external_id: str | None = None) -> bool:
        key = session_key(conversation_id, external_id)
        return bool(await self._guarded(self._redis.call, "DEL", key))

    async def ping(self) -> bool:
        """Whether Redis would serve the store's own commands now (a replica answers PING
        but refuses them): one GETEX, of a key no conversation can have."""
        try:
            async with asyncio.timeout(self._timeout):
                await self._redis.call("GETEX", _PROBE_KEY, "EX", self._ttl)
        except (RedisError, OSError, TimeoutError):
            return False
        self._breaker.success()
        return True

    async def aclose(self) -> None:
        await self._redis.aclose()

    async def _get_or_create(
        self, conversation_id: str, external_id: str | None, make: Maker
    ) -> tuple[Session, bool]:
        key = session_key(conversation_id, external_id)
        call = self._redis.call
        raw = await call("GETEX", key, "EX", self._ttl)
        candidate: Session | None = None
        for _ in range(_ATTEMPTS):
            if raw is None:
                candidate = candidate or make()
                value = candidate.to_json()
                if await call("SET", key, value, "NX", "EX", self._ttl) is not None:
                    return candidate, True
                # Another request created it between our GETEX and SET: use theirs.
                raw = await call("GETEX", key, "EX", self._ttl)
                continue
            found = decode_session(raw, conversation_id, external_id)
            if found is not None and self._accept(found):
                return found, False
            logger.warning("replacing unusable session value for conversation %s", conversation_id)
            candidate = candidate or make()
            value = candidate.to_json()
            stored = await call("EVAL", _REPLACE, 1, key, raw, value, self._ttl)
            if stored == value:
                return candidate, True
            raw = stored
        raise StoreUnavailable("the session store keeps returning unusable values")

    async def _repin(self, failed: Session, replacement: Session) -> Session:
        value = replacement.to_json()
        stored = await self._redis.call(
            "EVAL", _REPIN, 1, failed.key, failed.provider, failed.model, value, self._ttl
        )
        if stored == value:
            return replacement
        found = decode_session(stored, failed.id, failed.external_id)
        return found if found is not None and self._accept(found) else replacement

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
        except ResponseError as exc:
            if not _unserved(exc):
                # A command's own error (WRONGTYPE on a hand-made key): Redis did answer.
                self._breaker.success()
                raise StoreUnavailable("the session store refused the command") from exc
            self._breaker.failure()
            raise StoreUnavailable("the session store cannot serve requests now") from exc
        except (RedisError, OSError) as exc:
            self._breaker.failure()
            raise StoreUnavailable("the session store is unreachable") from exc
        self._breaker.success()
        return result


class _Deadline:
    """Ends a store call once Redis has kept it waiting for a whole budget.

    Redis keeps a call waiting when a batch has had no answer (its connection, or its next
    reply) for a budget. A call that waits while no batch has waited that long is waiting
    on this process (a saturated event loop working through a burst of replies, every
    connection busy), not on Redis: it is given another budget, up to a cap, and does not
    count against the circuit breaker. A dead or black-holed Redis answers nothing, so
    its calls end after one budget (and a tenth: see `_check`)."""

    __slots__ = ("_timeout", "_budget", "_store", "_loop", "_cap", "_handle", "_grace", "silent")

    def __init__(self, timeout: asyncio.Timeout, *, budget: float, store: _Connections) -> None:
        self._timeout = timeout
        self._budget = budget
        self._store = store
        self._loop = asyncio.get_running_loop()
        now = self._loop.time()
        self._cap = now + budget * _BUSY_BUDGETS
        self._handle = self._loop.call_at(now + budget, self._check)
        self._grace = False
        self.silent = False

    def _check(self) -> None:
        now = self._loop.time()
        owed = self._store.owed_since()
        # A batch that began owing just after this call began (its task starts a loop turn
        # later) has kept the call waiting all along: at the first check, that is enough.
        start = self._cap - self._budget * _BUSY_BUDGETS
        if owed is None or owed > max(now - self._budget, start + self._budget / 10):
            if now < self._cap:
                self._grace = False
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
