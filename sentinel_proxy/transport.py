"""
The transport under the upstream httpx client: aiohttp's connection pool, behind httpx's
transport interface.

httpx's default transport scans every pooled connection per request and collapses under
concurrency (encode/httpx#3215), so the proxy's speed is decided here. httpx-aiohttp does
the same job but maps a refused connection to a timeout and lets aiohttp add headers of
its own; this one forwards exactly what it is given and maps errors by what they mean.

The pool's limit is a counter of ours (_Slots) rather than aiohttp's, so that waiting for a
free connection has a deadline of its own (httpx's `pool` timeout) apart from connecting.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import re
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING

import aiohttp
import httpx
from aiohttp import http_writer
from yarl import URL

from sentinel_proxy.request import MAX_HEADER_BYTES

if TYPE_CHECKING:
    from multidict import CIMultiDict

# aiohttp adds these to requests that lack them; a proxy must not (an Accept-Encoding the
# client never sent would bring it a gzip body it cannot read).
_AUTO_HEADERS = {
    b"accept": "Accept",
    b"accept-encoding": "Accept-Encoding",
    b"user-agent": "User-Agent",
    b"content-type": "Content-Type",
}
# Upstream response headers are accepted up to what the proxy accepts from its clients:
# any line or field up to MAX_HEADER_BYTES, and as many lines as that many bytes can hold.
_MAX_HEADER_LINES = MAX_HEADER_BYTES // 4
_NO_TIMEOUTS: dict[str, float | None] = {}

# aiohttp writes header strings as UTF-8, so bytes a client sent outside ASCII would arrive
# re-encoded (`café` as `cafÃ©`) or not at all (a lone 0xE9). Requests that carry such
# bytes set this, and their head is written as the bytes given (see _serialize_headers).
_RAW_HEADERS: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "sentinel_raw_headers", default=False
)
_aiohttp_serialize_headers = http_writer._serialize_headers
_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _serialize_headers(status_line: str, headers: CIMultiDict[str]) -> bytes:
    if not _RAW_HEADERS.get():
        return _aiohttp_serialize_headers(status_line, headers)
    lines = [status_line]
    lines += [name + ": " + value for name, value in headers.items()]
    if _FORBIDDEN.search("".join(lines)):
        raise ValueError("a control character in a request header")
    # The strings were decoded as latin-1 from the client's bytes: this restores them.
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class AiohttpTransport(httpx.AsyncBaseTransport):
    """Sends httpx requests with one aiohttp ClientSession that keeps no cookies and
    decodes no bodies. The session is made on first use, inside the running loop.

    Timeouts come per request in the `timeout` extension: httpx's `connect`, `pool` and
    `read` (to the response headers and on to the first body bytes), and `chunk`, the
    silence allowed between two reads of the body after that."""

    def __init__(self, *, max_connections: int, ssl_context: ssl.SSLContext | None = None) -> None:
        self._slots = _Slots(max_connections)
        self._ssl = ssl_context if ssl_context is not None else httpx.create_ssl_context()
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[tuple[float | None, ...], aiohttp.ClientTimeout] = {}

    def _open(self) -> aiohttp.ClientSession:
        # Process-wide, but it changes only the requests that set _RAW_HEADERS.
        http_writer._serialize_headers = _serialize_headers
        connector = aiohttp.TCPConnector(
            limit=0,
            limit_per_host=0,
            ssl=self._ssl,
            enable_cleanup_closed=False,
        )
        return aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None),
            max_line_size=MAX_HEADER_BYTES,
            max_field_size=MAX_HEADER_BYTES,
            max_headers=_MAX_HEADER_LINES,
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session
        if session is None:
            session = self._session = self._open()
        timeout = request.extensions.get("timeout", _NO_TIMEOUTS)
        if not isinstance(request.stream, httpx.ByteStream):
            raise httpx.UnsupportedProtocol("only buffered request bodies are supported")
        content = b"".join(request.stream)
        headers = []
        missing = dict(_AUTO_HEADERS)
        raw = False
        for name, value in request.headers.raw:
            missing.pop(name.lower(), None)
            try:
                text = value.decode("ascii")
            except UnicodeDecodeError:
                raw = True
                text = value.decode("latin-1")
            headers.append((name.decode("latin-1"), text))
        slots = self._slots
        if slots.free:
            slots.free -= 1
        else:
            await slots.wait(timeout.get("pool"))
        token = _RAW_HEADERS.set(True) if raw else None
        try:
            response = await session.request(
                request.method,
                URL(str(request.url), encoded=True),
                headers=headers,
                skip_auto_headers=missing.values() if missing else None,
                data=content or None,
                allow_redirects=False,
                compress=None,
                timeout=self._timeout(timeout),
            )
        except BaseException as exc:
            slots.release()
            if isinstance(exc, Exception):
                raise _translate(exc, connecting=True) from exc
            raise
        finally:
            if token is not None:
                _RAW_HEADERS.reset(token)
        chunk = timeout.get("chunk")
        if chunk is not None and chunk != timeout.get("read"):
            connection = response.connection
            if connection is not None and connection.protocol is not None:
                # The timer running now still allows `read` until the first body bytes;
                # each read after them restarts it with this.
                connection.protocol.read_timeout = chunk
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=_ResponseStream(response, slots.release),
            request=request,
            extensions={"http_version": b"HTTP/1.1"},
        )

    def _timeout(self, timeout: Mapping[str, float | None]) -> aiohttp.ClientTimeout:
        # aiohttp's `connect` covers what is left once a slot is ours: resolving and
        # connecting. Requests share a few distinct values.
        key = (timeout.get("connect"), timeout.get("read"))
        found = self._timeouts.get(key)
        if found is None:
            found = self._timeouts[key] = aiohttp.ClientTimeout(
                total=None, connect=key[0], sock_connect=key[0], sock_read=key[1]
            )
        return found

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


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


class _ResponseStream(httpx.AsyncByteStream):
    __slots__ = ("_response", "_release")

    def __init__(self, response: aiohttp.ClientResponse, release: Callable[[], None]) -> None:
        self._response = response
        self._release: Callable[[], None] | None = release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        content = self._response.content
        try:
            while True:
                chunk = await content.readany()
                if not chunk:
                    return
                yield chunk
        except Exception as exc:
            raise _translate(exc, connecting=False) from exc

    async def aclose(self) -> None:
        release, self._release = self._release, None
        if release is None:
            return
        # An unfinished body closes its connection, so the upstream sees the client go.
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()
        release()


def _translate(exc: Exception, *, connecting: bool) -> Exception:
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(str(exc) or "connect timeout")
    if isinstance(exc, aiohttp.ServerTimeoutError | TimeoutError):
        return httpx.ReadTimeout(str(exc) or "read timeout")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(str(exc))
    if isinstance(exc, aiohttp.ClientResponseError | aiohttp.ClientPayloadError):
        return httpx.RemoteProtocolError(str(exc))
    if isinstance(exc, aiohttp.ClientError | OSError):
        message = str(exc) or type(exc).__name__
        return httpx.ConnectError(message) if connecting else httpx.ReadError(message)
    if isinstance(exc, ValueError):
        return httpx.LocalProtocolError(str(exc))
    return exc
