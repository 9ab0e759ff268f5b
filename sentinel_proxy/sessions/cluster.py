"""The Redis store on a Redis Cluster: each key to the master of its slot, over that master's
own pipelined connections and behind its own circuit breaker."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import AskError, MovedError, RedisError, ResponseError

from sentinel_proxy.sessions.base import KEY_PREFIX, Acceptor
from sentinel_proxy.sessions.breaker import CircuitBreaker
from sentinel_proxy.sessions.redis import Node, RedisStore, _Lookup

logger = logging.getLogger("sentinel_proxy.sessions")

# Readiness probe keys: one per master, each hashed (by its `{tag}`) to a slot of that master.
_PROBE_PREFIX = KEY_PREFIX + "\x00readyz{"


class RedisClusterStore(RedisStore):
    """Sessions in a Redis Cluster, found from any one node of it (`url`).

    Each session is one key, so each command goes to one master: the one the slot map
    names for the key's slot (CRC16, as Redis computes it). Concurrent commands for one
    master share its writes, as on a single Redis. A MOVED reply updates the map for its
    slot and the command follows it; an ASK reply (a slot being migrated) sends the
    command on with ASKING, once, leaving the map alone.

    Each master has its own circuit breaker: a dead master fails only the conversations
    on its slots, and the others go on. A failure or an open breaker also asks for the
    whole map again (`CLUSTER SLOTS`, from the masters that still answer, at most once
    per budget), so a replica promoted in a dead master's place is used as soon as the
    cluster says so. A master that newly serves slots starts with a closed breaker.
    """

    def __init__(
        self,
        url: str,
        *,
        ttl_seconds: int,
        timeout: float,
        max_connections: int,
        breakers: Callable[[], CircuitBreaker],
        accept: Acceptor = lambda session: True,
    ) -> None:
        super().__init__(
            url,
            ttl_seconds=ttl_seconds,
            timeout=timeout,
            max_connections=max_connections,
            breaker=breakers(),
            accept=accept,
        )
        self._breakers = breakers
        self._known: dict[str, Node] = {self._node.name: self._node}
        self._slots: list[Node | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        self._masters: list[Node] = []
        self._lookup = _Lookup(self._read_map, interval=timeout)
        self._refused = False

    @property
    def breakers(self) -> dict[str, CircuitBreaker]:
        """The circuit breaker of each master the store knows, by `host:port`."""
        return {node.name: node.breaker for node in self._masters}

    async def aclose(self) -> None:
        await self._lookup.aclose()
        for node in self._known.values():
            await node.connections.aclose()

    def servers(self) -> list[Node]:
        return list(self._masters)

    def _route(self, key: str) -> Node | None:
        return self._slots[key_slot(key.encode())]

    async def _locate(self, key: str) -> Node | None:
        await self._lookup.now(self._timeout)
        return self._route(key)

    async def _nodes(self) -> list[Node]:
        if not self._masters:
            await self._lookup.now(self._timeout)
        return list(self._masters)

    def _suspect(self, node: Node) -> None:
        self._lookup.soon(node)

    def _redirect(self, error: AskError) -> Node | None:
        node = self._node_at(error.host, error.port)
        if isinstance(error, MovedError):
            if node not in self._masters:
                node.breaker.success()  # it newly serves: not the node that failed before
            self._slots[error.slot_id] = node
            # One slot seldom moves alone (a failover, a resharding): read the whole map.
            self._lookup.soon(None)
        return node

    # -- the slot map -----------------------------------------------------------------------
    async def _read_map(self, avoid: Node | None) -> bool:
        """Ask the masters that answer (then every other node known) for the slot map."""
        masters = [node for node in self._masters if node is not avoid]
        random.shuffle(masters)
        others = [node for node in self._known.values() if node not in masters]
        if avoid is not None and avoid in others:
            others.remove(avoid)
            others.append(avoid)
        for node in [*masters, *others]:
            try:
                async with asyncio.timeout(self._timeout):
                    reply = await node.connections.call("CLUSTER", "SLOTS")
            except ResponseError as exc:
                if not self._refused:
                    self._refused = True
                    logger.error(
                        "session.cluster is true, but Redis at %s refused CLUSTER SLOTS (%s): "
                        "is it a cluster node?",
                        node.name,
                        exc,
                    )
                continue
            except (RedisError, OSError, TimeoutError):
                continue
            if self._apply(reply, node):
                return True
        return False

    def _apply(self, reply: Any, via: Node) -> bool:
        """Take a CLUSTER SLOTS reply as the map: [[first, last, [host, port, id, ...],
        replica, ...], ...]. False when it serves no slot."""
        slots: list[Node | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        masters: dict[str, Node] = {}
        via_host = via.name.rsplit(":", 1)[0]
        for first, last, primary, *_ in reply:
            host = primary[0].decode() if isinstance(primary[0], bytes) else str(primary[0])
            if host == "?":  # the node's address is unknown to the one that answered
                continue
            node = self._node_at(host or via_host, int(primary[1]))
            masters[node.name] = node
            slots[first : last + 1] = [node] * (last - first + 1)
        if not masters:
            return False
        for node in masters.values():
            if node not in self._masters:
                node.breaker.success()  # it newly serves: not the node that failed before
            node.probe_key = _probe_key(node, slots)
        dropped = [node for node in self._masters if node.name not in masters]
        self._slots = slots
        self._masters = list(masters.values())
        for node in dropped:
            logger.warning("Redis at %s serves no slot any more", node.name)
            task = asyncio.get_running_loop().create_task(node.connections.drop_idle())
            task.add_done_callback(_ignore)
        return True

    def _node_at(self, host: str, port: int) -> Node:
        name = f"{host}:{port}"
        node = self._known.get(name)
        if node is None:
            kwargs = {**self._connection_kwargs, "host": host, "port": port}
            node = self._make_node(kwargs, self._breakers(), "")
            self._known[name] = node
        return node


def _probe_key(node: Node, slots: list[Node | None]) -> str:
    """A key that no conversation can have, in one of `node`'s slots."""
    tag = 0
    while slots[key_slot(f"{_PROBE_PREFIX}{tag}}}".encode())] is not node:
        tag += 1
    return f"{_PROBE_PREFIX}{tag}}}"


def _ignore(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()
