"""A TCP relay that misbehaves on demand, for tests of what happens when a server does.

Put it in front of a server (the private Redis) and point the code under test at the relay::

    relay = FaultRelay(("127.0.0.1", redis_port))
    relay.start()                   # listens on 127.0.0.1:relay.port, passing bytes through
    relay.url("redis", "/0")        # "redis://127.0.0.1:<port>/0"
    relay.black_hole()              # accept and read, but forward and answer nothing
    relay.delay(0.001)              # forward every chunk 1 ms late, in both directions
    relay.reset()                   # reset every open connection now; new ones are accepted
    relay.refuse()                  # reset every open connection and refuse new ones, until
                                    # any of the other modes is set
    relay.cut()                     # reset each connection as soon as its client sends anything
    relay.pass_through()            # back to forwarding as sent
    relay.stop()

A mode applies at once to every connection, open or new, and has taken effect when the call
returns. Bytes read during a black hole are dropped for good, as by a network that loses
packets: a connection that lost some is no use afterwards. Resets are real TCP resets
(SO_LINGER 0), so the client's next read or write fails as after a server restart or a
`CLIENT KILL` on the far side of a load balancer. Counters, readable at any time:
`accepted` (connections accepted), `open_connections`, `awaiting_connections` (open ones
whose client spoke last: it awaits an answer), `bytes_from_clients` (read from clients,
forwarded or not): they tell whether a client touched the server at all; `bytes_from_server`
(read from the server).

The relay runs its own event loop in a daemon thread, so sync tests and async tests (on
their own loop) drive it alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_PASS, _BLACK_HOLE, _DELAY, _CUT = "pass", "black_hole", "delay", "cut"
_CHUNK = 65536


class FaultRelay:
    """A relay on a free loopback port in front of `target` (host, port)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.host = "127.0.0.1"
        self.port = 0
        self.accepted = 0
        self.bytes_from_clients = 0
        self.bytes_from_server = 0
        self._mode = _PASS
        self._delay = 0.0
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def url(self, scheme: str, path: str = "") -> str:
        """The relay's address as a URL: ``url("redis", "/0")``."""
        return f"{scheme}://{self.host}:{self.port}{path}"

    @property
    def open_connections(self) -> int:
        return len(self._links)

    @property
    def awaiting_connections(self) -> int:
        return sum(link.awaiting for link in list(self._links))

    @property
    def mode(self) -> str:
        """The fault in force: pass, black_hole, delay, cut or refuse."""
        return "refuse" if self._server is None and self._loop is not None else self._mode

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="fault-relay", daemon=True)
        self._thread.start()
        self._run(self._listen())

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._run(self._shutdown())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
        self._loop = self._thread = None

    # -- faults -------------------------------------------------------------------------------
    def pass_through(self) -> None:
        self._set(_PASS)

    def black_hole(self) -> None:
        self._set(_BLACK_HOLE)

    def delay(self, seconds: float) -> None:
        self._set(_DELAY, seconds)

    def cut(self) -> None:
        self._set(_CUT)

    def reset(self) -> None:
        """Reset every open connection now; the mode stays as it was."""
        self._run(self._reset_all())

    def refuse(self) -> None:
        """Reset every open connection and stop listening until another mode is set."""
        self._run(self._refuse())

    # -- inside the relay's loop ----------------------------------------------------------------
    def _set(self, mode: str, delay: float = 0.0) -> None:
        async def apply() -> None:
            self._mode, self._delay = mode, delay
            if self._server is None:
                await self._listen()

        self._run(apply())

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop is None:
            coro.close()
            raise RuntimeError("the relay is not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, self.host, self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _refuse(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        await self._reset_all()

    async def _shutdown(self) -> None:
        await self._refuse()
        await asyncio.wait_for(asyncio.gather(*self._handlers, return_exceptions=True), 10)

    async def _reset_all(self) -> None:
        for link in list(self._links):
            link.reset()
        # Let the pumps see their sockets closed before the caller goes on.
        await asyncio.sleep(0)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        handler.add_done_callback(self._handlers.discard)
        try:
            far_reader, far_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _abort(writer)
            return
        link = _Link(writer, far_writer)
        self._links.add(link)
        try:
            await asyncio.gather(
                self._pump(reader, far_writer, link, from_client=True),
                self._pump(far_reader, writer, link, from_client=False),
            )
        finally:
            self._links.discard(link)
            link.reset()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        link: _Link,
        *,
        from_client: bool,
    ) -> None:
        """Read one direction into a queue of (due time, chunk); a writer task sends them."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        sender = asyncio.create_task(self._send(queue, writer))
        try:
            while True:
                try:
                    chunk = await reader.read(_CHUNK)
                except OSError:
                    break
                if not chunk:
                    break
                link.awaiting = from_client
                if from_client:
                    self.bytes_from_clients += len(chunk)
                    if self._mode == _CUT:
                        break
                else:
                    self.bytes_from_server += len(chunk)
                if self._mode == _BLACK_HOLE:
                    continue
                due = loop.time() + (self._delay if self._mode == _DELAY else 0.0)
                queue.put_nowait((due, chunk))
        finally:
            queue.put_nowait(None)
            with contextlib.suppress(OSError):
                await sender
            link.reset()

    @staticmethod
    async def _send(
        queue: asyncio.Queue[tuple[float, bytes] | None], writer: asyncio.StreamWriter
    ) -> None:
        loop = asyncio.get_running_loop()
        while (item := await queue.get()) is not None:
            due, chunk = item
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(chunk)
            await writer.drain()

    def __repr__(self) -> str:
        return (
            f"FaultRelay(127.0.0.1:{self.port} -> {self.target[0]}:{self.target[1]}, {self.mode})"
        )


class _Link:
    """The two sockets of one relayed connection."""

    def __init__(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> None:
        self._client = client
        self._server = server
        self.awaiting = False

    def reset(self) -> None:
        _abort(self._client)
        _abort(self._server)


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset rather than a FIN."""
    if writer.transport.is_closing():
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
