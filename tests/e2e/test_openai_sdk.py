"""The real proxy process, driven by the official ``openai`` SDK and by raw httpx, against a local
upstream stub. Everything here is what CONTRACT.md promises a user."""

from __future__ import annotations

import gzip
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support.ports import free_port
from tests.support.proxy_process import (
    TEST_API_KEY,
    TEST_AUTH,
    OpenAIClientFactory,
    ProxyProcess,
    StartProxy,
    run_proxy_to_exit,
)
from tests.support.upstream_stub import REPLY_TEXT, UpstreamStub

pytestmark = pytest.mark.e2e

MESSAGES: list[Any] = [{"role": "user", "content": "Say hello."}]


def stub_config(base_url: str, extra: str = "") -> str:
    return f'[[providers]]\nname = "stub"\nbase_url = "{base_url}"\n{extra}'


@pytest.fixture
def proxy(start_proxy: StartProxy, upstream: UpstreamStub) -> ProxyProcess:
    """The proxy with one provider, ``stub``, that takes the client's own key, and the
    in-memory session store."""
    return start_proxy(stub_config(upstream.base_url, "forward_client_key = true\n"))


def http_client() -> httpx.Client:
    return httpx.Client(trust_env=False, timeout=20.0)


def assert_openai_error_shape(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert {"message", "type", "param", "code"} <= set(error), error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    return error


def test_chat_completion_bytes_and_upstream_request(
    proxy: ProxyProcess, upstream: UpstreamStub, openai_client: OpenAIClientFactory
) -> None:
    client = openai_client(proxy)

    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, extra_body={"conversation_id": "conv-plain"}
    )
    completion = raw.parse()

    assert completion.choices[0].message.content == REPLY_TEXT
    assert completion.model == "gpt-4o-mini"
    assert raw.http_response.content == upstream.chat_completion_body("gpt-4o-mini")
    assert raw.headers["x-sentinel-provider"] == "stub"
    assert raw.headers["x-sentinel-model"] == "gpt-4o-mini"

    [received] = upstream.requests
    assert received.method == "POST"
    assert received.path == "/v1/chat/completions"
    assert received.header("authorization") == f"Bearer {TEST_API_KEY}"
    assert received.header("host") == upstream.host_header
    body = received.json()
    assert "conversation_id" not in body
    assert body["model"] == "gpt-4o-mini"
    assert body["messages"] == MESSAGES


def test_streaming_through_the_sdk(
    proxy: ProxyProcess, upstream: UpstreamStub, openai_client: OpenAIClientFactory
) -> None:
    client = openai_client(proxy)

    with client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True
    ) as stream:
        chunks = list(stream)

    deltas = [chunk.choices[0].delta.content for chunk in chunks]
    assert deltas == ["", *UpstreamStub.stream_pieces(upstream.stream_chunks), None]
    assert "".join(d or "" for d in deltas) == UpstreamStub.stream_text(upstream.stream_chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert {chunk.model for chunk in chunks} == {"gpt-4o-mini"}
    assert upstream.requests[0].json()["stream"] is True


def test_streaming_bytes_are_the_upstream_bytes(
    proxy: ProxyProcess, upstream: UpstreamStub
) -> None:
    with (
        http_client() as client,
        client.stream(
            "POST",
            f"{proxy.base_url}/chat/completions",
            json={"model": "gpt-4o", "messages": MESSAGES, "stream": True},
            headers=TEST_AUTH,
        ) as response,
    ):
        body = b"".join(response.iter_raw())

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-sentinel-provider"] == "stub"
    assert body == upstream.stream_body("gpt-4o", upstream.stream_chunks)


def test_stream_is_forwarded_as_it_arrives(proxy: ProxyProcess, upstream: UpstreamStub) -> None:
    upstream.configure_stream(chunks=5, delay=0.2)  # the stub needs ~1.2 s for the whole stream

    with (
        http_client() as client,
        client.stream(
            "POST",
            f"{proxy.base_url}/chat/completions",
            json={"model": "gpt-4o", "messages": MESSAGES, "stream": True},
            headers=TEST_AUTH,
        ) as response,
    ):
        events = response.iter_raw()
        first = next(events)
        finished_before_first_chunk = upstream.stream_finished.is_set()
        body = first + b"".join(events)

    assert first.startswith(b"data: ")
    assert not finished_before_first_chunk, "the proxy buffered the stream until it ended"
    assert body == upstream.stream_body("gpt-4o", 5)


def test_models_list(
    proxy: ProxyProcess, upstream: UpstreamStub, openai_client: OpenAIClientFactory
) -> None:
    models = openai_client(proxy).models.list()

    assert [model.id for model in models] == ["gpt-4o-mini", "gpt-4o", "m-a", "m-b"]
    [received] = upstream.requests
    assert (received.method, received.path) == ("GET", "/v1/models")


def test_path_and_query_string_are_forwarded(proxy: ProxyProcess, upstream: UpstreamStub) -> None:
    with http_client() as client:
        response = client.get(f"{proxy.base_url}/models?limit=2&after=gpt-4o", headers=TEST_AUTH)

    assert response.status_code == 200
    assert response.content == upstream.models_body()
    [received] = upstream.requests
    assert received.path == "/v1/models"
    assert received.query_string == b"limit=2&after=gpt-4o"


def test_gzip_body_and_upstream_headers_pass_through_untouched(
    proxy: ProxyProcess, upstream: UpstreamStub, openai_client: OpenAIClientFactory
) -> None:
    plain = upstream.chat_completion_body("gpt-4o-mini")
    compressed = gzip.compress(plain, mtime=0)
    headers = [("content-encoding", "gzip"), ("x-stub-trace", "trace-123")]
    upstream.queue_response(200, compressed, headers, times=2)

    with (
        http_client() as client,
        client.stream(
            "POST",
            f"{proxy.base_url}/chat/completions",
            json={"model": "gpt-4o-mini", "messages": MESSAGES},
            headers={**TEST_AUTH, "accept-encoding": "gzip"},
        ) as response,
    ):
        raw_body = b"".join(response.iter_raw())
    completion = openai_client(proxy).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES
    )

    assert response.status_code == 200
    assert response.headers["content-encoding"] == "gzip"
    assert response.headers["x-stub-trace"] == "trace-123"
    assert raw_body == compressed
    assert completion.choices[0].message.content == REPLY_TEXT


def test_upstream_429_raises_rate_limit_error(
    proxy: ProxyProcess, upstream: UpstreamStub, openai_client: OpenAIClientFactory
) -> None:
    upstream.queue_rate_limit("Rate limit reached for stub-model in organization org-stub.")

    with pytest.raises(openai.RateLimitError) as caught:
        openai_client(proxy).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)

    error = caught.value
    assert error.status_code == 429
    assert error.code == "rate_limit_exceeded"
    assert isinstance(error.body, dict)
    assert error.body["message"] == "Rate limit reached for stub-model in organization org-stub."
    assert error.response.headers["retry-after"] == "0"


def test_malformed_json_is_rejected_with_openai_error(
    proxy: ProxyProcess, upstream: UpstreamStub
) -> None:
    with http_client() as client:
        response = client.post(
            f"{proxy.base_url}/chat/completions",
            content=b"{not json",
            headers={**TEST_AUTH, "content-type": "application/json"},
        )

    assert response.status_code == 400, response.text
    assert_openai_error_shape(response)
    assert upstream.requests == []


def test_bad_conversation_id_raises_bad_request_error(
    proxy: ProxyProcess, upstream: UpstreamStub, openai_client: OpenAIClientFactory
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client(proxy).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_body={"conversation_id": 5}
        )

    assert caught.value.status_code == 400
    assert isinstance(caught.value.body, dict) and caught.value.body.get("message")
    assert upstream.requests == []


def test_client_disconnect_closes_the_upstream_stream(
    proxy: ProxyProcess, upstream: UpstreamStub
) -> None:
    upstream.slow_stream(seconds=30, interval=0.1)

    client = http_client()
    try:
        with client.stream(
            "POST",
            f"{proxy.base_url}/chat/completions",
            json={"model": "gpt-4o", "messages": MESSAGES, "stream": True},
            headers=TEST_AUTH,
        ) as response:
            assert response.status_code == 200
            first = next(response.iter_raw())
            assert first.startswith(b"data: ")
    finally:
        client.close()
    closed_at = time.monotonic()

    assert upstream.upstream_disconnected.wait(timeout=1.0), (
        "the proxy kept the upstream stream open for 1 s after its client went away"
    )
    assert upstream.disconnected_at is not None
    assert upstream.disconnected_at - closed_at < 1.0
    [received] = upstream.requests
    assert received.disconnected and not received.response_complete


def test_unreachable_upstream_is_502(
    start_proxy: StartProxy, openai_client: OpenAIClientFactory
) -> None:
    proxy = start_proxy(stub_config(f"http://127.0.0.1:{free_port()}/v1"))

    with pytest.raises(openai.InternalServerError) as caught:
        openai_client(proxy).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert caught.value.status_code == 502

    with http_client() as client:
        response = client.post(
            f"{proxy.base_url}/chat/completions",
            json={"model": "gpt-4o-mini", "messages": MESSAGES},
            headers=TEST_AUTH,
        )
    assert response.status_code == 502
    assert_openai_error_shape(response)


def test_sigterm_lets_an_open_stream_finish_then_exits_0(
    proxy: ProxyProcess, upstream: UpstreamStub
) -> None:
    upstream.configure_stream(chunks=10, delay=0.1)

    with (
        http_client() as client,
        client.stream(
            "POST",
            f"{proxy.base_url}/chat/completions",
            json={"model": "gpt-4o", "messages": MESSAGES, "stream": True},
            headers=TEST_AUTH,
        ) as response,
    ):
        events = response.iter_raw()
        first = next(events)
        proxy.sigterm()
        body = first + b"".join(events)

    assert response.status_code == 200
    assert body == upstream.stream_body("gpt-4o", 10)
    assert proxy.wait(timeout=15.0) == 0, proxy.log_text()


GOOD_PROVIDER = stub_config("http://127.0.0.1:9/v1")


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        pytest.param(
            GOOD_PROVIDER
            + '[models.fast]\ntargets = [{ provider = "nope", model = "x", weight = 1 }]\n',
            ("fast", "nope"),
            id="alias-with-unknown-provider",
        ),
        pytest.param(
            GOOD_PROVIDER + "[session]\nttl_seconds = -1\n", ("ttl_seconds",), id="negative-ttl"
        ),
        pytest.param(stub_config("not a url"), ("base_url",), id="bad-provider-url"),
        pytest.param(None, ("missing.toml",), id="unreadable-file"),
    ],
)
def test_bad_config_exits_2_with_one_line(
    tmp_path: Path, config: str | None, expected: tuple[str, ...]
) -> None:
    path = tmp_path / "missing.toml"
    if config is not None:
        path = tmp_path / "sentinel.toml"
        path.write_text(config)

    result = run_proxy_to_exit(
        ["--config", str(path), "--host", "127.0.0.1", "--port", str(free_port())]
    )

    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for fragment in expected:
        assert fragment in lines[0], lines[0]


def test_upstream_cookies_do_not_leak_to_other_clients(
    start_proxy: StartProxy, upstream: UpstreamStub, openai_client: OpenAIClientFactory
) -> None:
    # By host name: a cookie jar may ignore cookies from IP addresses (aiohttp's does), which
    # would hide a leak through one.
    proxy = start_proxy(stub_config(f"http://localhost:{upstream.port}/v1"))
    upstream.add_response_header("set-cookie", "stub_session=client-a-secret; Path=/; HttpOnly")

    raw = openai_client(proxy).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES
    )
    assert raw.headers.get("set-cookie") == "stub_session=client-a-secret; Path=/; HttpOnly"

    openai_client(proxy).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)

    first, second = upstream.requests
    assert first.header("cookie") is None
    assert second.header("cookie") is None, "client A's upstream cookie was sent for client B"


def test_provider_key_replaces_client_key_and_never_leaks(
    start_proxy: StartProxy, upstream: UpstreamStub, openai_client: OpenAIClientFactory
) -> None:
    secret = "sk-provider-secret-0123456789"
    proxy = start_proxy(
        stub_config(upstream.base_url, 'api_key_env = "STUB_PROVIDER_KEY"\n'),
        env={"STUB_PROVIDER_KEY": secret},
    )
    client = openai_client(proxy)

    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    upstream.queue_error(401, "Incorrect API key provided.", "invalid_request_error", "bad_key")
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)

    assert raw.parse().choices[0].message.content == REPLY_TEXT
    assert secret not in caught.value.response.text

    assert [r.header("authorization") for r in upstream.requests] == [f"Bearer {secret}"] * 2
    assert secret.encode() not in raw.http_response.content
    assert all(secret not in value for _, value in raw.headers.items())
    assert proxy.terminate() == 0
    assert secret not in proxy.log_text()
