from __future__ import annotations

import httpx

from sentinel_proxy.config import UpstreamConfig
from sentinel_proxy.upstream import create_client


async def test_shared_client_never_carries_one_clients_cookie_to_another() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, headers={"set-cookie": "session=user-a; Path=/"})

    async with create_client(UpstreamConfig(), transport=httpx.MockTransport(handler)) as client:
        for _ in range(2):
            response = await client.send(httpx.Request("GET", "http://up.test/v1/models"))
            assert response.headers["set-cookie"].startswith("session=user-a")
        assert not client.cookies
    assert all("cookie" not in r.headers for r in seen)
