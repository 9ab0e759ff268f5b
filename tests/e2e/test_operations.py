"""Operating the real proxy: health, readiness, metrics, logs, the debug endpoint, and the
environment variables of CONTRACT.md ("Running it", "Operating it")."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import httpx
import pytest

from tests.support.proxy_process import TEST_AUTH, ProxyProcess, StartProxy
from tests.support.redis_server import RedisServer
from tests.support.upstream_stub import UpstreamStub

pytestmark = pytest.mark.e2e

MESSAGES: list[Any] = [{"role": "user", "content": "Hi."}]
DEBUG_TOKEN = "debug-token-0123456789abcdef"


def stub_config(upstream: UpstreamStub, extra: str = "") -> str:
    return f'{extra}\n[[providers]]\nname = "stub"\nbase_url = "{upstream.base_url}"\n'


def chat(
    proxy: ProxyProcess, conversation_id: str | None = None, model: str = "gpt-4o-mini"
) -> httpx.Response:
    body: dict[str, Any] = {"model": model, "messages": MESSAGES}
    if conversation_id is not None:
        body["conversation_id"] = conversation_id
    with httpx.Client(trust_env=False, timeout=20.0) as client:
        return client.post(f"{proxy.base_url}/chat/completions", json=body, headers=TEST_AUTH)


def get(url: str, headers: dict[str, str] | None = None) -> httpx.Response:
    with httpx.Client(trust_env=False, timeout=20.0) as client:
        return client.get(url, headers=headers)


def test_healthz_and_readyz(start_proxy: StartProxy, upstream: UpstreamStub) -> None:
    proxy = start_proxy(stub_config(upstream))

    assert get(f"{proxy.url}/healthz").status_code == 200
    assert get(f"{proxy.url}/readyz").status_code == 200
    assert upstream.requests == [], "health checks must not be forwarded upstream"


def test_readyz_fails_while_the_session_store_is_down(
    start_proxy: StartProxy, upstream: UpstreamStub, redis_url: str, redis_server: RedisServer
) -> None:
    proxy = start_proxy(stub_config(upstream, f'[session]\nredis_url = "{redis_url}"\n'))

    redis_server.stop()
    try:
        not_ready = get(f"{proxy.url}/readyz")
        alive = get(f"{proxy.url}/healthz")
    finally:
        redis_server.start()

    assert not_ready.status_code != 200, not_ready.text
    assert alive.status_code == 200


def test_metrics_count_requests_sessions_latency_and_streams(
    start_proxy: StartProxy, upstream: UpstreamStub
) -> None:
    proxy = start_proxy(stub_config(upstream))
    assert chat(proxy, "c-metrics").status_code == 200
    assert chat(proxy, "c-metrics").status_code == 200
    assert chat(proxy).status_code == 200

    response = get(f"{proxy.url}/metrics")

    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain"), response.headers
    samples = [line for line in response.text.splitlines() if line and not line.startswith("#")]

    def has_sample(*fragments: str) -> bool:
        return any(all(fragment in line for fragment in fragments) for line in samples)

    # No alias or [metrics] models names gpt-4o-mini: a name the client chose is "other".
    assert has_sample('"stub"', 'model="other"', '"2xx"'), "requests by provider, model, status"
    assert "gpt-4o-mini" not in response.text
    for outcome in ("created", "hit", "none"):
        assert has_sample(f'"{outcome}"'), f"session outcome {outcome} not counted"
    assert any(re.match(r"\w*upstream\w*", line) for line in samples), "no upstream latency"
    # The exact line: a looser pattern also matches the latency histogram's samples.
    assert "sentinel_open_streams 0.0" in samples, "no open-streams gauge, or not back at 0"


def test_json_access_log_line(start_proxy: StartProxy, upstream: UpstreamStub) -> None:
    proxy = start_proxy(stub_config(upstream), extra_args=("--log-format", "json"))
    response = chat(proxy, "c-log-line")
    assert response.status_code == 200
    assert proxy.terminate() == 0

    records: list[dict[str, Any]] = []
    for line in proxy.log_text().splitlines():
        if line.strip():
            record = json.loads(line)  # every line is JSON with --log-format json
            assert isinstance(record, dict), line
            records.append(record)
    [access] = [r for r in records if "c-log-line" in r.values() and 200 in r.values()]
    values = set(map(str, access.values()))
    assert {"stub", "gpt-4o-mini", "created"} <= values, access
    assert any("request" in key and "id" in key for key in access), access
    assert any(
        isinstance(value, int | float) and re.search("ms|latency|duration", key)
        for key, value in access.items()
    ), access


def test_session_creation_is_logged_at_info_and_hits_at_debug(
    start_proxy: StartProxy, upstream: UpstreamStub
) -> None:
    # Issue 3 puts "Created new session" at info (one line per conversation) and hit/miss
    # at debug; CONTRACT.md had all three at debug.
    at_warning = start_proxy(stub_config(upstream), log_level="warning")
    at_info = start_proxy(stub_config(upstream))
    at_debug = start_proxy(stub_config(upstream), log_level="debug")
    for proxy in (at_warning, at_info, at_debug):
        assert chat(proxy, "c-log-level").headers["x-sentinel-session"] == "created"
        assert chat(proxy, "c-log-level").headers["x-sentinel-session"] == "hit"
        assert proxy.terminate() == 0

    def lines(proxy: ProxyProcess, text: str) -> list[str]:
        return [line for line in proxy.log_text().splitlines() if text in line]

    assert lines(at_warning, "Created new session") == []
    assert len(lines(at_info, "Created new session")) == 1
    assert "c-log-level" in lines(at_info, "Created new session")[0]
    assert lines(at_info, "session hit") == []
    assert len(lines(at_debug, "session hit")) == 1
    assert len(lines(at_debug, "session miss")) == 1


def test_debug_session_endpoint(start_proxy: StartProxy, upstream: UpstreamStub) -> None:
    proxy = start_proxy(
        stub_config(upstream, f'[debug]\nenabled = true\ntoken = "{DEBUG_TOKEN}"\n')
    )
    first = chat(proxy, "c-debug")
    assert first.headers["x-sentinel-session"] == "created"
    url = f"{proxy.url}/debug/session/c-debug"
    good = {"authorization": f"Bearer {DEBUG_TOKEN}"}

    assert get(url).status_code in (401, 403)
    assert get(url, {"authorization": "Bearer wrong-token-0123456789"}).status_code in (401, 403)
    shown = get(url, good)
    assert shown.status_code == 200, shown.text
    session = shown.json()
    assert session["id"] == "c-debug"
    assert (session["provider"], session["model"]) == ("stub", "gpt-4o-mini")

    with httpx.Client(trust_env=False, timeout=20.0) as client:
        assert client.delete(url).status_code in (401, 403)
        assert client.delete(url, headers=good).status_code in (200, 204)
    assert get(url, good).status_code == 404
    assert chat(proxy, "c-debug").headers["x-sentinel-session"] == "created"


def test_debug_endpoint_is_off_by_default(start_proxy: StartProxy, upstream: UpstreamStub) -> None:
    proxy = start_proxy(stub_config(upstream))
    assert chat(proxy, "c-hidden").status_code == 200

    response = get(f"{proxy.url}/debug/session/c-hidden", {"authorization": "Bearer anything"})

    assert response.status_code == 404
    assert "created_at" not in response.text, "the session was shown with debug disabled"


def test_no_config_file_uses_sentinel_upstream_url(
    start_proxy: StartProxy, upstream: UpstreamStub
) -> None:
    proxy = start_proxy(None, env={"SENTINEL_UPSTREAM_URL": upstream.base_url})

    created = chat(proxy, "c-default")
    hit = chat(proxy, "c-default")

    assert created.status_code == 200
    assert created.content == upstream.chat_completion_body("gpt-4o-mini")
    assert created.headers["x-sentinel-provider"] == "openai"
    assert (created.headers["x-sentinel-session"], hit.headers["x-sentinel-session"]) == (
        "created",
        "hit",
    )
    assert len(upstream.requests) == 2


def test_environment_overrides_redis_url_and_ttl(
    start_proxy: StartProxy, upstream: UpstreamStub, redis_url: str, redis_server: RedisServer
) -> None:
    proxy = start_proxy(
        stub_config(upstream, "[session]\nttl_seconds = 120\n"),
        env={"SENTINEL_REDIS_URL": redis_url, "SESSION_TTL_SECONDS": "300"},
    )

    assert chat(proxy, "c-env").headers["x-sentinel-session"] == "created"

    with redis_server.client() as client:
        ttl = client.ttl("sentinel:session:c-env")
    assert 120 < ttl <= 300, ttl


@pytest.mark.parametrize("near_cache", ["false", "true"])
def test_a_hit_renews_the_session_ttl(
    start_proxy: StartProxy,
    upstream: UpstreamStub,
    redis_url: str,
    redis_server: RedisServer,
    near_cache: str,
) -> None:
    proxy = start_proxy(
        stub_config(
            upstream,
            f'[session]\nredis_url = "{redis_url}"\nttl_seconds = 600\nnear_cache = {near_cache}\n',
        )
    )
    assert chat(proxy, "c-sliding").headers["x-sentinel-session"] == "created"
    key = "sentinel:session:c-sliding"
    with redis_server.client() as client:
        assert 0 < client.ttl(key) <= 600
        client.expire(key, 30)

        assert chat(proxy, "c-sliding").headers["x-sentinel-session"] == "hit"

        if near_cache == "false":
            assert 30 < client.ttl(key) <= 600
        else:
            # Renewed in the background, once its renewal is due (the key's TTL says so).
            deadline = time.monotonic() + 5
            while client.ttl(key) <= 30:
                assert time.monotonic() < deadline, "the hit never renewed the TTL"
                time.sleep(0.02)  # polling a deadline: the renewal is sent in the background
            assert client.ttl(key) <= 600
