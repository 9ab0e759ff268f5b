from __future__ import annotations

import asyncio
import multiprocessing
import pickle
import socket
import threading
from collections import Counter
from dataclasses import replace
from multiprocessing.connection import Connection

import pytest

from sentinel_proxy.config import Alias, Config, Target, load_config
from sentinel_proxy.workers import (
    MAX_QUICK_FAILURES,
    RESTART_DELAY_MAX_SECONDS,
    Supervisor,
    _Slot,
    claim_port,
    listening_socket,
    restart_delay,
    steer,
)


async def test_connections_accepted_on_a_worker_socket_have_nagle_off() -> None:
    # uvicorn writes the head and the body of an answer separately; with Nagle on, the
    # body waits for the client's delayed ACK (40 ms on Linux).
    sock = listening_socket("127.0.0.1", 0)
    sock.listen()
    accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            conn = transport.get_extra_info("socket")
            accepted.set_result(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
    async with server:
        _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        assert await asyncio.wait_for(accepted, 5) != 0
        writer.close()


def _report(config: Config, sock: socket.socket, answer: Connection) -> None:
    redis_url = config.session.redis_url
    assert redis_url is not None
    answer.send((config, redis_url.reveal(), sock.proto))


def test_a_spawned_worker_gets_the_config_and_a_tcp_socket() -> None:
    # What a worker receives travels through the spawn pipe: the frozen Config with its
    # secrets, and the socket still naming IPPROTO_TCP (which keeps Nagle off, above).
    config = load_config(
        None, env={"SENTINEL_REDIS_URL": "redis://:hunter2@127.0.0.1:1/0"}, overrides={}
    )
    context = multiprocessing.get_context("spawn")
    reader, writer = context.Pipe(duplex=False)
    with listening_socket("127.0.0.1", 0) as sock:
        child = context.Process(target=_report, args=(config, sock, writer))
        child.start()
        writer.close()
        assert reader.poll(20), "the child sent nothing"
        received, secret, proto = reader.recv()
        child.join(10)
    assert received == config
    assert secret == "redis://:hunter2@127.0.0.1:1/0"
    assert proto == socket.IPPROTO_TCP
    assert child.exitcode == 0


def test_restart_delay_doubles_up_to_a_cap() -> None:
    assert restart_delay(0) == 0.0
    delays = [restart_delay(n) for n in range(1, MAX_QUICK_FAILURES)]
    assert delays == [0.5, 1.0, 2.0, 4.0]
    assert restart_delay(30) == RESTART_DELAY_MAX_SECONDS


def _accepted(sockets: list[socket.socket]) -> Counter[int]:
    counts: Counter[int] = Counter()
    for index, sock in enumerate(sockets):
        sock.setblocking(False)
        while True:
            try:
                conn, _ = sock.accept()
            except BlockingIOError:
                break
            conn.close()
            counts[index] += 1
    return counts


def _connect(port: int, count: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)]


def test_connections_go_to_ready_sockets_only_and_never_to_one_that_joined_later() -> None:
    sockets = claim_port("127.0.0.1", 0, 3, backlog=128)
    port = sockets[0].getsockname()[1]
    intruder = listening_socket("127.0.0.1", port)  # SO_REUSEPORT, same user: it joins
    intruder.listen(128)
    try:
        clients = _connect(port, 60)
        counts = _accepted([*sockets, intruder])
        assert sum(counts.values()) == 60 and counts[3] == 0
        assert all(counts[i] > 0 for i in range(3)), counts
        steer(sockets, [1])
        clients += _connect(port, 20)
        assert _accepted([*sockets, intruder]) == {1: 20}
        for client in clients:
            client.close()
    finally:
        for sock in [*sockets, intruder]:
            sock.close()


@pytest.mark.parametrize("reuseport", [False, True])
def test_a_port_that_something_listens_on_is_refused(reuseport: bool) -> None:
    with socket.socket() as taken:
        if reuseport:
            taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError):
            claim_port("127.0.0.1", taken.getsockname()[1], 2, backlog=128)


def test_a_large_reloaded_config_is_sent_to_a_worker_that_reads_nothing_yet() -> None:
    # A worker that is still starting reads nothing; the supervisor must not wait for it.
    running = load_config(None, env={}, overrides={})
    aliases = {
        f"alias-{i}": Alias(f"alias-{i}", (Target("openai", f"model-{i}-" + "m" * 200),))
        for i in range(1000)
    }
    reloaded = replace(running, aliases=aliases)
    assert len(pickle.dumps(reloaded)) > 128 * 1024
    supervisor = Supervisor(running, lambda config: {}, load=lambda: reloaded)
    reader, writer = multiprocessing.Pipe(duplex=False)
    with socket.socket() as sock:
        supervisor._slots = [_Slot(0, sock, updates=writer)]
        sending = threading.Thread(target=supervisor._reload, daemon=True)
        sending.start()
        sending.join(10)
        waited = sending.is_alive()
        received = pickle.loads(reader.recv_bytes())  # lets a blocked send go on
        sending.join(10)
    assert not waited, "the supervisor waited for the worker to read"
    assert received == reloaded == supervisor.config
