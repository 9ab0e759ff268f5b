"""
The transport under the upstream httpx client: aiohttp's connection pool, behind httpx's
transport interface.

httpx's default transport scans every pooled connection per request and collapses under
concurrency (encode/httpx#3215), so the proxy's speed is decided here. httpx-aiohttp does
the same job but maps a refused connection to a timeout and lets aiohttp add headers of
its own; this one forwards exactly what it is given and maps errors by what they mean.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator

import aiohttp
import httpx
from yarl import URL

# aiohttp adds these to requests that lack them; a proxy must not (an Accept-Encoding the
# client never sent would bring it a gzip body it cannot read).
_AUTO_HEADERS = {
    b"accept": "Accept",
    b"accept-encoding": "Accept-Encoding",
    b"user-agent": "User-Agent",
    b"content-type": "Content-Type",
}


class AiohttpTransport(httpx.AsyncBaseTransport):
    """Sends httpx requests with one aiohttp ClientSession that keeps no cookies and
    decodes no bodies. The session is made on first use, inside the running loop."""

    def __init__(self, *, max_connections: int, ssl_context: ssl.SSLContext | None = None) -> None:
        self._max_connections = max_connections
        self._ssl = ssl_context if ssl_context is not None else httpx.create_ssl_context()
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[tuple[float | None, ...], aiohttp.ClientTimeout] = {}

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self._max_connections,
            limit_per_host=0,
            ssl=self._ssl,
            enable_cleanup_closed=False,
        )
        return aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session
        if session is None:
            session = self._session = self._open()
        timeout = request.extensions.get("timeout", {})
        if not isinstance(request.stream, httpx.ByteStream):
            raise httpx.UnsupportedProtocol("only buffered request bodies are supported")
        content = b"".join(request.stream)
        headers = []
        missing = dict(_AUTO_HEADERS)
        for name, value in request.headers.raw:
            missing.pop(name.lower(), None)
            headers.append((name.decode("latin-1"), value.decode("latin-1")))
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
        except Exception as exc:
            raise _translate(exc, connecting=True) from exc
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=_ResponseStream(response),
            request=request,
            extensions={"http_version": b"HTTP/1.1"},
        )

    def _timeout(self, timeout: dict[str, float | None]) -> aiohttp.ClientTimeout:
        # httpx's pool timeout bounds the wait for a pooled connection plus connecting,
        # which is what aiohttp calls `connect`. Requests share a few distinct values.
        key = (timeout.get("pool"), timeout.get("connect"), timeout.get("read"))
        found = self._timeouts.get(key)
        if found is None:
            found = self._timeouts[key] = aiohttp.ClientTimeout(
                total=None, connect=key[0], sock_connect=key[1], sock_read=key[2]
            )
        return found

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

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
        # An unfinished body closes its connection, so the upstream sees the client go.
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()


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
    return exc
