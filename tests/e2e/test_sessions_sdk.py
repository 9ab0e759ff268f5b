"""Sticky sessions end to end: the real proxy, a real (private) Redis, the openai SDK and a stub
behind two providers. Provider ``a`` serves model ``m-a`` and ``b`` serves ``m-b`` through the
alias ``fast``, so the model the stub receives tells which target was chosen."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from tests.support.proxy_process import (
    TEST_AUTH,
    OpenAIClientFactory,
    ProxyProcess,
    StartProxy,
)
from tests.support.redis_server import RedisServer
from tests.support.upstream_stub import UpstreamStub

pytestmark = pytest.mark.e2e

MESSAGES: list[Any] = [{"role": "user", "content": "Hello again."}]
TARGETS = {("a", "m-a"), ("b", "m-b")}


def sessions_config(redis_url: str, stub_base_url: str, session_extra: str = "") -> str:
    return f"""
[session]
redis_url = "{redis_url}"
{session_extra}

[[providers]]
name = "a"
base_url = "{stub_base_url}"

[[providers]]
name = "b"
base_url = "{stub_base_url}"

[models.fast]
targets = [
  {{ provider = "a", model = "m-a", weight = 1 }},
  {{ provider = "b", model = "m-b", weight = 1 }},
]
"""


@pytest.fixture
def proxy(start_proxy: StartProxy, redis_url: str, upstream: UpstreamStub) -> ProxyProcess:
    return start_proxy(sessions_config(redis_url, upstream.base_url))


def stored_session(redis_server: RedisServer, conversation_id: str) -> dict[str, Any] | None:
    with redis_server.client() as client:
        raw = client.get(f"sentinel:session:{conversation_id}")
    if raw is None:
        return None
    value: dict[str, Any] = json.loads(raw)
    return value


def assert_upstream_never_saw_conversation_ids(upstream: UpstreamStub) -> None:
    for received in upstream.requests:
        assert "x-conversation-id" not in received.header_names, received.headers
        if received.body:
            assert "conversation_id" not in received.json(), received.body


def test_conversation_id_in_body_pins_provider_and_model(
    proxy: ProxyProcess,
    upstream: UpstreamStub,
    redis_server: RedisServer,
    openai_client: OpenAIClientFactory,
) -> None:
    client = openai_client(proxy)
    before = time.time()

    first = client.chat.completions.with_raw_response.create(
        model="fast", messages=MESSAGES, extra_body={"conversation_id": "c1"}
    )

    assert first.headers["x-sentinel-session"] == "created"
    pinned = (first.headers["x-sentinel-provider"], first.headers["x-sentinel-model"])
    assert pinned in TARGETS
    assert first.parse().model == pinned[1]
    assert upstream.requests[-1].json()["model"] == pinned[1]

    # Without stickiness, 9 more requests would all land on the same target once in 512 runs.
    for requested in ["fast"] * 8 + ["gpt-4o"]:
        later = client.chat.completions.with_raw_response.create(
            model=requested, messages=MESSAGES, extra_body={"conversation_id": "c1"}
        )
        assert later.headers["x-sentinel-session"] == "hit", requested
        assert (later.headers["x-sentinel-provider"], later.headers["x-sentinel-model"]) == pinned
        assert upstream.requests[-1].json()["model"] == pinned[1], requested
        assert later.parse().model == pinned[1]

    session = stored_session(redis_server, "c1")
    assert session is not None, "no sentinel:session:c1 in Redis"
    assert {"id", "provider", "model", "external_id", "created_at"} <= set(session)
    assert session["id"] == "c1"
    assert (session["provider"], session["model"]) == pinned
    assert session["external_id"] is None
    assert isinstance(session["created_at"], int | float)
    assert before - 2 <= session["created_at"] <= time.time() + 2
    with redis_server.client() as redis_client:
        ttl = redis_client.ttl("sentinel:session:c1")
    assert 0 < ttl <= 86400
    assert len(upstream.requests) == 10
    assert_upstream_never_saw_conversation_ids(upstream)


def test_conversation_id_in_header_pins_provider_and_model(
    proxy: ProxyProcess,
    upstream: UpstreamStub,
    redis_server: RedisServer,
    openai_client: OpenAIClientFactory,
) -> None:
    client = openai_client(proxy)
    outcomes: list[str] = []
    targets: set[tuple[str, str]] = set()

    for requested in ["fast"] * 6 + ["gpt-4o"]:
        raw = client.chat.completions.with_raw_response.create(
            model=requested, messages=MESSAGES, extra_headers={"x-conversation-id": "c2"}
        )
        outcomes.append(raw.headers["x-sentinel-session"])
        targets.add((raw.headers["x-sentinel-provider"], raw.headers["x-sentinel-model"]))

    assert outcomes == ["created"] + ["hit"] * 6
    assert len(targets) == 1 and targets <= TARGETS
    [(provider, model)] = targets
    assert {received.json()["model"] for received in upstream.requests} == {model}
    session = stored_session(redis_server, "c2")
    assert session is not None and (session["provider"], session["model"]) == (provider, model)
    assert_upstream_never_saw_conversation_ids(upstream)


def test_same_id_in_header_and_body_is_accepted(
    proxy: ProxyProcess,
    upstream: UpstreamStub,
    redis_server: RedisServer,
    openai_client: OpenAIClientFactory,
) -> None:
    raw = openai_client(proxy).chat.completions.with_raw_response.create(
        model="fast",
        messages=MESSAGES,
        extra_headers={"x-conversation-id": "c-same"},
        extra_body={"conversation_id": "c-same"},
    )

    assert raw.headers["x-sentinel-session"] == "created"
    assert stored_session(redis_server, "c-same") is not None
    assert_upstream_never_saw_conversation_ids(upstream)


def test_different_ids_in_header_and_body_are_rejected(
    proxy: ProxyProcess,
    upstream: UpstreamStub,
    redis_server: RedisServer,
    openai_client: OpenAIClientFactory,
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client(proxy).chat.completions.create(
            model="fast",
            messages=MESSAGES,
            extra_headers={"x-conversation-id": "c3"},
            extra_body={"conversation_id": "c4"},
        )

    assert caught.value.status_code == 400
    assert upstream.requests == []
    with redis_server.client() as client:
        assert client.dbsize() == 0


def test_no_conversation_id_stores_nothing(
    proxy: ProxyProcess,
    upstream: UpstreamStub,
    redis_server: RedisServer,
    openai_client: OpenAIClientFactory,
) -> None:
    client = openai_client(proxy)
    seen: set[tuple[str, str]] = set()

    for _ in range(3):
        raw = client.chat.completions.with_raw_response.create(model="fast", messages=MESSAGES)
        assert raw.headers["x-sentinel-session"] == "none"
        seen.add((raw.headers["x-sentinel-provider"], raw.headers["x-sentinel-model"]))

    assert seen <= TARGETS
    assert len(upstream.requests) == 3
    with redis_server.client() as redis_client:
        assert redis_client.dbsize() == 0


def test_concurrent_first_requests_agree_on_one_target(
    proxy: ProxyProcess, upstream: UpstreamStub, redis_server: RedisServer
) -> None:
    parallel = 8
    barrier = threading.Barrier(parallel)
    results: list[tuple[int, str, str, str]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def one() -> None:
        try:
            with httpx.Client(trust_env=False, timeout=20.0) as client:
                barrier.wait(timeout=10.0)
                response = client.post(
                    f"{proxy.base_url}/chat/completions",
                    json={"model": "fast", "messages": MESSAGES, "conversation_id": "c-race"},
                    headers=TEST_AUTH,
                )
            with lock:
                results.append(
                    (
                        response.status_code,
                        response.headers.get("x-sentinel-session", ""),
                        response.headers.get("x-sentinel-provider", ""),
                        response.headers.get("x-sentinel-model", ""),
                    )
                )
        except BaseException as exc:  # reported below, in the test's thread
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(parallel)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30.0)

    assert not errors, errors
    assert len(results) == parallel
    assert {status for status, *_ in results} == {200}, results
    targets = {(provider, model) for _, _, provider, model in results}
    assert len(targets) == 1 and targets <= TARGETS, results
    assert {received.json()["model"] for received in upstream.requests} == {
        model for _, model in targets
    }
    assert sum(outcome == "created" for _, outcome, _, _ in results) <= 1, results
    session = stored_session(redis_server, "c-race")
    assert session is not None
    assert {(session["provider"], session["model"])} == targets


def post_chat(proxy: ProxyProcess, conversation_id: str | None, timeout: float) -> httpx.Response:
    body: dict[str, Any] = {"model": "fast", "messages": MESSAGES}
    if conversation_id is not None:
        body["conversation_id"] = conversation_id
    with httpx.Client(trust_env=False, timeout=timeout) as client:
        return client.post(f"{proxy.base_url}/chat/completions", json=body, headers=TEST_AUTH)


def assert_store_closed_answer(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert "retry-after" in response.headers, response.headers
    assert response.headers["retry-after"].strip().isdigit(), response.headers["retry-after"]
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    assert {"message", "type", "param", "code"} <= set(body["error"]), body


def with_redis_down(redis_server: RedisServer, how: str, check: Callable[[], None]) -> None:
    """Run ``check`` with the private Redis stopped (``how="stop"``) or frozen (``"pause"``)."""
    if how == "stop":
        redis_server.stop()
    else:
        redis_server.pause()
    try:
        check()
    finally:
        redis_server.ensure_running()


@pytest.mark.parametrize("how", ["stop", "pause"])
def test_store_down_closed_is_503_for_sessions_only(
    how: str,
    proxy: ProxyProcess,
    upstream: UpstreamStub,
    redis_server: RedisServer,
) -> None:
    def check() -> None:
        assert_store_closed_answer(post_chat(proxy, "c-down", timeout=20.0))
        stateless = post_chat(proxy, None, timeout=20.0)
        assert stateless.status_code == 200, stateless.text
        assert stateless.headers["x-sentinel-session"] == "none"
        # Only the request without a conversation id reached the upstream.
        [received] = upstream.requests
        assert "conversation_id" not in received.json()

    with_redis_down(redis_server, how, check)

    recovered = post_chat(proxy, "c-down", timeout=20.0)
    assert recovered.status_code == 200, recovered.text
    assert recovered.headers["x-sentinel-session"] == "created"
    assert stored_session(redis_server, "c-down") is not None


def test_store_down_open_routes_without_stickiness(
    start_proxy: StartProxy,
    redis_url: str,
    upstream: UpstreamStub,
    redis_server: RedisServer,
    openai_client: OpenAIClientFactory,
) -> None:
    proxy = start_proxy(sessions_config(redis_url, upstream.base_url, 'on_store_error = "open"'))
    client = openai_client(proxy)

    def check() -> None:
        raw = client.chat.completions.with_raw_response.create(
            model="fast", messages=MESSAGES, extra_body={"conversation_id": "c-open"}
        )
        assert raw.http_response.status_code == 200
        assert raw.headers["x-sentinel-session"] == "degraded"
        target = (raw.headers["x-sentinel-provider"], raw.headers["x-sentinel-model"])
        assert target in TARGETS
        assert raw.parse().model == target[1]

    with_redis_down(redis_server, "stop", check)

    [received] = upstream.requests
    assert "conversation_id" not in received.json()
    assert stored_session(redis_server, "c-open") is None


def test_a_model_that_is_no_alias_goes_to_the_first_provider_unchanged(
    proxy: ProxyProcess, upstream: UpstreamStub, openai_client: OpenAIClientFactory
) -> None:
    client = openai_client(proxy)

    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    models = client.models.with_raw_response.list()

    assert (raw.headers["x-sentinel-provider"], raw.headers["x-sentinel-model"]) == (
        "a",
        "gpt-4o",
    )
    assert models.headers["x-sentinel-provider"] == "a"
    assert [received.json()["model"] for received in upstream.requests[:1]] == ["gpt-4o"]


def test_a_request_without_model_or_conversation_id_is_400(
    proxy: ProxyProcess, upstream: UpstreamStub
) -> None:
    with httpx.Client(trust_env=False, timeout=20.0) as client:
        response = client.post(
            f"{proxy.base_url}/chat/completions", json={"messages": MESSAGES}, headers=TEST_AUTH
        )

    assert response.status_code == 400, response.text
    assert "model field is required" in response.json()["error"]["message"]
    assert upstream.requests == []
