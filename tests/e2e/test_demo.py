"""`sentinel-proxy --demo`, the real process: the built-in demo providers through the proxy's
whole path, driven by the openai SDK, raw httpx and the README's own curl lines."""

from __future__ import annotations

import base64
import json
import re
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support.ports import free_port
from tests.support.proxy_process import (
    REPO_ROOT,
    OpenAIClientFactory,
    ProxyProcess,
    StartProxy,
    run_proxy_to_exit,
)
from tests.support.redis_server import RedisServer
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e

MODELS = {"demo-a": "demo-small", "demo-b": "demo-large"}
MESSAGES: list[Any] = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """One `--demo` proxy for the module: every test uses conversation ids of its own."""
    demo = ProxyProcess(None, tmp_path_factory.mktemp("demo"), extra_args=("--demo",))
    demo.start()
    try:
        yield demo
    finally:
        demo.stop()


def reply_text(provider: str, said: str = "Say hello.") -> str:
    return f"Hello from {provider} ({MODELS[provider]})! You said: {said}"


def test_a_conversation_is_created_then_hit_on_the_same_provider(
    proxy: ProxyProcess, openai_client: OpenAIClientFactory
) -> None:
    client = openai_client(proxy)

    first = client.chat.completions.with_raw_response.create(
        model="demo", messages=MESSAGES, extra_headers={"x-conversation-id": "c-1"}
    )
    provider = first.headers["x-sentinel-provider"]
    follow_up = client.chat.completions.with_raw_response.create(
        model="anything", messages=MESSAGES, extra_body={"conversation_id": "c-1"}
    )

    assert first.headers["x-sentinel-session"] == "created"
    assert provider in MODELS
    assert first.headers["x-sentinel-model"] == MODELS[provider]
    assert first.parse().choices[0].message.content == reply_text(provider)
    assert follow_up.headers["x-sentinel-session"] == "hit"
    assert follow_up.headers["x-sentinel-provider"] == provider
    completion = follow_up.parse()
    assert completion.model == MODELS[provider]
    assert completion.choices[0].message.content == reply_text(provider)
    assert completion.usage is not None and completion.usage.completion_tokens == 8


def test_the_alias_spreads_new_conversations_over_both_providers(
    proxy: ProxyProcess, openai_client: OpenAIClientFactory
) -> None:
    client = openai_client(proxy)
    chosen = set()
    # With weights 1:1, 40 picks of one provider only would happen once in 5e11 runs.
    for index in range(40):
        raw = client.chat.completions.with_raw_response.create(
            model="demo", messages=MESSAGES, extra_body={"conversation_id": f"spread-{index}"}
        )
        chosen.add(raw.headers["x-sentinel-provider"])
    assert chosen == set(MODELS)


def test_streaming_through_the_sdk(proxy: ProxyProcess, openai_client: OpenAIClientFactory) -> None:
    client = openai_client(proxy)

    with client.chat.completions.with_streaming_response.create(
        model="demo",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"conversation_id": "streamed"},
    ) as response:
        provider = response.headers["x-sentinel-provider"]
        chunks = list(response.parse())

    content = [c.choices[0].delta.content for c in chunks if c.choices]
    assert content[0] == "" and content[-1] is None
    assert "".join(content[1:-1]) == reply_text(provider)
    assert len(content) == 2 + len(reply_text(provider).split())
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 8
    assert {c.model for c in chunks} == {MODELS[provider]}


def test_a_stream_has_the_apis_framing_and_ends_when_its_client_leaves(
    proxy: ProxyProcess,
) -> None:
    said = " ".join(f"word{i}" for i in range(150))  # about 8 s of streaming at 20 words/s
    body = {
        "model": "demo",
        "messages": [{"role": "user", "content": said}],
        "stream": True,
        "conversation_id": "leaving",
    }
    with (
        httpx.Client(trust_env=False, timeout=20.0) as client,
        client.stream("POST", f"{proxy.base_url}/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        received = b""
        for chunk in response.iter_raw():
            received += chunk
            if received.count(b"\n\n") >= 3:
                break
    # The client has gone with the stream about 150 words short of its end.

    events = received.split(b"\n\n")[:3]
    assert all(event.startswith(b"data: {") for event in events), received
    chunks = [json.loads(event[6:]) for event in events]
    assert [c["object"] for c in chunks] == ["chat.completion.chunk"] * 3
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"role": "assistant", "content": "", "refusal": None},
        {"content": "Hello "},
        {"content": "from "},
    ]
    line = wait_for(
        "the proxy to log the request that lost its client",
        lambda: next(
            (
                ln
                for ln in proxy.log_text().splitlines()
                if "conversation_id=leaving" in ln and "status=" in ln
            ),
            None,
        ),
        timeout=5.0,
    )
    assert "status=499" in line and "error=client_disconnected" in line, line


def test_embeddings_through_the_sdk(
    proxy: ProxyProcess, openai_client: OpenAIClientFactory
) -> None:
    client = openai_client(proxy)

    # The SDK asks for base64 unless told otherwise, and decodes it.
    packed = client.embeddings.create(model="demo", input=["one", "two"], dimensions=16)
    floats = client.embeddings.create(
        model="demo", input="two", dimensions=16, encoding_format="float"
    )

    assert [len(item.embedding) for item in packed.data] == [16, 16]
    assert packed.data[0].embedding != packed.data[1].embedding
    assert floats.data[0].embedding == packed.data[1].embedding
    assert packed.model in MODELS.values()


def test_raw_embeddings_in_base64_are_little_endian_float32(proxy: ProxyProcess) -> None:
    with httpx.Client(trust_env=False, timeout=20.0) as client:
        response = client.post(
            f"{proxy.base_url}/embeddings",
            json={"model": "demo", "input": "x", "dimensions": 4, "encoding_format": "base64"},
        )
    vector = struct.unpack("<4f", base64.b64decode(response.json()["data"][0]["embedding"]))
    assert abs(sum(v * v for v in vector) - 1.0) < 1e-5


def test_models_and_errors_through_the_sdk(
    proxy: ProxyProcess, openai_client: OpenAIClientFactory
) -> None:
    client = openai_client(proxy)

    assert [m.id for m in client.models.list()] == ["demo-small", "demo-large"]
    assert client.models.retrieve("demo-large").owned_by == "sentinel-demo"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-9")
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.embeddings.create(model="demo", input="x", dimensions=0)
    assert bad.value.param == "dimensions"


def readme_demo_lines() -> list[str]:
    """The README's first command and the three lines after it."""
    readme = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"```sh\n(.*?)```", readme, re.S)
    assert block is not None
    lines = block.group(1).splitlines()
    assert lines[0].split("#")[0].split() == ["scripts/serve", "--demo"]
    return lines[1:4]


@pytest.mark.skipif(shutil.which("curl") is None, reason="the README's lines need curl")
def test_the_readmes_first_lines_work_as_written(proxy: ProxyProcess) -> None:
    outputs = []
    for line in readme_demo_lines():
        assert line.startswith("curl ") and "127.0.0.1:8080" in line, line
        result = subprocess.run(
            ["bash", "-c", line.replace("127.0.0.1:8080", f"127.0.0.1:{proxy.port}")],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
            env={"PATH": "/usr/bin:/bin:/usr/local/bin", "NO_PROXY": "*"},
        )
        assert result.returncode == 0, result
        outputs.append(result.stdout.replace("\r", "").strip().lower().splitlines())

    created, hit, reply = outputs
    [provider] = [ln.split(": ")[1] for ln in created if ln.startswith("x-sentinel-provider")]
    assert provider in MODELS
    assert created == [f"x-sentinel-provider: {provider}", "x-sentinel-session: created"]
    assert hit == [f"x-sentinel-provider: {provider}", "x-sentinel-session: hit"]
    assert reply == [f'"content":"{reply_text(provider, "Who are you?")}"'.lower()]


def test_scripts_serve_passes_its_arguments_on() -> None:
    script = (REPO_ROOT / "scripts" / "serve").read_text()
    assert 'exec .venv/bin/sentinel-proxy "$@"' in script


def test_demo_refuses_a_file_with_providers(tmp_path: Path) -> None:
    path = tmp_path / "sentinel.toml"
    path.write_text('[[providers]]\nname = "x"\nbase_url = "http://127.0.0.1:9/v1"\n')

    result = run_proxy_to_exit(["--demo", "--config", str(path), "--port", str(free_port())])

    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("sentinel-proxy: configuration error: providers: --demo brings")


def test_demo_with_a_file_redis_and_workers(
    start_proxy: StartProxy,
    redis_url: str,
    redis_server: RedisServer,
    openai_client: OpenAIClientFactory,
) -> None:
    proxy = start_proxy(
        f'[session]\nredis_url = "{redis_url}"\nttl_seconds = 600\n',
        extra_args=("--demo", "--workers", "2"),
        timeout=30.0,
    )
    client = openai_client(proxy)

    raw = client.chat.completions.with_raw_response.create(
        model="demo", messages=MESSAGES, extra_body={"conversation_id": "shared"}
    )

    provider = raw.headers["x-sentinel-provider"]
    assert raw.parse().choices[0].message.content == reply_text(provider)
    with redis_server.client() as redis:
        stored = json.loads(redis.get("sentinel:session:shared"))
        ttl = redis.ttl("sentinel:session:shared")
    assert (stored["provider"], stored["model"]) == (provider, MODELS[provider])
    assert 0 < ttl <= 600
