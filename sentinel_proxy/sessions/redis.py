"""The Redis session store: one round trip for a hit, atomic creation for a miss."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import AskError, MovedError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from sentinel_proxy.exceptions import ProxyError, StoreUnavailable
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
# MOVED or ASK replies one command may follow before it fails.
_REDIRECTS = 3
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

    def __init__(
        self,
        connection_class: type[AbstractConnection],
        connection_kwargs: dict[str, Any],
        *,
        size: int,
        cap: float,
    ) -> None:
        self._connection_class = connection_class
        self._connection_kwargs = connection_kwargs
        self._cap = cap
        self._slots = asyncio.Semaphore(size)
        self._idle: list[AbstractConnection] = []
        # Every connection to the server named now (`retarget` forgets the others).
        self._all: set[AbstractConnection] = set()
        self._queue: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._batches: set[asyncio.Task[None]] = set()
        # For each batch on a connection: loop time since which Redis has owed it an
        # answer (the connection, or the next reply).
        self._owed: dict[int, float] = {}

    @property
    def settings(self) -> tuple[type[AbstractConnection], dict[str, Any]]:
        """How a connection to the server named now is made: its class and arguments."""
        return self._connection_class, self._connection_kwargs

    def call(self, *args: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.append((args, future))
        if len(self._queue) == 1:
            batch = loop.create_task(self._run())
            self._batches.add(batch)
            batch.add_done_callback(self._batches.discard)
        return future

    def call_asking(self, *args: Any) -> asyncio.Future[Any]:
        """`args` preceded by ASKING (a cluster's redirection during a slot migration): both
        are queued together, so they go out adjacent on one connection."""
        asking = self.call("ASKING")
        asking.add_done_callback(_retrieve)
        return self.call(*args)

    async def retarget(self, host: str, port: int) -> None:
        """From now on connect to `host:port` (a new primary). Idle connections to the old
        one close now, busy ones when their batch is over."""
        self._connection_kwargs = {**self._connection_kwargs, "host": host, "port": port}
        idle, self._idle = self._idle, []
        self._all.clear()
        for connection in idle:
            await connection.disconnect(nowait=True)

    async def drop_idle(self) -> None:
        """Close the idle connections (to a server no longer used)."""
        idle, self._idle = self._idle, []
        for connection in idle:
            self._all.discard(connection)
            await connection.disconnect(nowait=True)

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
                    if connection in self._all:
                        self._idle.append(connection)
                    else:  # made for a server that is no longer the one named
                        await connection.disconnect(nowait=True)
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
        self._all.add(connection)
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
        # A connection closed while it was idle: nothing of this batch was answered. The
        # other idle ones were most likely closed with it (a restart, a failover): drop them
        # now, or those the pool does not reach again would hold their sockets for ever.
        await connection.disconnect(nowait=True)
        idle, self._idle = self._idle, []
        for other in idle:
            await other.disconnect(nowait=True)
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


class Node:
    """One Redis server the store talks to: its connections and its circuit breaker (and
    its name, `host:port`, which the near-cache keys its tracking connections by)."""

    __slots__ = ("name", "connections", "breaker", "probe_key")

    def __init__(
        self, name: str, connections: _Connections, breaker: CircuitBreaker, probe_key: str
    ) -> None:
        self.name = name
        self.connections = connections
        self.breaker = breaker
        # The readiness probe's key: one that this server serves.
        self.probe_key = probe_key


class RedisStore:
    """Sessions in Redis under `sentinel:session:{id}` with a sliding TTL.

    Every call has one time budget (connect, pool wait and reply together) and goes
    through a circuit breaker, so a dead or black-holed Redis costs a request at most
    the budget, and nothing at all while the breaker is open.

    This class talks to the one server of its URL. Its subclasses find their servers
    otherwise (through Sentinel, or a Redis Cluster's slot map) by overriding `_route`,
    `_locate`, `_suspect`, `_redirect` and `_nodes`: every key still goes to one server, in
    one round trip for a hit.
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
        # A pool used only to parse the URL into a connection class and its arguments.
        # No socket timeout: the batch's cap bounds it, and redis-py would otherwise wrap
        # each write in a task of its own.
        template = ConnectionPool.from_url(url, socket_timeout=None, socket_connect_timeout=timeout)
        self._connection_class = template.connection_class
        # Replies stay bytes whatever the URL says (`decode_responses`): the store compares
        # them with the bytes it wrote.
        self._connection_kwargs = {**template.connection_kwargs, "decode_responses": False}
        self._max_connections = max_connections
        self._ttl = ttl_seconds
        self._timeout = timeout
        self._accept = accept
        self._node = self._make_node(self._connection_kwargs, breaker, _PROBE_KEY)
        self._redirected = False

    @property
    def breaker(self) -> CircuitBreaker:
        """The circuit breaker of the store's server (with a cluster: of the URL's node)."""
        return self._node.breaker

    def _make_node(
        self, connection_kwargs: dict[str, Any], breaker: CircuitBreaker, probe_key: str
    ) -> Node:
        connections = _Connections(
            self._connection_class,
            connection_kwargs,
            size=self._max_connections,
            cap=self._timeout * _BUSY_BUDGETS,
        )
        name = f"{connection_kwargs.get('host')}:{connection_kwargs.get('port')}"
        return Node(name, connections, breaker, probe_key)

    def set_ttl(self, seconds: int) -> None:
        self._ttl = seconds

    async def get_or_create(
        self, conversation_id: str, external_id: str | None, make: Maker
    ) -> tuple[Session, bool]:
        key = session_key(conversation_id, external_id)
        return await self._guarded(
            key, self._get_or_create, key, conversation_id, external_id, make
        )

    async def repin(self, failed: Session, replacement: Session) -> Session:
        return await self._guarded(failed.key, self._repin, failed, replacement)

    async def get(self, conversation_id: str, external_id: str | None = None) -> Session | None:
        key = session_key(conversation_id, external_id)
        raw = await self._guarded(key, self._command, "GET", key)
        return None if raw is None else decode_session(raw, conversation_id, external_id)

    async def delete(self, conversation_id: str, external_id: str | None = None) -> bool:
        key = session_key(conversation_id, external_id)
        return bool(await self._guarded(key, self._command, "DEL", key))

    async def ping(self) -> bool:
        """Whether Redis would serve the store's own commands now (a replica answers PING
        but refuses them): one GETEX, of a key no conversation can have, on each server
        the store uses. True when one of them serves (a cluster with one master down
        still serves every conversation of the others)."""
        try:
            nodes = await self._nodes()
        except (RedisError, OSError, TimeoutError):
            return False
        served = await asyncio.gather(*(self._probe(node) for node in nodes))
        return any(served)

    async def aclose(self) -> None:
        await self._node.connections.aclose()

    def server_of(self, key: str) -> Node | None:
        """The server that holds `key` now, or None while it is not known."""
        return self._route(key)

    def servers(self) -> list[Node]:
        """The servers the store uses now (without looking them up again)."""
        return [self._node]

    # -- where a key goes: one server here; overridden for Sentinel and Redis Cluster -----
    def _route(self, key: str) -> Node | None:
        """The server of `key`, or None when it is not known yet (see `_locate`)."""
        return self._node

    async def _locate(self, key: str) -> Node | None:
        """The server of `key` once the servers have been looked up, within one budget."""
        return self._node

    def _suspect(self, node: Node) -> None:
        """`node` failed or its breaker is open: time to look whether another server took
        over its keys (a failover)."""

    def _redirect(self, error: AskError) -> Node | None:
        """Where a MOVED or ASK reply sends the command, if anywhere."""
        if not self._redirected:
            self._redirected = True
            logger.warning(
                "Redis at %s answered %s: it is a Redis Cluster node (set session.cluster = true)",
                self._node.name,
                error.status_code,
            )
        return None

    async def _nodes(self) -> list[Node]:
        """Every server the store uses now (for the readiness probe)."""
        return [self._node]

    # -- the commands -----------------------------------------------------------------------
    async def _command(self, node: Node, *args: Any) -> Any:
        """`args` on `node`, following MOVED and ASK replies to another server."""
        try:
            return await node.connections.call(*args)
        except AskError as exc:  # MovedError is one too
            error = exc
        for _ in range(_REDIRECTS):
            target = self._redirect(error)
            if target is None:
                break
            try:
                if isinstance(error, MovedError):
                    return await target.connections.call(*args)
                return await target.connections.call_asking(*args)
            except AskError as exc:
                error = exc
        raise error

    async def _get_or_create(
        self, node: Node, key: str, conversation_id: str, external_id: str | None, make: Maker
    ) -> tuple[Session, bool]:
        call = self._command
        raw = await call(node, "GETEX", key, "EX", self._ttl)
        candidate: Session | None = None
        for _ in range(_ATTEMPTS):
            if raw is None:
                candidate = candidate or make()
                value = candidate.to_json()
                if await call(node, "SET", key, value, "NX", "EX", self._ttl) is not None:
                    return candidate, True
                # Another request created it between our GETEX and SET: use theirs.
                raw = await call(node, "GETEX", key, "EX", self._ttl)
                continue
            found = decode_session(raw, conversation_id, external_id)
            if found is not None and self._accept(found):
                return found, False
            logger.warning("replacing unusable session value for conversation %s", conversation_id)
            candidate = candidate or make()
            value = candidate.to_json()
            stored = await call(node, "EVAL", _REPLACE, 1, key, raw, value, self._ttl)
            if stored == value:
                return candidate, True
            raw = stored
        raise StoreUnavailable("the session store keeps returning unusable values")

    async def _repin(self, node: Node, failed: Session, replacement: Session) -> Session:
        value = replacement.to_json()
        stored = await self._command(
            node, "EVAL", _REPIN, 1, failed.key, failed.provider, failed.model, value, self._ttl
        )
        if stored == value:
            return replacement
        found = decode_session(stored, failed.id, failed.external_id)
        return found if found is not None and self._accept(found) else replacement

    async def _probe(self, node: Node) -> bool:
        try:
            async with asyncio.timeout(self._timeout):
                await self._command(node, "GETEX", node.probe_key, "EX", self._ttl)
        except (RedisError, OSError, TimeoutError):
            self._suspect(node)
            return False
        node.breaker.success()
        return True

    async def _guarded(self, key: str, work: Callable[..., Awaitable[T]], *args: Any) -> T:
        """`work(node, *args)` on the server of `key`, under its breaker and the deadline,
        Redis errors made ours."""
        node = self._route(key)
        if node is None:
            try:
                node = await self._locate(key)
            except (RedisError, OSError, TimeoutError) as exc:
                raise StoreUnavailable("no session store server could be found") from exc
            if node is None:
                raise StoreUnavailable("no session store server serves this conversation")
        breaker = node.breaker
        if not breaker.allow():
            self._suspect(node)
            raise StoreUnavailable("the session store is unavailable (circuit open)")
        deadline: _Deadline | None = None
        try:
            async with asyncio.timeout(None) as timeout:
                deadline = _Deadline(timeout, budget=self._timeout, store=node.connections)
                try:
                    result = await work(node, *args)
                finally:
                    deadline.cancel()
        except TimeoutError as exc:
            if deadline is not None and deadline.silent:
                breaker.failure()
                self._suspect(node)
                raise StoreUnavailable("the session store did not answer in time") from exc
            raise StoreUnavailable("the proxy is too busy to wait for the session store") from exc
        except ResponseError as exc:
            if not _unserved(exc):
                # A command's own error (WRONGTYPE on a hand-made key): Redis did answer.
                breaker.success()
                raise StoreUnavailable("the session store refused the command") from exc
            breaker.failure()
            self._suspect(node)
            raise StoreUnavailable("the session store cannot serve requests now") from exc
        except (RedisError, OSError) as exc:
            breaker.failure()
            self._suspect(node)
            raise StoreUnavailable("the session store is unreachable") from exc
        except StoreUnavailable:
            raise
        except ProxyError:
            # The request's own error, raised by `make` (a follow-up whose pin is gone names
            # no model): Redis did answer. Were it a half-open trial, it must close the
            # breaker, or the store would stay shut another reset period.
            breaker.success()
            raise
        breaker.success()
        return result


class _Lookup:
    """Finding the servers again (Sentinel's primary, a cluster's slot map) with `look`,
    which returns whether it found them: one lookup at a time, which callers may join.
    Failures ask for one at most once per `interval`, in the background."""

    def __init__(
        self, look: Callable[[Node | None], Coroutine[Any, Any, bool]], *, interval: float
    ) -> None:
        self._look = look
        self._interval = interval
        self._task: asyncio.Task[bool] | None = None
        self._ended_at: float | None = None

    def soon(self, failed: Node | None) -> None:
        """Look again, unless a lookup is under way or ended less than `interval` ago."""
        if self._task is None:
            now = asyncio.get_running_loop().time()
            if self._ended_at is None or now - self._ended_at >= self._interval:
                self._start(failed)

    async def now(self, budget: float) -> None:
        """Until a lookup (the one under way, or a new one) has found the servers; raises
        RedisError when it did not, TimeoutError after `budget`."""
        task = self._task or self._start(None)
        async with asyncio.timeout(budget):
            if not await asyncio.shield(task):
                raise RedisError("the session store's servers could not be found")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _start(self, failed: Node | None) -> asyncio.Task[bool]:
        task = asyncio.get_running_loop().create_task(self._look(failed))
        self._task = task
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task[bool]) -> None:
        self._task = None
        self._ended_at = task.get_loop().time()
        if not task.cancelled() and task.exception() is not None:
            logger.error("looking up the session store's servers failed", exc_info=task.exception())


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a future's outcome as seen (nobody awaits it)."""
    if not future.cancelled():
        future.exception()


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
