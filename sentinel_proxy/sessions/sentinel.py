"""The Redis store on the primary that Redis Sentinel names, found again after a failover."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from sentinel_proxy.sessions.base import Acceptor
from sentinel_proxy.sessions.breaker import CircuitBreaker
from sentinel_proxy.sessions.redis import Node, RedisStore, _Lookup

logger = logging.getLogger("sentinel_proxy.sessions")


class RedisSentinelStore(RedisStore):
    """Sessions in the primary of `service`, as the first of `sentinels` that answers names
    it (redis-py's `Sentinel.discover_master`, which skips a primary a sentinel thinks is
    down). `url` gives the database, credentials and TLS options; its host is not used.

    The primary is looked up before the first command, and again, in the background and
    at most once per budget, whenever a call fails or finds the breaker open: a dead
    primary, or a demoted one answering READONLY. A new primary gets fresh connections
    and a closed breaker. Commands go over the same pipelined connections as on a
    single Redis: one round trip for a hit.
    """

    def __init__(
        self,
        url: str,
        *,
        sentinels: Sequence[tuple[str, int]],
        service: str,
        ttl_seconds: int,
        timeout: float,
        max_connections: int,
        breaker: CircuitBreaker,
        accept: Acceptor = lambda session: True,
    ) -> None:
        super().__init__(
            url,
            ttl_seconds=ttl_seconds,
            timeout=timeout,
            max_connections=max_connections,
            breaker=breaker,
            accept=accept,
        )
        # redis-py's own retries and 5 s timeouts would make one lookup last a minute.
        self._sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(sentinels),
            sentinel_kwargs={
                "socket_timeout": timeout,
                "socket_connect_timeout": timeout,
                "retry": Retry(NoBackoff(), 0),
            },
        )
        self._service = service
        self._primary: tuple[str, int] | None = None
        self._lookup = _Lookup(self._discover, interval=timeout)

    @property
    def primary(self) -> tuple[str, int] | None:
        """The primary's address as last named by a sentinel."""
        return self._primary

    async def aclose(self) -> None:
        await self._lookup.aclose()
        await super().aclose()
        await self._sentinel.aclose()

    def _route(self, key: str) -> Node | None:
        return self._node if self._primary is not None else None

    async def _locate(self, key: str) -> Node | None:
        await self._lookup.now(self._timeout)
        return self._route(key)

    async def _nodes(self) -> list[Node]:
        # The readiness probe asks the sentinels each time: a failover forced by an operator
        # leaves the old primary taking writes until the sentinels demote it, up to 10 s
        # later, and nothing fails meanwhile to make the store look.
        try:
            await self._lookup.now(self._timeout)
        except (RedisError, OSError, TimeoutError):
            if self._primary is None:
                raise
        return [self._node]

    def _suspect(self, node: Node) -> None:
        self._lookup.soon(node)

    async def _discover(self, failed: Node | None) -> bool:
        try:
            host, port = await self._sentinel.discover_master(self._service)
        except (RedisError, OSError) as exc:
            logger.warning("no sentinel named a primary for %s: %s", self._service, exc)
            return False
        address = (str(host), int(port))
        if address != self._primary:
            logger.warning("Sentinel names %s:%s the primary of %s", *address, self._service)
            await self._node.connections.retarget(*address)
            self._node.name = f"{address[0]}:{address[1]}"
            self._node.breaker.success()
            self._primary = address
        return True
