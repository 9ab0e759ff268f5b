from __future__ import annotations

import httpx
import pytest

from sentinel_proxy.config import UpstreamConfig
from sentinel_proxy.exceptions import UpstreamTimeout, UpstreamUnavailable
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

    config = UpstreamConfig(connect_timeout=2.5, read_timeout=90)
    upstream = Upstream(config, transport=httpx.MockTransport(handler))
    await upstream.send(httpx.Request("GET", "http://up.test/v1/models"))
    assert seen[0].extensions["timeout"] == {"connect": 2.5, "read": 90, "write": 90, "pool": 2.5}


@pytest.mark.parametrize(
    ("error", "translated"),
    [
        (httpx.ConnectError("refused"), UpstreamUnavailable),
        (httpx.ReadError("reset"), UpstreamUnavailable),
        (httpx.ConnectTimeout("slow"), UpstreamTimeout),
        (httpx.PoolTimeout("full"), UpstreamTimeout),
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
