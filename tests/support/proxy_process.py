"""The real proxy, started as a subprocess the way a user starts it.

``ProxyProcess`` writes a TOML config, runs ``python -m sentinel_proxy --config ... --host
127.0.0.1 --port P --log-level info`` with stdout and stderr captured to files, waits for
``GET /readyz`` to answer 200 and stops the process (by PID) when asked or at teardown.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

import httpx
import openai

from tests.support.ports import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
TEST_API_KEY = "sk-test"
# The Authorization header of a client that uses TEST_API_KEY.
TEST_AUTH = {"authorization": f"Bearer {TEST_API_KEY}"}

# Variables that would change what the proxy does behind the test's back.
_SCRUBBED_ENV = ("SESSION_TTL_SECONDS", "OPENAI_API_KEY", "OPENAI_BASE_URL")
_PROXY_ENV = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


class ProxyStartError(RuntimeError):
    """The proxy exited or did not become ready in time."""


def proxy_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a proxy subprocess: this one, less anything SENTINEL_* or proxying,
    plus ``extra``."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("SENTINEL_") and key not in _SCRUBBED_ENV and key not in _PROXY_ENV
    }
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost,::1"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    env.pop("PYTHONWARNINGS", None)
    env.update(extra or {})
    return env


def proxy_command(
    config_path: Path | str | None,
    port: int,
    host: str = "127.0.0.1",
    log_level: str = "info",
    extra_args: Sequence[str] = (),
) -> list[str]:
    command = [sys.executable, "-m", "sentinel_proxy"]
    if config_path is not None:
        command += ["--config", str(config_path)]
    command += ["--host", host, "--port", str(port), "--log-level", log_level, *extra_args]
    return command


def run_proxy_to_exit(
    args: Sequence[str],
    env: Mapping[str, str] | None = None,
    timeout: float = 15.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m sentinel_proxy *args`` and wait for it to exit (for start-up failures).

    Raises AssertionError if it is still running after ``timeout`` (it is killed then)."""
    command = [sys.executable, "-m", "sentinel_proxy", *args]
    try:
        return subprocess.run(
            command,
            env=proxy_env(env),
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr
        raise AssertionError(
            f"{' '.join(command)} was still running after {timeout} s (killed);\n"
            f"stdout:\n{out}\nstderr:\n{err}"
        ) from None


class ProxyProcess:
    """One proxy subprocess."""

    def __init__(
        self,
        config: str | None,
        workdir: Path,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        log_level: str = "info",
        extra_args: Sequence[str] = (),
        name: str = "proxy",
        process_group: bool = False,
    ) -> None:
        self.workdir = workdir
        # A process group of its own, so that a test can signal it as a terminal would.
        self.process_group = process_group
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.port = port if port is not None else free_port()
        self.config_path: Path | None = None
        if config is not None:
            self.config_path = workdir / f"{name}.toml"
            self.config_path.write_text(config)
        self.stdout_path = workdir / f"{name}.stdout.log"
        self.stderr_path = workdir / f"{name}.stderr.log"
        self.command = proxy_command(
            self.config_path, self.port, "127.0.0.1", log_level, extra_args
        )
        self.env = proxy_env(env)
        self._proc: subprocess.Popen[bytes] | None = None
        self._files: list[IO[bytes]] = []

    # -- addresses ------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """What an OpenAI client's ``base_url`` should be."""
        return f"{self.url}/v1"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("the proxy was not started")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    # -- logs -----------------------------------------------------------------------------
    def stdout_text(self) -> str:
        return _read(self.stdout_path)

    def stderr_text(self) -> str:
        return _read(self.stderr_path)

    def log_text(self) -> str:
        """Everything the process wrote, stderr first."""
        return self.stderr_text() + self.stdout_text()

    def _describe(self) -> str:
        return (
            f"command: {' '.join(self.command)}\nconfig:\n"
            f"{self.config_path.read_text() if self.config_path else '(none)'}\n"
            f"--- stderr ---\n{self.stderr_text()}--- stdout ---\n{self.stdout_text()}"
        )

    # -- life cycle -----------------------------------------------------------------------
    def start(self, ready_path: str | None = "/readyz", timeout: float = 15.0) -> None:
        """Start the process; unless ``ready_path`` is None, wait for it to answer 200 there."""
        stdout = self.stdout_path.open("ab")
        stderr = self.stderr_path.open("ab")
        self._files = [stdout, stderr]
        self._proc = subprocess.Popen(
            self.command,
            env=self.env,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            process_group=0 if self.process_group else None,
        )
        if ready_path is not None:
            self.wait_ready(ready_path, timeout)

    def wait_ready(self, path: str = "/readyz", timeout: float = 15.0) -> None:
        proc = self._proc
        assert proc is not None
        deadline = time.monotonic() + timeout
        last: str = "no answer"
        with httpx.Client(trust_env=False, timeout=1.0) as client:
            while True:
                if proc.poll() is not None:
                    self.stop()
                    raise ProxyStartError(
                        f"the proxy exited with code {proc.returncode} before {path} answered "
                        f"200\n{self._describe()}"
                    )
                try:
                    response = client.get(self.url + path)
                    if response.status_code == 200:
                        return
                    last = f"{response.status_code} {response.text[:200]!r}"
                except httpx.HTTPError as exc:
                    last = repr(exc)
                if time.monotonic() > deadline:
                    self.stop()
                    raise ProxyStartError(
                        f"the proxy did not answer 200 on {path} within {timeout} s "
                        f"(last: {last})\n{self._describe()}"
                    )
                time.sleep(0.05)  # readiness poll with a deadline

    def send_signal(self, sig: int) -> None:
        if self._proc is None or self._proc.poll() is not None:
            raise RuntimeError("the proxy is not running")
        self._proc.send_signal(sig)

    def sigterm(self) -> None:
        """Send SIGTERM and return at once."""
        self.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 15.0) -> int:
        """Wait for the process to exit and return its exit code."""
        if self._proc is None:
            raise RuntimeError("the proxy was not started")
        try:
            code = self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the proxy (pid {self._proc.pid}) did not exit within {timeout} s\n"
                f"{self._describe()}"
            ) from None
        self._close_files()
        return code

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait for the exit, return the exit code."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Teardown: SIGTERM, then SIGKILL if still alive after ``timeout``."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        self._close_files()

    def _close_files(self) -> None:
        for handle in self._files:
            handle.close()
        self._files = []

    def __repr__(self) -> str:
        return f"ProxyProcess(url={self.url!r}, pid={self._proc.pid if self._proc else None})"


def make_openai_client(base_url: str, api_key: str = TEST_API_KEY, **kwargs: Any) -> openai.OpenAI:
    """An SDK client for the proxy: no retries, a bounded timeout, no environment proxies."""
    options: dict[str, Any] = {
        "max_retries": 0,
        "timeout": 20.0,
        "http_client": openai.DefaultHttpxClient(trust_env=False),
    }
    options.update(kwargs)
    return openai.OpenAI(base_url=base_url, api_key=api_key, **options)


class StartProxy(Protocol):
    """The ``start_proxy`` fixture: start the real proxy with a TOML config string."""

    def __call__(
        self,
        config: str | None,
        env: Mapping[str, str] | None = None,
        *,
        ready_path: str | None = "/readyz",
        timeout: float = 15.0,
        port: int | None = None,
        log_level: str = "info",
        extra_args: tuple[str, ...] = (),
    ) -> ProxyProcess: ...


OpenAIClientFactory = Callable[..., openai.OpenAI]
"""The ``openai_client`` fixture: ``(proxy_or_base_url, **options) -> openai.OpenAI``."""


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
