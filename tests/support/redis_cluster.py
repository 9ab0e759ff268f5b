"""A throw-away Redis Cluster: three masters, each with one replica, on free loopback ports.

Each node is a ``RedisServer`` in cluster mode (no persistence, its own cluster bus port),
joined with ``redis-cli --cluster create ... --cluster-replicas 1 --cluster-yes``. Replicas
never fail over by themselves (``cluster-replica-no-failover``): a test promotes one when it
chooses (``promote``), so what it sees does not hang on the cluster's failure detection.
``cluster-require-full-coverage no`` keeps the other masters serving while one is down, as
a production cluster behind a sticky gateway should be configured.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis
from redis.crc import key_slot

from tests.support.ports import free_port
from tests.support.redis_server import RedisServer, RedisServerError

# Small, so that a restarted node learns quickly what changed while it was away.
NODE_TIMEOUT_MS = 1000


class RedisCluster:
    """``masters`` masters with one replica each; ``nodes[i].port`` on 127.0.0.1."""

    def __init__(self, workdir: Path, masters: int = 3) -> None:
        if shutil.which("redis-cli") is None:
            raise RedisServerError("redis-cli is not on PATH (it comes with redis-server)")
        self.workdir = workdir
        self.nodes: list[RedisServer] = []
        for index in range(masters * 2):
            options = [
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-port", str(free_port()),
                "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                "--cluster-require-full-coverage", "no",
                "--cluster-replica-no-failover", "yes",
                "--cluster-allow-replica-migration", "no",
                "--cluster-replica-validity-factor", "0",
                # Replicas sync at once, not after the default 5 s wait for more of them.
                "--repl-diskless-sync-delay", "0",
            ]  # fmt: skip
            self.nodes.append(RedisServer(workdir / f"node{index}", extra_args=options))

    @property
    def url(self) -> str:
        """A URL naming one node (a master when the cluster was made): enough to find all."""
        return self.nodes[0].url

    def start(self, timeout: float = 30.0) -> None:
        for node in self.nodes:
            node.start()
        addresses = [f"{node.host}:{node.port}" for node in self.nodes]
        done = subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "1",
             "--cluster-yes"],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if done.returncode != 0:
            raise RedisServerError(
                f"redis-cli --cluster create failed:\n{done.stdout}{done.stderr}"
            )
        self.wait_healthy(timeout)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    # -- roles ----------------------------------------------------------------------------
    def node_at(self, port: int) -> RedisServer:
        return next(node for node in self.nodes if node.port == port)

    def masters(self) -> list[RedisServer]:
        """The live masters that serve slots now, as a live node sees them, by first slot."""
        owners = sorted(
            (min(slots), port)
            for port, (flags, _, _, slots) in self._view().items()
            if "master" in flags and "fail" not in flags and slots
        )
        return [self.node_at(port) for _, port in owners]

    def replica_of(self, master: RedisServer) -> RedisServer:
        view = self._view()
        master_id = view[master.port][1]
        for port, (flags, _, of, _) in view.items():
            if "slave" in flags and of == master_id:
                return self.node_at(port)
        raise RedisServerError(f"no replica of {master.port} in {view}")

    def owner(self, key: str) -> RedisServer:
        """The master that serves `key` now."""
        slot = key_slot(key.encode())
        for port, (flags, _, _, slots) in self._view().items():
            if "master" in flags and slot in slots:
                return self.node_at(port)
        raise RedisServerError(f"no master serves slot {slot}")

    def _view(self) -> dict[int, tuple[set[str], str, str, set[int]]]:
        """port -> (flags, node id, master id, slots): a running node's CLUSTER NODES."""
        for node in self.nodes:
            if not node.running or node.paused:
                continue
            try:
                with node.client() as client:
                    nodes = client.execute_command("CLUSTER NODES")
            except redis.RedisError:
                continue
            view = {}
            for address, entry in nodes.items():
                slots: set[int] = set()
                for first, *last in entry["slots"]:
                    slots.update(range(int(first), int((last or [first])[0]) + 1))
                port = int(address.rsplit(":", 1)[1])
                flags = set(entry["flags"].split(","))
                view[port] = (flags, entry["node_id"], entry["master_id"], slots)
            return view
        raise RedisServerError("no cluster node answers")

    # -- faults ---------------------------------------------------------------------------
    def kill(self, node: RedisServer) -> None:
        """SIGKILL: gone at once, as a crashed machine."""
        proc = node._require_running()
        proc.kill()
        proc.wait(10)
        node.stop()  # reaps and closes the log; the port stays the node's

    def promote(self, replica: RedisServer, timeout: float = 15.0) -> None:
        """Make `replica` the master of its master's slots now (`CLUSTER FAILOVER TAKEOVER`,
        which needs no agreement of the other masters), and wait until the others know it."""
        with replica.client() as client:
            client.execute_command("CLUSTER FAILOVER TAKEOVER")
        self._wait(
            f"{replica.port} to serve slots",
            lambda: any(m.port == replica.port for m in self.masters()),
            timeout,
        )

    def flushall(self) -> None:
        for master in self.masters():
            with master.client() as client:
                client.flushall()

    def wait_replicated(self) -> None:
        """Until every master's writes so far have reached its replica."""
        for master in self.masters():
            with master.client() as client:
                assert client.execute_command("WAIT", 1, 5000) == 1

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Every node running, and every running node sees all slots served by live masters,
        each with one linked replica."""
        for node in self.nodes:
            node.ensure_running()
        self._wait("the cluster to be healthy", self._healthy, timeout)

    def _healthy(self) -> bool:
        masters = 0
        for node in self.nodes:
            try:
                with node.client() as client:
                    info = client.execute_command("CLUSTER INFO")
                    replication = client.info("replication")
            except redis.RedisError:
                return False
            expected = {
                "cluster_state": "ok",
                "cluster_slots_ok": "16384",
                "cluster_slots_pfail": "0",
                "cluster_slots_fail": "0",
                "cluster_known_nodes": str(len(self.nodes)),
            }
            if any(info.get(key) != value for key, value in expected.items()):
                return False
            if replication["role"] == "master":
                masters += 1
                if replication.get("connected_slaves") != 1:
                    return False
            elif replication.get("master_link_status") != "up":
                return False
        return masters == len(self.nodes) // 2

    @staticmethod
    def _wait(what: str, check: object, timeout: float) -> None:
        assert callable(check)
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise RedisServerError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.05)  # polling with a deadline
