"""The upstream client: one shared httpx.AsyncClient, and the seam where httpx's errors
become ours."""

from __future__ import annotations

from collections.abc import AsyncIterator
from http.cookiejar import Cookie, CookieJar

import httpx

from sentinel_proxy.config import UpstreamConfig
from sentinel_proxy.exceptions import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from sentinel_proxy.transport import AiohttpTransport


class _NoCookies(CookieJar):
    """A jar that keeps nothing: a shared client must never carry one user's
    Set-Cookie into another user's request (GHSA-7vwr-g6pm-9hc8)."""

    def set_cookie(self, cookie: Cookie) -> None:
        return None

    def extract_cookies(self, response: object, request: object) -> None:
        return None


def create_client(
    config: UpstreamConfig, *, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """The one place the transport is chosen (tests pass a mock one)."""
    if transport is None:
        transport = AiohttpTransport(max_connections=config.max_connections)
    return httpx.AsyncClient(
        transport=transport,
        cookies=_NoCookies(),
        timeout=httpx.Timeout(
            config.read_timeout, connect=config.connect_timeout, pool=config.connect_timeout
        ),
        follow_redirects=False,
        trust_env=False,
    )


class UpstreamResponse:
    """A response whose headers have arrived and whose body is still to be read."""

    __slots__ = ("_response", "status_code", "headers")

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status_code = response.status_code
        self.headers: list[tuple[bytes, bytes]] = response.headers.raw

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body bytes as the upstream sent them (no decoding)."""
        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout("the upstream stopped sending before the response ended") from exc
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable("the upstream broke off the response") from exc

    async def aclose(self) -> None:
        await self._response.aclose()


async def send(client: httpx.AsyncClient, request: httpx.Request) -> UpstreamResponse:
    try:
        response = await client.send(request, stream=True)
    except httpx.TimeoutException as exc:
        raise UpstreamTimeout("the upstream did not answer in time") from exc
    except (httpx.TransportError, httpx.UnsupportedProtocol) as exc:
        raise UpstreamUnavailable(
            "the upstream is unreachable or closed the connection before responding"
        ) from exc
    except httpx.HTTPError as exc:
        raise UpstreamError("the upstream request failed") from exc
    return UpstreamResponse(response)
