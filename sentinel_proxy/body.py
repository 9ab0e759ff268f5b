"""A JSON request body at the byte level: where a top-level member lies, and edits that
leave every other byte as the client sent it.

Re-encoding a parsed body would change what the proxy promises to leave alone: orjson
turns integers past 64 bits into doubles and rewrites escapes, spacing and, for duplicate
keys, which member survives. So the proxy parses for meaning and edits the bytes.

Every function here expects a body that has already been parsed as a JSON object.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_STRING_OR_BRACKET = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)
_SCALAR = re.compile(rb"[^\s,}\]]+")
_SPACE = re.compile(rb"[ \t\n\r]*")
_OPEN = frozenset(b"[{")
_QUOTE = ord('"')
_COMMA = ord(",")
_CLOSE_OBJECT = ord("}")


class DuplicateMember(ValueError):
    """The object names a key twice: the proxy and the upstream might read different ones."""


@dataclass(frozen=True, slots=True)
class Member:
    """Where one top-level member lies: `key` starts at its opening quote, the value
    spans [value_start, value_end)."""

    key: int
    value_start: int
    value_end: int


def find_member(body: bytes, name: str) -> Member:
    """The top-level member `name`, which the parsed object is known to hold.

    Raises DuplicateMember when the object holds `name` more than once, however spelt."""
    quoted = b'"' + name.encode() + b'"'
    if b"\\u" not in body and body.count(quoted) == 1:
        # Without \u escapes the key can only be spelt one way, so its one occurrence in
        # the whole body is the member (a member's key is such an occurrence).
        start = body.index(quoted)
        colon = _SPACE.match(body, start + len(quoted)).end()  # type: ignore[union-attr]
        value = _SPACE.match(body, colon + 1).end()  # type: ignore[union-attr]
        return Member(start, value, _value_end(body, value))
    found = [member for key, member in _members(body) if key == name]
    if len(found) != 1:
        raise DuplicateMember(name)
    return found[0]


def replace_value(body: bytes, member: Member, value: bytes) -> tuple[int, int, bytes]:
    """The edit that puts `value` (JSON text) in place of the member's value."""
    return member.value_start, member.value_end, value


def remove_member(body: bytes, member: Member) -> tuple[int, int, bytes]:
    """The edit that cuts the member out with one of the commas beside it."""
    after = _SPACE.match(body, member.value_end).end()  # type: ignore[union-attr]
    if body[after] == _COMMA:
        following = _SPACE.match(body, after + 1).end()  # type: ignore[union-attr]
        return member.key, following, b""
    before = _back_over_space(body, member.key)
    if body[before - 1] == _COMMA:
        return before - 1, member.value_end, b""
    return member.key, member.value_end, b""


def insert_first(body: bytes, members: bytes) -> tuple[int, int, bytes]:
    """The edit that puts `members` (`"name":value` text, with a trailing comma when
    members follow) right after the object's opening brace."""
    start = _SPACE.match(body).end() + 1  # type: ignore[union-attr]
    return start, start, members


def apply(body: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    """`body` with non-overlapping edits (start, end, replacement) made."""
    if not edits:
        return body
    parts: list[bytes] = []
    position = 0
    # An insertion sorts before a removal that starts where it does.
    for start, end, replacement in sorted(edits, key=lambda edit: edit[:2]):
        parts.append(body[position:start])
        parts.append(replacement)
        position = end
    parts.append(body[position:])
    return b"".join(parts)


def _members(body: bytes) -> list[tuple[str, Member]]:
    members: list[tuple[str, Member]] = []
    position = _SPACE.match(body).end() + 1  # type: ignore[union-attr]
    position = _SPACE.match(body, position).end()  # type: ignore[union-attr]
    if body[position] == _CLOSE_OBJECT:
        return members
    while True:
        key = _STRING.match(body, position)
        assert key is not None
        raw = key.group()
        name = json.loads(raw.decode()) if b"\\" in raw else raw[1:-1].decode()
        colon = _SPACE.match(body, key.end()).end()  # type: ignore[union-attr]
        value = _SPACE.match(body, colon + 1).end()  # type: ignore[union-attr]
        end = _value_end(body, value)
        members.append((name, Member(position, value, end)))
        position = _SPACE.match(body, end).end()  # type: ignore[union-attr]
        if body[position] != _COMMA:
            return members
        position = _SPACE.match(body, position + 1).end()  # type: ignore[union-attr]


def _value_end(body: bytes, start: int) -> int:
    first = body[start]
    if first == _QUOTE:
        return _STRING.match(body, start).end()  # type: ignore[union-attr]
    if first not in _OPEN:
        return _SCALAR.match(body, start).end()  # type: ignore[union-attr]
    depth = 0
    for token in _STRING_OR_BRACKET.finditer(body, start):
        mark = body[token.start()]
        if mark == _QUOTE:
            continue
        depth += 1 if mark in _OPEN else -1
        if depth == 0:
            return token.end()
    raise AssertionError("unbalanced JSON: the body must be parsed before it is edited")


def _back_over_space(body: bytes, position: int) -> int:
    while body[position - 1] in b" \t\n\r":
        position -= 1
    return position
