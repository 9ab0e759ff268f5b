"""`--workers N`: N processes on one port, each listening on a socket of its own.

uvicorn's own workers share one listening socket, and a keep-alive connection stays with
whichever worker accepted it: at 64 client connections the benchmark saw splits of 48/16
and 53/11, one worker saturated while the other idled. Here every worker binds the port
with SO_REUSEPORT and the kernel spreads new connections across them by address. A worker
starts listening only once its lifespan is done, so no connection waits on a worker that is
still starting.

The supervisor starts the workers, starts a new one when one dies, and on SIGTERM or
SIGINT passes SIGTERM on, so every worker drains its open streams; it returns once all
have exited.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import time
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE

logger = logging.getLogger("sentinel_proxy.workers")

# A worker that dies sooner than this after its start is replaced only after this long.
RESTART_DELAY_SECONDS = 1.0


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port that other processes can bind too (not yet listening)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio turns Nagle off on accepted connections only when the
    # listening socket names TCP, and with Nagle on every answer waited 40 ms for an ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def run_workers(count: int, options: dict[str, Any]) -> int:
    """Run `count` uvicorn servers made from `options` (uvicorn.Config arguments) until a
    signal stops them; the exit status: 0, or 1 when a worker could not start."""
    host, port = options["host"], options["port"]
    try:
        # Fail once, here, when the port is taken, rather than in every worker.
        listening_socket(host, port).close()
    except OSError as exc:
        logger.error("cannot listen on %s port %s: %s", host, port, exc)
        return 1
    context = multiprocessing.get_context("spawn")
    workers: list[BaseProcess] = []
    started: dict[int | None, float] = {}
    stopping = False

    def start() -> None:
        worker = context.Process(target=_serve, args=(options,), name="sentinel-proxy-worker")
        worker.start()
        workers.append(worker)
        started[worker.pid] = time.monotonic()
        if stopping and worker.pid is not None:  # a signal came while it was starting
            os.kill(worker.pid, signal.SIGTERM)

    def stop(signum: int = signal.SIGTERM, frame: FrameType | None = None) -> None:
        nonlocal stopping
        stopping = True
        for worker in workers:
            if worker.pid is not None and worker.exitcode is None:
                os.kill(worker.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for _ in range(count):
        start()
    status = 0
    while workers:
        wait([worker.sentinel for worker in workers])
        for worker in [w for w in workers if w.exitcode is not None]:
            workers.remove(worker)
            if stopping:
                continue
            if worker.exitcode == STARTUP_FAILURE:
                logger.error("a worker failed to start; stopping the others")
                status = 1
                stop()
                continue
            logger.warning(
                "worker %s exited with status %s; starting another", worker.pid, worker.exitcode
            )
            if time.monotonic() - started.pop(worker.pid, 0.0) < RESTART_DELAY_SECONDS:
                time.sleep(RESTART_DELAY_SECONDS)
            start()
    return status


def exit_cleanly(signum: int, frame: FrameType | None) -> None:
    """The SIGTERM handler: uvicorn re-raises the SIGTERM it drained for, and a drained stop
    is a clean exit."""
    raise SystemExit(0)


def _serve(options: dict[str, Any]) -> None:
    signal.signal(signal.SIGTERM, exit_cleanly)
    config = uvicorn.Config(**options)
    try:
        sock = listening_socket(config.host, config.port)
    except OSError as exc:
        logger.error("cannot listen on %s port %s: %s", config.host, config.port, exc)
        raise SystemExit(STARTUP_FAILURE) from exc
    uvicorn.Server(config).run(sockets=[sock])
