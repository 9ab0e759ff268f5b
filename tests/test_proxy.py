"""The proxy route end to end in-process, with respx standing in for the upstream."""

from __future__ import annotations

import asyncio
import gzip
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
import pytest
import respx

from sentinel_proxy.app import Gateway, StoreFactory, create_app
from sentinel_proxy.config import Alias, Config, Provider, Secret, SessionConfig, Target
from sentinel_proxy.exceptions import StoreUnavailable
from sentinel_proxy.sessions import MemoryStore, Session, SessionStore
from sentinel_proxy.sessions.base import Acceptor, Maker
from tests.support.redis_server import RedisServer

A = Provider("a", "http://a.test/v1", forward_client_key=True)
B = Provider("b", "http://b.test/v1", api_key=Secret("sk-b-provider"))
ALIAS = Alias("fast", (Target("a", "m-a"), Target("b", "m-b")))
CHAT = {"id": "chatcmpl-1", "object": "chat.completion", "choices": []}


def config(**session: Any) -> Config:
    return Config(providers=(A, B), aliases={"fast": ALIAS}, session=SessionConfig(**session))


@asynccontextmanager
async def serve(
    cfg: Config,
    mock: respx.MockRouter,
    store: StoreFactory | None = None,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
) -> AsyncIterator[httpx.AsyncClient]:
    async def handler(request: httpx.Request) -> httpx.Response:
        # respx hands back responses it has already read; the proxy reads raw streams.
        mocked = await mock.async_handler(request)
        body = httpx.ByteStream(mocked.content)
        return httpx.Response(mocked.status_code, headers=mocked.headers, stream=body)

    kwargs: dict[str, Any] = {"transport": transport or httpx.MockTransport(handler)}
    if store is not None:
        kwargs["store_factory"] = store
    app: Gateway = create_app(cfg, **kwargs)
    async with app.starlette.router.lifespan_context(app.starlette):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
            yield client


def chat_route(mock: respx.MockRouter, host: str = "a.test", **response: Any) -> respx.Route:
    response.setdefault("json", CHAT)
    return mock.post(f"http://{host}/v1/chat/completions").mock(
        return_value=httpx.Response(response.pop("status_code", 200), **response)
    )


def sent_json(route: respx.Route, index: int = -1) -> Any:
    return orjson.loads(route.calls[index].request.content)


async def test_forwards_method_path_query_headers_and_body() -> None:
    mock = respx.MockRouter(assert_all_called=False)
    route = mock.get("http://a.test/v1/files/f1/content", params={"x": "1"}).mock(
        return_value=httpx.Response(
            200,
            content=b"\x00raw",
            headers={"x-upstream": "yes", "connection": "close", "keep-alive": "timeout=1"},
        )
    )
    async with serve(config(), mock) as client:
        response = await client.get(
            "/v1/files/f1/content?x=1",
            headers={"authorization": "Bearer sk-client", "x-custom": "c", "te": "trailers"},
        )
    assert response.status_code == 200 and response.content == b"\x00raw"
    assert response.headers["x-upstream"] == "yes"
    assert "keep-alive" not in response.headers
    assert response.headers["x-sentinel-provider"] == "a"
    assert response.headers["x-sentinel-session"] == "none"
    sent = route.calls.last.request
    assert sent.headers["authorization"] == "Bearer sk-client"
    assert sent.headers["x-custom"] == "c"
    assert "te" not in sent.headers and sent.headers["host"] == "a.test"


async def test_upstream_errors_pass_through_untouched() -> None:
    body = b'{"error": {"message": "slow down", "type": "rate_limit_exceeded"}}'
    mock = respx.MockRouter()
    chat_route(mock, status_code=429, content=body, headers={"retry-after": "7"})
    async with serve(config(), mock) as client:
        response = await client.post("/v1/chat/completions", json={"model": "gpt-4o"})
    assert (response.status_code, response.content) == (429, body)
    assert response.headers["retry-after"] == "7"


async def test_gzip_response_stays_gzip() -> None:
    packed = gzip.compress(orjson.dumps(CHAT))

    def gzipped(request: httpx.Request) -> httpx.Response:
        headers = {"content-encoding": "gzip", "content-type": "application/json"}
        return httpx.Response(200, headers=headers, stream=httpx.ByteStream(packed))

    transport = httpx.MockTransport(gzipped)
    async with serve(config(), respx.MockRouter(), transport=transport) as client:
        request = client.build_request("POST", "/v1/chat/completions", json={"model": "x"})
        response = await client.send(request, stream=True)
        raw = b"".join([chunk async for chunk in response.aiter_raw()])
        await response.aclose()
    assert response.headers["content-encoding"] == "gzip"
    assert raw == packed


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (httpx.ConnectError("refused"), 502, "upstream_unreachable"),
        (httpx.RemoteProtocolError("bad status line"), 502, "upstream_bad_response"),
        (httpx.ConnectTimeout("slow"), 504, "upstream_timeout"),
        (httpx.ReadTimeout("slow"), 504, "upstream_timeout"),
    ],
)
async def test_upstream_failures_become_openai_errors(
    error: Exception, status: int, code: str
) -> None:
    mock = respx.MockRouter()
    mock.post("http://a.test/v1/chat/completions").mock(side_effect=error)
    async with serve(config(), mock) as client:
        response = await client.post("/v1/chat/completions", json={"model": "gpt-4o"})
    assert response.status_code == status
    error_json = response.json()["error"]
    assert error_json["code"] == code and error_json["type"] == "server_error"
    assert set(error_json) == {"message", "type", "param", "code", "request_id"}
    assert error_json["request_id"] == response.headers["x-request-id"]


@pytest.mark.parametrize(
    ("kwargs", "status", "param"),
    [
        ({"content": b"{oops", "headers": {"content-type": "application/json"}}, 400, None),
        ({"json": [1]}, 400, None),
        ({"json": {"model": "m", "conversation_id": 12}}, 400, "conversation_id"),
        ({"json": {"messages": []}}, 400, "model"),
        ({"json": {"model": "m", "pad": "x" * 2000}}, 413, None),
    ],
)
async def test_bad_requests_are_refused_in_openai_shape(
    kwargs: dict[str, Any], status: int, param: str | None
) -> None:
    mock = respx.MockRouter()
    cfg = config()
    cfg = Config(
        providers=cfg.providers,
        aliases=cfg.aliases,
        upstream=type(cfg.upstream)(max_body_bytes=1000),
    )
    async with serve(cfg, mock) as client:
        response = await client.post("/v1/chat/completions", **kwargs)
    assert response.status_code == status
    assert response.json()["error"]["param"] == param
    assert not mock.calls


async def test_model_is_required_only_where_routing_needs_it() -> None:
    mock = respx.MockRouter()
    route = mock.post("http://a.test/v1/batches").mock(return_value=httpx.Response(200, json={}))
    async with serve(config(), mock) as client:
        ok = await client.post("/v1/batches", json={"input_file_id": "f"})
        refused = await client.post("/v1/embeddings", json={"input": "x"})
    assert ok.status_code == 200 and route.called
    assert refused.status_code == 400
    assert refused.json()["error"]["message"] == "model field is required"


async def test_alias_rewrites_model_and_strips_conversation_id() -> None:
    mock = respx.MockRouter(assert_all_called=False)
    to_a = chat_route(mock, "a.test")
    to_b = chat_route(mock, "b.test")
    async with serve(config(), mock) as client:
        for _ in range(20):
            response = await client.post(
                "/v1/chat/completions", json={"model": "fast", "conversation_id": None}
            )
            assert response.status_code == 200
    assert to_a.called and to_b.called
    assert sent_json(to_a) == {"model": "m-a"}
    assert sent_json(to_b) == {"model": "m-b"}
    assert to_b.calls.last.request.headers["authorization"] == "Bearer sk-b-provider"


async def test_session_pins_provider_and_model_whatever_model_is_asked() -> None:
    mock = respx.MockRouter(assert_all_called=False)
    routes = {"a": chat_route(mock, "a.test"), "b": chat_route(mock, "b.test")}
    async with serve(config(), mock) as client:
        first = await client.post(
            "/v1/chat/completions", json={"model": "fast", "conversation_id": "c1"}
        )
        pinned = first.headers["x-sentinel-provider"]
        assert first.headers["x-sentinel-session"] == "created"
        for model in ("fast", "gpt-4o", "fast"):
            response = await client.post(
                "/v1/chat/completions",
                json={"model": model, "messages": []},
                headers={"x-conversation-id": "c1"},
            )
            assert response.headers["x-sentinel-session"] == "hit"
            assert response.headers["x-sentinel-provider"] == pinned
    calls = routes[pinned].calls
    assert len(calls) == 4
    expected_model = {"a": "m-a", "b": "m-b"}[pinned]
    assert all(orjson.loads(c.request.content)["model"] == expected_model for c in calls)
    assert all("conversation_id" not in orjson.loads(c.request.content) for c in calls)
    assert all("x-conversation-id" not in c.request.headers for c in calls)


class BrokenStore(MemoryStore):
    async def get_or_create(
        self, conversation_id: str, external_id: str | None, make: Maker
    ) -> tuple[Session, bool]:
        raise StoreUnavailable("the session store is unreachable")

    async def ping(self) -> bool:
        return False


def broken(cfg: Config, accept: Acceptor) -> SessionStore:
    return BrokenStore(ttl_seconds=1, max_sessions=1)


async def test_store_down_fails_closed_by_default_but_stateless_requests_work() -> None:
    mock = respx.MockRouter(assert_all_called=False)
    chat_route(mock)
    async with serve(config(), mock, broken) as client:
        sticky = await client.post(
            "/v1/chat/completions", json={"model": "gpt-4o", "conversation_id": "c"}
        )
        stateless = await client.post("/v1/chat/completions", json={"model": "gpt-4o"})
        ready = await client.get("/readyz")
    assert sticky.status_code == 503 and sticky.headers["retry-after"] == "1"
    assert sticky.json()["error"]["code"] == "session_store_unavailable"
    assert stateless.status_code == 200
    assert ready.status_code == 503


async def test_store_down_fails_open_when_configured() -> None:
    mock = respx.MockRouter(assert_all_called=False)
    chat_route(mock)
    async with serve(config(on_store_error="open"), mock, broken) as client:
        response = await client.post(
            "/v1/chat/completions", json={"model": "gpt-4o", "conversation_id": "c"}
        )
        ready = await client.get("/readyz")
    assert response.status_code == 200
    assert response.headers["x-sentinel-session"] == "degraded"
    assert ready.status_code == 200 and ready.json()["store"] == "unreachable"


async def test_fifty_concurrent_first_requests_reach_one_target(
    redis_url: str, redis_server: RedisServer
) -> None:
    mock = respx.MockRouter(assert_all_called=False)
    routes = [chat_route(mock, "a.test"), chat_route(mock, "b.test")]
    cfg = config(redis_url=Secret(redis_url))
    async with serve(cfg, mock) as client:
        for round_ in range(5):
            cid = f"new-{round_}"
            responses = await asyncio.gather(
                *(
                    client.post(
                        "/v1/chat/completions", json={"model": "fast", "conversation_id": cid}
                    )
                    for _ in range(50)
                )
            )
            targets = {
                (r.headers["x-sentinel-provider"], r.headers["x-sentinel-model"]) for r in responses
            }
            assert len(targets) == 1
            outcomes = sorted(r.headers["x-sentinel-session"] for r in responses)
            assert outcomes.count("created") == 1 and outcomes.count("hit") == 49
    sent = [orjson.loads(c.request.content)["model"] for r in routes for c in r.calls]
    assert len(sent) == 250
    with redis_server.client() as r:
        assert len(r.keys("sentinel:session:new-*")) == 5


async def test_operational_endpoints_and_unknown_paths() -> None:
    async with serve(config(), respx.MockRouter()) as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        assert (await client.get("/readyz")).json() == {"status": "ready", "store": "ok"}
        missing = await client.get("/v2/chat")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        assert (await client.get("/debug/session/x")).status_code == 404


async def test_debug_endpoints_need_the_token() -> None:
    token = "t" * 20
    cfg = config()
    cfg = Config(
        providers=cfg.providers,
        aliases=cfg.aliases,
        debug=type(cfg.debug)(enabled=True, token=Secret(token)),
    )
    mock = respx.MockRouter(assert_all_called=False)
    chat_route(mock, "a.test")
    chat_route(mock, "b.test")
    auth = {"authorization": f"Bearer {token}"}
    async with serve(cfg, mock) as client:
        await client.post("/v1/chat/completions", json={"model": "fast", "conversation_id": "c9"})
        assert (await client.get("/debug/session/c9")).status_code == 401
        bad = {"authorization": "Bearer " + "x" * 20}
        assert (await client.get("/debug/session/c9", headers=bad)).status_code == 401
        shown = await client.get("/debug/session/c9", headers=auth)
        assert shown.status_code == 200 and shown.json()["id"] == "c9"
        deleted = await client.delete("/debug/session/c9", headers=auth)
        assert deleted.json() == {"id": "c9", "deleted": True}
        assert (await client.get("/debug/session/c9", headers=auth)).status_code == 404
        too_long = await client.get("/debug/session/" + "x" * 257, headers=auth)
        assert too_long.status_code == 400
        assert too_long.json()["error"]["param"] == "conversation_id"


async def test_clients_leaving_mid_lookup_never_get_another_conversations_provider(
    redis_url: str,
) -> None:
    """The March 2023 incident, end to end: many conversations pinned to distinct providers,
    a third of the requests cancelled at random points (their Redis command in flight);
    every request that completes is served by its own conversation's provider."""
    providers = tuple(Provider(f"p{i}", f"http://p{i}.test/v1") for i in range(10))
    targets = tuple(Target(p.name, f"m-{p.name}") for p in providers)
    cfg = Config(
        providers=providers,
        aliases={"any": Alias("any", targets)},
        session=SessionConfig(redis_url=Secret(redis_url)),
    )
    mock = respx.MockRouter(assert_all_called=False)
    for provider in providers:
        chat_route(mock, f"{provider.name}.test")
    rng = random.Random(11)
    async with serve(cfg, mock) as client:

        async def ask(cid: str) -> str:
            response = await client.post(
                "/v1/chat/completions", json={"model": "any", "conversation_id": cid}
            )
            return response.headers["x-sentinel-provider"]

        pinned = {f"c{i}": await ask(f"c{i}") for i in range(100)}
        assert len(set(pinned.values())) > 1
        completed = 0
        for _ in range(5):
            tasks = {cid: asyncio.ensure_future(ask(cid)) for cid in pinned}
            loop = asyncio.get_running_loop()
            for task in rng.sample(list(tasks.values()), len(tasks) // 3):
                loop.call_later(rng.random() * 0.005, task.cancel)
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            for cid, task in tasks.items():
                if not task.cancelled():
                    assert task.result() == pinned[cid], cid
                    completed += 1
        assert completed >= 250


async def test_a_follow_up_without_model_is_served_by_its_pin() -> None:
    mock = respx.MockRouter(assert_all_called=False)
    routes = {"a": chat_route(mock, "a.test"), "b": chat_route(mock, "b.test")}
    async with serve(config(), mock) as client:
        first = await client.post(
            "/v1/chat/completions", json={"model": "fast", "conversation_id": "c1"}
        )
        pinned = first.headers["x-sentinel-provider"]
        follow_up = await client.post(
            "/v1/chat/completions", json={"messages": []}, headers={"x-conversation-id": "c1"}
        )
        unknown = await client.post(
            "/v1/chat/completions", json={"messages": []}, headers={"x-conversation-id": "c2"}
        )
    assert follow_up.status_code == 200
    assert follow_up.headers["x-sentinel-session"] == "hit"
    assert follow_up.headers["x-sentinel-provider"] == pinned
    expected_model = {"a": "m-a", "b": "m-b"}[pinned]
    assert sent_json(routes[pinned]) == {"model": expected_model, "messages": []}
    # Nothing to pin for a conversation that does not exist yet and names no model.
    assert unknown.status_code == 400
    assert unknown.json()["error"]["message"] == "model field is required"


async def test_a_model_that_cannot_be_a_header_is_refused_and_never_pinned() -> None:
    mock = respx.MockRouter(assert_all_called=False)
    route = chat_route(mock, "a.test")
    store = MemoryStore(ttl_seconds=60, max_sessions=10)
    async with serve(config(), mock, lambda cfg, accept: store) as client:
        bad = await client.post(
            "/v1/chat/completions", json={"model": "x\u0001", "conversation_id": "c"}
        )
        huge = await client.post(
            "/v1/chat/completions", json={"model": "m" * 10_000, "conversation_id": "c"}
        )
        stored = len(store)
        good = await client.post(
            "/v1/chat/completions", json={"model": "gpt-4o", "conversation_id": "c"}
        )
    assert (bad.status_code, huge.status_code) == (400, 400)
    assert bad.json()["error"]["param"] == "model"
    assert stored == 0 and route.call_count == 1
    assert good.status_code == 200 and good.headers["x-sentinel-session"] == "created"


async def test_an_empty_json_post_is_forwarded() -> None:
    mock = respx.MockRouter()
    route = mock.post("http://a.test/v1/batches/b1/cancel").mock(
        return_value=httpx.Response(200, json={"id": "b1", "status": "cancelling"})
    )
    async with serve(config(), mock) as client:
        response = await client.post(
            "/v1/batches/b1/cancel", headers={"content-type": "application/json"}
        )
    assert response.status_code == 200
    assert route.calls.last.request.content == b""


async def test_upstream_x_sentinel_headers_never_reach_the_client() -> None:
    mock = respx.MockRouter()
    chat_route(mock, headers={"x-sentinel-session": "forged", "x-sentinel-extra": "1"})
    async with serve(config(), mock) as client:
        response = await client.post("/v1/chat/completions", json={"model": "gpt-4o"})
    assert response.headers.get_list("x-sentinel-session") == ["none"]
    assert "x-sentinel-extra" not in response.headers


async def test_a_path_that_leaves_the_api_is_400_and_sends_nothing() -> None:
    mock = respx.MockRouter(assert_all_called=False)
    async with serve(config(), mock) as client:
        response = await client.get("/v1/%2e%2e/%2e%2e/admin")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_request"
    assert not mock.calls
