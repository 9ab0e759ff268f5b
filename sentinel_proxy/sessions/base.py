"""The Session record, its key and JSON form, and the protocol every store follows."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

KEY_PREFIX = "sentinel:session:"


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    provider: str
    model: str
    created_at: int
    external_id: str | None = None

    @property
    def key(self) -> str:
        return session_key(self.id, self.external_id)

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "id": self.id,
                "provider": self.provider,
                "model": self.model,
                "external_id": self.external_id,
                "created_at": self.created_at,
            }
        )


def session_key(conversation_id: str, external_id: str | None = None) -> str:
    if external_id is None:
        return KEY_PREFIX + conversation_id
    return f"{KEY_PREFIX}{external_id}:{conversation_id}"


def decode_session(
    raw: bytes | str, conversation_id: str, external_id: str | None
) -> Session | None:
    """The stored session, or None when the value is not one, or not the one asked for.

    The id check is defence in depth against a reply meant for another command reaching
    this one (CVE-2023-28858/28859): a session is only ever used for its own conversation.
    """
    try:
        data: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    provider, model, created_at = data.get("provider"), data.get("model"), data.get("created_at")
    if (
        data.get("id") != conversation_id
        or data.get("external_id") != external_id
        or not isinstance(provider, str)
        or not isinstance(model, str)
        or isinstance(created_at, bool)
        or not isinstance(created_at, int)
    ):
        return None
    return Session(conversation_id, provider, model, created_at, external_id)


# Decides whether a decoded session can still be served (its provider may be gone from config).
Acceptor = Callable[[Session], bool]
# Makes the session to store for a conversation that has none; may raise a ProxyError
# (a request that cannot start a conversation), which the store lets through.
Maker = Callable[[], Session]


class SessionStore(Protocol):
    """Where sessions live. Every method raises StoreUnavailable, never a library's error."""

    async def get_or_create(
        self, conversation_id: str, external_id: str | None, make: Maker
    ) -> tuple[Session, bool]:
        """The stored session of the conversation, its TTL renewed, or else the one `make`
        returns, stored atomically: of concurrent first requests one session wins and
        every one gets it. Returns (session, created)."""

    async def repin(self, failed: Session, replacement: Session) -> Session:
        """Move a conversation pinned to `failed`'s target to `replacement`, atomically: if
        another request moved it first, its pin wins and is returned. Renews the TTL."""

    async def get(self, conversation_id: str, external_id: str | None = None) -> Session | None:
        """The stored session without renewing it (debug endpoint)."""

    async def delete(self, conversation_id: str, external_id: str | None = None) -> bool:
        """Unpin a conversation; True when there was a session."""

    async def ping(self) -> bool:
        """Whether the store answers now (readiness)."""

    def set_ttl(self, seconds: int) -> None:
        """The TTL that stores and renewals set from now on (a reload)."""

    async def aclose(self) -> None: ...
