"""Conversation ids the proxy derives itself: implicit session ids for requests that carry
none, and the prompt-cache keys sent to providers.

Both are HMACs under one key that every replica shares (`session.implicit_key_env`), so a
conversation gets the same id and cache key on whichever replica or worker serves it, and
neither reveals what it was made from. The tenant (the user's external_id) is part of every
input, so two users never share one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from typing import Any

import orjson

IMPLICIT = "implicit"
# Ids look like "implicit-<32 hex digits>": 128 bits, and plainly not a client's own id.
_ID_PREFIX = "implicit-"
_DIGEST_CHARS = 32
_SYSTEM_ROLES = ("system", "developer")


class Identity:
    """Holds the HMAC key; without a configured one, a key of this process only (prompt-
    cache keys then differ between processes, and implicit sessions are not allowed)."""

    def __init__(self, key: bytes | None) -> None:
        self.shared = key is not None
        self._key = key if key is not None else os.urandom(32)

    def implicit_id(self, tenant: str | None, payload: dict[str, Any]) -> str | None:
        """The id of the conversation a request without one belongs to: a keyed hash of
        its system prompt and its first user message, which a growing history keeps. None
        when the request has no user message to go by."""
        start = conversation_start(payload)
        if start is None:
            return None
        return _ID_PREFIX + self._digest(b"implicit", tenant, start)

    def prompt_cache_key(self, tenant: str | None, conversation_id: str) -> str:
        """The prompt_cache_key for a conversation: never its raw id."""
        return self._digest(b"prompt-cache", tenant, conversation_id.encode())

    def _digest(self, purpose: bytes, tenant: str | None, data: bytes) -> str:
        # Length-prefixed parts: no two (tenant, data) pairs make the same input.
        tenant_bytes = (tenant or "").encode()
        message = b"%s\0%d:%s%s" % (purpose, len(tenant_bytes), tenant_bytes, data)
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()[:_DIGEST_CHARS]


def conversation_start(payload: dict[str, Any]) -> bytes | None:
    """The canonical bytes of a request's system prompt and first user message (chat
    completions' `messages`, the Responses API's `instructions` and `input`), or None."""
    system: Any = None
    first_user: Any = None
    messages = payload.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, dict):
                continue
            role = message.get("role")
            if system is None and role in _SYSTEM_ROLES:
                system = message.get("content")
            elif role == "user":
                first_user = message.get("content")
                break
    else:
        system = payload.get("instructions")
        given = payload.get("input")
        if isinstance(given, str):
            first_user = given
        elif isinstance(given, list):
            for item in given:
                if isinstance(item, dict) and item.get("role") == "user":
                    first_user = item.get("content")
                    break
    if first_user is None:
        return None
    return _canonical([system, first_user])


def _canonical(value: Any) -> bytes:
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        # A lone surrogate orjson cannot encode: Python's encoder escapes it.
        return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
