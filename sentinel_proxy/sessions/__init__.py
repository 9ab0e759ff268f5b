"""Conversation sessions: which provider and model a conversation is pinned to."""

from sentinel_proxy.sessions.base import Session, SessionStore, session_key
from sentinel_proxy.sessions.breaker import CircuitBreaker
from sentinel_proxy.sessions.cluster import RedisClusterStore
from sentinel_proxy.sessions.memory import MemoryStore
from sentinel_proxy.sessions.redis import RedisStore
from sentinel_proxy.sessions.sentinel import RedisSentinelStore

__all__ = [
    "CircuitBreaker",
    "MemoryStore",
    "RedisClusterStore",
    "RedisSentinelStore",
    "RedisStore",
    "Session",
    "SessionStore",
    "session_key",
]
