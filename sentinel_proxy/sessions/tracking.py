"""A Redis connection with client tracking on (RESP3): Redis remembers every key read
through it and pushes an `invalidate` message on it when one of them changes, is deleted
or expires.

Replies and pushes share the one stream, in the order Redis sent them: a read's reply
always comes before the invalidation of anything that changed after the read. Each reply
is handed to its `apply` callback as it is parsed, before the next message is looked at,
so a cache filled from replies and emptied by pushes can never keep a value older than a
push it has seen.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any

import hiredis
from redis.asyncio.connection import AbstractConnection, SSLConnection, UnixDomainSocketConnection

logger = logging.getLogger("sentinel_proxy.sessions")

Apply = Callable[[Any], None]
# First and longest wait before connecting again.
_RECONNECT_DELAYS = (0.05, 2.0)
# How often the connection proves it still reaches a primary. A demoted primary keeps
# answering reads, and sends no invalidation for what the new primary changes. The beat is
# an EXPIRE of a key that never exists (the store's readiness probe key): a write, which a
# replica refuses, that changes nothing.
HEARTBEAT_SECONDS = 1.0


class TrackerDown(OSError):
    """The tracking connection is not there (yet, or any more)."""


class ReplyError(Exception):
    """Redis answered a command with an error (a cluster's MOVED, say): the connection
    itself is sound."""


class Tracker:
    """Keeps one tracking connection up, reconnecting with backoff. `on_invalidate`
    gets the keys Redis invalidated, or None for all (a flush); `on_down` is called when
    the connection is lost, as a lost connection may have lost invalidations."""

    def __init__(
        self,
        settings: tuple[type[AbstractConnection], dict[str, Any]],
        *,
        timeout: float,
        heartbeat_key: Callable[[], str],
        on_invalidate: Callable[[list[bytes] | None], None],
        on_down: Callable[[], None],
    ) -> None:
        self._connection_class, self._settings = settings
        self._heartbeat_key = heartbeat_key
        self._timeout = timeout
        self._on_invalidate = on_invalidate
        self._on_down = on_down
        self._writer: asyncio.StreamWriter | None = None
        self._pending: deque[tuple[asyncio.Future[Any], Apply | None]] = deque()
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._parser = hiredis.Reader()
        self.live = False
        self.connections = 0

    def start(self) -> None:
        """Connect, and keep connecting; a second call does nothing."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._keep_up())

    async def wait_live(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self._ready.wait()
        except TimeoutError:
            return False
        return True

    def call(self, *args: Any, apply: Apply | None = None) -> asyncio.Future[Any]:
        """Send one command; `apply` runs on its reply as soon as it is read."""
        writer = self._writer
        if not self.live or writer is None:
            raise TrackerDown("the tracking connection is down")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((future, apply))
        writer.write(hiredis.pack_command(args))
        return future

    def drop(self) -> None:
        """Close the connection (a reply took too long): every cached key is then flushed
        and the connection made again."""
        if self._writer is not None:
            self._writer.transport.abort()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _keep_up(self) -> None:
        delay = _RECONNECT_DELAYS[0]
        while True:
            try:
                reader = await self._connect()
                delay = _RECONNECT_DELAYS[0]
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._read(reader))
                    group.create_task(self._beat())
            except* (OSError, EOFError, TimeoutError, hiredis.HiredisError) as group:
                exc = group.exceptions[0]
                logger.warning("session tracking connection lost: %s", str(exc) or repr(exc))
            finally:
                self._lose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RECONNECT_DELAYS[1])

    async def _connect(self) -> asyncio.StreamReader:
        settings = self._settings
        async with asyncio.timeout(self._timeout * 4):
            if issubclass(self._connection_class, UnixDomainSocketConnection):
                reader, writer = await asyncio.open_unix_connection(settings["path"])
            else:
                reader, writer = await asyncio.open_connection(
                    settings.get("host", "localhost"),
                    settings.get("port", 6379),
                    ssl=_ssl_context(self._connection_class, settings),
                )
            self._writer = writer
            hello: list[Any] = ["HELLO", 3]
            if settings.get("password") is not None:
                hello += ["AUTH", settings.get("username") or "default", settings["password"]]
            commands = [hello]
            if settings.get("db"):
                commands.append(["SELECT", settings["db"]])
            commands.append(["CLIENT", "TRACKING", "ON"])
            commands.append(["EXPIRE", self._heartbeat_key(), 1])
            parser = hiredis.Reader()
            for command in commands:
                writer.write(hiredis.pack_command(tuple(command)))
            for _ in commands:
                reply = await _read_one(reader, parser)
                if isinstance(reply, hiredis.ReplyError):
                    raise OSError(f"Redis refused the tracking connection: {reply}")
        self._parser = parser
        self.live = True
        self.connections += 1
        self._ready.set()
        return reader

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            try:
                async with asyncio.timeout(self._timeout * 4):
                    await self.call("EXPIRE", self._heartbeat_key(), 1)
            except ReplyError as exc:
                raise OSError(f"the heartbeat was refused: {exc}") from exc

    async def _read(self, reader: asyncio.StreamReader) -> None:
        parser = self._parser
        pending = self._pending
        while True:
            data = await reader.read(65536)
            if not data:
                raise EOFError("Redis closed the connection")
            parser.feed(data)
            while (item := parser.gets()) is not False:
                if isinstance(item, hiredis.PushNotification):
                    if item and item[0] == b"invalidate":
                        self._on_invalidate(item[1])
                    continue
                future, apply = pending.popleft()
                if isinstance(item, hiredis.ReplyError):
                    if not future.done():
                        future.set_exception(ReplyError(str(item)))
                    continue
                if apply is not None:
                    apply(item)
                if not future.done():
                    future.set_result(item)

    def _lose(self) -> None:
        was_live = self.live
        self.live = False
        self._ready.clear()
        if self._writer is not None:
            self._writer.transport.abort()
            self._writer = None
        while self._pending:
            future, _ = self._pending.popleft()
            if not future.done():
                future.set_exception(TrackerDown("the tracking connection was lost"))
        if was_live:
            self._on_down()


async def _read_one(reader: asyncio.StreamReader, parser: hiredis.Reader) -> Any:
    while (item := parser.gets()) is False:
        data = await reader.read(65536)
        if not data:
            raise EOFError("Redis closed the connection")
        parser.feed(data)
    return item


def _ssl_context(
    connection_class: type[AbstractConnection], settings: dict[str, Any]
) -> ssl.SSLContext | None:
    if not issubclass(connection_class, SSLConnection):
        return None
    context = ssl.create_default_context()
    if str(settings.get("ssl_cert_reqs", "required")).lower() == "none":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
