from __future__ import annotations

from typing import Any

import pytest

from sentinel_proxy.config import DEFAULT_ID_SOURCES, IdSource
from sentinel_proxy.exceptions import HeadersTooLarge, InvalidRequest, RequestTooLarge
from sentinel_proxy.request import ClientDisconnected, IdSources, read_request

HEADER = b"x-conversation-id"
SOURCES = IdSources(DEFAULT_ID_SOURCES)


def scope(headers: list[tuple[bytes, bytes]], method: str = "POST") -> dict[str, Any]:
    return {
        "type": "http",
        "method": method,
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "headers": headers,
    }


def receiver(*chunks: bytes) -> Any:
    messages = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    return receive


JSON = [(b"content-type", b"application/json")]


async def read(body: bytes, headers: list[tuple[bytes, bytes]] = JSON, **kw: Any) -> Any:
    return await read_request(
        scope(headers, **kw), receiver(body), max_body_bytes=100, sources=SOURCES
    )


async def test_json_body_with_conversation_id() -> None:
    request = await read(b'{"model": "m", "conversation_id": "c1"}')
    assert request.payload == {"model": "m", "conversation_id": "c1"}
    assert (request.conversation_id, request.model) == ("c1", "m")
    assert request.id_member is not None


async def test_header_conversation_id() -> None:
    request = await read(b'{"model": "m"}', JSON + [(HEADER, b"c2")])
    assert request.conversation_id == "c2"
    assert request.id_member is None


async def test_same_id_in_both_places_is_fine_but_different_is_400() -> None:
    request = await read(b'{"model": "m", "conversation_id": "c"}', JSON + [(HEADER, b"c")])
    assert request.conversation_id == "c"
    with pytest.raises(InvalidRequest, match="differ"):
        await read(b'{"model": "m", "conversation_id": "c"}', JSON + [(HEADER, b"d")])


@pytest.mark.parametrize(
    "body",
    [
        b'{"conversation_id": 5}',
        b'{"conversation_id": ""}',
        b'{"conversation_id": "a\\nb"}',
        b'{"conversation_id": ["x"]}',
        b'{"conversation_id": "' + b"x" * 257 + b'"}',
    ],
)
async def test_bad_conversation_id(body: bytes) -> None:
    with pytest.raises(InvalidRequest) as info:
        await read_request(scope(JSON), receiver(body), max_body_bytes=1000, sources=SOURCES)
    assert info.value.param == "conversation_id"


async def test_null_conversation_id_means_none() -> None:
    request = await read(b'{"model": "m", "conversation_id": null}')
    assert request.conversation_id is None
    assert request.id_member is not None  # still stripped before going upstream


async def test_bad_header_conversation_id() -> None:
    with pytest.raises(InvalidRequest):
        await read(b'{"model": "m"}', JSON + [(HEADER, b"\xff\xfe")])


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'"text"', b"{} x", b"\xff"])
async def test_malformed_or_non_object_json_is_400(body: bytes) -> None:
    with pytest.raises(InvalidRequest):
        await read(body)


async def test_model_must_be_a_string() -> None:
    with pytest.raises(InvalidRequest) as info:
        await read(b'{"model": 4}')
    assert info.value.param == "model"


async def test_non_json_bodies_are_not_parsed() -> None:
    request = await read(b"{not json", [(b"content-type", b"text/plain")])
    assert request.payload is None and request.body == b"{not json"
    gzipped = await read(b"\x1f\x8b", JSON + [(b"content-encoding", b"gzip")])
    assert gzipped.payload is None


async def test_get_is_not_parsed() -> None:
    request = await read(b"", method="GET")
    assert request.payload is None


async def test_body_in_chunks() -> None:
    request = await read_request(
        scope(JSON), receiver(b'{"model":', b' "m"}'), max_body_bytes=100, sources=SOURCES
    )
    assert request.model == "m"


async def test_declared_length_over_the_limit_is_refused_before_reading() -> None:
    async def receive() -> dict[str, Any]:
        raise AssertionError("the body must not be read")

    headers = JSON + [(b"content-length", b"101")]
    with pytest.raises(RequestTooLarge):
        await read_request(scope(headers), receive, max_body_bytes=100, sources=SOURCES)


async def test_streamed_body_over_the_limit() -> None:
    with pytest.raises(RequestTooLarge):
        await read_request(
            scope(JSON), receiver(b"x" * 60, b"x" * 60), max_body_bytes=100, sources=SOURCES
        )


async def test_client_gone_while_sending_body() -> None:
    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    with pytest.raises(ClientDisconnected):
        await read_request(scope(JSON), receive, max_body_bytes=100, sources=SOURCES)


async def test_oversized_headers_are_refused_before_the_body_is_read() -> None:
    async def receive() -> dict[str, Any]:
        raise AssertionError("the body must not be read")

    headers = JSON + [(b"x-padding", b"x" * 70_000)]
    with pytest.raises(HeadersTooLarge) as info:
        await read_request(scope(headers), receive, max_body_bytes=100, sources=SOURCES)
    assert info.value.status_code == 431


async def test_an_empty_json_body_is_forwarded_unparsed() -> None:
    # The SDKs send this for batches.cancel, fine_tuning.jobs.cancel, responses.cancel.
    for body in (b"", b"  \r\n"):
        request = await read(body)
        assert request.payload is None and request.body == body


@pytest.mark.parametrize(
    "model",
    ['"x\\u0001"', '"' + "m" * 257 + '"', '" gpt"', '"gpt\\n"', '"\\u2028"', '""', "4"],
)
async def test_a_model_that_cannot_be_a_header_is_400(model: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        await read_request(
            scope(JSON),
            receiver(b'{"model": ' + model.encode() + b"}"),
            max_body_bytes=1000,
            sources=SOURCES,
        )
    assert info.value.param == "model"


async def test_a_long_printable_model_is_fine() -> None:
    body = b'{"model": "' + "\u00e9".encode() * 256 + b'"}'
    request = await read_request(scope(JSON), receiver(body), max_body_bytes=1000, sources=SOURCES)
    assert request.model == "\u00e9" * 256


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "a", "model": "b"}',
        b'{"model": "a", "mod\\u0065l": "b"}',
        b'{"conversation_id": "a", "conversation_id": "b", "model": "m"}',
    ],
)
async def test_a_key_the_proxy_routes_on_named_twice_is_400(body: bytes) -> None:
    with pytest.raises(InvalidRequest, match="more than one"):
        await read(body)


async def test_valid_json_that_orjson_refuses_is_still_read() -> None:
    request = await read(b'{"model": "m", "x": "\\ud800", "y": 1e400}')
    assert request.model == "m" and request.payload["x"] == "\ud800"


@pytest.mark.parametrize("body", [b'{"model": NaN}', b'{"a": Infinity}'])
async def test_non_json_constants_are_refused(body: bytes) -> None:
    with pytest.raises(InvalidRequest):
        await read(body)


def sources(*labels: str) -> IdSources:
    made = []
    for label in labels:
        kind, name = label.split(":")
        owned = name in ("conversation_id", "x-conversation-id")
        made.append(IdSource(kind, name, owned))  # type: ignore[arg-type]
    return IdSources(tuple(made))


async def read_with(order: IdSources, body: bytes, headers: list[tuple[bytes, bytes]]) -> Any:
    return await read_request(
        scope(JSON + headers), receiver(body), max_body_bytes=1000, sources=order
    )


async def test_the_first_present_source_wins_in_the_configured_order() -> None:
    order = sources("header:x-session-id", "body:prompt_cache_key", "body:user")
    body = b'{"model": "m", "prompt_cache_key": "pck", "user": "u-1"}'
    both = await read_with(order, body, [(b"x-session-id", b"s-1")])
    assert (both.conversation_id, both.id_source) == ("s-1", "header:x-session-id")
    body_only = await read_with(order, body, [])
    assert (body_only.conversation_id, body_only.id_source) == ("pck", "body:prompt_cache_key")
    user = await read_with(order, b'{"model": "m", "user": "u-1"}', [])
    assert (user.conversation_id, user.id_source) == ("u-1", "body:user")
    none = await read_with(order, b'{"model": "m"}', [(b"x-conversation-id", b"c")])
    assert (none.conversation_id, none.id_source) == (None, None)


async def test_an_id_over_256_characters_from_any_source_is_400_never_cut() -> None:
    order = sources("header:x-session-affinity", "body:user")
    with pytest.raises(InvalidRequest) as info:
        await read_with(order, b'{"model": "m"}', [(b"x-session-affinity", b"s" * 257)])
    assert info.value.param == "x-session-affinity"
    with pytest.raises(InvalidRequest) as info:
        await read_with(order, b'{"model": "m", "user": "' + b"u" * 257 + b'"}', [])
    assert info.value.param == "user"


async def test_the_body_conversation_id_is_cut_out_whichever_source_wins() -> None:
    order = sources("header:x-session-id")
    request = await read_with(
        order, b'{"model": "m", "conversation_id": "c"}', [(b"x-session-id", b"s")]
    )
    assert request.conversation_id == "s" and request.id_member is not None
