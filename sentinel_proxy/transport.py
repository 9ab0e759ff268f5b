"""
The transport under the upstream httpx client: HTTP/1.1 connections of our own, kept alive
and pooled per origin, their responses read by httptools (uvicorn's parser).

httpx's default transport scans every pooled connection per request and collapses under
concurrency (encode/httpx#3215). aiohttp's client, which this replaces, took a third of the
proxy's CPU per request: a timer re-armed on every read, a task per request body, and the
cookies, redirects, tracing and decoding of a general client, each of which a transparent
proxy must switch off (bench/RESULTS.md: the proxy serves 1.4x the requests without it). A
proxy needs little of a client: the request goes out as the bytes it is given, in one
write, and the response comes back as the bytes the upstream sent.

Timeouts come per request in the `timeout` extension: httpx's `connect` and `pool`, `read`
(silence allowed until the first body bytes) and `chunk` (silence allowed between reads of
the body after them). The pool's limit is a counter of requests in flight (_Slots), so that
waiting for a free connection has a deadline of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable

import httptools
import httpx

from sentinel_proxy.request import MAX_HEADER_BYTES

# An upstream's response head (status line and headers) may be up to twice what the proxy
# takes from a client; larger is not HTTP any server should send.
MAX_RESPONSE_HEAD_BYTES = 2 * MAX_HEADER_BYTES
# An idle connection is reused for this long, then closed: servers close theirs too (nginx
# after 75 s, Node after 5 s), and one they closed can look alive for a moment.
KEEPALIVE_SECONDS = 15.0
# Body bytes read from the upstream and not yet taken by the relay: past the high mark the
# connection stops reading (the upstream waits), below the low mark it reads again.
READ_HIGH_WATER = 256 * 1024
READ_LOW_WATER = 64 * 1024

_NO_TIMEOUTS: dict[str, float | None] = {}
# Bytes no header name or value may hold: a CR or LF would end the line early.
_FORBIDDEN = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_DEFAULT_PORTS = {b"http": 80, b"https": 443}

Origin = tuple[bytes, str, int]


class UpstreamTransport(httpx.AsyncBaseTransport):
    """Sends httpx requests over pooled HTTP/1.1 connections; no cookies, redirects,
    decoding or added headers. Plain TCP and TLS."""

    def __init__(self, *, max_connections: int, ssl_context: ssl.SSLContext | None = None) -> None:
        self._slots = _Slots(max_connections)
        self._ssl = ssl_context
        # Idle connections per origin, the most recently used on the right.
        self._idle: dict[Origin, deque[_Connection]] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeout = request.extensions.get("timeout", _NO_TIMEOUTS)
        if not isinstance(request.stream, httpx.ByteStream):
            raise httpx.UnsupportedProtocol("only buffered request bodies are supported")
        url = request.url
        scheme = url.raw_scheme
        port = url.port or _DEFAULT_PORTS.get(scheme)
        if port is None:
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {url.scheme!r}")
        origin = (scheme, url.raw_host.decode("ascii"), port)
        data = _head(request) + b"".join(request.stream)
        slots = self._slots
        if slots.free:
            slots.free -= 1
        else:
            await slots.wait(timeout.get("pool"))
        connection = None
        try:
            connection = self._reuse(origin)
            if connection is None:
                connection = await self._connect(origin, timeout.get("connect"))
            await connection.exchange(
                data, request.method == "HEAD", timeout.get("read"), timeout.get("chunk")
            )
        except BaseException:
            slots.release()
            if connection is not None:
                connection.close()
            raise
        return httpx.Response(
            status_code=connection.status,
            headers=connection.headers,
            stream=_ResponseStream(connection, self._idle, slots.release),
            request=request,
            extensions={"http_version": b"HTTP/1.1"},
        )

    def _reuse(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            if connection.reusable():
                return connection
            connection.close()
        return None

    async def _connect(self, origin: Origin, timeout: float | None) -> _Connection:
        scheme, host, port = origin
        context = None
        if scheme == b"https":
            if self._ssl is None:
                self._ssl = httpx.create_ssl_context()
            context = self._ssl
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(origin, loop),
                    host,
                    port,
                    ssl=context,
                    server_hostname=host if context is not None else None,
                )
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out") from exc
        except OSError as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
        return connection

    async def aclose(self) -> None:
        for idle in self._idle.values():
            while idle:
                idle.pop().close()


def _head(request: httpx.Request) -> bytes:
    """The request line and headers, as the bytes given."""
    raw = request.headers.raw
    if _FORBIDDEN.search(b"".join([value for _, value in raw] + [name for name, _ in raw])):
        raise httpx.LocalProtocolError("a control character in a request header")
    lines = [request.method.encode("ascii"), b" ", request.url.raw_path, b" HTTP/1.1\r\n"]
    for name, value in raw:
        lines += (name, b": ", value, b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


class _Connection(asyncio.Protocol):
    """One connection to an upstream, carrying one exchange (request and response) at a
    time; httptools calls its on_* methods as it parses."""

    def __init__(self, origin: Origin, loop: asyncio.AbstractEventLoop) -> None:
        self.origin = origin
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._lost = False
        self.idle_since = 0.0
        self._active = False  # an exchange is under way
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        # The head's size, counted twice over: the bytes read while it is unfinished (a line
        # that never ends), and its header lines (a whole head read at once).
        self._head_bytes = 0
        self._header_bytes = 0
        self._head_done = False
        self._body_started = False
        self._complete = False
        self._keep_alive = False
        self._head_only = False
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._error: Exception | None = None
        self._read: float | None = None
        self._chunk: float | None = None
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def reusable(self) -> bool:
        return (
            not self._lost
            and self._loop.time() - self.idle_since < KEEPALIVE_SECONDS
            and self._transport is not None
            and not self._transport.is_closing()
        )

    async def exchange(
        self, data: bytes, head_only: bool, read: float | None, chunk: float | None
    ) -> None:
        """Send a request (`data`); return once the response's head has arrived."""
        self._active = True
        self.status = 0
        self.headers = []
        self._head_bytes = self._header_bytes = 0
        self._head_done = self._body_started = self._complete = False
        self._head_only = head_only
        self._error = None
        self._read = read
        self._chunk = read if chunk is None else chunk
        if read is not None:
            self._deadline = deadline = self._loop.time() + read
            if self._timer is None or deadline < self._timer.when():
                self._arm(deadline)
        if self._lost or self._transport is None:
            raise httpx.ReadError("the upstream closed the connection before the request")
        self._transport.write(data)
        while not self._head_done:
            if self._error is not None:
                raise self._error
            await self._wait()

    async def read(self) -> bytes:
        """The body bytes read since the last call, or b"" once the body is complete."""
        chunks = self._chunks
        while not chunks:
            if self._complete:
                return b""
            if self._error is not None:
                raise self._error
            await self._wait()
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        return data

    async def _wait(self) -> None:
        self._waiter = waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def finished(self) -> bool:
        """The response was read whole and the connection can carry another."""
        return self._complete and self._keep_alive and not self._head_only and not self._lost

    def rest(self) -> None:
        """Between exchanges: idle in the pool."""
        self._active = False
        self.idle_since = self._loop.time()

    def close(self) -> None:
        self._active = False
        self._stop_timer()
        if self._transport is not None:
            self._transport.close()

    def _fail(self, error: Exception) -> None:
        if self._error is None and not self._complete:
            self._error = error
        self._wake()
        self.close()

    # The timer: one per connection, moved on lazily. An exchange or a read only stores its
    # deadline; the timer, when it fires, compares, and re-arms itself for a later one. A
    # connection carrying many quick exchanges touches it once per timeout period.

    def _check(self) -> None:
        self._timer = None
        if not self._active or self._complete:
            return
        if self._loop.time() < self._deadline:
            self._arm(self._deadline)
            return
        if self._chunks:
            # Silent because the relay has not taken what came yet (a slow client, which
            # the relay's own stall check is for), not because the upstream stalled.
            self._deadline = self._loop.time() + (self._chunk or 0.0)
            self._arm(self._deadline)
            return
        self._fail(httpx.ReadTimeout("the upstream sent nothing for too long"))

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._check)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._stop_timer()
        if not self._active or self._complete:
            return
        if self._head_done and self._ends_at_close():
            self._complete = True  # a body without a length ends with the connection
            self._keep_alive = False
            self._wake()
        elif not self._head_done:
            self._fail(httpx.ReadError("the upstream closed the connection before responding"))
        else:
            self._fail(httpx.RemoteProtocolError("the upstream closed the connection mid-response"))

    def _ends_at_close(self) -> bool:
        if self._head_only or self.status in (204, 304):
            return False
        return not any(
            name.lower() in (b"content-length", b"transfer-encoding") for name, _ in self.headers
        )

    def data_received(self, data: bytes) -> None:
        if not self._active or self._complete:
            # Bytes nobody asked for (or past a HEAD response's head): the connection is
            # no longer one to reuse.
            self._lost = True
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._keep_alive = False
            self._complete = True  # 101: nothing of it is relayed (Upstream refuses it)
            self._wake()
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"the upstream's response is not HTTP: {exc}"))
            return
        if self._error is not None:
            self._fail(self._error)
            return
        if not self._head_done:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_RESPONSE_HEAD_BYTES:
                self._fail(httpx.RemoteProtocolError("the upstream's response head is too large"))
                return
        if self._read is not None and self._timer is not None:
            # `read` until the first body bytes, `chunk` after them.
            wait = self._chunk if self._body_started else self._read
            self._deadline = deadline = self._loop.time() + wait  # type: ignore[operator]
            if deadline < self._timer.when():
                self._arm(deadline)

    def eof_received(self) -> bool | None:
        return None  # close; connection_lost decides what the end means

    # httptools

    def on_message_begin(self) -> None:
        if self._complete:
            self._lost = True  # a second response to one request: not a connection to reuse

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > MAX_RESPONSE_HEAD_BYTES and self._error is None:
            self._error = httpx.RemoteProtocolError("the upstream's response head is too large")

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if self._error is not None:
            return
        if 100 <= status < 200 and status != 101:
            self.headers = []  # an interim response (100 Continue): the final one follows
            return
        self.status = status
        self._head_done = True
        self._keep_alive = self._parser.should_keep_alive()
        if self._head_only:
            self._complete = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._body_started = True
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > READ_HIGH_WATER and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if not self._head_done:
            return  # the end of an interim response
        self._complete = True
        self._wake()


class _ResponseStream(httpx.AsyncByteStream):
    __slots__ = ("_connection", "_idle", "_release")

    def __init__(
        self,
        connection: _Connection,
        idle: dict[Origin, deque[_Connection]],
        release: Callable[[], None],
    ) -> None:
        self._connection = connection
        self._idle = idle
        self._release: Callable[[], None] | None = release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        read = self._connection.read
        while chunk := await read():
            yield chunk

    async def aclose(self) -> None:
        release, self._release = self._release, None
        if release is None:
            return
        connection = self._connection
        # An unfinished body closes its connection, so the upstream sees the client go.
        if connection.finished():
            connection.rest()
            idle = self._idle.get(connection.origin)
            if idle is None:
                idle = self._idle[connection.origin] = deque()
            idle.append(connection)
            while idle and not idle[0].reusable():
                idle.popleft().close()
        else:
            connection.close()
        release()


class _Slots:
    """The pool's limit: requests in flight, each from sending to closing its response.
    A counter rather than asyncio.Semaphore, which costs several times as much per
    request; a freed slot goes straight to the longest waiter."""

    __slots__ = ("free", "_waiters")

    def __init__(self, size: int) -> None:
        self.free = size
        # Only futures still waiting: a waiter that gives up takes itself out.
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def wait(self, timeout: float | None) -> None:
        """Take a slot once one is released (none is free now)."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed over just as this waiter gave up: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise httpx.PoolTimeout("every upstream connection is busy") from exc
            raise

    def release(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.free += 1
