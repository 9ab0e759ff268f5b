"""Store calls in the shape the tests think in: "this candidate, or what is stored"."""

from __future__ import annotations

from sentinel_proxy.sessions import Session, SessionStore


async def get_or_create(store: SessionStore, candidate: Session) -> tuple[Session, bool]:
    return await store.get_or_create(candidate.id, candidate.external_id, lambda: candidate)
