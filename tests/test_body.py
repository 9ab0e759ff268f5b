"""The body's bytes: what the reader finds and the rewriter changes, for any JSON object."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sentinel_proxy.body import DuplicateMember, apply, find_member, plain_keys, remove_member
from sentinel_proxy.config import DEFAULT_ID_SOURCES, Provider
from sentinel_proxy.exceptions import InvalidRequest, RequestTooLarge
from sentinel_proxy.request import IdSources, read_request
from sentinel_proxy.rewrite import rewrite_body
from sentinel_proxy.routing import Route

PROVIDER = Provider("p", "http://p.test/v1")
SPACE = st.sampled_from(["", " ", "\n", "\t", "\r\n", "  "])

# JSON text, not values: the spelling is what must survive.
NUMBERS = st.one_of(
    st.integers().map(str),
    st.integers(min_value=10**20, max_value=10**40).map(str),
    st.sampled_from(
        ["0.1000000000000000055511151231257827", "-0.0", "1e400", "1E-7", "123.4560", "-12e+3"]
    ),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
)
STRINGS = st.one_of(
    st.text(max_size=12).map(lambda t: json.dumps(t, ensure_ascii=False)),
    st.text(max_size=12).map(json.dumps),
    st.sampled_from(
        [
            r'"caf\u00e9"',
            r'"\ud83d\ude00"',
            r'"a\/b"',
            r'"say \"model\""',
            r'"\\"',
            r'"\ud800"',
            '"{[\\"conversation_id\\": 1]}"',
            '"model"',
        ]
    ),
)
SCALARS = st.one_of(NUMBERS, STRINGS, st.sampled_from(["true", "false", "null"]))


def _array(items: list[tuple[str, str, str]]) -> str:
    return "[" + ",".join(a + v + b for a, v, b in items) + "]"


def _object(items: list[tuple[str, str, str, str]]) -> str:
    return "{" + ",".join(f"{a}{k}{b}:{c}{v}" for a, k, b, c, v in items) + "}"


VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(st.tuples(SPACE, inner, SPACE), max_size=4).map(_array),
        st.lists(st.tuples(SPACE, STRINGS, SPACE, SPACE, inner), max_size=4).map(_object),
    ),
    max_leaves=12,
)
# Keys the proxy reads, in every spelling a parser accepts, and others.
MODEL_KEYS = st.sampled_from(['"model"', r'"mod\u0065l"', r'"\u006dodel"'])
ID_KEYS = st.sampled_from(['"conversation_id"', r'"conversation\u005fid"'])
OTHER_KEYS = st.one_of(
    STRINGS, st.sampled_from(['"messages"', '"seed"', '"models"', '"model "', '"conversation"'])
).filter(lambda key: json.loads(key) not in ("model", "conversation_id"))


@st.composite
def bodies(draw: st.DrawFn) -> tuple[bytes, list[tuple[str, str, str]], str, str | None]:
    """A JSON object as text, its members as (key text, value text, member text), the
    model value's text and the conversation id's value text (or None when absent)."""
    members = draw(st.lists(st.tuples(OTHER_KEYS, VALUES), max_size=4))
    model = draw(st.sampled_from(['"fast"', '"gpt-4o"', "null"]))
    members.insert(draw(st.integers(0, len(members))), (draw(MODEL_KEYS), model))
    conversation = None
    if draw(st.booleans()):
        conversation = draw(st.sampled_from(['"c-1"', "null", '"caf\\u00e9"']))
        members.insert(draw(st.integers(0, len(members))), (draw(ID_KEYS), conversation))
    texts = [
        (key, value, f"{draw(SPACE)}{key}{draw(SPACE)}:{draw(SPACE)}{value}{draw(SPACE)}")
        for key, value in members
    ]
    body = draw(SPACE) + "{" + ",".join(text for _, _, text in texts) + "}" + draw(SPACE)
    return body.encode(), texts, model, conversation


def _receive(body: bytes) -> Any:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def _read(body: bytes, *, limit: int = 1 << 20) -> Any:
    scope = {
        "method": "POST",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
    }
    return await read_request(
        scope, _receive(body), max_body_bytes=limit, sources=IdSources(DEFAULT_ID_SOURCES)
    )


def _pairs(body: bytes) -> list[tuple[str, Any]]:
    pairs: list[tuple[str, Any]] = json.loads(body, object_pairs_hook=list)
    return pairs


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(bodies(), st.sampled_from(["fast", "llama-3.1", 'we"ird\\model']))
async def test_only_the_model_value_and_the_conversation_id_change(
    case: tuple[bytes, list[tuple[str, str, str]], str, str | None], new_model: str
) -> None:
    body, members, model_text, conversation = case
    request = await _read(body)
    forwarded = rewrite_body(request, Route(PROVIDER, new_model))
    expected = [
        (key, new_model if key == "model" else value)
        for key, value in _pairs(body)
        if key != "conversation_id"
    ]
    if request.model_member is None:
        expected.insert(0, ("model", new_model))
    assert _pairs(forwarded) == expected
    # Every other member is there byte for byte, in the order it came.
    position = 0
    for key, _value, text in members:
        if json.loads(key) in ("model", "conversation_id"):
            continue
        found = forwarded.find(text.strip(" \t\r\n").encode(), position)
        assert found >= 0, (text, forwarded)
        position = found + 1


@settings(max_examples=200)
@given(bodies())
async def test_a_body_left_alone_is_the_same_bytes(
    case: tuple[bytes, list[tuple[str, str, str]], str, str | None],
) -> None:
    body, _, _, conversation = case
    request = await _read(body)
    unchanged = Route(PROVIDER, None)
    if conversation is None:
        assert rewrite_body(request, unchanged) is body


@settings(max_examples=150)
@given(bodies(), st.sampled_from(["model", "conversation_id"]), st.sampled_from(['"x"', "1"]))
async def test_a_member_named_twice_is_refused(
    case: tuple[bytes, list[tuple[str, str, str]], str, str | None], name: str, value: str
) -> None:
    body = case[0]
    twice = body.replace(b"{", b'{"' + name.encode() + b'":' + value.encode() + b",", 1)
    if name == "conversation_id" and case[3] is None:
        twice = twice.replace(b"{", b'{"conversation_id":"y",', 1)
    with pytest.raises(InvalidRequest):
        await _read(twice)


@settings(max_examples=300)
@given(st.binary(max_size=64) | bodies().map(lambda case: case[0][: len(case[0]) // 2]))
async def test_no_input_raises_anything_but_the_proxy_s_own_4xx(body: bytes) -> None:
    try:
        request = await _read(body, limit=48)
    except (InvalidRequest, RequestTooLarge):
        return
    rewrite_body(request, Route(PROVIDER, "m"))


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"conversation_id":"c"}', b"{}"),
        (b'{ "conversation_id" : "c" }', b"{  }"),
        (b'{"a":1,"conversation_id":"c"}', b'{"a":1}'),
        (b'{"conversation_id":"c", "a":1}', b'{"a":1}'),
        (b'{"a":1, "conversation_id":"c" ,"b":2}', b'{"a":1, "b":2}'),
        (b'{"a":{"conversation_id":1},"conversation_id":null}', b'{"a":{"conversation_id":1}}'),
    ],
)
def test_removing_a_member_takes_one_comma_with_it(body: bytes, expected: bytes) -> None:
    member = find_member(body, b'"conversation_id"', plain=plain_keys(body))
    assert apply(body, [remove_member(body, member)]) == expected


def test_keys_spelt_with_escapes_are_the_same_key() -> None:
    with pytest.raises(DuplicateMember):
        body = b'{"model":"a","mod\\u0065l":"b"}'
        find_member(body, b'"model"', plain=plain_keys(body))
    body = b'{"x":"\\u0041","model":"a"}'
    member = find_member(body, b'"model"', plain=plain_keys(body))
    assert member[1:] == (22, 25)
