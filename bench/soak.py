"""The sentinel-proxy soak run: one command, run outside CI.

    bench/soak.py [--duration 600] [--concurrency 64]

Starts Redis (its own, on a free port), two nginx mock providers behind one alias and the real
proxy (`python -m sentinel_proxy --config ...`), then drives it with a mixed load for
--duration seconds: streaming and non-streaming chat completions over many conversations, new
and returning, about 20% of them aborted by the client (before the answer or mid-stream, with
a FIN or a reset). Redis is stopped in the middle and started again on the same port.

It checks every answer against the conversation's pin and the request it belongs to, samples
the proxy's RSS, open fds and connections every few seconds, and compares them at the end,
once the load has stopped and idle connections have closed, with a baseline taken the same
way after a warm-up. See bench/README.md ("Soak run").

Pinning as in run.py: the proxy alone on the first CPU; nginx, Redis and this script (its
clients) on the second.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import csv
import ctypes
import datetime as dt
import importlib.util
import json
import os
import random
import resource
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import run
from clients import read_head
from run import BenchError, Proc, Processes, log

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
NGINX_TEMPLATE = BENCH / "soak-nginx.conf"
CHAT_PATH = "/v1/chat/completions"
# The alias and what each provider behind it answers as (see soak-nginx.conf).
ALIAS = "soak"
PROVIDERS = {"alpha": "model-a", "beta": "model-b"}
SESSION_KEY = "sentinel:session:{}"
# Our own Redis clients carry these names, so CLIENT LIST can leave them out.
OWN_CLIENT_PREFIX = "soak-"

# The mix of requests (per request, drawn with the run's seed).
STREAM_SHARE = 0.5
NEW_SHARE = 0.1
HEADER_ID_SHARE = 0.3  # conversation id in x-conversation-id rather than the body
NO_MODEL_SHARE = 0.15  # follow-ups that name no model (the pin supplies it)
RESET_SHARE = 0.5  # aborts that close with a reset rather than a FIN
MIN_CONVERSATIONS = 100  # every request starts a conversation until there are this many
HOT_CONVERSATIONS = 100  # half the follow-ups go to the newest ones, so some overlap
REQUEST_TIMEOUT = 30.0
# Upstream timings (seconds) and stream lengths, uniform in these ranges.
JSON_DELAY = (0.0, 0.06)
STREAM_DELAY = (0.0, 0.1)
STREAM_GAP = (0.01, 0.03)
STREAM_EVENTS = (5, 30)
# A request planned to be aborted before its answer waits at least this long upstream.
ABORT_MIN_DELAY = 0.02
_RESET = struct.pack("ii", 1, 0)
_SYS_PIDFD_GETFD = 438  # the same number on every architecture

# Seconds after Redis is back from which a 503 is no longer the outage's (the circuit
# breaker's default reset is 5 s).
LATE_503_SECONDS = 10.0

# TCP states in /proc/net/tcp.
ESTABLISHED, CLOSE_WAIT, LISTEN = "01", "08", "0A"
_STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "04": "FIN_WAIT1", "05": "FIN_WAIT2",
           "07": "CLOSE", "08": "CLOSE_WAIT", "09": "LAST_ACK", "0B": "CLOSING"}  # fmt: skip
SAMPLE_FIELDS = (
    "t_s", "phase", "rss_mb", "fds", "fds_not_socket", "client_conns", "upstream_conns",
    "upstream_alpha", "upstream_beta", "redis_conns", "close_wait", "unix_sockets",
    "unlisted_sockets", "other_sockets",
    "redis_clients", "open_streams", "threads", "proxy_cpu_pct", "requests", "rps",
    "errors", "loadavg_1m", "io_stall_ms", "steal_ms", "client_lag_ms",
)  # fmt: skip
# A sample with this much IO stall, CPU steal or client event-loop lag (ms) is listed as a
# stall of the machine: the shared machine's doing, not the proxy's.
STALL_MS = 500


# --------------------------------------------------------------------------------------------
# The proxy process, seen from /proc


def tcp_table() -> dict[int, tuple[int, int, str]]:
    """inode -> (local port, remote port, state) of every TCP socket of the machine."""
    table: dict[int, tuple[int, int, str]] = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(name).read_text().splitlines()[1:]:
                f = line.split()
                with contextlib.suppress(IndexError, ValueError):
                    local = int(f[1].rsplit(":", 1)[1], 16)
                    remote = int(f[2].rsplit(":", 1)[1], 16)
                    table[int(f[9])] = (local, remote, f[3])
    return table


@dataclass
class Ports:
    proxy: int
    redis: int
    upstreams: dict[str, int]


def unix_inodes() -> set[int]:
    inodes: set[int] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
            with contextlib.suppress(IndexError, ValueError):
                inodes.add(int(line.split()[6]))
    return inodes


def socket_fds(pid: int) -> list[tuple[int, int]]:
    """(fd, inode) of each socket the process holds."""
    found = []
    fd_dir = Path(f"/proc/{pid}/fd")
    with contextlib.suppress(OSError):
        for fd in fd_dir.iterdir():
            with contextlib.suppress(OSError, ValueError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    found.append((int(fd.name), int(target[8:-1])))
    return found


def proxy_sockets(pid: int, ports: Ports, seen: dict[int, str] | None = None) -> dict[str, int]:
    """The proxy's open fds, its TCP sockets by peer (clients, each upstream, Redis) and how
    many are half closed by their peer (CLOSE_WAIT: we have not closed them yet).

    `unlisted_sockets` are sockets in neither the TCP nor the Unix table: a TCP socket not
    connected yet, or one whose connection is over (a reset) that the process still holds.
    `seen`, if given, gets each TCP socket's local port -> "peer state" (to tell later what a
    socket in no table had been)."""
    counts = collections.Counter[str]()
    table = tcp_table()
    unix = unix_inodes()
    by_port = {port: name for name, port in ports.upstreams.items()}
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        fds = list(fd_dir.iterdir())
    except OSError:
        fds = []
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        counts["fds"] += 1
        if not target.startswith("socket:["):
            counts["fds_not_socket"] += 1
            continue
        inode = int(target[8:-1])
        entry = table.get(inode)
        if entry is None:
            counts["unix_sockets" if inode in unix else "unlisted_sockets"] += 1
            continue
        local, remote, state = entry
        if seen is not None and state != LISTEN:
            peer = by_port.get(remote) or ("redis" if remote == ports.redis else str(remote))
            seen[local] = (
                f"{'client' if local == ports.proxy else peer} {_STATES.get(state, state)}"
            )
        if state == CLOSE_WAIT:
            counts["close_wait"] += 1
        if state == LISTEN:
            counts["listen"] += 1
        elif local == ports.proxy:
            counts["client_conns"] += 1
        elif remote in by_port:
            counts["upstream_conns"] += 1
            counts[f"upstream_{by_port[remote]}"] += 1
        elif remote == ports.redis:
            counts["redis_conns"] += 1
        else:
            counts["other_sockets"] += 1
    return dict(counts)


def describe_unlisted(pid: int, history: dict[int, list[tuple[float, str]]]) -> list[str]:
    """What each unlisted socket of the process is: borrowed with pidfd_getfd (Linux 5.6;
    the harness is the proxy's parent, so it may), asked for its addresses and pending error,
    and given back (closed here; the proxy's own fd is untouched)."""
    table, unix = tcp_table(), unix_inodes()
    out = []
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pidfd = os.pidfd_open(pid)
    except (OSError, AttributeError) as exc:
        return [f"cannot look: {exc}"]
    try:
        for fd, inode in socket_fds(pid):
            if inode in table or inode in unix:
                continue
            copy = libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
            if copy < 0:
                out.append(f"fd {fd}: pidfd_getfd failed, errno {ctypes.get_errno()}")
                continue
            with socket.socket(fileno=copy) as sock:
                try:
                    peer = str(sock.getpeername())
                except OSError as exc:
                    peer = f"none ({exc.strerror})"
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                local = sock.getsockname()
                past = history.get(local[1] if isinstance(local, tuple) else -1, [])
                out.append(
                    f"fd {fd}: {sock.family.name} {sock.type.name}, local {local}, "
                    f"peer {peer}, SO_ERROR {os.strerror(error) if error else 0}; as sampled: "
                    + (", ".join(f"{what} at {t} s" for t, what in past[-4:]) or "never seen")
                )
    finally:
        os.close(pidfd)
    return out


def status_field(pid: int, name: str) -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return 0


def cpu_ticks(pid: int) -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        text = Path(f"/proc/{pid}/stat").read_text()
        fields = text[text.rindex(")") + 2 :].split()
        return int(fields[11]) + int(fields[12])
    return 0


def machine_stalls() -> tuple[float | None, float]:
    """Milliseconds so far of (all tasks stalled on IO, CPU time stolen by the hypervisor)."""
    io: float | None = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/pressure/io").read_text().splitlines():
            if line.startswith("full"):
                io = int(line.rsplit("total=", 1)[1]) / 1000.0
    steal = 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        steal = int(fields[8]) * 1000.0 / os.sysconf("SC_CLK_TCK")
    return io, steal


def metric(port: int, name: str) -> float | None:
    """One unlabelled value from the proxy's /metrics (a separate, short connection)."""
    with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
    return None


# --------------------------------------------------------------------------------------------
# Redis: started and restarted on one port


class RedisServer:
    def __init__(self, procs: Processes, tmp: Path, port: int, cpus: str) -> None:
        self.procs = procs
        self.tmp = tmp
        self.port = port
        self.cpus = cpus
        self.proc: Proc | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        data = self.tmp / f"redis-{self.starts}"
        data.mkdir()
        argv = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--daemonize", "no", "--dir", str(data),
            "--protected-mode", "no", "--maxclients", "10000",
        ]  # fmt: skip
        self.proc = self.procs.start(f"redis-{self.starts}", argv, self.cpus)
        client = redis_client(self.port, "monitor-start")

        def answers() -> bool:
            try:
                return bool(client.ping())
            except Exception:  # noqa: BLE001 - not up yet
                return False

        try:
            run.wait_until("redis PING", answers, self.proc, 15)
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.procs.stop(self.proc)
            self.proc = None


def redis_client(port: int, name: str) -> Any:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis(
        host="127.0.0.1",
        port=port,
        socket_timeout=2,
        socket_connect_timeout=2,
        retry=Retry(NoBackoff(), 0),
        client_name=OWN_CLIENT_PREFIX + name,
    )


def proxy_redis_clients(client: Any) -> int | None:
    """Connections Redis has from anyone but this script (CLIENT LIST), or None when down."""
    try:
        clients = client.client_list()
    except Exception:  # noqa: BLE001 - Redis down or restarting: no figure
        return None
    return sum(1 for c in clients if not str(c.get("name", "")).startswith(OWN_CLIENT_PREFIX))


# --------------------------------------------------------------------------------------------
# The load


@dataclass(slots=True)
class Plan:
    conversation: Conversation
    seq: int
    new: bool
    stream: bool
    model: str | None
    id_in_header: bool
    events: int
    delay: float
    gap: float
    abort: str | None  # None, "head" (before the answer) or "body" (mid-stream)
    abort_after: float  # seconds after sending ("head") or events received ("body")
    reset: bool

    @property
    def soak_id(self) -> str:
        return f"{self.conversation.id}.{self.seq}"

    def request(self, port: int) -> bytes:
        payload: dict[str, Any] = {
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": f"Soak request {self.soak_id}."},
            ]
        }
        if self.model is not None:
            payload["model"] = self.model
        if not self.id_in_header:
            payload["conversation_id"] = self.conversation.id
        if self.stream:
            payload["stream"] = True
        body = json.dumps(payload, separators=(",", ":")).encode()
        head = [
            f"POST {CHAT_PATH} HTTP/1.1",
            f"Host: 127.0.0.1:{port}",
            "Content-Type: application/json",
            "Authorization: Bearer sk-soak",
            f"X-Soak-Id: {self.soak_id}",
            f"X-Soak-Delay: {self.delay:.3f}",
            f"Content-Length: {len(body)}",
        ]
        if self.id_in_header:
            head.append(f"X-Conversation-Id: {self.conversation.id}")
        if self.stream:
            head.append("X-Soak-Chunks: " + ",".join(str(n) for n in range(1, self.events + 1)))
            head.append(f"X-Soak-Gap: {self.gap:.3f}")
        return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@dataclass(slots=True)
class Conversation:
    id: str
    # The provider each epoch (before and after the Redis restart) pinned it to, as seen.
    pins: list[str | None] = field(default_factory=lambda: [None, None])
    created: list[int] = field(default_factory=lambda: [0, 0])


@dataclass
class Timeline:
    """Monotonic times of the Redis restart."""

    stop_at: float | None = None  # SIGTERM sent
    down_at: float | None = None  # the old process has exited
    up_at: float | None = None  # the new one answers PING


class Abort(Exception):
    """The plan says: abort the request here."""


class Problem(Exception):
    """An answer that is not what the request should get; `kind` names the check."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


# Outcomes that are no error: a complete, checked answer; an abort as planned; a follow-up
# naming no model whose session the Redis restart took (400, as documented).
EXPECTED_OUTCOMES = ("ok", "aborted", "no_model_after_restart")
# Problems that mean an answer, or a pin, belonged to another request or conversation.
MIXUP_KINDS = (
    "wrong_request_id", "wrong_provider_in_body", "wrong_model", "pin_violation",
    "redis_pin_mismatch", "created_twice",
)  # fmt: skip


@dataclass
class Tally:
    """What one phase's requests came to."""

    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    aborts: collections.Counter[str] = field(default_factory=collections.Counter)
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    problems: collections.Counter[str] = field(default_factory=collections.Counter)
    samples: list[str] = field(default_factory=list)
    http_samples: dict[str, list[str]] = field(default_factory=dict)
    # (t_sent, t_done, status, outcome) of every request, monotonic seconds.
    records: list[tuple[float, float, int, str]] = field(default_factory=list)
    redis_checks: int = 0
    redis_checks_skipped: int = 0
    stale_retries: int = 0
    new_conversations: int = 0

    @property
    def requests(self) -> int:
        return len(self.records)

    @property
    def errors(self) -> int:
        return sum(n for k, n in self.outcomes.items() if k not in EXPECTED_OUTCOMES)

    def http_error(self, status: int, code: str, detail: str) -> None:
        samples = self.http_samples.setdefault(f"{status} {code}", [])
        if len(samples) < 5:
            samples.append(detail)

    def problem(self, kind: str, detail: str) -> None:
        self.problems[kind] += 1
        if len(self.samples) < 30:
            self.samples.append(f"{kind}: {detail}")


class _Conn:
    """One client connection (raw socket, HTTP/1.1 keep-alive)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.used = 0

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.reader is None or self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
            self.used = 0
        self.used += 1
        return self.reader, self.writer

    def close(self, reset: bool = False) -> None:
        writer, self.reader, self.writer = self.writer, None, None
        if writer is None:
            return
        if reset:
            sock = writer.get_extra_info("socket")
            with contextlib.suppress(OSError):
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            writer.transport.abort()
        else:
            writer.close()


class Body:
    """The body of one response, piece by piece: chunked, Content-Length or until EOF."""

    def __init__(self, reader: asyncio.StreamReader, headers: dict[str, str]) -> None:
        self.reader = reader
        self.chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        self.length = int(headers.get("content-length", "-1"))
        self.done = False

    async def next(self) -> bytes | None:
        if self.done:
            return None
        if self.chunked:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
            if size == 0:
                while await self.reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailers
                self.done = True
                return None
            return (await self.reader.readexactly(size + 2))[:-2]
        self.done = True
        if self.length >= 0:
            return await self.reader.readexactly(self.length)
        return await self.reader.read()

    async def read_all(self, limit: int = 1 << 20) -> bytes:
        data = b""
        while (piece := await self.next()) is not None and len(data) < limit:
            data += piece
        return data


class Load:
    """Closed-loop clients: each one sends a request, reads (or aborts) its answer, checks
    it, and sends the next, until told to stop."""

    def __init__(
        self, args: argparse.Namespace, port: int, redis_port: int, timeline: Timeline
    ) -> None:
        self.args = args
        self.port = port
        self.redis_port = redis_port
        self.timeline = timeline
        self.rng = random.Random(args.seed)
        self.conversations: list[Conversation] = []
        self.by_id: dict[str, Conversation] = {}
        self.seq = 0
        self.tally = Tally()
        self.stopping = False
        self.redis: Any = None
        self.max_lag = 0.0  # the clients' event loop, longest lateness since last read

    async def watch_lag(self) -> None:
        """How late this process's own loop wakes up: a stall of the machine shows here too,
        a stall of the proxy alone does not."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + 0.1
            await asyncio.sleep(0.1)
            self.max_lag = max(self.max_lag, loop.time() - due)

    # Plans ------------------------------------------------------------------------------

    def plan(self) -> Plan:
        rng = self.rng
        new = len(self.conversations) < MIN_CONVERSATIONS or rng.random() < NEW_SHARE
        if new:
            conversation = Conversation(f"soak-{len(self.conversations)}")
            self.conversations.append(conversation)
            self.by_id[conversation.id] = conversation
            self.tally.new_conversations += 1
        elif rng.random() < 0.5:
            conversation = rng.choice(self.conversations[-HOT_CONVERSATIONS:])
        else:
            conversation = rng.choice(self.conversations)
        self.seq += 1
        known = any(pin is not None for pin in conversation.pins)
        stream = rng.random() < STREAM_SHARE
        abort: str | None = None
        if rng.random() < self.args.abort_share:
            abort = "body" if stream and rng.random() < 0.5 else "head"
        low, high = STREAM_DELAY if stream else JSON_DELAY
        delay = rng.uniform(max(low, ABORT_MIN_DELAY) if abort == "head" else low, high)
        events = rng.randint(*STREAM_EVENTS)
        abort_after: float = 0.0
        if abort == "head":
            abort_after = rng.uniform(0.0, delay)
        elif abort == "body":
            abort_after = rng.randint(1, events - 1)
        return Plan(
            conversation=conversation,
            seq=self.seq,
            new=new,
            stream=stream,
            # Only where the client has seen its conversation answered: a follow-up with no
            # model racing the conversation's first request gets its 400 by right.
            model=None if known and rng.random() < NO_MODEL_SHARE else ALIAS,
            id_in_header=rng.random() < HEADER_ID_SHARE,
            events=events,
            delay=delay,
            gap=rng.uniform(*STREAM_GAP),
            abort=abort,
            abort_after=abort_after,
            reset=rng.random() < RESET_SHARE,
        )

    def epoch(self, sent: float) -> int:
        """0 for a request sent while the first Redis ran, 1 once it had exited: a request
        sent after that can only have found its session in the second one."""
        down = self.timeline.down_at
        return 1 if down is not None and sent >= down else 0

    # Running ----------------------------------------------------------------------------

    async def run(self, seconds: float, during: Any = None) -> None:
        """Run the clients for `seconds`, awaiting `during` (a coroutine) meanwhile; then let
        each finish its request (bounded) and close its connection."""
        self.stopping = False
        if self.redis is None:
            import redis.asyncio
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            self.redis = redis.asyncio.Redis(
                host="127.0.0.1",
                port=self.redis_port,
                socket_timeout=1,
                socket_connect_timeout=1,
                client_name=OWN_CLIENT_PREFIX + "check",
                retry=Retry(NoBackoff(), 0),
            )
        workers = [asyncio.create_task(self.worker()) for _ in range(self.args.concurrency)]
        side = asyncio.create_task(during) if during is not None else None
        try:
            await asyncio.sleep(seconds)
            if side is not None:
                await side
        finally:
            self.stopping = True
            _done, pending = await asyncio.wait(workers, timeout=REQUEST_TIMEOUT + 5)
            for task in pending:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            for task in workers:
                if not task.cancelled() and task.exception() is not None:
                    raise BenchError(f"a client failed: {task.exception()!r}")

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()

    async def worker(self) -> None:
        conn = _Conn(self.port)
        try:
            while not self.stopping:
                plan = self.plan()
                retry_after = await self.one(conn, plan)
                if retry_after:
                    # As the SDKs do with a 503's Retry-After (with some jitter).
                    await asyncio.sleep(self.rng.uniform(0.5, 1.0) * min(retry_after, 2.0))
        finally:
            conn.close()

    async def one(self, conn: _Conn, plan: Plan) -> float:
        """One request; records its outcome. Returns the Retry-After of a 503, else 0."""
        sent = time.monotonic()
        status, outcome, retry_after = 0, "error", 0.0
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                status, outcome, retry_after = await self._exchange(conn, plan, sent)
        except Abort:
            conn.close(reset=plan.reset)
            outcome = "aborted"
        except Problem as exc:
            conn.close()
            self.tally.problem(exc.kind, f"{plan.soak_id}: {exc}")
            outcome = exc.kind
        except TimeoutError:
            conn.close()
            self.tally.problem("timeout", f"{plan.soak_id}: no complete answer in time")
            outcome = "timeout"
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            conn.close()
            self.tally.problem("transport", f"{plan.soak_id}: {type(exc).__name__}: {exc}")
            outcome = "transport"
        except ValueError as exc:  # a status line or chunk size that does not parse
            conn.close()
            self.tally.problem("bad_framing", f"{plan.soak_id}: {exc}")
            outcome = "bad_framing"
        self.tally.outcomes[outcome] += 1
        self.tally.records.append((sent, time.monotonic(), status, outcome))
        return retry_after

    async def _send(
        self, conn: _Conn, plan: Plan
    ) -> tuple[asyncio.StreamReader, int, dict[str, str]]:
        """Send the request and read the response head; a keep-alive connection that the
        proxy closed while it was idle is replaced once, as HTTP clients do."""
        request = plan.request(self.port)
        for attempt in range(2):
            reader, writer = await conn.open()
            reused = conn.used > 1
            writer.write(request)
            try:
                if plan.abort == "head":
                    try:
                        async with asyncio.timeout(plan.abort_after):
                            status, headers = await read_head(reader)
                    except TimeoutError:
                        self.tally.aborts["aborted_before_answer"] += 1
                        raise Abort() from None
                    self.tally.aborts["aborted_after_head"] += 1
                else:
                    status, headers = await read_head(reader)
                return reader, status, headers
            except (ConnectionResetError, BrokenPipeError, asyncio.IncompleteReadError) as exc:
                partial = isinstance(exc, asyncio.IncompleteReadError) and exc.partial
                if attempt or not reused or partial:
                    raise
                conn.close()
                self.tally.stale_retries += 1
        raise AssertionError("unreachable")

    async def _exchange(self, conn: _Conn, plan: Plan, sent: float) -> tuple[int, str, float]:
        lost = self.epoch(sent) == 1 and plan.conversation.pins[1] is None
        reader, status, headers = await self._send(conn, plan)
        body = Body(reader, headers)
        if status != 200:
            data = await body.read_all()
            self._after_response(conn, headers, body)
            code = ""
            with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError):
                code = json.loads(data)["error"]["code"]
            self.tally.statuses[f"{status} {code}".strip()] += 1
            self.tally.http_error(status, code, f"{plan.soak_id} answered at {_wall()}")
            retry_after = float(headers.get("retry-after", "0") or 0) if status == 503 else 0.0
            if status == 400 and code == "invalid_request" and plan.model is None and lost:
                # A follow-up naming no model whose session the restart took, as documented.
                return status, "no_model_after_restart", 0.0
            return status, f"http_{status}", retry_after
        self.tally.statuses["200"] += 1
        provider = self._check_head(plan, headers, sent)
        if plan.abort == "head":  # the answer came before the abort: abort it now
            raise Abort()
        if plan.stream:
            await self._check_stream(plan, body, provider)
        else:
            data = await body.read_all()
            try:
                answer = json.loads(data)
            except ValueError:
                raise Problem("bad_body", f"not JSON: {data[:200]!r}") from None
            _check_event(answer, plan, provider)
        self._after_response(conn, headers, body)
        await self._check_redis(plan, provider, sent)
        return status, "ok", 0.0

    def _after_response(self, conn: _Conn, headers: dict[str, str], body: Body) -> None:
        if headers.get("connection", "").lower() == "close" or not body.done:
            conn.close()

    def _check_head(self, plan: Plan, headers: dict[str, str], sent: float) -> str:
        """The pin checks, on the response head: the provider must be the conversation's."""
        provider = headers.get("x-sentinel-provider", "")
        model = headers.get("x-sentinel-model", "")
        outcome = headers.get("x-sentinel-session", "")
        where = f"{plan.soak_id}: provider {provider!r} model {model!r} session {outcome!r}"
        if provider not in PROVIDERS:
            raise Problem("bad_headers", where)
        if PROVIDERS[provider] != model:
            raise Problem("wrong_model", where)
        conversation = plan.conversation
        epoch = self.epoch(sent)
        if outcome == "created":
            conversation.created[epoch] += 1
            if conversation.created[epoch] > 1:
                raise Problem("created_twice", f"{where}, epoch {epoch}")
        elif outcome != "hit":
            raise Problem("bad_headers", where)
        pinned = conversation.pins[epoch]
        if pinned is None:
            conversation.pins[epoch] = provider
        elif pinned != provider:
            raise Problem("pin_violation", f"{where}, pinned to {pinned} in epoch {epoch}")
        return provider

    async def _check_stream(self, plan: Plan, body: Body, provider: str) -> None:
        buffer = b""
        seen = 0
        done = False
        while (piece := await body.next()) is not None:
            buffer += piece
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                if done:
                    raise Problem("bad_body", f"{plan.soak_id}: an event after [DONE]")
                if event == b"data: [DONE]":
                    done = True
                    continue
                if not event.startswith(b"data: "):
                    raise Problem("bad_body", f"{plan.soak_id}: not an SSE event: {event[:100]!r}")
                try:
                    answer = json.loads(event[6:])
                except ValueError:
                    raise Problem("bad_body", f"{plan.soak_id}: {event[:200]!r}") from None
                _check_event(answer, plan, provider)
                seen += 1
                if answer.get("n") != seen:
                    raise Problem("bad_body", f"{plan.soak_id}: event {answer.get('n')} as {seen}")
                if plan.abort == "body" and seen >= plan.abort_after:
                    self.tally.aborts["aborted_mid_stream"] += 1
                    raise Abort()
        if not done or seen != plan.events or buffer:
            raise Problem(
                "bad_body",
                f"{plan.soak_id}: {seen} of {plan.events} events, [DONE] {done}, rest {buffer!r}",
            )

    async def _check_redis(self, plan: Plan, provider: str, sent: float) -> None:
        """The conversation's pin in Redis now must be the provider that answered, unless
        the restart came between (the key may then be gone or made anew)."""
        if self.rng.random() >= self.args.redis_check:
            return
        epoch = self.epoch(sent)
        if epoch == 0 and self.timeline.stop_at is not None:
            return
        key = SESSION_KEY.format(plan.conversation.id)
        try:
            raw = await self.redis.get(key)
        except Exception:  # noqa: BLE001 - Redis restarting: nothing to compare with
            self.tally.redis_checks_skipped += 1
            return
        if epoch == 0 and self.timeline.stop_at is not None:
            return
        self.tally.redis_checks += 1
        stored = json.loads(raw).get("provider") if raw else None
        if stored != provider:
            raise Problem(
                "redis_pin_mismatch", f"{plan.soak_id}: answered by {provider}, Redis has {stored}"
            )


def _wall() -> str:
    """The time of day, as the proxy's log writes it (to find a request there)."""
    return dt.datetime.now().strftime("%H:%M:%S.%f")[:-3]


def _check_event(answer: Any, plan: Plan, provider: str) -> None:
    """A JSON answer or SSE event must be this request's, from the provider that the
    proxy's headers name."""
    if not isinstance(answer, dict):
        raise Problem("bad_body", f"{plan.soak_id}: {answer!r:.200}")
    if answer.get("id") != plan.soak_id:
        raise Problem("wrong_request_id", f"{plan.soak_id}: got the answer to {answer.get('id')}")
    if answer.get("provider") != provider:
        raise Problem(
            "wrong_provider_in_body",
            f"{plan.soak_id}: headers say {provider}, body {answer.get('provider')}",
        )


# --------------------------------------------------------------------------------------------
# Sampling


class Sampler:
    """Samples the proxy every `interval` seconds in a thread; rows go to a CSV as taken."""

    def __init__(
        self, pid: int, ports: Ports, load: Load, interval: float, csv_path: Path, t0: float
    ) -> None:
        self.pid = pid
        self.ports = ports
        self.load = load
        self.interval = interval
        self.t0 = t0
        self.phase = "start"
        self.rows: list[dict[str, Any]] = []
        self.redis = redis_client(ports.redis, "monitor")
        self._file: IO[str] = csv_path.open("w", newline="")
        self._csv = csv.DictWriter(self._file, SAMPLE_FIELDS)
        self._csv.writeheader()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._last = (time.monotonic(), cpu_ticks(pid), 0)
        self._stalls = machine_stalls()
        # Local port -> [(t_s, "peer state")], each change of what the proxy's socket was.
        self.history: dict[int, list[tuple[float, str]]] = {}
        self._requests_before = 0  # of earlier phases' tallies

    def start(self) -> None:
        self._thread.start()

    def new_tally(self) -> None:
        self._requests_before += self.load.tally.requests
        self.load.tally = Tally()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception as exc:  # noqa: BLE001 - keep sampling; say why one failed
                log(f"sample failed: {exc!r}")

    def sample(self, phase: str | None = None) -> dict[str, Any]:
        with self._lock:
            now = time.monotonic()
            seen: dict[int, str] = {}
            sockets = proxy_sockets(self.pid, self.ports, seen)
            for port, what in seen.items():
                changes = self.history.setdefault(port, [])
                if not changes or changes[-1][1] != what:
                    changes.append((round(now - self.t0, 1), what))
            ticks = cpu_ticks(self.pid)
            requests = self._requests_before + self.load.tally.requests
            last_t, last_ticks, last_requests = self._last
            elapsed = max(now - last_t, 1e-3)
            self._last = (now, ticks, requests)
            (io, steal), (last_io, last_steal) = machine_stalls(), self._stalls
            self._stalls = (io, steal)
            lag, self.load.max_lag = self.load.max_lag, 0.0
            row: dict[str, Any] = {
                "t_s": round(now - self.t0, 1),
                "phase": phase or self.phase,
                "rss_mb": round(run.rss_mb(self.pid), 2),
                **{k: sockets.get(k, 0) for k in SAMPLE_FIELDS[3:14]},
                "redis_clients": proxy_redis_clients(self.redis),
                "open_streams": metric(self.ports.proxy, "sentinel_open_streams"),
                "threads": status_field(self.pid, "Threads"),
                "proxy_cpu_pct": round(
                    100.0 * (ticks - last_ticks) / os.sysconf("SC_CLK_TCK") / elapsed, 1
                ),
                "requests": requests,
                "rps": round((requests - last_requests) / elapsed, 1),
                "errors": self.load.tally.errors,
                "loadavg_1m": float(Path("/proc/loadavg").read_text().split()[0]),
                "io_stall_ms": None if io is None or last_io is None else round(io - last_io),
                "steal_ms": round(steal - last_steal),
                "client_lag_ms": round(lag * 1000.0),
            }
            self.rows.append(row)
            self._csv.writerow(row)
            self._file.flush()
            return row

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._file.close()
        self.redis.close()


async def settle(sampler: Sampler, deadline: float, phase: str) -> tuple[dict[str, Any], float]:
    """Sample until the proxy holds no client or upstream connection and no open stream, or
    until `deadline` seconds have passed. Returns the last sample and the time it took."""
    began = time.monotonic()
    sampler.phase = phase
    while True:
        row = await asyncio.to_thread(sampler.sample)
        quiet = row["client_conns"] == 0 and row["upstream_conns"] == 0 and not row["open_streams"]
        waited = time.monotonic() - began
        if quiet or waited >= deadline:
            return row, waited
        await asyncio.sleep(1.0)


# --------------------------------------------------------------------------------------------
# The run


@dataclass
class Env:
    args: argparse.Namespace
    procs: Processes
    tmp: Path
    proxy_cpu: int
    load_cpu: int
    python: str
    ports: set[int] = field(default_factory=set)


def start_nginx(env: Env) -> dict[str, int]:
    prefix = env.tmp / "nginx"
    prefix.mkdir()
    module = run.find_echo_module(env.args.echo_module)
    assert module is not None
    upstreams = {name: run.free_port(env.ports) for name in PROVIDERS}
    text = NGINX_TEMPLATE.read_text()
    for key, value in {
        "@PREFIX@": str(prefix),
        "@ECHO_MODULE@": module,
        "@PORT_ALPHA@": str(upstreams["alpha"]),
        "@PORT_BETA@": str(upstreams["beta"]),
    }.items():
        text = text.replace(key, value)
    conf = prefix / "nginx.conf"
    conf.write_text(text)
    base = ["nginx", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    test = subprocess.run([*base, "-t"], capture_output=True, text=True, timeout=30)
    if test.returncode != 0:
        raise BenchError(f"nginx -t failed for {conf}:\n{test.stderr}")
    proc = env.procs.start("nginx", base, str(env.load_cpu))
    for port in upstreams.values():
        run.wait_until(f"nginx port {port}", lambda p=port: run.tcp_open(p), proc, 15)  # type: ignore[misc]
    return upstreams


def start_proxy(env: Env, redis_port: int, upstreams: dict[str, int]) -> tuple[Proc, int]:
    port = run.free_port(env.ports)
    config = env.tmp / "sentinel.toml"
    lines = ["[session]", f'redis_url = "redis://127.0.0.1:{redis_port}/0"', ""]
    for name, upstream_port in upstreams.items():
        lines += ["[[providers]]", f'name = "{name}"']
        lines += [f'base_url = "http://127.0.0.1:{upstream_port}/v1"', ""]
    targets = ", ".join(
        f'{{ provider = "{name}", model = "{model}", weight = 1 }}'
        for name, model in PROVIDERS.items()
    )
    lines += [f"[models.{ALIAS}]", f"targets = [{targets}]", ""]
    config.write_text("\n".join(lines))
    argv = [
        env.python, "-m", "sentinel_proxy", "--config", str(config),
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "info",
    ]  # fmt: skip
    proc = env.procs.start("sentinel", argv, str(env.proxy_cpu))
    ready = f"http://127.0.0.1:{port}/readyz"
    run.wait_until(f"{ready} = 200", lambda: run.http_status(ready)[0] == 200, proc, 60)
    return proc, port


async def restart_redis(
    redis: RedisServer, load: Load, sampler: Sampler, at: float, outage: float
) -> None:
    """Stop Redis `at` seconds into the run, start it again on its port `outage` s later."""
    await asyncio.sleep(at)
    timeline = load.timeline
    log(f"stopping redis :{redis.port}")
    sampler.phase = "redis-down"
    timeline.stop_at = time.monotonic()
    await asyncio.to_thread(redis.stop)
    timeline.down_at = time.monotonic()
    await asyncio.sleep(outage)
    log(f"starting redis :{redis.port} again")
    await asyncio.to_thread(redis.start)
    timeline.up_at = time.monotonic()
    sampler.phase = "soak"


async def soak(env: Env, results: dict[str, Any]) -> None:
    args = env.args
    upstreams = start_nginx(env)
    redis = RedisServer(env.procs, env.tmp, run.free_port(env.ports), str(env.load_cpu))
    redis.start()
    proxy, port = start_proxy(env, redis.port, upstreams)
    ports = Ports(port, redis.port, upstreams)
    log(f"proxy :{port} (pid {proxy.pid}), redis :{redis.port}, upstreams {upstreams}")
    results["ports"] = {"proxy": port, "redis": redis.port, **upstreams}
    timeline = Timeline()
    load = Load(args, port, redis.port, timeline)
    t0 = time.monotonic()
    sampler = Sampler(
        proxy.pid, ports, load, args.sample_interval, args.out / "soak-samples.csv", t0
    )
    lag_task = asyncio.create_task(load.watch_lag())
    results["start"] = sampler.sample("start")
    sampler.start()
    try:
        log(f"warm-up: {args.warmup:.0f} s")
        sampler.phase = "warmup"
        await load.run(args.warmup)
        results["warmup"] = summarize_tally(load.tally)
        baseline, waited = await settle(sampler, args.settle, "settle")
        results["baseline"] = baseline
        results["baseline_settle_s"] = round(waited, 1)
        log(f"baseline after {waited:.0f} s idle: {json.dumps(baseline)}")
        if baseline["upstream_conns"] or baseline["client_conns"]:
            log("warning: connections still open at the baseline")

        sampler.new_tally()
        sampler.phase = "soak"
        restart_at = args.duration * args.restart_at
        log(f"soak: {args.duration:.0f} s, Redis restart at {restart_at:.0f} s")
        ticks_before = run.process_ticks()
        cpu_before = run.cpu_times()
        began = time.monotonic()
        await load.run(args.duration, restart_redis(redis, load, sampler, restart_at, args.outage))
        stopped = time.monotonic()
        results["soak_window"] = {
            "seconds": round(stopped - began, 1),
            "other_cpu_pct": run.foreign_cpu_pct(
                ticks_before, run.process_ticks(), stopped - began
            ),
            "proxy_core_busy_pct": run.cpu_busy_pct(cpu_before, run.cpu_times(), [env.proxy_cpu]),
            "load_core_busy_pct": run.cpu_busy_pct(cpu_before, run.cpu_times(), [env.load_cpu]),
            "began_t_s": round(began - t0, 1),
        }
        log(f"load stopped; waiting up to {args.settle:.0f} s for idle connections to close")
        final, waited = await settle(sampler, args.settle, "settle")
        results["final"] = final
        results["final_settle_s"] = round(waited, 1)
        results["unlisted_at_end"] = describe_unlisted(proxy.pid, sampler.history)
        results["soak"] = summarize_tally(load.tally)
        results["stalls"] = stalls(sampler.rows)
        results["outage"] = outage_report(load.tally, timeline, t0, began, results["stalls"])
        results["audit"] = await audit(load, timeline)
        results["repins"] = repin_report(load)
        results["peaks"] = peaks(sampler.rows, began - t0)
        results["trend"] = rss_trend(sampler.rows, began - t0, args.duration)
    finally:
        lag_task.cancel()
        sampler.stop()
        await load.close()
        results["samples"] = sampler.rows
        results["proxy_alive"] = proxy.alive()
        results["proxy_log"] = log_summary(proxy.log_path)


def stalls(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The sample intervals in which the machine stalled (see STALL_MS)."""
    found = []
    for previous, row in zip(rows, rows[1:], strict=False):
        if max(row["io_stall_ms"] or 0, row["steal_ms"], row["client_lag_ms"]) >= STALL_MS:
            keys = ("t_s", "phase", "io_stall_ms", "steal_ms", "client_lag_ms", "rps")
            found.append({"from_t_s": previous["t_s"], **{k: row[k] for k in keys}})
    return found


def summarize_tally(tally: Tally) -> dict[str, Any]:
    mixups = {k: tally.problems[k] for k in MIXUP_KINDS}
    return {
        "requests": tally.requests,
        "new_conversations": tally.new_conversations,
        "outcomes": dict(tally.outcomes.most_common()),
        "aborts": dict(tally.aborts.most_common()),
        "statuses": dict(tally.statuses.most_common()),
        "problems": dict(tally.problems.most_common()),
        "mixups": mixups,
        "mixups_total": sum(mixups.values()),
        "problem_samples": tally.samples,
        "http_error_samples": tally.http_samples,
        "redis_checks": tally.redis_checks,
        "redis_checks_skipped": tally.redis_checks_skipped,
        "stale_connection_retries": tally.stale_retries,
    }


def outage_report(
    tally: Tally, timeline: Timeline, t0: float, began: float, stalls: list[dict[str, Any]]
) -> dict[str, Any]:
    """503s around the restart and how long until conversations were served again."""
    if timeline.stop_at is None or timeline.up_at is None or timeline.down_at is None:
        return {}
    stop, down, up = timeline.stop_at, timeline.down_at, timeline.up_at
    records = tally.records
    store_503 = [r for r in records if r[2] == 503]
    after_stop = [r for r in records if r[1] >= stop]
    first_fail = min((r[1] for r in after_stop if r[3] != "ok" and r[3] != "aborted"), default=None)
    first_ok_after_up = min((r[1] for r in records if r[0] >= up and r[3] == "ok"), default=None)
    last_503 = max((r[1] for r in store_503), default=None)
    # Per second, from 5 s before the stop to 20 s after Redis answered again.
    per_second: list[dict[str, Any]] = []
    start = int(stop - t0) - 5
    for second in range(start, int(up - t0) + 21):
        window = [r for r in records if second <= r[1] - t0 < second + 1]
        per_second.append(
            {
                "t_s": second,
                "ok": sum(1 for r in window if r[3] == "ok"),
                "503": sum(1 for r in window if r[2] == 503),
                "other": sum(1 for r in window if r[3] not in ("ok", "aborted") and r[2] != 503),
            }
        )
    during = [r for r in records if stop <= r[1] and (first_ok_after_up or up) >= r[1]]
    # A 503 that ended before the stop, or was asked for well after Redis was back (past the
    # breaker's reset), has nothing to do with the restart.
    unexpected = [r for r in store_503 if r[1] < stop or r[0] > up + LATE_503_SECONDS]
    # Of those, the ones in flight while the machine stalled (the proxy may wait ten store
    # budgets, then answers 503: README, "When Redis is down") are counted apart.
    windows = [(t0 + s["from_t_s"], t0 + s["t_s"]) for s in stalls]
    in_stall = [r for r in unexpected if any(r[0] <= end and r[1] >= a for a, end in windows)]
    return {
        "stop_t_s": round(stop - t0, 2),
        "stop_into_soak_s": round(stop - began, 1),
        "down_t_s": round(down - t0, 2),
        "up_t_s": round(up - t0, 2),
        "redis_down_s": round(up - down, 2),
        "first_failure_after_stop_s": None if first_fail is None else round(first_fail - stop, 3),
        "first_ok_after_up_s": None
        if first_ok_after_up is None
        else round(first_ok_after_up - up, 3),
        "last_503_after_up_s": None if last_503 is None else round(last_503 - up, 3),
        "total_503": len(store_503),
        "unexpected_503": len(unexpected) - len(in_stall),
        "unexpected_503_in_machine_stalls": len(in_stall),
        "statuses_during": dict(collections.Counter(f"{r[2]} {r[3]}" for r in during)),
        # What ended after Redis was back but before the first success: a request the
        # store answered that still did not close the breaker shows up here.
        "between_up_and_first_ok": dict(
            collections.Counter(
                f"{r[2]} {r[3]}" for r in records if up <= r[1] < (first_ok_after_up or up)
            )
        ),
        "per_second": per_second,
    }


async def audit(load: Load, timeline: Timeline) -> dict[str, Any]:
    """Every conversation's pin as the clients saw it last, against Redis at the end."""
    restarted = timeline.down_at is not None
    counts = collections.Counter[str]()
    samples: list[str] = []
    conversations = load.conversations
    for start in range(0, len(conversations), 500):
        batch = conversations[start : start + 500]
        values = await load.redis.mget([SESSION_KEY.format(c.id) for c in batch])
        for conversation, raw in zip(batch, values, strict=True):
            expected = conversation.pins[1] if restarted else conversation.pins[0]
            stored = json.loads(raw).get("provider") if raw else None
            if expected is None:
                counts["not_seen_since_restart" if restarted else "never_answered"] += 1
            elif stored is None:
                counts["missing"] += 1
                if len(samples) < 10:
                    samples.append(f"{conversation.id}: pinned to {expected}, no key")
            elif stored == expected:
                counts["match"] += 1
            else:
                counts["mismatch"] += 1
                if len(samples) < 10:
                    samples.append(f"{conversation.id}: pinned to {expected}, Redis {stored}")
    return {"conversations": len(conversations), **dict(counts), "samples": samples}


def repin_report(load: Load) -> dict[str, int]:
    counts = collections.Counter[str]()
    for conversation in load.conversations:
        before, after = conversation.pins
        if before is not None and after is not None:
            counts["same_provider" if before == after else "other_provider"] += 1
        elif after is not None:
            counts["new_after_restart"] += 1
    return dict(counts)


def peaks(rows: list[dict[str, Any]], since: float) -> dict[str, Any]:
    soak_rows = [r for r in rows if r["t_s"] >= since and r["phase"] in ("soak", "redis-down")]
    if not soak_rows:
        return {}
    keys = ("rss_mb", "fds", "client_conns", "upstream_conns", "redis_conns", "close_wait")
    out: dict[str, Any] = {k: max(r[k] for r in soak_rows) for k in keys}
    streams = [r["open_streams"] for r in soak_rows if r["open_streams"] is not None]
    out["open_streams"] = max(streams, default=None)
    out["rps_median"] = statistics.median(r["rps"] for r in soak_rows)
    out["proxy_cpu_pct_median"] = statistics.median(r["proxy_cpu_pct"] for r in soak_rows)
    out["loadavg_1m_max"] = max(r["loadavg_1m"] for r in soak_rows)
    return out


def rss_trend(rows: list[dict[str, Any]], since: float, duration: float) -> dict[str, Any]:
    """Least-squares slope of RSS under load (MB per minute), from a minute (or a quarter of
    the run, if shorter) into the soak: whether memory kept growing while the load did not."""
    skip = min(60.0, duration / 4)
    points = [
        (r["t_s"], r["rss_mb"]) for r in rows if r["t_s"] >= since + skip and r["phase"] == "soak"
    ]
    if len(points) < 3:
        return {}
    mean_t = statistics.fmean(t for t, _ in points)
    mean_m = statistics.fmean(m for _, m in points)
    var = sum((t - mean_t) ** 2 for t, _ in points)
    slope = sum((t - mean_t) * (m - mean_m) for t, m in points) / var if var else 0.0
    half = len(points) // 2
    return {
        "slope_mb_per_min": round(slope * 60.0, 3),
        "from_t_s": points[0][0],
        "first_half_median_mb": round(statistics.median(m for _, m in points[:half]), 2),
        "second_half_median_mb": round(statistics.median(m for _, m in points[half:]), 2),
    }


def log_summary(path: Path) -> dict[str, Any]:
    """Warnings and errors of the proxy's log, by message (request ids left out)."""
    counts = collections.Counter[str]()
    lines = 0
    tracebacks = 0
    with contextlib.suppress(OSError):
        with path.open(errors="replace") as handle:
            for line in handle:
                lines += 1
                if line.startswith("Traceback"):
                    tracebacks += 1
                for level in ("WARNING", "ERROR", "CRITICAL"):
                    if f" {level} " in line or line.startswith(level):
                        message = line.split(level, 1)[1].strip()
                        counts[f"{level} {_shape(message)}"] += 1
    return {"lines": lines, "tracebacks": tracebacks, "by_message": dict(counts.most_common(20))}


def _shape(message: str) -> str:
    """A log message with its numbers and ids blanked, so alike messages count as one."""
    words = []
    for word in message.split()[:14]:
        words.append("#" if any(ch.isdigit() for ch in word) else word)
    return " ".join(words)


# --------------------------------------------------------------------------------------------
# Verdict and report


def verdict(results: dict[str, Any], args: argparse.Namespace) -> list[tuple[str, str, bool]]:
    """(check, figures, passed) for each thing the soak run promises."""
    base, final = results["baseline"], results["final"]
    soak, audit_ = results["soak"], results["audit"]
    checks: list[tuple[str, str, bool]] = []
    rss_delta = final["rss_mb"] - base["rss_mb"]
    checks.append(
        (
            f"RSS back to baseline (within {args.rss_tolerance_mb:g} MB)",
            f"{base['rss_mb']:.1f} -> {final['rss_mb']:.1f} MB ({rss_delta:+.1f}); "
            f"peak {results['peaks'].get('rss_mb', 0):.1f} MB",
            rss_delta <= args.rss_tolerance_mb,
        )
    )
    # The Redis pool keeps the connections it opened (it has no idle timeout): the one
    # difference in fds the end may have, and it is counted apart.
    pool_delta = final["redis_conns"] - base["redis_conns"]
    checks.append(
        (
            "open fds back to baseline (exactly, but for the Redis pool's size)",
            f"{base['fds']} -> {final['fds']} (Redis pool {pool_delta:+d}); "
            f"peak {results['peaks'].get('fds')}",
            final["fds"] - pool_delta == base["fds"],
        )
    )
    checks.append(
        (
            "upstream connections back to baseline (exactly)",
            f"{base['upstream_conns']} -> {final['upstream_conns']}; "
            f"peak {results['peaks'].get('upstream_conns')}; idle closed within "
            f"{results['final_settle_s']} s",
            final["upstream_conns"] == base["upstream_conns"],
        )
    )
    checks.append(
        (
            f"Redis connections back to baseline (CLIENT LIST; + {args.redis_slack} at most)",
            f"{base['redis_clients']} -> {final['redis_clients']}; the proxy holds "
            f"{base['redis_conns']} -> {final['redis_conns']} sockets to Redis, "
            f"{final['close_wait']} of them half closed by Redis (CLOSE_WAIT)",
            final["redis_clients"] is not None
            and final["redis_clients"] <= base["redis_clients"] + args.redis_slack,
        )
    )
    checks.append(
        (
            "no open streams, no client connections left",
            f"open streams {final['open_streams']}, client connections {final['client_conns']}",
            not final["open_streams"] and final["client_conns"] == 0,
        )
    )
    checks.append(
        (
            "zero cross-session mix-ups",
            ", ".join(f"{k} {v}" for k, v in soak["mixups"].items())
            + f"; end audit mismatches {audit_.get('mismatch', 0)}",
            soak["mixups_total"] == 0
            and results["warmup"]["mixups_total"] == 0
            and audit_.get("mismatch", 0) == 0
            and audit_.get("missing", 0) == 0,
        )
    )
    unexplained = collections.Counter[str]()
    for phase in (results["warmup"], soak):
        unexplained.update({k: v for k, v in phase["problems"].items() if k not in MIXUP_KINDS})
        unexplained.update(
            {
                k: v
                for k, v in phase["outcomes"].items()
                if k.startswith("http_") and k != "http_503"
            }
        )
    unexplained.update({"http_503 outside the outage": results["outage"].get("unexpected_503", 0)})
    unexplained = +unexplained
    in_stalls = results["outage"].get("unexpected_503_in_machine_stalls", 0)
    checks.append(
        (
            "no broken answers, transport errors or error statuses (but the outage's)",
            (", ".join(f"{k} {v}" for k, v in unexplained.items()) or "none")
            + (
                f"; 503s in flight during a machine stall (apart): {in_stalls}" if in_stalls else ""
            ),
            not unexplained,
        )
    )
    outage = results["outage"]
    recovered = outage.get("first_ok_after_up_s")
    checks.append(
        (
            f"served again within {args.recovery_limit:g} s of Redis answering",
            f"{outage.get('total_503')} 503s; first success {recovered} s after Redis was back",
            recovered is not None and recovered <= args.recovery_limit,
        )
    )
    checks.append(
        (
            "proxy alive, no tracebacks in its log",
            f"alive {results['proxy_alive']}, tracebacks {results['proxy_log']['tracebacks']}",
            results["proxy_alive"] and results["proxy_log"]["tracebacks"] == 0,
        )
    )
    return checks


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    meta = results["meta"]
    base, final, soak = results["baseline"], results["final"], results["soak"]
    window = results["soak_window"]
    lines = [
        f"# Soak run, {meta['date']}",
        "",
        f"`{meta['command']}`",
        "",
        f"{meta['cpu_model']}, {meta['cpus']} CPUs, {meta['memory']}; {meta['kernel']}, "
        f"Python {meta['python']}, {meta['redis']}, nginx {meta['nginx']}; commit "
        f"{meta['commit']}. Proxy on CPU {meta['proxy_cpu']}, load on CPU {meta['load_cpu']}. "
        f"Other processes used {window['other_cpu_pct']}% of a CPU during the soak (load "
        f"average up to {results['peaks'].get('loadavg_1m_max')}); proxy core "
        f"{window['proxy_core_busy_pct']}% busy, load core {window['load_core_busy_pct']}%.",
        "",
        f"{soak['requests']:,} requests in {window['seconds']:.0f} s "
        f"({soak['requests'] / max(window['seconds'], 1):.0f}/s) on {args.concurrency} "
        f"client connections, {soak['new_conversations']:,} new conversations "
        f"({results['audit']['conversations']:,} in all); "
        f"Redis stopped {results['outage'].get('stop_into_soak_s')} s into the soak, "
        f"down {results['outage'].get('redis_down_s')} s.",
        "",
        "| check | figures | result |",
        "|---|---|---|",
    ]
    for check, figures, passed in verdict(results, args):
        lines.append(f"| {check} | {figures} | {'yes' if passed else '**no**'} |")
    lines += [
        "",
        "| | start | baseline | peak under load | end |",
        "|---|---:|---:|---:|---:|",
    ]
    start, peak = results["start"], results["peaks"]
    for key, label in (
        ("rss_mb", "RSS (MB)"),
        ("fds", "open fds"),
        ("upstream_conns", "upstream connections"),
        ("client_conns", "client connections"),
        ("redis_conns", "Redis connections (proxy side)"),
        ("close_wait", "sockets in CLOSE_WAIT"),
        ("unlisted_sockets", "sockets in no table (closed by a reset, or unconnected)"),
        ("open_streams", "open streams (metric)"),
    ):
        lines.append(
            f"| {label} | {start.get(key)} | {base.get(key)} | {peak.get(key)} | {final.get(key)} |"
        )
    unlisted = results.get("unlisted_at_end") or []
    lines += [
        "",
        "Sockets in no table at the end: " + ("; ".join(unlisted) or "none") + ".",
    ]
    trend = results["trend"]
    if trend:
        lines += [
            "",
            f"RSS under load: slope {trend['slope_mb_per_min']:+.3f} MB/min from "
            f"{trend['from_t_s']} s; median {trend['first_half_median_mb']} MB in the first "
            f"half, {trend['second_half_median_mb']} MB in the second.",
        ]
    stalls = results.get("stalls") or []
    lines += [
        "",
        f"Machine stalls (a sample with {STALL_MS} ms or more of IO stall, CPU steal or lag of "
        "the clients' own event loop): "
        + (
            "; ".join(
                f"at {s['t_s']} s: IO {s['io_stall_ms']} ms, steal {s['steal_ms']} ms, "
                f"client lag {s['client_lag_ms']} ms"
                for s in stalls
            )
            or "none"
        )
        + ".",
    ]
    outcomes = soak["outcomes"]
    lines += [
        "",
        "Outcomes: " + ", ".join(f"{k} {v:,}" for k, v in outcomes.items()),
        "",
        "Statuses: " + ", ".join(f"{k}: {v:,}" for k, v in soak["statuses"].items()),
        "",
        f"Pins: {results['repins']}; Redis checks after answers: {soak['redis_checks']:,} "
        f"({soak['redis_checks_skipped']} skipped while Redis was down); end audit: "
        + ", ".join(f"{k} {v}" for k, v in results["audit"].items() if k != "samples"),
    ]
    outage = results["outage"]
    if outage:
        lines += [
            "",
            f"Redis restart (seconds from the run's start, as in the samples): stopped at "
            f"{outage['stop_t_s']}, exited at {outage['down_t_s']}, back at {outage['up_t_s']};"
            f" first failure {outage['first_failure_after_stop_s']}"
            f" s after the stop; {outage['total_503']} 503s; first success "
            f"{outage['first_ok_after_up_s']} s and last 503 {outage['last_503_after_up_s']} s "
            f"after Redis was back; 503s away from the outage: {outage['unexpected_503']}, and "
            f"{outage['unexpected_503_in_machine_stalls']} more in flight during a machine stall"
            ". Answers between Redis back and the first success: "
            + (
                ", ".join(f"{k}: {v}" for k, v in outage["between_up_and_first_ok"].items())
                or "none"
            )
            + ".",
        ]
    if soak["http_error_samples"]:
        lines += ["", "Error statuses (first ones of each):", ""]
        lines += [f"- {k}: {', '.join(v)}" for k, v in soak["http_error_samples"].items()]
    if soak["problem_samples"]:
        lines += ["", "Problems (first ones):", ""]
        lines += [f"- {s}" for s in soak["problem_samples"][:15]]
    log_info = results["proxy_log"]
    lines += [
        "",
        f"Proxy log: {log_info['lines']:,} lines, {log_info['tracebacks']} tracebacks; "
        + "; ".join(f"{k}: {v}" for k, v in log_info["by_message"].items()),
    ]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["samples"]
    t = [r["t_s"] for r in rows]
    fig, axes = plt.subplots(4, 1, figsize=(9, 9), sharex=True)
    panels: list[tuple[str, list[tuple[str, str]]]] = [
        ("RSS (MB)", [("rss_mb", "RSS")]),
        ("fds", [("fds", "open fds")]),
        (
            "connections",
            [
                ("upstream_conns", "upstream"),
                ("client_conns", "client"),
                ("redis_conns", "Redis"),
                ("close_wait", "CLOSE_WAIT"),
                ("unlisted_sockets", "in no table"),
            ],
        ),
        ("requests/s", [("rps", "requests/s")]),
    ]
    outage = results.get("outage") or {}
    for ax, (label, series) in zip(axes, panels, strict=True):
        for key, name in series:
            ax.plot(t, [r.get(key) for r in rows], label=name, linewidth=1)
        ax.set_ylabel(label)
        if outage:
            ax.axvspan(outage["stop_t_s"], outage["up_t_s"], color="red", alpha=0.15)
        window = results.get("soak_window")
        if window:
            ax.axvline(window["began_t_s"], color="grey", linestyle=":", linewidth=1)
            ax.axvline(window["began_t_s"] + window["seconds"], color="grey", linestyle=":")
        if len(series) > 1:
            ax.legend(loc="upper right", fontsize="small")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("seconds (dotted: soak start and end; red: Redis down)")
    fig.suptitle("sentinel-proxy soak run")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of soak (600)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up load (60; 15 if short)")
    parser.add_argument("--concurrency", type=int, default=64, help="client connections (64)")
    parser.add_argument(
        "--abort-share", type=float, default=0.2, help="share of requests aborted (0.2)"
    )
    parser.add_argument(
        "--restart-at", type=float, default=0.5, help="Redis restart, as a share of --duration"
    )
    parser.add_argument("--outage", type=float, default=5.0, help="seconds Redis stays down (5)")
    parser.add_argument(
        "--settle",
        type=float,
        default=90.0,
        help="seconds to wait for idle connections to close after the load (90)",
    )
    parser.add_argument("--sample-interval", type=float, default=5.0, help="seconds (5)")
    parser.add_argument(
        "--redis-check",
        type=float,
        default=1.0,
        help="share of answers whose pin is read back from Redis at once (1.0)",
    )
    parser.add_argument(
        "--rss-tolerance-mb", type=float, default=5.0, help="RSS 'back to baseline' margin (5)"
    )
    parser.add_argument(
        "--redis-slack",
        type=int,
        default=2,
        help="Redis connections the end may hold above the baseline (2)",
    )
    parser.add_argument(
        "--recovery-limit",
        type=float,
        default=6.0,
        help="seconds after Redis is back by which requests must succeed (6: the breaker's"
        " reset and a second)",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the request mix (1)")
    parser.add_argument("--echo-module", help="path of ngx_http_echo_module.so")
    parser.add_argument("--out", type=Path, default=BENCH / "out", help="output directory")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp dir and logs")
    parser.add_argument(
        "--from-json",
        type=Path,
        metavar="SOAK_JSON",
        help="only write the report and the plot again from a soak.json, without running",
    )
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = 60.0 if args.duration >= 300 else 15.0
    return args


def check_requirements(args: argparse.Namespace) -> list[str]:
    missing: list[str] = []
    for tool, package in (
        ("nginx", "nginx-light (or nginx)"),
        ("redis-server", "redis-server"),
        ("taskset", "util-linux"),
    ):
        if shutil.which(tool) is None:
            missing.append(f"{tool}: apt-get install {package}")
    if run.find_echo_module(args.echo_module) is None:
        missing.append("nginx echo module: apt-get install libnginx-mod-http-echo")
    for module in ("redis", "matplotlib"):
        if importlib.util.find_spec(module) is None:
            missing.append(f"python module {module}: .venv/bin/pip install -e '.[bench]'")
    if len(os.sched_getaffinity(0)) < 2:
        missing.append("at least 2 CPUs (the proxy and the load generator are pinned apart)")
    return missing


def meta(env: Env) -> dict[str, Any]:
    commit = run.first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = run.first_line(["git", "-C", str(ROOT), "status", "--porcelain", "sentinel_proxy"])
    return run.machine() | {
        "commit": commit + (" (sentinel_proxy/ modified)" if dirty not in ("", "?") else ""),
        "command": shlex.join(["bench/soak.py", *sys.argv[1:]]),
        "proxy_cpu": env.proxy_cpu,
        "load_cpu": env.load_cpu,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(env.args).items()},
        "tmp": str(env.tmp),
    }


def rerender(path: Path, out: Path) -> int:
    """--from-json: the report and the plot of an earlier run, with that run's settings."""
    results: dict[str, Any] = json.loads(path.read_text())
    args = argparse.Namespace(**results["meta"]["args"])
    text = report(results, args)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.md").write_text(text)
    plot(results, out / "soak.png")
    print(text)
    return 0 if all(ok for _, _, ok in verdict(results, args)) else 3


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return rerender(args.from_json, args.out)
    missing = check_requirements(args)
    if missing:
        print("bench/soak.py cannot run; missing:", file=sys.stderr)
        for item in missing:
            print(f"  - {item}", file=sys.stderr)
        return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    cpus = sorted(os.sched_getaffinity(0))
    proxy_cpu, load_cpu = cpus[0], cpus[1]
    os.sched_setaffinity(0, {load_cpu})
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, run.raise_interrupt)
    tmp = Path(tempfile.mkdtemp(prefix="sentinel-soak-"))
    venv_python = ROOT / ".venv" / "bin" / "python"
    python = str(venv_python) if venv_python.exists() else sys.executable
    env = Env(args, Processes(tmp), tmp, proxy_cpu, load_cpu, python)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"meta": meta(env)}
    keep = args.keep_tmp
    log(f"temp dir {tmp}; proxy on CPU {proxy_cpu}, load on CPU {load_cpu}")
    try:
        asyncio.run(soak(env, results))
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        keep = True
        return 130
    except BenchError as exc:
        log(f"failed: {exc}")
        keep = True
        return 1
    finally:
        env.procs.stop_all()
        (args.out / "soak.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
        if keep:
            log(f"logs kept in {tmp}")
    checks = verdict(results, args)
    text = report(results, args)
    (args.out / "soak.md").write_text(text)
    plot(results, args.out / "soak.png")
    print(text)
    passed = all(ok for _, _, ok in checks)
    if passed and not keep:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        log(f"logs kept in {tmp}")
    log(f"wrote soak.json, soak.md, soak-samples.csv and soak.png in {args.out}")
    return 0 if passed else 3


if __name__ == "__main__":
    sys.exit(main())
