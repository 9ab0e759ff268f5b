"""Shared fixtures: a private Redis, an upstream stub, the real proxy process, SDK clients.

- ``redis_server`` (session): a ``RedisServer`` on a free port (``.url``, ``.port``, ``.client()``,
  ``.stop()``/``.start()``, ``.pause()``/``.resume()``).
- ``redis_url`` (function): FLUSHALLs that server and yields its URL.
- ``redis_relay`` (function): a started ``FaultRelay`` in front of that (emptied) server;
  ``relay.url("redis", "/0")`` reaches Redis through it.
- ``redis_cluster`` (session): a ``RedisCluster`` of three masters with a replica each
  (``.url``, ``.masters()``, ``.owner(key)``, ``.kill(node)``, ``.promote(replica)``);
  ``cluster`` (function): the same, healthy and emptied.
- ``redis_sentinels`` (session): ``RedisSentinels``, a primary, a replica and three sentinels
  watching ``mymaster`` (``.addresses``, ``.primary()``, ``.failover()``, ``.kill(server)``);
  ``sentinels`` (function): the same, healthy, the primary emptied.
- ``own_redis`` (function): two fresh ``RedisServer``s of the test's own (to make one a replica).
- ``upstream``, ``second_upstream`` (function): a started ``UpstreamStub`` each.
- ``start_proxy`` (function): ``start_proxy(config, env=None, **options) -> ProxyProcess``.
- ``openai_client`` (function): ``openai_client(proxy_or_base_url, **options) -> openai.OpenAI``.
- ``otlp_receiver`` (function): a started ``OTLPReceiver`` (``.url``, ``.wait_for_spans(n)``).
- ``raw_upstream`` (function): ``raw_upstream(response) -> RawUpstream``, an upstream that
  answers every connection with those bytes (or a ``Responder``); stopped at teardown.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.support.fault_relay import FaultRelay
from tests.support.otlp_receiver import OTLPReceiver
from tests.support.proxy_process import (
    OpenAIClientFactory,
    ProxyProcess,
    StartProxy,
    make_openai_client,
)
from tests.support.raw_upstream import RawUpstream, Responder
from tests.support.redis_cluster import RedisCluster
from tests.support.redis_sentinel import RedisSentinels
from tests.support.redis_server import RedisServer, RedisServerNotFound
from tests.support.upstream_stub import UpstreamStub


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server for the whole session, killed at the end."""
    try:
        server = RedisServer(tmp_path_factory.mktemp("redis"))
    except RedisServerNotFound as exc:
        pytest.fail(str(exc), pytrace=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """The private Redis, emptied, as a URL; left running and unpaused after the test."""
    redis_server.ensure_running()
    redis_server.flushall()
    yield redis_server.url
    redis_server.ensure_running()


@pytest.fixture
def redis_relay(redis_server: RedisServer, redis_url: str) -> Iterator[FaultRelay]:
    """A fault relay in front of the private Redis, passing through until told otherwise."""
    relay = FaultRelay((redis_server.host, redis_server.port))
    relay.start()
    try:
        yield relay
    finally:
        relay.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A private Redis Cluster for the whole session (about 2 s to start), stopped at the end."""
    try:
        cluster = RedisCluster(tmp_path_factory.mktemp("cluster"))
    except RedisServerNotFound as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster(redis_cluster: RedisCluster) -> Iterator[RedisCluster]:
    """The private cluster, every node up and every master emptied; healthy again after."""
    redis_cluster.wait_healthy()
    redis_cluster.flushall()
    yield redis_cluster
    redis_cluster.wait_healthy()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer]]:
    """Two fresh redis-servers of this test's own, so that one can be made a replica."""
    servers = [RedisServer(tmp_path / name) for name in ("first", "second")]
    try:
        for server in servers:
            server.start()
        yield servers[0], servers[1]
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="session")
def redis_sentinels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisSentinels]:
    """A private primary, replica and three sentinels (about 2 s to start)."""
    try:
        setup = RedisSentinels(tmp_path_factory.mktemp("sentinel"))
    except RedisServerNotFound as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        setup.start()
        yield setup
    finally:
        setup.stop()


@pytest.fixture
def sentinels(redis_sentinels: RedisSentinels) -> Iterator[RedisSentinels]:
    """The private Sentinel set-up, healthy and its primary emptied; healthy again after."""
    redis_sentinels.wait_healthy()
    redis_sentinels.primary().flushall()
    yield redis_sentinels
    redis_sentinels.wait_healthy()


def _upstream_stub() -> Iterator[UpstreamStub]:
    stub = UpstreamStub()
    stub.start()
    try:
        yield stub
    finally:
        stub.stop()


@pytest.fixture
def upstream() -> Iterator[UpstreamStub]:
    """A fresh upstream stub on a free loopback port."""
    yield from _upstream_stub()


@pytest.fixture
def second_upstream() -> Iterator[UpstreamStub]:
    """Another, for tests of two providers."""
    yield from _upstream_stub()


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[StartProxy]:
    """Factory: start the real proxy with a TOML config string; every one is stopped at teardown.

    ``ready_path=None`` returns as soon as the process is spawned; otherwise it waits until
    ``GET ready_path`` answers 200 (failing with the captured log after ``timeout`` seconds).
    """
    started: list[ProxyProcess] = []

    def factory(
        config: str | None,
        env: Mapping[str, str] | None = None,
        *,
        ready_path: str | None = "/readyz",
        timeout: float = 15.0,
        port: int | None = None,
        log_level: str = "info",
        extra_args: tuple[str, ...] = (),
    ) -> ProxyProcess:
        proxy = ProxyProcess(
            config,
            tmp_path,
            env=env,
            port=port,
            log_level=log_level,
            extra_args=extra_args,
            name=f"proxy{len(started)}",
        )
        started.append(proxy)
        proxy.start(ready_path=ready_path, timeout=timeout)
        return proxy

    try:
        yield factory
    finally:
        for proxy in started:
            proxy.stop()


@pytest.fixture
def openai_client() -> Iterator[OpenAIClientFactory]:
    """Factory: ``openai_client(proxy_or_base_url, api_key="sk-test", **options)``; an
    ``openai.OpenAI`` with ``max_retries=0``, closed at teardown."""
    clients: list[openai.OpenAI] = []

    def factory(target: ProxyProcess | str, **options: Any) -> openai.OpenAI:
        base_url = target.base_url if isinstance(target, ProxyProcess) else target
        client = make_openai_client(base_url, **options)
        clients.append(client)
        return client

    try:
        yield factory
    finally:
        for client in clients:
            client.close()


@pytest.fixture
def otlp_receiver() -> Iterator[OTLPReceiver]:
    """An OTLP/HTTP receiver on a free loopback port, recording the spans exported to it."""
    receiver = OTLPReceiver()
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()


@pytest.fixture
def raw_upstream() -> Iterator[Callable[[bytes | Responder], RawUpstream]]:
    started: list[RawUpstream] = []

    def start(response: bytes | Responder) -> RawUpstream:
        server = RawUpstream(response).start()
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()
