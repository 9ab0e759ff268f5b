"""The Redis session store: one round trip for a hit, atomic creation for a miss."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from sentinel_proxy.exceptions import StoreUnavailable
from sentinel_proxy.sessions.base import Acceptor, Session, decode_session, session_key
from sentinel_proxy.sessions.breaker import CircuitBreaker

logger = logging.getLogger("sentinel_proxy.sessions")

# Replace a value we found unusable, unless another request got there first: then that
# request's session wins and is returned, as for a lost SET NX.
_REPLACE = """
local current = redis.call('GET', KEYS[1])
if current == false or current == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return ARGV[2]
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return current
"""

# A stored value may be replaced at most this often within one call before we give up.
_ATTEMPTS = 3


class RedisStore:
    """Sessions in Redis under `sentinel:session:{id}` with a sliding TTL.

    Every call has one time budget (connect, pool wait and reply together) and goes
    through a circuit breaker, so a dead or black-holed Redis costs a request at most
    the budget, and nothing at all while the breaker is open.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        ttl_seconds: int,
        timeout: float,
        breaker: CircuitBreaker,
        accept: Acceptor = lambda session: True,
    ) -> None:
        self._redis = client
        self._ttl = ttl_seconds
        self._timeout = timeout
        self._breaker = breaker
        self._accept = accept
        self._replace = client.register_script(_REPLACE)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        ttl_seconds: int,
        timeout: float,
        max_connections: int,
        breaker: CircuitBreaker,
        accept: Acceptor = lambda session: True,
    ) -> RedisStore:
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # Retries would multiply the budget; the breaker and the client's retry decide.
            retry=Retry(NoBackoff(), 0),
        )
        client = aioredis.Redis(connection_pool=pool)
        return cls(client, ttl_seconds=ttl_seconds, timeout=timeout, breaker=breaker, accept=accept)

    @property
    def breaker(self) -> CircuitBreaker:
        return self._breaker

    async def get_or_create(self, candidate: Session) -> tuple[Session, bool]:
        key = candidate.key
        async with self._guard():
            raw = await self._redis.getex(key, ex=self._ttl)
            for _ in range(_ATTEMPTS):
                if raw is None:
                    if await self._redis.set(key, candidate.to_json(), nx=True, ex=self._ttl):
                        return candidate, True
                    # Another request created it between our GETEX and SET: use theirs.
                    raw = await self._redis.getex(key, ex=self._ttl)
                    continue
                found = decode_session(raw, expected=candidate)
                if found is not None and self._accept(found):
                    return found, False
                logger.warning("replacing unusable session value for conversation %s", candidate.id)
                stored = await self._replace(keys=[key], args=[raw, candidate.to_json(), self._ttl])
                if stored == candidate.to_json():
                    return candidate, True
                raw = stored
        raise StoreUnavailable("the session store keeps returning unusable values")

    async def get(self, conversation_id: str, external_id: str | None = None) -> Session | None:
        probe = Session(conversation_id, "", "", 0, external_id)
        async with self._guard():
            raw = await self._redis.get(session_key(conversation_id, external_id))
        return None if raw is None else decode_session(raw, expected=probe)

    async def delete(self, conversation_id: str, external_id: str | None = None) -> bool:
        async with self._guard():
            return bool(await self._redis.delete(session_key(conversation_id, external_id)))

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(self._timeout):
                await self._redis.ping()
        except (RedisError, OSError, TimeoutError):
            return False
        self._breaker.success()
        return True

    async def aclose(self) -> None:
        await self._redis.aclose(close_connection_pool=True)

    @asynccontextmanager
    async def _guard(self) -> AsyncIterator[None]:
        if not self._breaker.allow():
            raise StoreUnavailable("the session store is unavailable (circuit open)")
        try:
            async with asyncio.timeout(self._timeout):
                yield
        except TimeoutError as exc:
            self._breaker.failure()
            raise StoreUnavailable("the session store did not answer in time") from exc
        except (RedisError, OSError) as exc:
            self._breaker.failure()
            raise StoreUnavailable("the session store is unreachable") from exc
        else:
            self._breaker.success()
