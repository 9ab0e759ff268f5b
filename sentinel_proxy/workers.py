"""`--workers N`: a supervisor and N worker processes on one port.

uvicorn's own workers share one listening socket, and a keep-alive connection stays with
whichever worker accepted it: at 64 client connections the benchmark saw splits of 48/16
and 53/11, one worker saturated while the other idled. Here the supervisor binds N
SO_REUSEPORT sockets, one per worker, and the kernel spreads new connections across them.

The port is the supervisor's alone. It first binds the port without SO_REUSEPORT, which
fails while anything else is bound there (another sentinel-proxy included). A process of
the same user could still bind SO_REUSEPORT later and join the group, so a classic BPF
program attached to the group picks the socket for each new connection: at random among
the sockets whose worker is ready. A socket that joined later is never picked, and no
connection waits on a worker that is starting or dead while another one serves.

The supervisor loads the configuration; each worker gets that `Config` object (pickled
through the spawn pipe, never through argv or the environment) and its slot's socket,
which the slot keeps for its replacement workers. On SIGHUP the supervisor reads the
configuration again, once (reload.py); when it loads, it becomes the one replacement
workers get, and each running worker is sent it through a pipe of its own, which the
worker's event loop reads. Workers never read the file themselves.

A worker exits when the supervisor dies (PR_SET_PDEATHSIG: it drains as on SIGTERM). A
worker that dies is replaced, after a delay that doubles with each quick failure; after
MAX_QUICK_FAILURES in a row the supervisor stops the others and exits 1.

The supervisor makes a directory for the workers' metrics files (metrics.py), where each
slot's worker writes and any worker reads them all for a scrape; it is removed at exit.

The first SIGTERM or SIGINT closes the supervisor's sockets and passes SIGTERM on, so every
worker drains (server.py); a second one is passed on too, and cuts what is left. Workers
ignore SIGINT and SIGHUP: Ctrl-C or a hangup reaches the whole process group, and the
supervisor speaks for them.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import multiprocessing
import os
import pickle
import shutil
import signal
import socket
import struct
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

from sentinel_proxy.config import Config
from sentinel_proxy.metrics import MetricsSlot, forget_worker
from sentinel_proxy.reload import Loader, reread
from sentinel_proxy.server import serve

logger = logging.getLogger("sentinel_proxy.workers")

# A worker that dies sooner than this after its start failed quickly.
QUICK_FAILURE_SECONDS = 60.0
# The delay before replacing a worker after its first quick failure; it doubles with each
# further quick failure in a row, up to RESTART_DELAY_MAX_SECONDS.
RESTART_DELAY_SECONDS = 0.5
RESTART_DELAY_MAX_SECONDS = 30.0
# This many quick failures in a row in one slot, and the supervisor gives up.
MAX_QUICK_FAILURES = 5
# A pipe's room unless the supervisor asks for more (Linux's default).
_PIPE_BYTES = 64 * 1024
# Signals for the workers' processes to ignore: the supervisor speaks for them.
_WORKER_IGNORED = (signal.SIGINT, signal.SIGHUP)

Options = Callable[[Config], dict[str, Any]]

# Linux ABI: <linux/prctl.h>, <asm-generic/socket.h>, <linux/filter.h>.
_PR_SET_PDEATHSIG = 1
_SO_ATTACH_REUSEPORT_CBPF = 51
_BPF_LD_W_ABS = 0x20
_BPF_ALU_MOD_K = 0x94
_BPF_JEQ_K = 0x15
_BPF_RET_K = 0x06
_SKF_AD_RANDOM = -0x1000 + 56


def restart_delay(quick_failures: int) -> float:
    """How long a slot waits before its next worker, after `quick_failures` in a row."""
    if quick_failures == 0:
        return 0.0
    return min(RESTART_DELAY_SECONDS * 2.0 ** (quick_failures - 1), RESTART_DELAY_MAX_SECONDS)


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port with SO_REUSEPORT (not yet listening)."""
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


def claim_port(host: str, port: int, count: int, backlog: int) -> list[socket.socket]:
    """`count` listening SO_REUSEPORT sockets on host:port, or OSError when anything else
    is bound there."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP) as check:
        # SO_REUSEADDR only: a connection of an earlier run in TIME_WAIT does not count,
        # a listening socket does, SO_REUSEPORT or not.
        check.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        check.bind((host, port))
        port = check.getsockname()[1]
        sockets: list[socket.socket] = []
        try:
            for _ in range(count):
                sockets.append(listening_socket(host, port))
            # The kernel numbers the group's sockets in the order they listen.
            for sock in sockets:
                sock.listen(backlog)
            steer(sockets, range(count))
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
    return sockets


def steer(sockets: Sequence[socket.socket], ready: Sequence[int]) -> None:
    """Send each new connection to one of the sockets numbered `ready`, at random (to any
    of them when none is ready: connections then wait in its backlog)."""
    chosen = list(ready) or list(range(len(sockets)))
    program = [(_BPF_LD_W_ABS, 0, 0, _SKF_AD_RANDOM & 0xFFFFFFFF)]
    program.append((_BPF_ALU_MOD_K, 0, 0, len(chosen)))
    for position, index in enumerate(chosen):
        program += [(_BPF_JEQ_K, 0, 1, position), (_BPF_RET_K, 0, 0, index)]
    program.append((_BPF_RET_K, 0, 0, chosen[0]))
    code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *op) for op in program))
    fprog = struct.pack("HP", len(program), ctypes.addressof(code))
    sockets[0].setsockopt(socket.SOL_SOCKET, _SO_ATTACH_REUSEPORT_CBPF, fprog)


@dataclass
class _Slot:
    """One socket and the worker serving it."""

    index: int
    sock: socket.socket
    process: BaseProcess | None = None
    ready_pipe: Connection | None = None
    # The supervisor's end of the pipe on which the worker receives reloaded configurations.
    updates: Connection | None = None
    ready: bool = False
    started_at: float = 0.0
    quick_failures: int = 0
    restart_at: float | None = None


class Supervisor:
    """Runs the workers of `config` until a signal stops them or one keeps failing.

    `config` is the current configuration: every worker started is given it. `load`
    reads it again on SIGHUP."""

    def __init__(self, config: Config, options: Options, load: Loader | None = None) -> None:
        self.config = config
        self._options = options
        self._load = load
        self._context = multiprocessing.get_context("spawn")
        self._slots: list[_Slot] = []
        self._stopping = False
        self._status = 0
        self._metrics_directory = ""

    def run(self) -> int:
        """Serve until stopped; the exit status (1 when a worker kept failing)."""
        server = self.config.server
        options = self._options(self.config)
        try:
            sockets = claim_port(server.host, server.port, server.workers, options["backlog"])
        except OSError as exc:
            logger.error("cannot listen on %s port %s: %s", server.host, server.port, exc)
            return 1
        self._slots = [_Slot(index, sock) for index, sock in enumerate(sockets)]
        host, port = sockets[0].getsockname()[:2]
        logger.info("listening on %s port %s with %d workers", host, port, len(sockets))
        wakeup_read, wakeup_write = os.pipe()
        os.set_blocking(wakeup_write, False)
        previous = {
            sig: signal.signal(sig, _note_signal)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        }
        previous_wakeup = signal.set_wakeup_fd(wakeup_write)
        self._metrics_directory = tempfile.mkdtemp(prefix="sentinel-metrics-")
        try:
            for slot in self._slots:
                self._start(slot)
            # Until no worker runs or waits for its restart (_stop cancels restarts).
            while any(s.process is not None or s.restart_at is not None for s in self._slots):
                self._turn(wakeup_read)
        finally:
            signal.set_wakeup_fd(previous_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(wakeup_read)
            os.close(wakeup_write)
            self._close_sockets()
            shutil.rmtree(self._metrics_directory, ignore_errors=True)
        return self._status

    def _turn(self, wakeup: int) -> None:
        """Wait for a worker to become ready or exit, a signal or a due restart; handle it."""
        waiting: list[Any] = [wakeup]
        for slot in self._slots:
            if slot.process is not None:
                waiting.append(slot.process.sentinel)
            if slot.ready_pipe is not None:
                waiting.append(slot.ready_pipe)
        due = [slot.restart_at for slot in self._slots if slot.restart_at is not None]
        timeout = max(0.0, min(due) - time.monotonic()) if due else None
        woken = wait(waiting, timeout)
        if wakeup in woken:
            for signum in os.read(wakeup, 64):
                if signum == signal.SIGHUP:
                    self._reload()
                else:
                    self._on_signal()
        for slot in self._slots:
            if slot.ready_pipe is not None and slot.ready_pipe in woken:
                self._on_ready(slot)
            if slot.process is not None and slot.process.sentinel in woken:
                self._on_exit(slot)
            if slot.restart_at is not None and slot.restart_at <= time.monotonic():
                self._start(slot)

    def _start(self, slot: _Slot) -> None:
        slot.restart_at = None
        reader, writer = self._context.Pipe(duplex=False)
        updates_reader, updates = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_work,
            args=(
                self.config,
                self._options,
                slot.sock,
                writer,
                os.getpid(),
                updates_reader,
                MetricsSlot(self._metrics_directory, slot.index),
            ),
            name=f"sentinel-proxy-worker-{slot.index}",
        )
        # SIG_IGN survives exec, so the worker (and multiprocessing's resource tracker, which
        # the first start launches) ignores these from its first instruction; blocked
        # meanwhile, a Ctrl-C or SIGHUP for the supervisor waits instead of being lost.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, set(_WORKER_IGNORED))
        handlers = {sig: signal.signal(sig, signal.SIG_IGN) for sig in _WORKER_IGNORED}
        try:
            process.start()
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            writer.close()
            updates_reader.close()
        slot.process, slot.ready_pipe, slot.ready = process, reader, False
        slot.updates = updates
        slot.started_at = time.monotonic()

    def _on_ready(self, slot: _Slot) -> None:
        assert slot.ready_pipe is not None
        try:
            slot.ready_pipe.recv_bytes()
            slot.ready = True
        except EOFError:  # it died before it was ready; its sentinel says so too
            pass
        slot.ready_pipe.close()
        slot.ready_pipe = None
        if slot.ready and not self._stopping:
            self._steer()

    def _on_exit(self, slot: _Slot) -> None:
        process = slot.process
        assert process is not None
        process.join()
        if slot.ready_pipe is not None:
            slot.ready_pipe.close()
        if slot.updates is not None:
            slot.updates.close()
        slot.process, slot.ready_pipe, slot.updates, slot.ready = None, None, None, False
        forget_worker(self._metrics_directory, slot.index)
        if self._stopping:
            return
        self._steer()
        lived = time.monotonic() - slot.started_at
        slot.quick_failures = slot.quick_failures + 1 if lived < QUICK_FAILURE_SECONDS else 0
        if slot.quick_failures >= MAX_QUICK_FAILURES:
            logger.error(
                "worker %s failed %d times in a row, each within %.0f s of its start "
                "(last exit status %s); stopping",
                slot.index,
                slot.quick_failures,
                QUICK_FAILURE_SECONDS,
                process.exitcode,
            )
            self._status = 1
            self._stop()
            return
        delay = restart_delay(slot.quick_failures)
        logger.warning(
            "worker %s (pid %s) exited with status %s; starting another in %.1f s",
            slot.index,
            process.pid,
            process.exitcode,
            delay,
        )
        slot.restart_at = time.monotonic() + delay

    def _reload(self) -> None:
        if self._stopping:
            logger.info("SIGHUP while stopping: the configuration is not reloaded")
            return
        if self._load is None:
            logger.warning("SIGHUP: nothing to reload the configuration from")
            return
        config = reread(self.config, self._load)
        if config is None:
            return
        self.config = config
        data = pickle.dumps(config)
        # Room for it and one more (where the system allows), so that the send does not
        # wait for a worker that is still starting and reads nothing yet.
        room = 2 * len(data) + 64
        for slot in self._slots:
            if slot.updates is None:
                continue
            try:
                if room > _PIPE_BYTES:
                    with contextlib.suppress(OSError):
                        fcntl.fcntl(slot.updates.fileno(), fcntl.F_SETPIPE_SZ, room)
                slot.updates.send_bytes(data)
            except OSError:  # it is exiting; its replacement starts with self.config
                pass

    def _on_signal(self) -> None:
        if self._stopping:
            logger.warning("stopping at once: cutting what the workers still serve")
            self._kill_workers()
        else:
            logger.info("stopping: draining %d worker(s)", self._running())
            self._stop()

    def _stop(self) -> None:
        self._stopping = True
        # The supervisor's copies close first: a socket listens while any process holds it,
        # and a connection queued on it after the worker stopped accepting would hang.
        self._close_sockets()
        for slot in self._slots:
            slot.restart_at = None
        self._kill_workers()

    def _kill_workers(self) -> None:
        for slot in self._slots:
            if slot.process is not None and slot.process.pid is not None:
                try:
                    os.kill(slot.process.pid, signal.SIGTERM)
                except ProcessLookupError:  # exited; its sentinel will say so
                    pass

    def _steer(self) -> None:
        steer([slot.sock for slot in self._slots], [s.index for s in self._slots if s.ready])

    def _running(self) -> int:
        return sum(slot.process is not None for slot in self._slots)

    def _close_sockets(self) -> None:
        for slot in self._slots:
            slot.sock.close()


def run_workers(config: Config, options: Options, load: Loader | None = None) -> int:
    """Run `config.server.workers` workers, each serving uvicorn `options(config)`; on
    SIGHUP, the configuration `load` returns."""
    return Supervisor(config, options, load).run()


def _note_signal(signum: int, frame: FrameType | None) -> None:
    """The supervisor's handler: the signal reaches its loop through the wakeup fd."""


def _work(
    config: Config,
    options: Options,
    sock: socket.socket,
    ready: Connection,
    parent: int,
    updates: Connection,
    metrics: MetricsSlot,
) -> None:
    """A worker process: serve on `sock` until SIGTERM, or until the supervisor is gone;
    serve each configuration that arrives on `updates`."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # it died before the line above
        raise SystemExit(0)

    def notify() -> None:
        ready.send_bytes(b"ready")
        ready.close()

    raise SystemExit(
        serve(
            config,
            options(config),
            sockets=[sock],
            on_ready=notify,
            stop_signals=(signal.SIGTERM,),
            updates=updates,
            metrics_slot=metrics,
        )
    )
