from __future__ import annotations

import orjson

from sentinel_proxy.config import Config, Provider, Secret
from sentinel_proxy.request import InboundRequest
from sentinel_proxy.rewrite import Rewriter, filter_headers
from sentinel_proxy.routing import Route

KEYED = Provider("keyed", "https://api.example.test/v1", Secret("sk-provider"))
OPEN = Provider("open", "http://127.0.0.1:9/base")
CONFIG = Config(providers=(KEYED, OPEN))


def inbound(
    body: bytes = b"",
    *,
    payload: dict[str, object] | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
    path: bytes = b"/v1/chat/completions",
    query: bytes = b"",
    id_in_body: bool = False,
) -> InboundRequest:
    return InboundRequest(
        method="POST",
        raw_path=path,
        query=query,
        headers=headers or [],
        body=body,
        payload=payload,
        conversation_id=None,
        model=None,
        id_in_body=id_in_body,
    )


def test_hop_by_hop_and_connection_named_headers_are_dropped() -> None:
    headers = [
        (b"connection", b"keep-alive, X-Private"),
        (b"keep-alive", b"timeout=5"),
        (b"transfer-encoding", b"chunked"),
        (b"te", b"trailers"),
        (b"upgrade", b"h2c"),
        (b"proxy-authorization", b"Basic x"),
        (b"x-private", b"1"),
        (b"content-type", b"application/json"),
        (b"x-request-id", b"r1"),
    ]
    assert filter_headers(headers) == [
        (b"content-type", b"application/json"),
        (b"x-request-id", b"r1"),
    ]


def test_request_headers_lose_host_length_and_conversation_header() -> None:
    request = Rewriter(CONFIG).build(
        inbound(
            b"{}",
            headers=[
                (b"host", b"proxy:8080"),
                (b"content-length", b"2"),
                (b"x-conversation-id", b"c1"),
                (b"authorization", b"Bearer sk-client"),
                (b"openai-organization", b"org-1"),
            ],
        ),
        Route(OPEN, None),
    )
    assert request.headers["host"] == "127.0.0.1:9"
    assert "x-conversation-id" not in request.headers
    assert request.headers["authorization"] == "Bearer sk-client"
    assert request.headers["openai-organization"] == "org-1"
    assert request.headers["content-length"] == "2"


def test_provider_key_replaces_the_client_authorization() -> None:
    request = Rewriter(CONFIG).build(
        inbound(b"{}", headers=[(b"authorization", b"Bearer sk-client")]), Route(KEYED, None)
    )
    assert request.headers.get_list("authorization") == ["Bearer sk-provider"]


def test_url_is_base_url_plus_path_less_v1_with_query() -> None:
    rewriter = Rewriter(CONFIG)
    request = rewriter.build(
        inbound(path=b"/v1/files/file-1%2Fx/content", query=b"a=1&b=%20"), Route(OPEN, None)
    )
    assert str(request.url) == "http://127.0.0.1:9/base/files/file-1%2Fx/content?a=1&b=%20"
    root = rewriter.build(inbound(path=b"/v1"), Route(KEYED, None))
    assert str(root.url) == "https://api.example.test/v1"


def test_body_untouched_when_nothing_changes() -> None:
    body = b'{ "model" : "m",  "messages": [] }'
    request = Rewriter(CONFIG).build(inbound(body, payload=orjson.loads(body)), Route(OPEN, None))
    assert request.read() == body


def test_model_rewritten_and_conversation_id_stripped() -> None:
    body = b'{"model": "fast", "conversation_id": "c1", "messages": [{"role": "user"}]}'
    request = Rewriter(CONFIG).build(
        inbound(body, payload=orjson.loads(body), id_in_body=True), Route(OPEN, "llama3.1")
    )
    assert orjson.loads(request.read()) == {"model": "llama3.1", "messages": [{"role": "user"}]}
    assert request.headers["content-length"] == str(len(request.read()))


def test_non_json_body_goes_byte_for_byte() -> None:
    body = b"--boundary\r\nbinary \x00\xff\r\n"
    request = Rewriter(CONFIG).build(inbound(body), Route(OPEN, "other"))
    assert request.read() == body
