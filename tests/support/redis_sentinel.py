"""A throw-away Redis Sentinel set-up: a primary, one replica and three sentinels, on free
loopback ports, monitoring the service ``mymaster``.

The sentinels call the primary down after 1 s (``down-after-milliseconds``), so a killed
primary is replaced within a few seconds; ``failover()`` forces a failover at once
(``SENTINEL FAILOVER``), which demotes a live primary to a replica of the new one.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import redis

from tests.support.ports import free_port
from tests.support.redis_server import RedisServer, RedisServerError

SERVICE = "mymaster"
DOWN_AFTER_MS = 1000


class SentinelProcess:
    """One ``redis-server --sentinel`` with its own (writable) config file."""

    def __init__(self, workdir: Path, primary: RedisServer) -> None:
        self.host = "127.0.0.1"
        self.port = free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "sentinel.conf"
        self.config_path.write_text(
            f"port {self.port}\n"
            f"bind {self.host}\n"
            f'dir "{workdir}"\n'
            f"sentinel monitor {SERVICE} {primary.host} {primary.port} 2\n"
            f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {SERVICE} 4000\n"
            f"sentinel parallel-syncs {SERVICE} 1\n"
        )
        self.log_path = workdir / "sentinel.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def client(self) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port, socket_timeout=5.0)

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            [binary, str(self.config_path), "--sentinel"],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None


class RedisSentinels:
    """``servers[0]`` starts as the primary, ``servers[1]`` as its replica; ``sentinels``."""

    def __init__(self, workdir: Path) -> None:
        self.servers = [RedisServer(workdir / "first"), RedisServer(workdir / "second")]
        # Replicas sync at once, not after the default 5 s wait for more of them.
        for server in self.servers:
            server.extra_args = ("--repl-diskless-sync-delay", "0")
        self.sentinels = [
            SentinelProcess(workdir / f"sentinel{i}", self.servers[0]) for i in range(3)
        ]

    @property
    def addresses(self) -> list[str]:
        """The sentinels as `session.sentinels` names them."""
        return [sentinel.address for sentinel in self.sentinels]

    def start(self, timeout: float = 30.0) -> None:
        first, second = self.servers
        first.start()
        options = second.extra_args
        second.extra_args = (*options, "--replicaof", first.host, str(first.port))
        second.start()
        second.extra_args = options
        for sentinel in self.sentinels:
            sentinel.start()
        self.wait_healthy(timeout)

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        for server in self.servers:
            server.stop()

    def primary(self) -> RedisServer:
        """The server every sentinel names as the primary now."""
        named = {self._named(sentinel) for sentinel in self.sentinels}
        if len(named) != 1 or None in named:
            raise RedisServerError(f"the sentinels disagree on the primary: {named}")
        port = named.pop()
        return next(server for server in self.servers if server.port == port)

    def replica(self) -> RedisServer:
        primary = self.primary()
        return next(server for server in self.servers if server is not primary)

    def failover(self, *, demote: bool = True, timeout: float = 20.0) -> RedisServer:
        """Force a failover now; returns the new primary once every sentinel names it. The
        old primary stays a primary until the sentinels' next look at it (up to 10 s), or
        with `demote` is made a replica of the new one at once, as they would."""
        old = self.primary()
        with self.sentinels[0].client() as client:
            client.execute_command("SENTINEL FAILOVER", SERVICE)
        _wait("the sentinels to name the new primary", lambda: self._agree_on_other(old), timeout)
        new = self.primary()
        if demote:
            with old.client() as client:
                client.replicaof(new.host, new.port)
        return new

    def kill(self, server: RedisServer) -> None:
        proc = server._require_running()
        proc.kill()
        proc.wait(10)
        server.stop()

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Both servers up, the sentinels agreeing on the primary, knowing each other and a
        replica in sync with it. A server that was down comes back as the replica (the
        sentinels would make it one too, but only at their next look, up to 10 s later)."""
        for server in self.servers:
            if server.running:
                server.ensure_running()
                continue
            # Just after a failover the sentinels may still name different primaries.
            _wait("the sentinels to agree on the primary", self._agreed, timeout)
            primary = self.primary()
            options = server.extra_args
            server.extra_args = (*options, "--replicaof", primary.host, str(primary.port))
            try:
                server.ensure_running()
            finally:
                server.extra_args = options
        _wait("the sentinels to be ready", self._healthy, timeout)

    def _agreed(self) -> bool:
        try:
            self.primary()
        except (RedisServerError, redis.RedisError):
            return False
        return True

    def _healthy(self) -> bool:
        try:
            primary = self.primary()
            for sentinel in self.sentinels:
                with sentinel.client() as client:
                    state = client.execute_command("SENTINEL MASTER", SERVICE)
                if isinstance(state, list):
                    state = dict(zip(state[::2], state[1::2], strict=True))
                state = {_text(k): _text(v) for k, v in state.items()}
                if state.get("num-other-sentinels") != "2" or state.get("num-slaves") != "1":
                    return False
                if state.get("flags") != "master":
                    return False
            replica = self.replica()
            with replica.client() as client:
                replication = client.info("replication")
            with primary.client() as client:
                role = client.info("replication")["role"]
        except (redis.RedisError, RedisServerError, StopIteration):
            return False
        return (
            role == "master"
            and replication.get("role") == "slave"
            and replication.get("master_port") == primary.port
            and replication.get("master_link_status") == "up"
        )

    def _agree_on_other(self, old: RedisServer) -> bool:
        try:
            return self.primary() is not old
        except RedisServerError:
            return False

    def _named(self, sentinel: SentinelProcess) -> int | None:
        try:
            with sentinel.client() as client:
                address = client.execute_command("SENTINEL GET-MASTER-ADDR-BY-NAME", SERVICE)
        except redis.RedisError:
            return None
        return int(address[1]) if address else None


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _wait(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RedisServerError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)  # polling with a deadline
