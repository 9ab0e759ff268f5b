"""Tiers, users and failover against the real process: two upstream stubs as two providers,
the private Redis, the `openai` SDK."""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.support.proxy_process import OpenAIClientFactory, StartProxy
from tests.support.redis_server import RedisServer
from tests.support.upstream_stub import UpstreamStub

pytestmark = pytest.mark.e2e

MESSAGES: list[Any] = [{"role": "user", "content": "Say hello."}]
KEYS = {"PROVIDER_A_KEY": "sk-provider-a", "PROVIDER_B_KEY": "sk-provider-b"}


def sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def config(
    a: UpstreamStub, b: UpstreamStub, redis_url: str, *, users: bool = False, extra: str = ""
) -> str:
    text = (
        f'[session]\nredis_url = "{redis_url}"\n'
        '[routing]\ndefault_model = "fast"\n'
        f'[[providers]]\nname = "a"\nbase_url = "{a.base_url}"\napi_key_env = "PROVIDER_A_KEY"\n'
        f'[[providers]]\nname = "b"\nbase_url = "{b.base_url}"\napi_key_env = "PROVIDER_B_KEY"\n'
        "[models.fast]\ntargets = [\n"
        '  { provider = "a", model = "m-a", weight = 3 },\n'
        '  { provider = "b", model = "m-b", weight = 1 },\n]\n'
        "[models.smart]\ntargets = [\n"
        '  { provider = "a", model = "big-a" },\n  { provider = "b", model = "big-b" },\n]\n'
    )
    if users:
        text += (
            f'[[users]]\nexternal_id = "team-a"\nkey_sha256 = "{sha256("sk-team-a")}"\n'
            'tier = "smart"\nmodels = ["smart", "fast"]\n'
            f'[[users]]\nexternal_id = "team-b"\nkey_sha256 = "{sha256("sk-team-b")}"\n'
        )
    return text + extra


def test_weights_are_honoured(
    start_proxy: StartProxy,
    upstream: UpstreamStub,
    second_upstream: UpstreamStub,
    redis_url: str,
    openai_client: OpenAIClientFactory,
) -> None:
    proxy = start_proxy(config(upstream, second_upstream, redis_url), env=KEYS)
    client = openai_client(proxy)
    counts: Counter[str] = Counter()
    for _ in range(400):
        raw = client.chat.completions.with_raw_response.create(model="fast", messages=MESSAGES)
        counts[raw.headers["x-sentinel-provider"]] += 1
    # 3:1 over 400 draws: 300 expected for a; outside 255..345 has odds below one in 10^6.
    assert 255 <= counts["a"] <= 345 and counts["a"] + counts["b"] == 400
    assert len(upstream.requests) == counts["a"] and len(second_upstream.requests) == counts["b"]


def test_users_get_401_403_and_sessions_of_their_own(
    start_proxy: StartProxy,
    upstream: UpstreamStub,
    second_upstream: UpstreamStub,
    redis_url: str,
    redis_server: RedisServer,
    openai_client: OpenAIClientFactory,
) -> None:
    proxy = start_proxy(config(upstream, second_upstream, redis_url, users=True), env=KEYS)
    with pytest.raises(openai.AuthenticationError):
        openai_client(proxy, api_key="sk-nobody").models.list()
    team_a = openai_client(proxy, api_key="sk-team-a")
    team_b = openai_client(proxy, api_key="sk-team-b")
    with pytest.raises(openai.PermissionDeniedError):
        team_a.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    pinned = {}
    for name, client in (("team-a", team_a), ("team-b", team_b)):
        # No model (the SDK's create() insists on one): team-a's tier, smart; team-b the
        # default, fast.
        raw = client.post(
            "/chat/completions",
            body={"messages": MESSAGES, "conversation_id": "shared"},
            cast_to=httpx.Response,
        )
        assert raw.status_code == 200
        assert raw.headers["x-sentinel-session"] == "created"
        pinned[name] = (raw.headers["x-sentinel-provider"], raw.headers["x-sentinel-model"])
    with redis_server.client() as redis:
        keys = sorted(key.decode() for key in redis.keys("sentinel:session:*"))
        stored = {key: orjson.loads(redis.get(key)) for key in keys}
    assert keys == ["sentinel:session:team-a:shared", "sentinel:session:team-b:shared"]
    for name in ("team-a", "team-b"):
        value = stored[f"sentinel:session:{name}:shared"]
        assert value["external_id"] == name and value["id"] == "shared"
        assert (value["provider"], value["model"]) == pinned[name]
    assert pinned["team-a"][1] in ("big-a", "big-b") and pinned["team-b"][1] in ("m-a", "m-b")
    # The client's key never went upstream: each provider got its own.
    for stub, key in ((upstream, "sk-provider-a"), (second_upstream, "sk-provider-b")):
        assert {r.header("authorization") for r in stub.requests} <= {f"Bearer {key}"}


def test_a_stopped_provider_fails_over_and_the_pin_moves_in_redis(
    start_proxy: StartProxy,
    upstream: UpstreamStub,
    second_upstream: UpstreamStub,
    redis_url: str,
    redis_server: RedisServer,
    openai_client: OpenAIClientFactory,
) -> None:
    proxy = start_proxy(config(upstream, second_upstream, redis_url), env=KEYS)
    client = openai_client(proxy)
    with redis_server.client() as redis:
        redis.set(
            "sentinel:session:moving",
            orjson.dumps(
                {
                    "id": "moving",
                    "provider": "a",
                    "model": "m-a",
                    "external_id": None,
                    "created_at": 1,
                }
            ),
            ex=600,
        )
    upstream.stop()
    raw = client.chat.completions.with_raw_response.create(
        model="fast", messages=MESSAGES, extra_body={"conversation_id": "moving"}
    )
    assert raw.parse().model == "m-b"
    assert raw.headers["x-sentinel-failover"] == "a"
    assert raw.headers["x-sentinel-provider"] == "b"
    with redis_server.client() as redis:
        moved = orjson.loads(redis.get("sentinel:session:moving"))
    assert (moved["provider"], moved["model"]) == ("b", "m-b")
    assert [r.json()["model"] for r in second_upstream.requests] == ["m-b"]
    assert "failing over from a/m-a to b/m-b" in proxy.log_text()


def test_a_stream_that_broke_after_a_byte_is_never_sent_again(
    start_proxy: StartProxy,
    upstream: UpstreamStub,
    second_upstream: UpstreamStub,
    redis_url: str,
    openai_client: OpenAIClientFactory,
) -> None:
    proxy = start_proxy(config(upstream, second_upstream, redis_url), env=KEYS)
    upstream.break_stream(after_events=2)
    second_upstream.break_stream(after_events=2)
    client = openai_client(proxy)
    # The SDK meets the truncated body as httpx does: the connection ended mid-body.
    with pytest.raises(httpx.RemoteProtocolError):
        stream = client.chat.completions.create(
            model="fast", messages=MESSAGES, stream=True, extra_body={"conversation_id": "s1"}
        )
        for _ in stream:
            pass
    # One upstream got the request and broke off mid-stream; the other never saw it.
    assert len(upstream.requests) + len(second_upstream.requests) == 1
