from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from sentinel_proxy.config import UpstreamConfig
from sentinel_proxy.exceptions import (
    InvalidRequest,
    UpstreamBadResponse,
    UpstreamPoolExhausted,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from sentinel_proxy.upstream import Upstream


async def test_never_carries_one_clients_cookie_to_another() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, headers={"set-cookie": "session=user-a; Path=/"})

    upstream = Upstream(UpstreamConfig(), transport=httpx.MockTransport(handler))
    for _ in range(2):
        response = await upstream.send(httpx.Request("GET", "http://up.test/v1/models"))
        assert dict(response.headers)[b"set-cookie"].startswith(b"session=user-a")
        await response.aclose()
    await upstream.aclose()
    assert len(seen) == 2 and all("cookie" not in r.headers for r in seen)


async def test_timeouts_come_from_the_configuration() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    config = UpstreamConfig(
        connect_timeout=2.5, first_byte_timeout=90, chunk_timeout=30, pool_timeout=0.5
    )
    upstream = Upstream(config, transport=httpx.MockTransport(handler))
    await upstream.send(httpx.Request("GET", "http://up.test/v1/models"))
    assert seen[0].extensions["timeout"] == {
        "connect": 2.5,
        "read": 90,
        "write": 90,
        "pool": 0.5,
        "chunk": 30,
    }


@pytest.mark.parametrize(
    ("error", "translated"),
    [
        (httpx.ConnectError("refused"), UpstreamUnavailable),
        (httpx.ReadError("reset"), UpstreamUnavailable),
        (httpx.ConnectTimeout("slow"), UpstreamTimeout),
        (httpx.RemoteProtocolError("bad header line"), UpstreamBadResponse),
        (httpx.PoolTimeout("full"), UpstreamPoolExhausted),
        (httpx.LocalProtocolError("control character"), InvalidRequest),
    ],
)
async def test_httpx_errors_are_translated_at_the_seam(
    error: Exception, translated: type[Exception]
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise error

    upstream = Upstream(UpstreamConfig(), transport=httpx.MockTransport(handler))
    with pytest.raises(translated) as info:
        await upstream.send(httpx.Request("GET", "http://up.test/v1/models"))
    assert info.value.__cause__ is error


@pytest.mark.parametrize("status", [101, 600, 999])
async def test_a_status_http_does_not_allow_is_a_bad_response(status: int) -> None:
    closed: list[bool] = []

    class Body(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b"ok"

        async def aclose(self) -> None:
            closed.append(True)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, stream=Body())

    upstream = Upstream(UpstreamConfig(), transport=httpx.MockTransport(handler))
    with pytest.raises(UpstreamBadResponse) as info:
        await upstream.send(httpx.Request("GET", "http://up.test/v1/models"))
    assert info.value.status_code == 502
    assert str(status) in info.value.message
    assert closed == [True], "the response (and its pooled connection) was not released"
