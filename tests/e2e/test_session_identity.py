"""Where the conversation id comes from: ordered sources, implicit sessions across replicas,
prompt-cache keys. The real process, two upstream stubs, the private Redis."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest

from tests.support.proxy_process import TEST_AUTH, OpenAIClientFactory, StartProxy
from tests.support.redis_server import RedisServer
from tests.support.upstream_stub import UpstreamStub

pytestmark = pytest.mark.e2e

HASH_KEY = {"SENTINEL_IMPLICIT_KEY": "replicas-share-this-key-0123456789"}
SYSTEM = {"role": "system", "content": "You are the secret-system-prompt assistant."}
FIRST = {"role": "user", "content": "my-private-first-message"}


def config(a: UpstreamStub, b: UpstreamStub, redis_url: str, extra: str = "") -> str:
    return (
        f'[session]\nredis_url = "{redis_url}"\nimplicit_key_env = "SENTINEL_IMPLICIT_KEY"\n'
        'id_sources = ["header:x-session-id", "body:conversation_id", '
        '"header:x-conversation-id", "body:prompt_cache_key", "body:user"]\n'
        f'[[providers]]\nname = "a"\nbase_url = "{a.base_url}"\nforward_client_key = true\n'
        f'[[providers]]\nname = "b"\nbase_url = "{b.base_url}"\nforward_client_key = true\n'
        "[models.fast]\nimplicit_sessions = true\ntargets = [\n"
        '  { provider = "a", model = "m-a" },\n  { provider = "b", model = "m-b" },\n]\n' + extra
    )


def post(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
    with httpx.Client(trust_env=False, timeout=20) as client:
        return client.post(
            f"{url}/chat/completions", json=body, headers={**TEST_AUTH, **(headers or {})}
        )


@pytest.mark.parametrize(
    ("body", "headers", "source", "forwarded"),
    [
        ({}, {"x-session-id": "agent-7"}, "header:x-session-id", {"x-session-id": "agent-7"}),
        ({"conversation_id": "c-7"}, {}, "body:conversation_id", {}),
        ({}, {"x-conversation-id": "c-8"}, "header:x-conversation-id", {}),
        ({"prompt_cache_key": "pck-7"}, {}, "body:prompt_cache_key", {}),
        ({"user": "end-user-7"}, {}, "body:user", {}),
    ],
)
def test_each_source_pins_and_is_forwarded_or_removed_as_stated(
    start_proxy: StartProxy,
    upstream: UpstreamStub,
    second_upstream: UpstreamStub,
    redis_url: str,
    body: dict[str, Any],
    headers: dict[str, str],
    source: str,
    forwarded: dict[str, str],
) -> None:
    proxy = start_proxy(config(upstream, second_upstream, redis_url), env=HASH_KEY)
    answers = [
        post(proxy.base_url, {"model": "fast", "messages": [FIRST], **body}, headers)
        for _ in range(6)
    ]
    assert [a.headers["x-sentinel-session"] for a in answers] == ["created"] + ["hit"] * 5
    assert {a.headers["x-sentinel-session-source"] for a in answers} == {source}
    assert len({a.headers["x-sentinel-provider"] for a in answers}) == 1
    received = upstream.requests + second_upstream.requests
    assert len(received) == 6
    for request in received:
        sent = request.json()
        assert "conversation_id" not in sent and "x-conversation-id" not in request.header_names
        for name, value in forwarded.items():
            assert request.header(name) == value
        for name in ("prompt_cache_key", "user"):
            if name in body:
                assert sent[name] == body[name]


def test_the_configured_order_decides(
    start_proxy: StartProxy, upstream: UpstreamStub, second_upstream: UpstreamStub, redis_url: str
) -> None:
    proxy = start_proxy(config(upstream, second_upstream, redis_url), env=HASH_KEY)
    answer = post(
        proxy.base_url,
        {"model": "fast", "messages": [FIRST], "conversation_id": "body-id", "user": "u"},
        {"x-session-id": "header-id"},
    )
    assert answer.headers["x-sentinel-session-source"] == "header:x-session-id"
    # The body's conversation_id is the proxy's field: removed though it did not win.
    assert "conversation_id" not in (upstream.requests + second_upstream.requests)[0].json()


def test_implicit_sessions_hold_across_replicas_and_store_no_prompt(
    start_proxy: StartProxy,
    upstream: UpstreamStub,
    second_upstream: UpstreamStub,
    redis_url: str,
    redis_server: RedisServer,
    openai_client: OpenAIClientFactory,
) -> None:
    text = config(upstream, second_upstream, redis_url)
    replicas = [start_proxy(text, env=HASH_KEY), start_proxy(text, env=HASH_KEY)]
    history: list[Any] = [SYSTEM, FIRST]
    providers = []
    for turn in range(6):
        client = openai_client(replicas[turn % 2])
        raw = client.chat.completions.with_raw_response.create(model="fast", messages=history)
        assert raw.headers["x-sentinel-session-source"] == "implicit"
        assert raw.headers["x-sentinel-session"] == ("created" if turn == 0 else "hit")
        providers.append(raw.headers["x-sentinel-provider"])
        history += [
            {"role": "assistant", "content": raw.parse().choices[0].message.content},
            {"role": "user", "content": f"turn {turn}"},
        ]
    assert len(set(providers)) == 1
    with redis_server.client() as redis:
        (key,) = redis.keys("sentinel:session:*")
        value = redis.get(key)
    assert key.startswith(b"sentinel:session:implicit-")
    for secret in (b"secret-system-prompt", b"my-private-first-message", b"turn"):
        assert secret not in key and secret not in value
    assert orjson.loads(value)["id"] == key.decode().removeprefix("sentinel:session:")


def test_prompt_caching_follows_the_pin_and_leaves_a_client_key_alone(
    start_proxy: StartProxy, upstream: UpstreamStub, second_upstream: UpstreamStub, redis_url: str
) -> None:
    text = config(upstream, second_upstream, redis_url).replace(
        "forward_client_key = true\n", "forward_client_key = true\nprompt_cache = true\n"
    )
    proxy = start_proxy(text, env=HASH_KEY)
    for _ in range(3):
        post(proxy.base_url, {"model": "fast", "messages": [FIRST], "conversation_id": "t-1"})
    post(proxy.base_url, {"model": "fast", "messages": [FIRST], "conversation_id": "t-2"})
    post(
        proxy.base_url,
        {"model": "fast", "messages": [FIRST], "conversation_id": "t-3", "prompt_cache_key": "own"},
    )
    sent = [
        r.json()
        for r in sorted(upstream.requests + second_upstream.requests, key=lambda r: r.received_at)
    ]
    keys = [body.get("prompt_cache_key") for body in sent]
    assert keys[0] == keys[1] == keys[2] and len(keys[0]) == 32 and "t-1" not in keys[0]
    assert keys[3] not in (None, keys[0])
    assert keys[4] == "own"
