from __future__ import annotations

import posixpath
from urllib.parse import unquote

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sentinel_proxy.body import find_member, plain_keys
from sentinel_proxy.config import Config, Provider, Secret
from sentinel_proxy.exceptions import InvalidRequest, URITooLong
from sentinel_proxy.request import InboundRequest
from sentinel_proxy.rewrite import Rewriter, filter_headers
from sentinel_proxy.routing import Route

KEYED = Provider("keyed", "https://api.example.test/v1", Secret("sk-provider"))
OPEN = Provider("open", "http://127.0.0.1:9/base", forward_client_key=True)
KEYLESS = Provider("keyless", "http://127.0.0.1:9/local")
CONFIG = Config(providers=(KEYED, OPEN, KEYLESS))


def inbound(
    body: bytes = b"",
    *,
    payload: dict[str, object] | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
    path: bytes = b"/v1/chat/completions",
    query: bytes = b"",
) -> InboundRequest:
    request = InboundRequest(
        method="POST",
        raw_path=path,
        query=query,
        headers=headers or [],
        body=body,
        payload=payload,
        conversation_id=None,
        model=None,
    )
    if payload is not None:
        if "model" in payload:
            request.model_member = find_member(body, b'"model"', plain=plain_keys(body))
            request.model = payload["model"]
        if "conversation_id" in payload:
            request.id_member = find_member(body, b'"conversation_id"', plain=plain_keys(body))
    return request


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
        inbound(body, payload=orjson.loads(body)), Route(OPEN, "llama3.1")
    )
    assert orjson.loads(request.read()) == {"model": "llama3.1", "messages": [{"role": "user"}]}
    assert request.headers["content-length"] == str(len(request.read()))


def test_non_json_body_goes_byte_for_byte() -> None:
    body = b"--boundary\r\nbinary \x00\xff\r\n"
    request = Rewriter(CONFIG).build(inbound(body), Route(OPEN, "other"))
    assert request.read() == body


TEAM = Provider("team", "http://up.test/team/v1", Secret("sk-team"))


@pytest.mark.parametrize(
    "path",
    [
        b"/v1/../../admin",
        b"/v1/./models",
        b"/v1/models/..",
        b"/v1/%2e%2e/%2e%2e/admin",
        b"/v1/%2E%2e/admin",
        b"/v1/.%2e/admin",
        b"/v1/x%2f..%2f..%2fadmin",
        b"/v1/x%2F%2E%2E%2Fadmin",
        b"/v1/%252e%252e/admin",
        b"/v1/..%5cadmin",
        b"/v1/x\\..\\admin",
        b"/v1//evil.test/x",
        b"/v1/%2f%2fevil.test/x",
        b"/v1/..;/admin",
        b"/v1%2f..%2fadmin",
        b"/v2/models",
        b"/v1x/models",
    ],
)
def test_no_path_leaves_the_provider_base_url(path: bytes) -> None:
    with pytest.raises(InvalidRequest):
        Rewriter(Config(providers=(TEAM,))).build(inbound(path=path), Route(TEAM, None))


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (b"/v1/models/gpt-4o", "/team/v1/models/gpt-4o"),
        (b"/v1/files/file-1%2Fx/content", "/team/v1/files/file-1%2Fx/content"),
        (b"/v1/@evil.test/x", "/team/v1/@evil.test/x"),
        (b"/v1/models/a..b", "/team/v1/models/a..b"),
        (b"/v1/models/", "/team/v1/models/"),
    ],
)
def test_ordinary_paths_stay_as_sent(path: bytes, expected: str) -> None:
    request = Rewriter(Config(providers=(TEAM,))).build(inbound(path=path), Route(TEAM, None))
    assert request.url.host == "up.test" and request.url.raw_path.decode() == expected


SEGMENTS = st.sampled_from(
    ["..", ".", "%2e", "%2E%2e", "%2f", "%2F", "%5c", "\\", "", "a", "models", "%252e", "@h", ";"]
)


@given(st.lists(st.lists(SEGMENTS, max_size=3).map("".join), max_size=5))
def test_what_an_upstream_resolves_never_leaves_the_base_path(parts: list[str]) -> None:
    path = ("/v1/" + "/".join(parts)).encode()
    try:
        request = Rewriter(Config(providers=(TEAM,))).build(inbound(path=path), Route(TEAM, None))
    except InvalidRequest:
        return
    # A server that decodes (even twice) and then resolves dot segments and backslashes.
    seen = request.url.raw_path.decode()
    for _ in range(3):
        seen = unquote(seen)
    resolved = posixpath.normpath(seen.replace("\\", "/"))
    assert resolved == "/team/v1" or resolved.startswith("/team/v1/"), path


def test_a_url_too_long_for_the_upstream_is_414() -> None:
    with pytest.raises(URITooLong):
        Rewriter(CONFIG).build(inbound(path=b"/v1/" + b"a" * 65_530), Route(OPEN, None))


def test_client_x_sentinel_headers_never_go_upstream() -> None:
    headers = [(b"x-sentinel-provider", b"forged"), (b"X-Sentinel-Anything", b"1"), (b"x-s", b"1")]
    request = Rewriter(CONFIG).build(inbound(b"{}", headers=headers), Route(OPEN, None))
    assert [name for name in request.headers if name.startswith("x-s")] == ["x-s"]


def test_a_follow_up_without_model_gets_the_pinned_one() -> None:
    for body, expected in [
        (b'{"messages": []}', b'{"model":"m-pinned","messages": []}'),
        (b'{"conversation_id": "c"}', b'{"model":"m-pinned"}'),
        (b'{"messages": [], "conversation_id": "c"}', b'{"messages": [], "model":"m-pinned"}'),
        (b"{}", b'{"model":"m-pinned"}'),
        (b'{"model": null, "n": 1}', b'{"model": "m-pinned", "n": 1}'),
    ]:
        request = Rewriter(CONFIG).build(
            inbound(body, payload=orjson.loads(body)), Route(OPEN, "m-pinned")
        )
        assert request.read() == expected


def test_numbers_and_escapes_survive_a_model_rewrite() -> None:
    body = (
        b'{"model": "fast", "conversation_id": "c", "seed": 123456789012345678901234567890, '
        b'"temperature": 0.1000000000000000055511151231257827, "s": "caf\\u00e9\\/"}'
    )
    request = Rewriter(CONFIG).build(
        inbound(body, payload={"model": "fast", "conversation_id": "c"}), Route(OPEN, "m-b")
    )
    assert request.read() == (
        b'{"model": "m-b", "seed": 123456789012345678901234567890, '
        b'"temperature": 0.1000000000000000055511151231257827, "s": "caf\\u00e9\\/"}'
    )


def test_client_credentials_go_only_to_a_provider_that_opts_in() -> None:
    credentials = [
        (b"authorization", b"Bearer sk-client"),
        (b"api-key", b"azure-client"),
        (b"x-api-key", b"anthropic-client"),
        (b"x-other", b"kept"),
    ]
    rewriter = Rewriter(CONFIG)
    opted_in = rewriter.build(inbound(b"{}", headers=credentials), Route(OPEN, None))
    keyless = rewriter.build(inbound(b"{}", headers=credentials), Route(KEYLESS, None))
    keyed = rewriter.build(inbound(b"{}", headers=credentials), Route(KEYED, None))
    assert opted_in.headers["authorization"] == "Bearer sk-client"
    assert opted_in.headers["x-api-key"] == "anthropic-client"
    assert not {"authorization", "api-key", "x-api-key"} & set(keyless.headers)
    assert keyless.headers["x-other"] == "kept"
    assert keyed.headers.get_list("authorization") == ["Bearer sk-provider"]
    assert not {"api-key", "x-api-key"} & set(keyed.headers)


def test_a_prompt_cache_key_is_added_where_asked() -> None:
    rewriter = Rewriter(CONFIG)
    for body, expected in [
        (b'{"model": "m"}', b'{"prompt_cache_key":"k1","model": "m"}'),
        (b'{"model": "m", "conversation_id": "c"}', b'{"model": "m", "prompt_cache_key":"k1"}'),
        (b"{}", b'{"prompt_cache_key":"k1"}'),
    ]:
        request = rewriter.build(
            inbound(body, payload=orjson.loads(body)), Route(OPEN, None), cache_key="k1"
        )
        assert request.read() == expected
    both = b'{"conversation_id": "c", "messages": []}'
    request = rewriter.build(
        inbound(both, payload=orjson.loads(both)), Route(OPEN, "m-b"), cache_key="k1"
    )
    assert orjson.loads(request.read()) == {
        "model": "m-b",
        "prompt_cache_key": "k1",
        "messages": [],
    }
