"""Users, tiers, endpoint kinds and failover through the proxy route, with respx upstreams."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
import orjson
import pytest
import respx

from sentinel_proxy.app import create_app
from sentinel_proxy.config import (
    Alias,
    Config,
    Provider,
    RoutingConfig,
    Secret,
    SessionConfig,
    Target,
    User,
)
from sentinel_proxy.identity import Identity
from sentinel_proxy.routing import Router
from sentinel_proxy.sessions import MemoryStore, Session, SessionStore

A = Provider("a", "http://a.test/v1", Secret("sk-a"))
B = Provider("b", "http://b.test/v1", Secret("sk-b"))
CHAT = {"id": "chatcmpl-1", "object": "chat.completion", "choices": []}
ALIASES = {
    "fast": Alias("fast", (Target("a", "m-a"), Target("b", "m-b"))),
    "strict": Alias("strict", (Target("a", "m-a"), Target("b", "m-b")), "error"),
    "embed": Alias("embed", (Target("a", "e-a"),)),
}


def config(**changes: object) -> Config:
    settings: dict[str, object] = {"providers": (A, B), "aliases": ALIASES}
    settings.update(changes)
    return Config(**settings)  # type: ignore[arg-type]


@asynccontextmanager
async def serve(
    cfg: Config, mock: respx.MockRouter, store: SessionStore | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    async def handler(request: httpx.Request) -> httpx.Response:
        mocked = await mock.async_handler(request)
        body = httpx.ByteStream(mocked.content)
        return httpx.Response(mocked.status_code, headers=mocked.headers, stream=body)

    def factory(cfg: Config, router: Router) -> SessionStore:
        return store if store is not None else MemoryStore(ttl_seconds=60, max_sessions=100)

    # rand 0.0: an alias picks its first target, and a replacement the first other one.
    app = create_app(
        cfg, transport=httpx.MockTransport(handler), store_factory=factory, rand=lambda: 0.0
    )
    async with app.starlette.router.lifespan_context(app.starlette):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
            yield client


def chat(mock: respx.MockRouter, host: str, **response: object) -> respx.Route:
    response.setdefault("json", CHAT)
    status = response.pop("status_code", 200)
    return mock.post(f"http://{host}/v1/chat/completions").mock(
        return_value=httpx.Response(status, **response)  # type: ignore[arg-type]
    )


def failing(mock: respx.MockRouter, host: str, error: Exception) -> respx.Route:
    return mock.post(f"http://{host}/v1/chat/completions").mock(side_effect=error)


Outcome = Callable[[], object]


@pytest.mark.parametrize(
    "break_a",
    [
        lambda mock: failing(mock, "a.test", httpx.ConnectError("refused")),
        lambda mock: failing(mock, "a.test", httpx.ReadTimeout("slow")),
        lambda mock: chat(mock, "a.test", status_code=503, json={"error": {"message": "down"}}),
        lambda mock: chat(mock, "a.test", status_code=500, json={"error": {"message": "boom"}}),
    ],
)
async def test_a_failing_target_fails_over_and_the_pin_moves(
    break_a: Callable[[respx.MockRouter], respx.Route],
) -> None:
    mock = respx.MockRouter()
    to_a = break_a(mock)
    to_b = chat(mock, "b.test")
    store = MemoryStore(ttl_seconds=60, max_sessions=10)
    await store.get_or_create("c1", None, lambda: Session("c1", "a", "m-a", 1))
    async with serve(config(), mock, store) as client:
        response = await client.post(
            "/v1/chat/completions", json={"model": "fast", "conversation_id": "c1"}
        )
        moved = await store.get("c1")
        again = await client.post(
            "/v1/chat/completions", json={"model": "fast", "conversation_id": "c1"}
        )
    assert response.status_code == 200 and response.json() == CHAT
    assert response.headers["x-sentinel-failover"] == "a"
    assert (response.headers["x-sentinel-provider"], response.headers["x-sentinel-model"]) == (
        "b",
        "m-b",
    )
    assert response.headers["x-sentinel-session"] == "hit"
    assert moved is not None and (moved.provider, moved.model) == ("b", "m-b")
    assert orjson.loads(to_b.calls[0].request.content)["model"] == "m-b"
    assert to_b.calls[0].request.headers["authorization"] == "Bearer sk-b"
    # The next request goes to the new pin straight away.
    assert (
        again.headers["x-sentinel-provider"] == "b" and "x-sentinel-failover" not in again.headers
    )
    assert to_a.call_count == 1 and to_b.call_count == 2


async def test_at_most_two_upstreams_and_the_second_answer_goes_back() -> None:
    mock = respx.MockRouter()
    to_a = failing(mock, "a.test", httpx.ConnectError("refused"))
    to_b = chat(mock, "b.test", status_code=502, json={"error": {"message": "b is down"}})
    async with serve(config(), mock) as client:
        response = await client.post("/v1/chat/completions", json={"model": "fast"})
    assert response.status_code == 502 and response.json()["error"]["message"] == "b is down"
    assert response.headers["x-sentinel-failover"] == "a"
    assert to_a.call_count == 1 and to_b.call_count == 1


async def test_a_model_that_is_no_alias_gets_the_upstream_answer() -> None:
    mock = respx.MockRouter()
    to_a = chat(mock, "a.test", status_code=500, json={"error": {"message": "a says no"}})
    async with serve(config(), mock) as client:
        response = await client.post("/v1/chat/completions", json={"model": "gpt-4o"})
    assert response.status_code == 500 and response.json()["error"]["message"] == "a says no"
    assert "x-sentinel-failover" not in response.headers and to_a.call_count == 1


async def test_an_alias_that_says_error_answers_503_and_keeps_the_pin() -> None:
    mock = respx.MockRouter(assert_all_called=False)
    failing(mock, "a.test", httpx.ConnectError("refused"))
    to_b = chat(mock, "b.test")
    store = MemoryStore(ttl_seconds=60, max_sessions=10)
    async with serve(config(), mock, store) as client:
        response = await client.post(
            "/v1/chat/completions", json={"model": "strict", "conversation_id": "c2"}
        )
        kept = await store.get("c2")
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "target_unavailable"
    assert kept is not None and kept.provider == "a" and not to_b.called


async def test_an_ejected_pin_moves_before_its_target_is_tried() -> None:
    mock = respx.MockRouter()
    to_a = failing(mock, "a.test", httpx.ConnectError("refused"))
    to_b = chat(mock, "b.test")
    store = MemoryStore(ttl_seconds=60, max_sessions=10)
    await store.get_or_create("old", None, lambda: Session("old", "a", "m-a", 1))
    cfg = config(routing=RoutingConfig(eject_after_failures=1, eject_seconds=60))
    async with serve(cfg, mock, store) as client:
        first = await client.post("/v1/chat/completions", json={"model": "fast"})
        pinned = await client.post(
            "/v1/chat/completions", json={"model": "fast", "conversation_id": "old"}
        )
    assert first.headers["x-sentinel-failover"] == "a"
    assert pinned.status_code == 200 and pinned.headers["x-sentinel-failover"] == "a"
    assert pinned.headers["x-sentinel-provider"] == "b"
    assert to_a.call_count == 1 and to_b.call_count == 2


async def test_pins_belong_to_generation_endpoints_only() -> None:
    mock = respx.MockRouter()
    chat(mock, "a.test")
    embeddings = mock.post("http://a.test/v1/embeddings").mock(
        return_value=httpx.Response(200, json={"data": []})
    )
    store = MemoryStore(ttl_seconds=60, max_sessions=10)
    async with serve(config(), mock, store) as client:
        await client.post("/v1/chat/completions", json={"model": "fast", "conversation_id": "c"})
        response = await client.post(
            "/v1/embeddings", json={"model": "embed", "input": "x", "conversation_id": "c"}
        )
        only_embeddings = await client.post(
            "/v1/embeddings", json={"model": "embed", "input": "x", "conversation_id": "e"}
        )
        pinned = await store.get("c")
        stored = len(store)
    assert response.status_code == only_embeddings.status_code == 200
    assert response.headers["x-sentinel-session"] == "none"
    assert response.headers["x-sentinel-model"] == "e-a"
    assert orjson.loads(embeddings.calls[0].request.content) == {"model": "e-a", "input": "x"}
    assert pinned is not None and pinned.model == "m-a"
    assert stored == 1


def key_hash(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


USERS = (
    User("team-a", key_hash("sk-team-a"), "strict", frozenset({"strict", "fast"})),
    User("team-b", key_hash("sk-team-b")),
)


async def test_users_are_authenticated_and_limited_to_their_models() -> None:
    mock = respx.MockRouter(assert_all_called=False)
    to_a = chat(mock, "a.test")
    cfg = config(users=USERS, routing=RoutingConfig(default_model="fast"))
    async with serve(cfg, mock) as client:
        anonymous = await client.post("/v1/chat/completions", json={"model": "fast"})
        wrong = await client.post(
            "/v1/chat/completions",
            json={"model": "fast"},
            headers={"authorization": "Bearer sk-nobody"},
        )
        models = await client.get("/v1/models")
        forbidden = await client.post(
            "/v1/chat/completions",
            json={"model": "gpt-4o"},
            headers={"authorization": "Bearer sk-team-a"},
        )
        allowed = await client.post(
            "/v1/chat/completions",
            json={"messages": []},
            headers={"authorization": "Bearer sk-team-a"},
        )
    assert anonymous.status_code == wrong.status_code == models.status_code == 401
    assert wrong.json()["error"]["code"] == "invalid_api_key"
    assert forbidden.status_code == 403 and forbidden.json()["error"]["param"] == "model"
    assert allowed.status_code == 200
    # team-a's tier is strict: its first target, with the provider's key, never the client's.
    sent = to_a.calls.last.request
    assert orjson.loads(sent.content) == {"model": "m-a", "messages": []}
    assert sent.headers.get_list("authorization") == ["Bearer sk-a"]
    assert to_a.call_count == 1


async def test_two_users_with_one_conversation_id_have_two_sessions() -> None:
    mock = respx.MockRouter(assert_all_called=False)
    chat(mock, "a.test")
    chat(mock, "b.test")
    store = MemoryStore(ttl_seconds=60, max_sessions=10)
    await store.get_or_create(
        "shared", "team-b", lambda: Session("shared", "b", "m-b", 1, "team-b")
    )
    cfg = config(users=USERS)
    async with serve(cfg, mock, store) as client:
        team_a = await client.post(
            "/v1/chat/completions",
            json={"model": "fast", "conversation_id": "shared"},
            headers={"authorization": "Bearer sk-team-a"},
        )
        team_b = await client.post(
            "/v1/chat/completions",
            json={"model": "fast", "conversation_id": "shared"},
            headers={"authorization": "Bearer sk-team-b"},
        )
        mine = await store.get("shared", "team-a")
    assert team_a.headers["x-sentinel-session"] == "created"
    assert team_a.headers["x-sentinel-provider"] == "a"
    assert team_b.headers["x-sentinel-session"] == "hit"
    assert team_b.headers["x-sentinel-provider"] == "b"
    assert mine is not None and mine.external_id == "team-a"


async def test_a_request_naming_no_model_goes_by_the_default_tier_or_is_400() -> None:
    mock = respx.MockRouter()
    to_a = chat(mock, "a.test")
    async with serve(config(routing=RoutingConfig(default_model="fast")), mock) as client:
        routed = await client.post("/v1/chat/completions", json={"messages": []})
    async with serve(config(), respx.MockRouter()) as client:
        refused = await client.post("/v1/chat/completions", json={"messages": []})
    assert (
        routed.status_code == 200 and orjson.loads(to_a.calls[0].request.content)["model"] == "m-a"
    )
    assert refused.status_code == 400
    assert refused.json()["error"]["message"] == "model field is required"


async def test_a_re_pinned_implicit_session_stays_implicit() -> None:
    mock = respx.MockRouter(assert_all_called=False)
    to_a = chat(mock, "a.test")
    chat(mock, "b.test")
    implicit = Alias("fast", ALIASES["fast"].targets, implicit_sessions=True)
    cfg = config(
        aliases={**ALIASES, "fast": implicit},
        session=SessionConfig(hash_key=Secret("k" * 32)),
    )
    store = MemoryStore(ttl_seconds=60, max_sessions=10)
    body = {"model": "fast", "messages": [{"role": "user", "content": "hi"}]}
    implicit_id = Identity(b"k" * 32).implicit_id(None, body)
    assert implicit_id is not None
    async with serve(cfg, mock, store) as client:
        first = await client.post("/v1/chat/completions", json=body)
        before = await store.get(implicit_id)
        to_a.mock(side_effect=httpx.ConnectError("refused"))
        moved = await client.post("/v1/chat/completions", json=body)
        after = await store.get(implicit_id)
        stored = len(store)
    assert first.headers["x-sentinel-session-source"] == "implicit"
    assert first.headers["x-sentinel-session"] == "created"
    assert moved.headers["x-sentinel-session-source"] == "implicit"
    assert moved.headers["x-sentinel-failover"] == "a"
    assert before is not None and before.provider == "a"
    assert after is not None and after.provider == "b" and stored == 1
