"""Request ids on the real process: kept from the client when sane, made otherwise; sent
upstream, returned in `x-request-id`, in the errors the proxy makes and in every log line
of the request."""

from __future__ import annotations

import re
from typing import Any

import httpx
import openai
import pytest

from tests.support.proxy_process import TEST_AUTH, OpenAIClientFactory, ProxyProcess, StartProxy
from tests.support.upstream_stub import UpstreamStub

pytestmark = pytest.mark.e2e

CHAT: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi."}]}
MADE = re.compile(r"[0-9a-f]{32}")


def stub_config(upstream: UpstreamStub) -> str:
    return f'[[providers]]\nname = "stub"\nbase_url = "{upstream.base_url}"\n'


def post(
    proxy: ProxyProcess, headers: dict[str, str] | None = None, body: Any = CHAT
) -> httpx.Response:
    with httpx.Client(trust_env=False, timeout=20.0) as client:
        return client.post(
            f"{proxy.base_url}/chat/completions",
            json=body,
            headers={**TEST_AUTH, **(headers or {})},
        )


def log_lines(proxy: ProxyProcess, request_id: str) -> list[str]:
    return [line for line in proxy.log_text().splitlines() if f"request_id={request_id}" in line]


def test_a_request_without_an_id_gets_one_upstream_in_the_response_and_the_log(
    start_proxy: StartProxy, upstream: UpstreamStub
) -> None:
    proxy = start_proxy(stub_config(upstream))

    first, second = post(proxy), post(proxy)

    request_id = first.headers["x-request-id"]
    assert MADE.fullmatch(request_id), request_id
    assert second.headers["x-request-id"] != request_id
    assert "x-sentinel-request-id" not in first.headers
    received = upstream.requests[0]
    assert received.header_values("x-request-id") == [request_id]
    assert proxy.terminate() == 0
    [access] = log_lines(proxy, request_id)
    assert "sentinel_proxy.access" in access


def test_a_clients_sane_id_is_kept(start_proxy: StartProxy, upstream: UpstreamStub) -> None:
    proxy = start_proxy(stub_config(upstream))
    sent = "req_" + "A1-b2.c3:d4/e5 f6" + "x" * 107  # 128 printable ASCII characters

    response = post(proxy, {"x-request-id": sent})

    assert len(sent) == 128
    assert response.headers["x-request-id"] == sent
    assert upstream.requests[0].header_values("x-request-id") == [sent]


@pytest.mark.parametrize(
    "sent",
    [b"x" * 129, "caf\u00e9".encode("latin-1"), b"tab\there"],
    ids=["too-long", "not-ascii", "control-character"],
)
def test_a_clients_insane_id_is_replaced_everywhere(
    start_proxy: StartProxy, upstream: UpstreamStub, sent: bytes
) -> None:
    proxy = start_proxy(stub_config(upstream))

    response = post(proxy, {"x-request-id": sent})  # type: ignore[dict-item]

    made = response.headers["x-request-id"]
    assert MADE.fullmatch(made), made
    assert upstream.requests[0].header_values("x-request-id") == [made]


def test_the_upstreams_own_id_comes_back_under_another_name(
    start_proxy: StartProxy, upstream: UpstreamStub
) -> None:
    proxy = start_proxy(stub_config(upstream))
    upstream.add_response_header("X-Request-Id", "req_upstream_123")

    response = post(proxy, {"x-request-id": "mine-1"})

    assert response.headers.get_list("x-request-id") == ["mine-1"]
    assert response.headers["x-upstream-request-id"] == "req_upstream_123"


def test_errors_the_proxy_makes_carry_the_id_where_the_sdk_reads_it(
    start_proxy: StartProxy, upstream: UpstreamStub, openai_client: OpenAIClientFactory
) -> None:
    proxy = start_proxy(stub_config(upstream))
    client = openai_client(proxy)

    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[], extra_body={"conversation_id": "x" * 300}
        )

    error = raised.value
    assert error.code == "invalid_request" and error.param == "conversation_id"
    assert isinstance(error.request_id, str) and MADE.fullmatch(error.request_id)
    assert isinstance(error.body, dict) and error.body["request_id"] == error.request_id
    assert upstream.requests == []
    assert proxy.terminate() == 0
    [access] = log_lines(proxy, error.request_id)
    assert "status=400" in access


def test_every_log_line_of_a_request_carries_its_id(
    start_proxy: StartProxy, upstream: UpstreamStub
) -> None:
    proxy = start_proxy(stub_config(upstream), log_level="debug")
    body = {**CHAT, "conversation_id": "c-logged"}

    created = post(proxy, {"x-request-id": "first-request"}, body)
    hit = post(proxy, {"x-request-id": "second-request"}, body)

    assert (created.status_code, hit.status_code) == (200, 200)
    assert proxy.terminate() == 0
    first = log_lines(proxy, "first-request")
    second = log_lines(proxy, "second-request")
    assert any("Created new session" in line for line in first), first
    assert any("session miss" in line for line in first), first
    assert any("session hit" in line for line in second), second
    assert sum("sentinel_proxy.access" in line for line in first + second) == 2
    # Nothing of one request is marked with the other's id, and no line logged while
    # serving them lacks one.
    assert not any(
        "c-logged" in line and "request_id=" not in line for line in proxy.log_text().splitlines()
    )


def test_json_log_lines_carry_the_id_too(start_proxy: StartProxy, upstream: UpstreamStub) -> None:
    proxy = start_proxy(stub_config(upstream), extra_args=("--log-format", "json"))

    post(proxy, {"x-request-id": "json-request"}, {**CHAT, "conversation_id": "c-json"})

    assert proxy.terminate() == 0
    lines = [line for line in proxy.log_text().splitlines() if "c-json" in line]
    assert len(lines) == 2, lines  # "Created new session" and the access line
    assert all('"request_id":"json-request"' in line for line in lines), lines
