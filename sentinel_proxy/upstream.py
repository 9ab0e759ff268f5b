"""The upstream client: one shared httpx transport (the connection pool to every
provider), and the seam where httpx's errors become ours.

Requests go to the transport directly rather than through `httpx.AsyncClient.send`:
everything the client adds per request (auth flows, redirects, a cookie jar, event hooks,
default headers) is something a transparent proxy has to switch off, and together it cost
about a tenth of the proxy's time. Without a client there is no cookie jar at all, so one
user's Set-Cookie can never ride along on another user's request (GHSA-7vwr-g6pm-9hc8).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence

import httpx

from sentinel_proxy.config import Provider, UpstreamConfig
from sentinel_proxy.demo import DemoTransport, is_demo_url
from sentinel_proxy.exceptions import (
    InvalidRequest,
    UpstreamBadResponse,
    UpstreamError,
    UpstreamPoolExhausted,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from sentinel_proxy.transport import UpstreamTransport

logger = logging.getLogger("sentinel_proxy.upstream")


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
            async for chunk in self._response.stream:  # type: ignore[union-attr]
                yield chunk
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout("the upstream stopped sending before the response ended") from exc
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable("the upstream broke off the response") from exc

    async def aclose(self) -> None:
        await self._response.aclose()


class Upstream:
    """Sends rewritten requests upstream; made in the lifespan, closed at shutdown."""

    def __init__(
        self,
        config: UpstreamConfig,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        providers: Sequence[Provider] = (),
    ) -> None:
        # The one place the transport is chosen (tests pass a mock one).
        if transport is None:
            transport = UpstreamTransport(max_connections=config.max_connections)
            if any(is_demo_url(p.base_url) for p in providers):
                # Demo providers (--demo) are answered in process; without one, nothing
                # stands between the proxy and its connections.
                transport = DemoTransport(transport)
        self._transport = transport
        # httpx's timeout names, plus `chunk` for the silence between two reads of the body
        # (UpstreamTransport's docstring); `read` runs to the first body bytes.
        self._timeout = {
            "connect": config.connect_timeout,
            "read": config.first_byte_timeout,
            "write": config.first_byte_timeout,
            "pool": config.pool_timeout,
            "chunk": config.chunk_timeout,
        }

    async def send(self, request: httpx.Request) -> UpstreamResponse:
        request.extensions["timeout"] = self._timeout
        try:
            response = await self._transport.handle_async_request(request)
        except httpx.PoolTimeout as exc:
            raise UpstreamPoolExhausted(
                "Every upstream connection is busy; retry in a moment."
            ) from exc
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout("the upstream did not answer in time") from exc
        except httpx.RemoteProtocolError as exc:
            logger.warning("the upstream's response is not valid HTTP: %s", _first_line(exc))
            raise UpstreamBadResponse("the upstream's response is not valid HTTP") from exc
        except httpx.LocalProtocolError as exc:
            # uvicorn refuses such headers already; this guards other servers.
            raise InvalidRequest("A request header holds a control character.") from exc
        except httpx.TransportError as exc:
            raise UpstreamUnavailable(
                "the upstream is unreachable or closed the connection before responding"
            ) from exc
        except httpx.HTTPError as exc:
            raise UpstreamError("the upstream request failed") from exc
        # HTTP has no other final status, and uvicorn cannot send one.
        if not 200 <= response.status_code < 600:
            await response.aclose()
            raise UpstreamBadResponse(
                f"the upstream answered with status {response.status_code}, which HTTP "
                "does not allow for a final response"
            )
        return UpstreamResponse(response)

    def reconfigured(self, config: UpstreamConfig) -> Upstream:
        """An Upstream with `config`'s timeouts on this one's transport and connections
        (a reload: the pool's size stays as it began)."""
        return Upstream(config, transport=self._transport)

    async def aclose(self) -> None:
        await self._transport.aclose()


def _first_line(exc: Exception) -> str:
    # Parser errors can quote the offending bytes at length over several lines.
    return str(exc).split("\n", 1)[0][:200]
