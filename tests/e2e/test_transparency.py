"""What passes through arrives as sent, and no input breaks a conversation: the real process,
a local upstream stub, raw sockets where a client library would normalise what is sent."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx
import pytest

from tests.support.ports import free_port
from tests.support.proxy_process import (
    TEST_AUTH,
    OpenAIClientFactory,
    ProxyProcess,
    StartProxy,
    run_proxy_to_exit,
)
from tests.support.redis_server import RedisServer
from tests.support.upstream_stub import UpstreamStub

pytestmark = pytest.mark.e2e


def team_config(upstream: UpstreamStub, extra: str = "") -> str:
    # A base URL with a path of its own, so a path escape would show.
    return (
        f'[[providers]]\nname = "team"\nbase_url = "{upstream.url}/team/v1"\n'
        f'[models.fast]\ntargets = [{{provider = "team", model = "m-a"}}]\n{extra}'
    )


@pytest.fixture
def proxy(start_proxy: StartProxy, upstream: UpstreamStub) -> ProxyProcess:
    return start_proxy(team_config(upstream))


def raw_request(proxy: ProxyProcess, head: bytes, body: bytes = b"") -> bytes:
    """Send one request as written, read the whole answer (the proxy closes the socket)."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(head + b"Host: proxy\r\nConnection: close\r\n\r\n" + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize(
    "target",
    [
        b"/v1/../../admin",
        b"/v1/%2e%2e/%2e%2e/admin",
        b"/v1/x%2f..%2f..%2fadmin",
        b"/v1/%5c..%5cadmin",
        b"/v1//127.0.0.1/admin",
        b"/v1/..;/admin",
    ],
)
def test_a_path_that_would_leave_the_base_url_is_400_and_sends_nothing(
    proxy: ProxyProcess, upstream: UpstreamStub, target: bytes
) -> None:
    answer = raw_request(proxy, b"GET " + target + b" HTTP/1.1\r\n")
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b'"code":"invalid_request"' in answer
    assert upstream.requests == []


def test_an_absolute_uri_target_goes_to_the_provider_not_the_named_host(
    proxy: ProxyProcess, upstream: UpstreamStub
) -> None:
    answer = raw_request(proxy, b"GET http://evil.test/v1/models HTTP/1.1\r\n")
    assert answer.startswith(b"HTTP/1.1 404 ")  # the stub knows no /team/v1/models
    (seen,) = upstream.requests
    assert seen.path == "/team/v1/models"
    assert seen.header("host") == upstream.host_header


def test_body_bytes_arrive_as_sent_but_for_model_and_conversation_id(
    proxy: ProxyProcess, upstream: UpstreamStub
) -> None:
    body = (
        b'{"model": "fast", "conversation_id": "c", "seed": 123456789012345678901234567890,'
        b' "temperature": 0.1000000000000000055511151231257827, "note": "caf\\u00e9 \\/",\n'
        b'  "z": 1, "a": [1.0, 2e10]}'
    )
    with httpx.Client(trust_env=False, timeout=20) as client:
        response = client.post(
            f"{proxy.base_url}/chat/completions",
            content=body,
            headers={**TEST_AUTH, "content-type": "application/json"},
        )
    assert response.status_code == 404  # the stub answers only its own /v1 paths
    (seen,) = upstream.requests
    assert seen.body == (
        b'{"model": "m-a", "seed": 123456789012345678901234567890,'
        b' "temperature": 0.1000000000000000055511151231257827, "note": "caf\\u00e9 \\/",\n'
        b'  "z": 1, "a": [1.0, 2e10]}'
    )


def test_sdk_cancel_calls_with_an_empty_json_body_are_forwarded(
    start_proxy: StartProxy, upstream: UpstreamStub, openai_client: OpenAIClientFactory
) -> None:
    proxy = start_proxy(f'[[providers]]\nname = "stub"\nbase_url = "{upstream.base_url}"\n')
    upstream.queue_response(200, {"id": "batch_1", "object": "batch", "status": "cancelling"})
    openai_client(proxy).batches.cancel("batch_1")
    (seen,) = upstream.requests
    assert (seen.method, seen.path, seen.body) == ("POST", "/v1/batches/batch_1/cancel", b"")


def test_a_bad_model_is_refused_before_anything_is_sent_or_stored(
    start_proxy: StartProxy, upstream: UpstreamStub, redis_url: str, redis_server: RedisServer
) -> None:
    proxy = start_proxy(
        f'[session]\nredis_url = "{redis_url}"\n'
        f'[[providers]]\nname = "stub"\nbase_url = "{upstream.base_url}"\n'
    )
    with httpx.Client(trust_env=False, timeout=20) as client:
        url = f"{proxy.base_url}/chat/completions"
        control = client.post(url, json={"model": "x\u0001", "conversation_id": "c"})
        huge = client.post(url, json={"model": "m" * 1_000_000, "conversation_id": "c"})
        follow = client.post(url, json={"model": "gpt-4o", "conversation_id": "c", "messages": []})
    assert (control.status_code, huge.status_code) == (400, 400)
    assert control.json()["error"]["param"] == "model"
    assert follow.status_code == 200 and follow.headers["x-sentinel-model"] == "gpt-4o"
    assert len(upstream.requests) == 1
    with redis_server.client() as redis:
        assert redis.keys("*") == [b"sentinel:session:c"]
    assert "m" * 1000 not in proxy.log_text()


def test_a_follow_up_needs_no_model(
    start_proxy: StartProxy, upstream: UpstreamStub, redis_url: str
) -> None:
    proxy = start_proxy(
        f'[session]\nredis_url = "{redis_url}"\n' + team_config(upstream).replace("/team", "")
    )
    with httpx.Client(trust_env=False, timeout=20) as client:
        url = f"{proxy.base_url}/chat/completions"
        first = client.post(url, json={"model": "fast", "conversation_id": "t1", "messages": []})
        follow = client.post(
            url, json={"messages": []}, headers={**TEST_AUTH, "x-conversation-id": "t1"}
        )
    assert first.status_code == follow.status_code == 200
    assert follow.headers["x-sentinel-session"] == "hit"
    assert upstream.requests[-1].json() == {"model": "m-a", "messages": []}


def _responses(answer: bytes) -> list[tuple[bytes, bytes]]:
    """The status lines and bodies of the HTTP/1.1 responses `answer` holds, in order."""
    found = []
    while answer:
        head, answer = answer.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        fields = dict(line.lower().split(b": ", 1) for line in lines[1:])
        body = b""
        if fields.get(b"transfer-encoding") == b"chunked":
            while True:
                size_line, answer = answer.split(b"\r\n", 1)
                size = int(size_line, 16)
                body, answer = body + answer[:size], answer[size + 2 :]
                if not size:
                    break
        else:
            size = int(fields[b"content-length"])
            body, answer = answer[:size], answer[size:]
        found.append((lines[0], body))
    return found


def test_pipelined_requests_are_answered_in_order_each_whole(
    start_proxy: StartProxy, upstream: UpstreamStub
) -> None:
    proxy = start_proxy(
        f'[[providers]]\nname = "stub"\nbase_url = "{upstream.base_url}"\n'
        '[models.fast]\ntargets = [{provider = "stub", model = "m-a"}]\n'
    )
    auth = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in TEST_AUTH.items())

    def chat(stream: bool, close: bool = False) -> bytes:
        body = b'{"model":"fast","stream":%s,"messages":[{"role":"user","content":"hi"}]}' % (
            b"true" if stream else b"false"
        )
        return (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n%s"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
            % (auth, len(body), b"Connection: close\r\n" if close else b"", body)
        )

    files = b"GET /v1/files HTTP/1.1\r\nHost: proxy\r\n\r\n"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(chat(False) + files + chat(True) + chat(False, close=True))
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk

    (status, json_body), (missing, _), (streamed, events), (last, again) = _responses(answer)
    assert [status, missing, streamed, last] == [
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 404 Not Found",  # the stub answers chat completions only
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 200 OK",
    ]
    assert json.loads(json_body)["model"] == json.loads(again)["model"] == "m-a"
    assert events == b"".join(UpstreamStub.stream_events("m-a"))


def test_client_x_sentinel_headers_are_dropped(proxy: ProxyProcess, upstream: UpstreamStub) -> None:
    with httpx.Client(trust_env=False, timeout=20) as client:
        client.get(
            f"{proxy.base_url}/models",
            headers={"x-sentinel-provider": "forged", "x-sentinel-session": "hit", "x-keep": "1"},
        )
    (seen,) = upstream.requests
    assert not [name for name in seen.header_names if name.startswith("x-sentinel-")]
    assert seen.header("x-keep") == "1"


def test_a_path_cannot_forge_a_log_line(proxy: ProxyProcess, upstream: UpstreamStub) -> None:
    raw_request(proxy, b"GET /v1/models%0Aforged=1%0D%0Aalso=1 HTTP/1.1\r\n")
    proxy.terminate()  # flushes the log
    lines = proxy.log_text().splitlines()
    assert not [line for line in lines if line.startswith(("forged", "also"))]
    assert any("path=/v1/models\\x0aforged=1\\x0d\\x0aalso=1" in line for line in lines)


def test_a_url_longer_than_the_upstream_takes_is_414(
    start_proxy: StartProxy, upstream: UpstreamStub
) -> None:
    # A request target under the proxy's own 64 KiB that the provider's path makes too long.
    base = f"{upstream.url}/{'p' * 400}/v1"
    proxy = start_proxy(f'[[providers]]\nname = "long"\nbase_url = "{base}"\n')
    answer = raw_request(proxy, b"GET /v1/" + b"a" * 65_200 + b" HTTP/1.1\r\n")
    assert answer.startswith(b"HTTP/1.1 414 "), answer[:200]
    assert b'"code":"uri_too_long"' in answer
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("config", "env", "key", "secret"),
    [
        ('base_url = "http://user:hunter2@127.0.0.1:9/v1"', {}, "base_url", "hunter2"),
        (
            'base_url = "http://127.0.0.1:9/v1"\napi_key_env = "K"',
            {"K": "hunter2\n"},
            "K",
            "hunter2",
        ),
    ],
)
def test_secrets_in_a_bad_provider_stop_start_up_unseen(
    tmp_path: Path, config: str, env: dict[str, str], key: str, secret: str
) -> None:
    path = tmp_path / "sentinel.toml"
    path.write_text(f'[[providers]]\nname = "p"\n{config}\n')
    result = run_proxy_to_exit(["--config", str(path), "--port", str(free_port())], env=env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and secret not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert key in line


@pytest.mark.parametrize(
    ("content", "key"),
    [
        (b'[session]\nredis_url = "redis://:pa#hunter2@127.0.0.1:6379/0"\n', "session.redis_url"),
        (b'[server]\nhost = "caf\xe9"\n', "not UTF-8"),
    ],
)
def test_config_problems_are_one_line_and_exit_2(tmp_path: Path, content: bytes, key: str) -> None:
    path = tmp_path / "sentinel.toml"
    path.write_bytes(content)
    result = run_proxy_to_exit(["--config", str(path), "--port", str(free_port())])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "hunter2" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert key in line
