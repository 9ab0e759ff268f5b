"""A throw-away ``redis-server`` on a free loopback port, owned by the test session.

Never touches the shared Redis on 6379: the server is started here, on its own port, with no
persistence, and stopped (by PID) when the session ends. ``stop()``/``start()`` take it down and
bring it back on the same port ("Redis down"); ``pause()``/``resume()`` freeze it with
SIGSTOP/SIGCONT, so connections are accepted by the kernel but never answered ("black-holed").
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.support.ports import free_port

INSTALL_HINT = (
    "redis-server is not on PATH; the end-to-end session tests need a real Redis. "
    "Install it with `apt-get install redis-server` (scripts/install does this)."
)


class RedisServerNotFound(RuntimeError):
    """``redis-server`` is not installed."""


class RedisServerError(RuntimeError):
    """The server did not start or stop as asked."""


class RedisServer:
    """One ``redis-server`` subprocess on ``127.0.0.1:port``."""

    def __init__(
        self, workdir: Path, port: int | None = None, extra_args: Sequence[str] = ()
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisServerNotFound(INSTALL_HINT)
        self.binary = binary
        self.host = "127.0.0.1"
        self.port = port if port is not None else free_port()
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"redis-{self.port}.log"
        # More redis-server options (cluster mode, replication), after the ones above.
        self.extra_args = tuple(extra_args)
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._paused = False

    # -- addresses ------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def paused(self) -> bool:
        return self._paused

    def client(self, **kwargs: Any) -> redis.Redis:
        """A synchronous client for this server; close it (``with`` works) when done."""
        options: dict[str, Any] = {"socket_timeout": 5.0, "socket_connect_timeout": 5.0}
        options.update(kwargs)
        return redis.Redis(host=self.host, port=self.port, db=0, **options)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- life cycle -----------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> None:
        """Start the server (again, on the same port) and wait until it answers PING."""
        if self.running:
            return
        self._close_log()
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                self.host,
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
                str(self.workdir),
                *self.extra_args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._paused = False
        self._wait_until_ready(timeout)

    def _wait_until_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while True:
            proc = self._proc
            assert proc is not None
            if proc.poll() is not None:
                self._close_log()
                raise RedisServerError(
                    f"redis-server on port {self.port} exited with code {proc.returncode} "
                    f"before answering PING; its log:\n{self.log_text()}"
                )
            try:
                with redis.Redis(
                    host=self.host,
                    port=self.port,
                    socket_timeout=0.5,
                    socket_connect_timeout=0.5,
                    retry=Retry(NoBackoff(), 0),
                ) as probe:
                    if probe.ping():
                        return
            except redis.exceptions.RedisError as exc:
                last_error = exc
            if time.monotonic() > deadline:
                self.stop()
                raise RedisServerError(
                    f"redis-server on port {self.port} did not answer PING within {timeout} s "
                    f"(last error: {last_error!r}); its log:\n{self.log_text()}"
                )
            time.sleep(0.02)  # readiness poll with a deadline

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL); the port stays reserved for ``start()``."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            if self._paused:
                proc.send_signal(signal.SIGCONT)
                self._paused = False
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        self._proc = None
        self._paused = False
        self._close_log()

    def pause(self) -> None:
        """Freeze the server with SIGSTOP: it accepts connections but answers nothing."""
        proc = self._require_running()
        os.kill(proc.pid, signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """Undo ``pause()`` with SIGCONT."""
        proc = self._require_running()
        os.kill(proc.pid, signal.SIGCONT)
        self._paused = False

    def ensure_running(self) -> None:
        """Bring the server back to a serving state after a test that stopped or paused it."""
        if self.running and self._paused:
            self.resume()
        if not self.running:
            self.stop()  # reap a server that died on its own
            self.start()

    def flushall(self) -> None:
        with self.client() as client:
            client.flushall()

    def _require_running(self) -> subprocess.Popen[bytes]:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise RedisServerError(f"redis-server on port {self.port} is not running")
        return proc

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __repr__(self) -> str:
        state = "paused" if self._paused else ("running" if self.running else "stopped")
        return f"RedisServer(url={self.url!r}, pid={self.pid}, {state})"
