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

# The escapes that could spell a lowercase letter or '_' of a key: \u005f, \u0061..\u007a.
_LETTER_ESCAPE = re.compile(rb"\\u00[567]")
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_STRING_OR_BRACKET = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)
_SCALAR = re.compile(rb"[^\s,}\]]+")
_SPACE = re.compile(rb"[ \t\n\r]*")
_BLANK = frozenset(b" \t\n\r")
_OPEN = frozenset(b"[{")
_QUOTE = ord('"')
_BACKSLASH = ord("\\")
_COMMA = ord(",")
_CLOSE_OBJECT = ord("}")

# Where one top-level member lies: (key, value_start, value_end), the key from its opening
# quote, the value over [value_start, value_end). A plain tuple: this is on every request.
Member = tuple[int, int, int]
# An edit of the body: replace [start, end) with the bytes.
Edit = tuple[int, int, bytes]


class DuplicateMember(ValueError):
    """The object names a key twice: the proxy and the upstream might read different ones."""


def plain_keys(body: bytes) -> bool:
    """Whether no key in `body` can be an escaped spelling of a lowercase name."""
    return b"\\u00" not in body or _LETTER_ESCAPE.search(body) is None


def find_member(body: bytes, key: bytes, *, plain: bool) -> Member:
    """The top-level member whose key is `key` (the name as a JSON string, `b'"model"'`),
    which the parsed object is known to hold; `plain` is what `plain_keys(body)` says.

    Raises DuplicateMember when the object holds the key more than once, however spelt."""
    start = body.find(key)
    if plain and start >= 0 and body.find(key, start + len(key)) < 0:
        # Spelt without escapes, a key has one form: its only occurrence in the whole
        # body is the member (a member's key is such an occurrence).
        value = _skip_blank(body, _skip_blank(body, start + len(key)) + 1)
        return start, value, _value_end(body, value)
    name = key[1:-1].decode()
    found = [member for found_name, member in _members(body) if found_name == name]
    if len(found) != 1:
        raise DuplicateMember(name)
    return found[0]


def replace_value(member: Member, value: bytes) -> Edit:
    """The edit that puts `value` (JSON text) in place of the member's value."""
    return member[1], member[2], value


def remove_member(body: bytes, member: Member) -> Edit:
    """The edit that cuts the member out with one of the commas beside it."""
    key, _, value_end = member
    after = _skip_blank(body, value_end)
    if body[after] == _COMMA:
        return key, _skip_blank(body, after + 1), b""
    before = key
    while body[before - 1] in _BLANK:
        before -= 1
    if body[before - 1] == _COMMA:
        return before - 1, value_end, b""
    return key, value_end, b""


def insert_first(body: bytes, members: bytes) -> Edit:
    """The edit that puts `members` (`"name":value` text, with a trailing comma when
    members follow) right after the object's opening brace."""
    start = _skip_blank(body, 0) + 1
    return start, start, members


def apply(body: bytes, edits: list[Edit]) -> bytes:
    """`body` with non-overlapping edits made."""
    if len(edits) == 1:
        start, end, replacement = edits[0]
        return body[:start] + replacement + body[end:]
    parts: list[bytes] = []
    position = 0
    # An insertion sorts before a removal that starts where it does.
    for start, end, replacement in sorted(edits):
        parts.append(body[position:start])
        parts.append(replacement)
        position = end
    parts.append(body[position:])
    return b"".join(parts)


def _members(body: bytes) -> list[tuple[str, Member]]:
    members: list[tuple[str, Member]] = []
    position = _skip_blank(body, _skip_blank(body, 0) + 1)
    if body[position] == _CLOSE_OBJECT:
        return members
    while True:
        key = _STRING.match(body, position)
        assert key is not None
        raw = key.group()
        name = json.loads(raw.decode()) if b"\\" in raw else raw[1:-1].decode()
        value = _skip_blank(body, _skip_blank(body, key.end()) + 1)
        end = _value_end(body, value)
        members.append((name, (position, value, end)))
        position = _skip_blank(body, end)
        if body[position] != _COMMA:
            return members
        position = _skip_blank(body, position + 1)


def _skip_blank(body: bytes, position: int) -> int:
    if body[position] not in _BLANK:
        return position
    return _SPACE.match(body, position).end()  # type: ignore[union-attr]


def _value_end(body: bytes, start: int) -> int:
    first = body[start]
    if first == _QUOTE:
        end = body.find(b'"', start + 1)
        if body[end - 1] != _BACKSLASH:
            return end + 1
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
