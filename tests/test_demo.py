"""The demo upstream (demo.py) under the real upstream client, and the --demo configuration."""

from __future__ import annotations

import asyncio
import base64
import math
import struct
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sentinel_proxy.config import UpstreamConfig, load_config
from sentinel_proxy.demo import DEFAULT_DIMENSIONS, DemoTransport, is_demo_url
from sentinel_proxy.exceptions import ConfigError
from sentinel_proxy.transport import UpstreamTransport
from sentinel_proxy.upstream import Upstream, UpstreamResponse

DEMO = load_config(None, env={}, demo=True)
URL_A = "http://demo-a.sentinel.invalid/v1"
MESSAGES = [{"role": "user", "content": "Say hello."}]


def demo_upstream(word_delay: float = 0.0) -> Upstream:
    fallback = httpx.MockTransport(lambda request: httpx.Response(599))
    return Upstream(UpstreamConfig(), transport=DemoTransport(fallback, word_delay=word_delay))


async def post(upstream: Upstream, path: str, body: Any, base: str = URL_A) -> UpstreamResponse:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return await upstream.send(httpx.Request("POST", base + path, content=content))


async def read(response: UpstreamResponse) -> list[bytes]:
    try:
        return [chunk async for chunk in response.chunks()]
    finally:
        await response.aclose()


async def json_of(response: UpstreamResponse) -> Any:
    return orjson.loads(b"".join(await read(response)))


# -- the configuration ----------------------------------------------------------------------


def test_demo_configuration_is_two_providers_behind_one_alias_of_equal_weights() -> None:
    assert [(p.name, p.base_url, p.api_key) for p in DEMO.providers] == [
        ("demo-a", "http://demo-a.sentinel.invalid/v1", None),
        ("demo-b", "http://demo-b.sentinel.invalid/v1", None),
    ]
    [(name, alias)] = DEMO.aliases.items()
    assert name == "demo"
    assert [(t.provider, t.model, t.weight) for t in alias.targets] == [
        ("demo-a", "demo-small", 1),
        ("demo-b", "demo-large", 1),
    ]
    assert DEMO.demo and DEMO.session.redis_url is None
    assert all(is_demo_url(p.base_url) for p in DEMO.providers)
    assert not is_demo_url("https://api.openai.com/v1")
    assert not is_demo_url("http://sentinel.invalid.example.com/v1")


def test_demo_takes_everything_else_from_the_file_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "sentinel.toml"
    path.write_text("[server]\nport = 9100\n[session]\nttl_seconds = 60\n")
    config = load_config(
        str(path),
        env={"SENTINEL_REDIS_URL": "redis://127.0.0.1:6390/0", "SENTINEL_UPSTREAM_URL": "x"},
        overrides={"workers": 2},
        demo=True,
    )
    assert (config.server.port, config.server.workers, config.session.ttl_seconds) == (9100, 2, 60)
    assert config.session.redis_url is not None
    assert [p.name for p in config.providers] == ["demo-a", "demo-b"]


@pytest.mark.parametrize(
    ("text", "key", "section"),
    [
        (
            '[[providers]]\nname = "x"\nbase_url = "http://x.test/v1"\n',
            "providers",
            "[[providers]]",
        ),
        ('[models.fast]\ntargets = [{ provider = "demo-a", model = "m" }]\n', "models", "[models]"),
    ],
)
def test_demo_refuses_a_file_with_providers_or_models(
    tmp_path: Path, text: str, key: str, section: str
) -> None:
    path = tmp_path / "sentinel.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(str(path), env={}, demo=True)
    assert caught.value.key == key
    assert section in caught.value.problem and "--demo" in caught.value.problem


def test_demo_with_workers_still_needs_redis() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, env={}, overrides={"workers": 2}, demo=True)
    assert caught.value.key == "server.workers"


def test_a_file_may_name_demo_providers_beside_real_ones(tmp_path: Path) -> None:
    path = tmp_path / "sentinel.toml"
    path.write_text(
        '[[providers]]\nname = "real"\nbase_url = "https://api.example.test/v1"\n'
        '[[providers]]\nname = "demo-a"\nbase_url = "http://demo-a.sentinel.invalid/v1"\n'
    )
    config = load_config(str(path), env={})
    assert [is_demo_url(p.base_url) for p in config.providers] == [False, True]


# -- choosing the transport -----------------------------------------------------------------


def test_without_demo_providers_requests_go_straight_to_the_upstream_transport() -> None:
    upstream = Upstream(UpstreamConfig(), providers=load_config(None, env={}).providers)
    assert type(upstream._transport) is UpstreamTransport


def test_with_demo_providers_the_demo_transport_answers_them() -> None:
    upstream = Upstream(UpstreamConfig(), providers=DEMO.providers)
    assert isinstance(upstream._transport, DemoTransport)


async def test_requests_to_other_hosts_go_to_the_fallback() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(201)

    upstream = Upstream(UpstreamConfig(), transport=DemoTransport(httpx.MockTransport(handler)))
    response = await post(upstream, "/chat/completions", {}, base="http://real.test/v1")
    await response.aclose()
    assert response.status_code == 201
    assert seen == ["http://real.test/v1/chat/completions"]


# -- chat completions -----------------------------------------------------------------------


async def test_a_reply_names_provider_and_model_and_echoes_the_user() -> None:
    upstream = demo_upstream()
    response = await post(
        upstream,
        "/chat/completions",
        {
            "model": "demo-small",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Say hello."}]},
            ],
        },
    )
    headers = dict(response.headers)
    completion = await json_of(response)

    assert response.status_code == 200
    assert headers[b"content-type"] == b"application/json"
    assert completion["object"] == "chat.completion"
    assert completion["model"] == "demo-small"
    assert completion["id"].startswith("chatcmpl-")
    [choice] = completion["choices"]
    assert choice["message"] == {
        "role": "assistant",
        "content": "Hello from demo-a (demo-small)! You said: Say hello.",
        "refusal": None,
    }
    assert choice["finish_reason"] == "stop"
    assert completion["usage"] == {"prompt_tokens": 4, "completion_tokens": 8, "total_tokens": 12}


async def test_the_provider_is_the_hosts_first_label() -> None:
    response = await post(
        demo_upstream(),
        "/chat/completions",
        {"model": "m", "messages": MESSAGES},
        base="http://demo-b.sentinel.invalid/v1",
    )
    completion = await json_of(response)
    assert completion["choices"][0]["message"]["content"].startswith("Hello from demo-b (m)!")


def events_of(body: bytes) -> list[Any]:
    """The data of each event, asserting the API's framing: `data: ...` and a blank line."""
    assert body.endswith(b"\n\n")
    events = body[:-2].split(b"\n\n")
    assert all(event.startswith(b"data: ") and b"\n" not in event for event in events), body
    assert events[-1] == b"data: [DONE]"
    return [orjson.loads(event[6:]) for event in events[:-1]]


async def test_a_streamed_reply_is_one_event_per_chunk_in_the_apis_framing() -> None:
    response = await post(
        demo_upstream(),
        "/chat/completions",
        {"model": "demo-large", "messages": MESSAGES, "stream": True},
    )
    headers = dict(response.headers)
    chunks = await read(response)

    assert headers[b"content-type"] == b"text/event-stream; charset=utf-8"
    assert b"content-length" not in headers
    # Event by event, as the real API sends them: never two in one chunk.
    assert all(chunk.count(b"\n\n") == 1 for chunk in chunks)
    events = events_of(b"".join(chunks))
    assert len(chunks) == len(events) + 1
    assert {e["object"] for e in events} == {"chat.completion.chunk"}
    assert len({e["id"] for e in events}) == 1
    assert {e["model"] for e in events} == {"demo-large"}
    deltas = [e["choices"][0]["delta"] for e in events]
    assert deltas[0] == {"role": "assistant", "content": "", "refusal": None}
    assert deltas[-1] == {}
    assert [e["choices"][0]["finish_reason"] for e in events][-2:] == [None, "stop"]
    text = "".join(d["content"] for d in deltas[1:-1])
    assert text == "Hello from demo-a (demo-large)! You said: Say hello."
    assert len(deltas) == 2 + len(text.split())
    assert all("usage" not in e for e in events)


async def test_include_usage_adds_the_apis_usage_chunk() -> None:
    response = await post(
        demo_upstream(),
        "/chat/completions",
        {
            "model": "demo-small",
            "messages": MESSAGES,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    events = events_of(b"".join(await read(response)))
    assert all(e["usage"] is None for e in events[:-1])
    assert events[-1]["choices"] == []
    assert events[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 8, "total_tokens": 10}


async def test_a_stream_arrives_word_by_word_and_closing_it_ends_the_generator() -> None:
    transport = DemoTransport(httpx.MockTransport(lambda r: httpx.Response(599)), word_delay=30)
    upstream = Upstream(UpstreamConfig(), transport=transport)
    response = await post(
        upstream, "/chat/completions", {"model": "m", "messages": MESSAGES, "stream": True}
    )
    chunks = response.chunks()
    # The first event comes at once although the next is 30 s away: nothing is buffered.
    async with asyncio.timeout(5):
        first = await anext(chunks)
    assert first.startswith(b"data: ") and b'"role":"assistant"' in first
    assert transport.open_streams == 1

    await response.aclose()  # what the proxy does when its client goes away

    assert transport.open_streams == 0


async def test_a_cancelled_stream_ends_its_generator() -> None:
    transport = DemoTransport(httpx.MockTransport(lambda r: httpx.Response(599)), word_delay=30)
    upstream = Upstream(UpstreamConfig(), transport=transport)
    response = await post(
        upstream, "/chat/completions", {"model": "m", "messages": MESSAGES, "stream": True}
    )
    task = asyncio.ensure_future(read(response))
    async with asyncio.timeout(5):
        while transport.open_streams == 0:
            await asyncio.sleep(0.01)
    task.cancel()  # the relay's task, cancelled by the proxy's disconnect watcher
    with pytest.raises(asyncio.CancelledError):
        await task
    assert transport.open_streams == 0


# -- embeddings and models ------------------------------------------------------------------


async def embed(upstream: Upstream, **body: Any) -> Any:
    response = await post(upstream, "/embeddings", {"model": "demo-small", **body})
    assert response.status_code == 200
    return await json_of(response)


async def test_embeddings_are_unit_vectors_that_only_the_input_decides() -> None:
    upstream = demo_upstream()
    first = await embed(upstream, input=["one", "two", [1, 2, 3]])
    again = await embed(upstream, input="two", model="demo-large")

    vectors = [item["embedding"] for item in first["data"]]
    assert [item["index"] for item in first["data"]] == [0, 1, 2]
    assert {len(v) for v in vectors} == {DEFAULT_DIMENSIONS}
    assert all(math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-5) for v in vectors)
    assert len({tuple(v) for v in vectors}) == 3
    assert again["data"][0]["embedding"] == vectors[1]
    assert first["model"] == "demo-small"
    assert first["usage"] == {"prompt_tokens": 5, "total_tokens": 5}


async def test_embeddings_honour_dimensions_and_base64() -> None:
    upstream = demo_upstream()
    floats = await embed(upstream, input="hi", dimensions=8)
    packed = await embed(upstream, input="hi", dimensions=8, encoding_format="base64")

    vector = floats["data"][0]["embedding"]
    assert len(vector) == 8
    decoded = struct.unpack("<8f", base64.b64decode(packed["data"][0]["embedding"]))
    assert list(decoded) == vector


async def test_models_lists_the_demo_models() -> None:
    upstream = demo_upstream()
    listed = await json_of(await upstream.send(httpx.Request("GET", URL_A + "/models")))
    one = await json_of(await upstream.send(httpx.Request("GET", URL_A + "/models/demo-large")))

    assert listed["object"] == "list"
    assert [m["id"] for m in listed["data"]] == ["demo-small", "demo-large"]
    assert one == {"id": "demo-large", "object": "model", "created": 0, "owned_by": "sentinel-demo"}


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "param", "code"),
    [
        ("POST", "/chat/completions", b"{not json", 400, None, None),
        ("POST", "/chat/completions", b"[]", 400, None, None),
        ("POST", "/chat/completions", b'{"messages": []}', 400, "model", None),
        ("POST", "/chat/completions", b'{"model": "m"}', 400, "messages", None),
        ("POST", "/embeddings", b'{"model": "m", "input": ""}', 400, "input", None),
        (
            "POST",
            "/embeddings",
            b'{"model": "m", "input": "x", "dimensions": 0}',
            400,
            "dimensions",
            None,
        ),
        (
            "POST",
            "/embeddings",
            b'{"model": "m", "input": "x", "encoding_format": "hex"}',
            400,
            "encoding_format",
            None,
        ),
        ("GET", "/models/gpt-9", b"", 404, "model", "model_not_found"),
        ("POST", "/responses", b"{}", 404, None, None),
        ("GET", "/chat/completions", b"", 404, None, None),
    ],
)
async def test_errors_have_the_openai_shape(
    method: str, path: str, body: bytes, status: int, param: str | None, code: str | None
) -> None:
    response = await demo_upstream().send(httpx.Request(method, URL_A + path, content=body))
    headers = dict(response.headers)
    document = await json_of(response)

    assert response.status_code == status
    assert headers[b"content-type"] == b"application/json"
    assert set(document) == {"error"}
    error = document["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code)


_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
_FIELDS = st.sampled_from(
    ["model", "messages", "stream", "stream_options", "input", "dimensions", "encoding_format"]
)


@settings(max_examples=150, deadline=None)
@given(
    path=st.sampled_from(["/chat/completions", "/embeddings"]),
    body=st.dictionaries(_FIELDS, _JSON_VALUES | st.just([{"role": "user", "content": "x"}])),
)
async def test_any_json_body_gets_an_answer_or_an_openai_error(
    path: str, body: dict[str, Any]
) -> None:
    response = await post(demo_upstream(), path, body)
    chunks = await read(response)
    if response.status_code == 200:
        return
    assert response.status_code == 400
    assert set(orjson.loads(b"".join(chunks))["error"]) == {"message", "type", "param", "code"}
