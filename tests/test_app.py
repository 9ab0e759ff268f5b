"""Reloading the app's configuration in-process: new requests use the new one, a request in
flight keeps the one it began with, the session store and its pins stay."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson

from sentinel_proxy.app import Gateway, create_app
from sentinel_proxy.config import (
    Alias,
    Config,
    DebugConfig,
    Provider,
    Secret,
    SessionConfig,
    Target,
)
from sentinel_proxy.sessions import MemoryStore, SessionStore
from sentinel_proxy.sessions.base import Acceptor

A = Provider("a", "http://a.test/v1")
B = Provider("b", "http://b.test/v1")
TOKEN = "debug-token-0123456789"


def config(*providers: Provider, target: str, **session: Any) -> Config:
    """`providers`, and the alias `fast` that sends everything to provider `target`."""
    alias = Alias("fast", (Target(target, f"m-{target}"),))
    return Config(providers=providers, aliases={"fast": alias}, session=SessionConfig(**session))


@asynccontextmanager
async def running(cfg: Config) -> AsyncIterator[tuple[Gateway, httpx.AsyncClient, MemoryStore]]:
    """The app serving `cfg` (answers name the upstream host), a client, and its store."""
    stores: list[MemoryStore] = []

    def factory(cfg: Config, accept: Acceptor) -> SessionStore:
        stores.append(
            MemoryStore(ttl_seconds=cfg.session.ttl_seconds, max_sessions=10, accept=accept)
        )
        return stores[0]

    def upstream(request: httpx.Request) -> httpx.Response:
        body = httpx.ByteStream(orjson.dumps({"host": request.url.host}))
        return httpx.Response(200, headers={"content-type": "application/json"}, stream=body)

    app = create_app(cfg, transport=httpx.MockTransport(upstream), store_factory=factory)
    async with app.starlette.router.lifespan_context(app.starlette):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
            yield app, client, stores[0]


def chat(client: httpx.AsyncClient, conversation_id: str | None = None) -> Any:
    body: dict[str, Any] = {"model": "fast", "messages": []}
    if conversation_id is not None:
        body["conversation_id"] = conversation_id
    return client.post("/v1/chat/completions", json=body)


class Held:
    """A request that has reached the proxy and waits there, before its body, until let go."""

    def __init__(self, client: httpx.AsyncClient, conversation_id: str | None = None) -> None:
        self.entered = asyncio.Event()
        self._release = asyncio.Event()
        body = {"model": "fast", "messages": [], "conversation_id": conversation_id}

        async def chunks() -> AsyncIterator[bytes]:
            self.entered.set()  # the proxy reads the body: it has picked its configuration
            await self._release.wait()
            yield orjson.dumps(body)

        self.task = asyncio.create_task(
            client.post(
                "/v1/chat/completions",
                content=chunks(),
                headers={"content-type": "application/json"},
            )
        )

    async def finish(self) -> httpx.Response:
        self._release.set()
        return await self.task


async def test_a_request_in_flight_finishes_on_the_configuration_it_began_with() -> None:
    async with running(config(A, target="a")) as (app, client, _):
        held = Held(client)
        await held.entered.wait()
        app.reload(config(A, B, target="b"))
        fresh = await chat(client)
        old = await held.finish()
    assert (fresh.headers["x-sentinel-provider"], fresh.json()["host"]) == ("b", "b.test")
    assert (old.headers["x-sentinel-provider"], old.json()["host"]) == ("a", "a.test")
    assert old.headers["x-sentinel-model"] == "m-a"


async def test_a_pin_stays_while_its_provider_does_and_is_replaced_once_it_is_gone() -> None:
    async with running(config(A, target="a")) as (app, client, _):
        first = await chat(client, "c1")
        app.reload(config(A, B, target="b"))
        kept = await chat(client, "c1")
        app.reload(config(B, target="b"))
        replaced = await chat(client, "c1")
    assert (first.headers["x-sentinel-session"], first.json()["host"]) == ("created", "a.test")
    assert (kept.headers["x-sentinel-session"], kept.json()["host"]) == ("hit", "a.test")
    assert replaced.status_code == 200
    assert (replaced.headers["x-sentinel-session"], replaced.json()["host"]) == (
        "created",
        "b.test",
    )


async def test_a_request_older_than_its_conversation_s_new_pin_is_told_to_retry() -> None:
    # Its configuration lacks the provider that a request after the reload pinned.
    async with running(config(A, target="a")) as (app, client, _):
        await chat(client, "c1")
        held = Held(client, "c1")
        await held.entered.wait()
        app.reload(config(B, target="b"))
        repinned = await chat(client, "c1")
        old = await held.finish()
        retried = await chat(client, "c1")
    assert repinned.headers["x-sentinel-session"] == "created"
    assert old.status_code == 503 and old.headers["retry-after"] == "1"
    assert old.json()["error"]["code"] == "configuration_changed"
    assert (retried.headers["x-sentinel-session"], retried.json()["host"]) == ("hit", "b.test")


async def test_a_reload_sets_the_ttl_of_sessions_from_their_next_request() -> None:
    async with running(config(A, target="a", ttl_seconds=60)) as (app, client, store):
        await chat(client, "c1")
        before = store.ttl("c1")
        app.reload(config(A, target="a", ttl_seconds=5000))
        await chat(client, "c1")
        after = store.ttl("c1")
    assert before is not None and 59 < before <= 60
    assert after is not None and 4999 < after <= 5000


async def test_a_reload_can_enable_the_debug_endpoint() -> None:
    async with running(config(A, target="a")) as (app, client, _):
        headers = {"authorization": f"Bearer {TOKEN}"}
        before = await client.delete("/debug/session/c1", headers=headers)
        debug = DebugConfig(enabled=True, token=Secret(TOKEN))
        app.reload(Config(providers=(A,), debug=debug))
        after = await client.delete("/debug/session/c1", headers=headers)
    assert before.status_code == 404
    assert before.json()["error"]["message"] == (
        "No route for /debug/session/c1; the API is under /v1."
    )
    assert (after.status_code, after.json()) == (200, {"id": "c1", "deleted": False})
