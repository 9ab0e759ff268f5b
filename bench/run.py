"""The sentinel-proxy benchmark: one command, run outside CI.

    bench/run.py [--quick] [--targets direct,aiohttp,sentinel]

Starts Redis and an nginx mock upstream, then each target in turn (the raw aiohttp reference
proxy and sentinel-proxy; "direct" is nginx itself), drives them with wrk and small asyncio
clients, prints markdown tables with ratios and writes bench/out/results.json,
bench/out/results.md and bench/out/throughput.png. See bench/README.md.

Pinning: the proxy under test runs alone on the first CPU; wrk, nginx, Redis and this script
(with its clients) share the second. The workers scenario runs the proxy on both.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib.util
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

import clients

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WRK_SCRIPT = BENCH / "wrk" / "chat.lua"
NGINX_TEMPLATE = BENCH / "nginx.conf"
ECHO_MODULE_CANDIDATES = (
    "/usr/lib/nginx/modules/ngx_http_echo_module.so",
    "/usr/share/nginx/modules/ngx_http_echo_module.so",
    "/usr/lib64/nginx/modules/ngx_http_echo_module.so",
    "/usr/local/nginx/modules/ngx_http_echo_module.so",
)
ALL_TARGETS = ("direct", "aiohttp", "sentinel")
PROXIES = ("aiohttp", "sentinel")
ALL_SCENARIOS = ("throughput", "ttfb", "memory", "workers", "cluster")
MODES = ("json", "sse")
# nginx servers (see nginx.conf): the mode or test each one serves.
UPSTREAMS = ("json", "sse", "sse_delay", "slow")
REFERENCE = "aiohttp"

# The goals from the issue.
GOAL_RATIO_VS_REFERENCE = 0.5
GOAL_P50_OVER_DIRECT_MS = 1.0
GOAL_TTFB_OVER_DIRECT_MS = 2.0
GOAL_RSS_IDLE_MB = 100.0
GOAL_RSS_STREAMS_MB = 250.0
GOAL_WORKERS_RATIO = 1.7
GOAL_CONNS = (64, 512)
# Masters of the cluster scenario's Redis Cluster (no replicas: they would only add load).
CLUSTER_MASTERS = 3
# A run whose load CPU is at least this busy may be limited by wrk and nginx, not the proxy.
LOAD_BOUND_PCT = 90.0
ERROR_KEYS = ("non2xx", "bad_body", "statuses")


class BenchError(Exception):
    """A target or a tool that failed; the message says what and where its log is."""


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 25) -> str:
        with contextlib.suppress(OSError):
            text = self.log_path.read_text(errors="replace").splitlines()
            return "\n".join(text[-lines:])
        return ""


def children_of(pid: int) -> list[int]:
    """All descendants of pid (from /proc/PID/task/*/children)."""
    found: list[int] = []
    stack = [pid]
    while stack and len(found) < 10_000:
        current = stack.pop()
        for task in Path(f"/proc/{current}/task").glob("*"):
            with contextlib.suppress(OSError, ValueError):
                kids = [int(k) for k in (task / "children").read_text().split()]
                found.extend(kids)
                stack.extend(kids)
    return found


def rss_mb(pid: int) -> float:
    """VmRSS of pid and all its descendants, in MiB."""
    total_kb = 0
    for p in [pid, *children_of(pid)]:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
                    break
    return total_kb / 1024.0


class Processes:
    """Every process the harness starts; each is stopped by its PID."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.running: list[Proc] = []
        self.counter = 0

    def start(
        self,
        name: str,
        argv: list[str],
        cpus: str | None,
        env: dict[str, str] | None = None,
        cwd: Path = ROOT,
    ) -> Proc:
        self.counter += 1
        command = (["taskset", "-c", cpus] if cpus else []) + argv
        log_path = self.log_dir / f"{self.counter:02d}-{name}.log"
        log_file = log_path.open("ab")
        log_file.write(f"$ {shlex.join(command)}\n".encode())
        log_file.flush()
        popen = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,  # Ctrl-C reaches the harness only; it stops the rest.
        )
        proc = Proc(name, popen, log_path, log_file)
        self.running.append(proc)
        return proc

    def stop(self, proc: Proc, timeout: float = 10.0) -> None:
        descendants = children_of(proc.pid) if proc.alive() else []
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{proc.name} (pid {proc.pid}) ignored SIGTERM for {timeout}s; killing it")
                proc.popen.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.popen.wait(5)
        for pid in descendants:  # workers left behind by a supervisor that was killed
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        proc.log_file.close()
        if proc in self.running:
            self.running.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.running)):
            self.stop(proc)


def free_port(taken: set[int]) -> int:
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in taken:
            taken.add(port)
            return port
    raise BenchError("no free port found")


def wait_until(
    what: str, check: Callable[[], bool], proc: Proc | None, timeout: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise BenchError(
                f"{proc.name} exited with {proc.popen.returncode} before {what}; "
                f"log {proc.log_path}:\n{proc.log_tail()}"
            )
        with contextlib.suppress(OSError, urllib.error.URLError):
            if check():
                return
        time.sleep(0.1)
    tail = f"; log {proc.log_path}:\n{proc.log_tail()}" if proc else ""
    raise BenchError(f"timed out after {timeout}s waiting for {what}{tail}")


def tcp_open(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1.0):
        return True


def http_status(url: str, data: bytes | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    if data:
        request.add_header("Content-Type", "application/json")
        request.add_header("Authorization", "Bearer sk-bench")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


# --------------------------------------------------------------------------------------------
# Measurements


def cpu_times() -> dict[str, tuple[int, int]]:
    """(busy, total) jiffies per CPU from /proc/stat."""
    out: dict[str, tuple[int, int]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *fields = line.split()
            values = [int(v) for v in fields]
            idle = values[3] + values[4]
            out[name[3:]] = (sum(values[:8]) - idle, sum(values[:8]))
    return out


def cpu_busy_pct(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]], cpus: list[int]
) -> float:
    busy = sum(after[str(c)][0] - before[str(c)][0] for c in cpus)
    total = sum(after[str(c)][1] - before[str(c)][1] for c in cpus)
    return round(100.0 * busy / total, 1) if total else 0.0


def process_ticks() -> dict[int, int]:
    """utime + stime (clock ticks) of every user-space process."""
    ticks: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = stat.read_text()
            fields = text[text.rindex(")") + 2 :].split()
            if fields[1] == "2" or stat.parent.name == "2":
                continue  # kernel threads
            ticks[int(stat.parent.name)] = int(fields[11]) + int(fields[12])
    return ticks


def foreign_cpu_pct(before: dict[int, int], after: dict[int, int], seconds: float) -> float:
    """CPU used by processes that are not this harness or its children, in % of one CPU."""
    ours = {os.getpid(), *children_of(os.getpid())}
    used = sum(t - before.get(pid, 0) for pid, t in after.items() if pid not in ours)
    return round(100.0 * used / (os.sysconf("SC_CLK_TCK") * max(seconds, 0.001)), 1)


def busy_check(seconds: float = 2.0) -> float:
    before = process_ticks()
    time.sleep(seconds)
    return foreign_cpu_pct(before, process_ticks(), seconds)


def established(port: int) -> int:
    """ESTABLISHED TCP connections whose local port is `port` (server side), from /proc."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


def connections_per_process(port: int) -> list[int]:
    """Established server-side connections on `port`, counted per process that holds them
    (largest first): how a multi-worker server's listening socket shared out its clients."""
    done = subprocess.run(
        ["ss", "-Htnp", "state", "established", f"( sport = :{port} )"],
        capture_output=True, text=True, timeout=10,
    )  # fmt: skip
    counts: dict[str, int] = {}
    for line in done.stdout.splitlines():
        for pid in re.findall(r"pid=(\d+)", line)[:1]:
            counts[pid] = counts.get(pid, 0) + 1
    return sorted(counts.values(), reverse=True)


class RssSampler:
    """Samples the RSS of a process tree every 0.25 s in a thread; keeps the peak."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while self.pid is not None and not self._stop.wait(0.25):
            self.peak = max(self.peak, rss_mb(self.pid))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


class RedisStats:
    """INFO stats of the benchmark's own Redis (or the sum over a cluster's masters),
    through redis-py."""

    def __init__(self, *ports: int) -> None:
        import redis

        self.clients = [redis.Redis(host="127.0.0.1", port=p, socket_timeout=5) for p in ports]

    @property
    def client(self) -> Any:
        return self.clients[0]

    def snapshot(self) -> dict[str, int]:
        totals = {"hits": 0, "misses": 0, "commands": 0, "keys": 0, "net_in": 0, "net_out": 0}
        for client in self.clients:
            info: dict[str, Any] = client.info("stats")
            totals["hits"] += int(info.get("keyspace_hits", 0))
            totals["misses"] += int(info.get("keyspace_misses", 0))
            totals["commands"] += int(info.get("total_commands_processed", 0))
            totals["net_in"] += int(info.get("total_net_input_bytes", 0))
            totals["net_out"] += int(info.get("total_net_output_bytes", 0))
            totals["keys"] += int(client.dbsize())
        return totals

    def keys_per_node(self) -> list[int]:
        return [int(client.dbsize()) for client in self.clients]

    def close(self) -> None:
        for client in self.clients:
            client.close()


@dataclass
class Env:
    args: argparse.Namespace
    procs: Processes
    tmp: Path
    proxy_cpu: int
    load_cpu: int
    ports: set[int] = field(default_factory=set)
    upstream_ports: dict[str, int] = field(default_factory=dict)
    redis_port: int = 0
    redis: RedisStats | None = None
    # The cluster scenario's Redis Cluster: its masters' ports, and their stats.
    cluster_ports: list[int] = field(default_factory=list)
    cluster: RedisStats | None = None
    python: str = sys.executable
    proxy_logs: dict[str, list[Path]] = field(default_factory=dict)

    @property
    def load_cpus(self) -> str:
        return str(self.load_cpu)

    @property
    def both_cpus(self) -> str:
        return f"{self.proxy_cpu},{self.load_cpu}"


def wrk_argv(
    cpus: str,
    port: int,
    *,
    conns: int,
    seconds: float,
    stream: bool,
    pool: int,
    extra: Sequence[str] = (),
) -> list[str]:
    """wrk on `cpus`, one thread, POSTing the chat body of wrk/chat.lua to port; `extra`
    are more arguments of that script (key=..., model=..., implicit)."""
    return [
        "taskset", "-c", cpus,
        "wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--timeout", "5s",
        "-s", str(WRK_SCRIPT), f"http://127.0.0.1:{port}{clients.CHAT_PATH}",
        "--", *(["stream"] if stream else []), f"pool={pool}", *extra,
    ]  # fmt: skip


def run_wrk(
    env: Env,
    port: int,
    conns: int,
    seconds: float,
    stream: bool,
    pid: int | None,
    stats: RedisStats | None = None,
) -> dict[str, Any]:
    """One wrk run on the load CPU; returns its BENCH_RESULT plus CPU, RSS and Redis figures
    (of `stats`, the benchmark's own Redis unless given)."""
    argv = wrk_argv(
        env.load_cpus, port, conns=conns, seconds=seconds, stream=stream, pool=env.args.pool
    )
    redis_stats = stats or env.redis
    redis_before = redis_stats.snapshot() if redis_stats else None
    cpu_before = cpu_times()
    ticks_before = process_ticks()
    started = time.monotonic()
    with RssSampler(pid) as sampler:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=seconds + 60, start_new_session=True
        )
    foreign = foreign_cpu_pct(ticks_before, process_ticks(), time.monotonic() - started)
    cpu_after = cpu_times()
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("BENCH_RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise BenchError(
            f"wrk failed ({done.returncode}): {done.stdout[-800:]}{done.stderr[-800:]}"
        )
    raw: dict[str, Any] = json.loads(line.split(" ", 1)[1])
    errors = sum(
        int(raw[k])
        for k in ("err_connect", "err_read", "err_write", "err_timeout", "non2xx", "bad_body")
    )
    good = int(raw["requests"]) - int(raw["non2xx"]) - int(raw["bad_body"])
    result: dict[str, Any] = {
        "conns": conns,
        # Throughput counts good answers only: a proxy that fails fast must not look fast.
        "rps": round(good / max(float(raw["duration_s"]), 0.001), 1),
        "rps_all": round(float(raw["rps"]), 1),
        "requests": int(raw["requests"]),
        "p50_ms": raw["lat_p50_us"] / 1000.0,
        "p90_ms": raw["lat_p90_us"] / 1000.0,
        "p99_ms": raw["lat_p99_us"] / 1000.0,
        "max_ms": raw["lat_max_us"] / 1000.0,
        "errors": errors,
        "error_detail": {k: v for k, v in raw.items() if k.startswith("err_") or k in ERROR_KEYS},
        "proxy_cpu_pct": cpu_busy_pct(cpu_before, cpu_after, [env.proxy_cpu]),
        "load_cpu_pct": cpu_busy_pct(cpu_before, cpu_after, [env.load_cpu]),
        "other_cpu_pct": foreign,
        "rss_peak_mb": round(sampler.peak, 1) if pid else None,
    }
    if redis_before and redis_stats:
        after = redis_stats.snapshot()
        lookups = after["hits"] + after["misses"] - redis_before["hits"] - redis_before["misses"]
        commands = after["commands"] - redis_before["commands"]
        n = max(1, result["requests"])
        result["redis_lookups_per_req"] = round(lookups / n, 3)
        result["redis_commands_per_req"] = round(commands / n, 3)
        result["redis_bytes_in_per_req"] = round((after["net_in"] - redis_before["net_in"]) / n, 1)
        result["redis_bytes_out_per_req"] = round(
            (after["net_out"] - redis_before["net_out"]) / n, 1
        )
        result["redis_keys"] = after["keys"]
    return result


# --------------------------------------------------------------------------------------------
# Services: Redis, nginx, targets


def find_echo_module(explicit: str | None) -> str | None:
    candidates = [explicit] if explicit else list(ECHO_MODULE_CANDIDATES)
    return next((c for c in candidates if c and Path(c).is_file()), None)


def check_requirements(args: argparse.Namespace, targets: list[str]) -> list[str]:
    missing: list[str] = []
    for tool, package in (
        ("wrk", "wrk"),
        ("nginx", "nginx-light (or nginx)"),
        ("redis-server", "redis-server"),
        ("taskset", "util-linux"),
    ):
        if shutil.which(tool) is None:
            missing.append(f"{tool}: apt-get install {package}")
    if find_echo_module(args.echo_module) is None:
        missing.append(
            "nginx echo module (ngx_http_echo_module.so): apt-get install libnginx-mod-http-echo"
            " (or pass --echo-module PATH)"
        )
    modules = ["redis", "matplotlib"]
    if "aiohttp" in targets:
        modules += ["aiohttp", "uvicorn", "uvloop", "httptools"]
    for module in modules:
        if importlib.util.find_spec(module) is None:
            missing.append(f"python module {module}: .venv/bin/pip install -e '.[bench]'")
    if len(os.sched_getaffinity(0)) < 2:
        missing.append("at least 2 CPUs (the proxy and the load generator are pinned apart)")
    return missing


def start_redis(env: Env, name: str = "redis") -> None:
    """A Redis of the benchmark's own; env.redis_port and env.redis name the last started."""
    env.redis_port = free_port(env.ports)
    redis_dir = env.tmp / name
    redis_dir.mkdir()
    argv = [
        "redis-server", "--port", str(env.redis_port), "--bind", "127.0.0.1",
        "--save", "", "--appendonly", "no", "--daemonize", "no", "--dir", str(redis_dir),
        "--protected-mode", "no", "--maxclients", "10000",
    ]  # fmt: skip
    proc = env.procs.start(name, argv, env.load_cpus)
    wait_until(name, lambda: tcp_open(env.redis_port), proc, 15)
    env.redis = RedisStats(env.redis_port)
    wait_until("redis PING", lambda: bool(env.redis and env.redis.client.ping()), proc, 15)


def delayed_redis(env: Env, seconds: float) -> Any:
    """Put the benchmark's Redis behind a relay that holds each read `seconds`/2 each way
    (the fault relay of the tests), on the load CPU: sentinel-proxy then talks to Redis as
    across a network. Returns the relay (stop() it)."""
    sys.path.insert(0, str(ROOT))
    from tests.support.fault_relay import FaultRelay

    relay = FaultRelay(("127.0.0.1", env.redis_port))
    relay.start()
    relay.delay(seconds / 2)
    env.redis_port = relay.port
    # The relay's timers are asyncio's, so the delay it adds is longer than asked: say how long.
    trips = []
    with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as probe:
        for _ in range(100):
            start = time.perf_counter()
            probe.sendall(b"PING\r\n")
            probe.recv(64)
            trips.append(time.perf_counter() - start)
    measured = statistics.median(trips) * 1000
    log(
        f"redis behind a relay on :{relay.port}, {seconds * 1000:g} ms asked, "
        f"{measured:.2f} ms a PING"
    )
    return relay


def start_cluster(env: Env, name: str = "cluster") -> None:
    """A Redis Cluster of CLUSTER_MASTERS masters on the load CPU, joined with redis-cli;
    `name` tells the processes and directories of a second one apart."""
    ports = []
    for index in range(CLUSTER_MASTERS):
        port, bus = free_port(env.ports), free_port(env.ports)
        directory = env.tmp / f"{name}-{index}"
        directory.mkdir()
        argv = [
            "redis-server", "--port", str(port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--daemonize", "no", "--dir", str(directory),
            "--protected-mode", "no", "--maxclients", "10000",
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-port", str(bus),
        ]  # fmt: skip
        proc = env.procs.start(f"{name}-{index}", argv, env.load_cpus)
        wait_until(f"cluster node {index}", lambda p=port: tcp_open(p), proc, 15)  # type: ignore[misc]
        ports.append(port)
    done = subprocess.run(
        ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), "--cluster-yes"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if done.returncode != 0:
        raise BenchError(f"redis-cli --cluster create failed: {done.stdout[-500:]}{done.stderr}")
    env.cluster_ports = ports
    env.cluster = RedisStats(*ports)

    def ready() -> bool:
        assert env.cluster is not None
        return all(
            c.execute_command("CLUSTER INFO")["cluster_state"] == "ok" for c in env.cluster.clients
        )

    wait_until("the cluster's state ok", ready, None, 30)


def start_nginx(env: Env) -> None:
    prefix = env.tmp / "nginx"
    prefix.mkdir()
    module = find_echo_module(env.args.echo_module)
    assert module is not None
    for name in UPSTREAMS:
        env.upstream_ports[name] = free_port(env.ports)
    text = NGINX_TEMPLATE.read_text()
    replacements = {
        "@PREFIX@": str(prefix),
        "@ECHO_MODULE@": module,
        "@PORT_JSON@": str(env.upstream_ports["json"]),
        "@PORT_SSE@": str(env.upstream_ports["sse"]),
        "@PORT_SSE_DELAY@": str(env.upstream_ports["sse_delay"]),
        "@PORT_SLOW@": str(env.upstream_ports["slow"]),
    }
    for key, value in replacements.items():
        text = text.replace(key, value)
    conf = prefix / "nginx.conf"
    conf.write_text(text)
    base = ["nginx", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    test = subprocess.run([*base, "-t"], capture_output=True, text=True, timeout=30)
    if test.returncode != 0:
        raise BenchError(f"nginx -t failed for {conf}:\n{test.stderr}")
    proc = env.procs.start("nginx", base, env.load_cpus)
    for name, port in env.upstream_ports.items():
        wait_until(f"nginx {name} port", lambda p=port: tcp_open(p), proc, 15)  # type: ignore[misc]


def sentinel_config(
    env: Env,
    upstream: str,
    extra: str = "",
    name: str = "",
    *,
    cluster: bool = False,
    session: str = "",
) -> Path:
    """sentinel-proxy's config: the mock `upstream`, and the benchmark's Redis (or with
    `cluster`, its Redis Cluster); `session` is TOML for the [session] table, `extra` TOML
    appended (so its first lines still belong to the provider's table)."""
    path = env.tmp / f"sentinel-{upstream}{'-cluster' if cluster else ''}{name}.toml"
    store = f'redis_url = "redis://127.0.0.1:{env.redis_port}/0"\n'
    if cluster:
        store = f'redis_url = "redis://127.0.0.1:{env.cluster_ports[0]}/0"\ncluster = true\n'
    path.write_text(
        "[session]\n"
        f"{store}{session}"
        "\n"
        "[[providers]]\n"
        'name = "mock"\n'
        f'base_url = "http://127.0.0.1:{env.upstream_ports[upstream]}/v1"\n' + extra
    )
    return path


@dataclass
class Running:
    target: str
    port: int
    proc: Proc | None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None


def start_target(
    env: Env, target: str, upstream: str, cpus: str, workers: int = 1, *, cluster: bool = False
) -> Running:
    """Start a target in front of an nginx upstream; 'direct' is nginx itself. With
    `cluster`, sentinel-proxy keeps its sessions in the benchmark's Redis Cluster."""
    if target == "direct":
        return Running(target, env.upstream_ports[upstream], None)
    port = free_port(env.ports)
    worker_args = ["--workers", str(workers)] if workers > 1 else []
    name = f"{target}-{upstream}-w{workers}{'-cluster' if cluster and target == 'sentinel' else ''}"
    if target == "aiohttp":
        argv = [
            env.python, "-m", "uvicorn", "ref_aiohttp_proxy:app", "--app-dir", str(BENCH),
            "--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop",
            "--http", "httptools", "--no-access-log", "--log-level", "warning",
            "--backlog", "4096", "--timeout-graceful-shutdown", "2", *worker_args,
        ]  # fmt: skip
        upstream_url = f"http://127.0.0.1:{env.upstream_ports[upstream]}"
        proc = env.procs.start(name, argv, cpus, os.environ | {"BENCH_UPSTREAM": upstream_url})
        ready = f"http://127.0.0.1:{port}/"
    elif target == "sentinel":
        argv = [
            env.python, "-m", "sentinel_proxy",
            "--config", str(sentinel_config(env, upstream, cluster=cluster)),
            # Its default level: one access-log line per request, as users run it.
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "info", *worker_args,
        ]  # fmt: skip
        proc = env.procs.start(name, argv, cpus)
        ready = f"http://127.0.0.1:{port}/readyz"
    else:
        raise BenchError(f"unknown target {target}")
    env.proxy_logs.setdefault(target, []).append(proc.log_path)
    running = Running(target, port, proc)
    try:
        if target == "sentinel":
            wait_until(f"{ready} = 200", lambda: http_status(ready)[0] == 200, proc, 60)
        else:
            wait_until(f"{ready} to answer", lambda: http_status(ready)[0] > 0, proc, 60)
        if workers > 1:
            time.sleep(2.0)  # let every worker come up, not just the first
        sanity_check(running, upstream)
    except BaseException:
        env.procs.stop(proc)
        raise
    return running


def sanity_check(running: Running, upstream: str) -> None:
    """One request through the target; its answer must be what the mock sends."""
    stream = upstream != "json"
    body = json.dumps(
        {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "hi"}],
            "conversation_id": "bench-sanity",
            **({"stream": True} if stream else {}),
        }
    ).encode()
    url = f"http://127.0.0.1:{running.port}{clients.CHAT_PATH}"
    if upstream == "slow":  # a 60 s stream: just look at its first chunk
        with socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
            sock.sendall(clients.chat_request(running.port, "bench-sanity", stream=True))
            first = sock.recv(4096)
        if not first.startswith(b"HTTP/1.1 200"):
            raise BenchError(f"{running.target}: slow stream answered {first[:200]!r}")
        return
    status, data = http_status(url, body, timeout=10)
    expect = b"data: [DONE]" if stream else b'"chat.completion"'
    if status != 200 or expect not in data:
        log_hint = f"; log {running.proc.log_path}" if running.proc else ""
        raise BenchError(
            f"{running.target} via {upstream}: status {status}, body {data[:300]!r}{log_hint}"
        )


# --------------------------------------------------------------------------------------------
# Scenarios


def scenario_throughput(env: Env, targets: list[str], results: dict[str, Any]) -> None:
    rows: list[dict[str, Any]] = results.setdefault("throughput", [])
    args = env.args
    for target in targets:
        for mode in MODES:
            stream = mode == "sse"
            log(f"throughput: {target} {mode}")
            try:
                running = start_target(env, target, mode, str(env.proxy_cpu))
            except BenchError as exc:
                log(f"  {target} {mode} failed to start: {exc}")
                results.setdefault("failures", []).append(f"{target} {mode}: {exc}")
                continue
            try:
                if running.pid and mode == "json":
                    results.setdefault("rss_start_mb", {})[target] = round(rss_mb(running.pid), 1)
                if target == "sentinel" or mode == MODES[0]:
                    # Every sentinel-proxy process: its near-cache starts empty.
                    began = time.monotonic()
                    failed = asyncio.run(clients.prime(running.port, args.pool))
                    keys = env.redis.snapshot()["keys"] if env.redis else None
                    log(
                        f"  primed {args.pool} conversation ids in "
                        f"{time.monotonic() - began:.1f}s, {failed} failed, redis keys {keys}"
                    )
                    if failed:
                        results.setdefault("failures", []).append(
                            f"{target}: {failed} of {args.pool} priming requests failed"
                        )
                if args.warmup > 0:
                    run_wrk(env, running.port, 64, args.warmup, stream, running.pid)
                for conns in args.conns:
                    row = {"target": target, "mode": mode}
                    try:
                        row |= run_wrk(env, running.port, conns, args.duration, stream, running.pid)
                    except (BenchError, subprocess.TimeoutExpired) as exc:
                        row |= {"conns": conns, "failed": str(exc)}
                        log(f"  {conns} conns failed: {exc}")
                    rows.append(row)
                    log(
                        f"  c={conns}: {row.get('rps', 0):.0f} req/s p50 {row.get('p50_ms')} ms "
                        f"p99 {row.get('p99_ms')} ms errors {row.get('errors')}"
                    )
                    if running.proc and not running.proc.alive():
                        raise BenchError(f"{target} died; log {running.proc.log_path}")
                    time.sleep(0.5)
            except (BenchError, subprocess.TimeoutExpired) as exc:
                log(f"  {target} {mode}: {exc}")
                results.setdefault("failures", []).append(f"{target} {mode}: {exc}")
            finally:
                if running.proc:
                    env.procs.stop(running.proc)


def scenario_ttfb(env: Env, targets: list[str], results: dict[str, Any]) -> None:
    out: dict[str, Any] = results.setdefault("ttfb", {})
    for target in targets:
        log(f"ttfb: {target}, {env.args.ttfb_requests} requests at 1 connection")
        try:
            running = start_target(env, target, "sse_delay", str(env.proxy_cpu))
        except BenchError as exc:
            log(f"  {target} failed to start: {exc}")
            results.setdefault("failures", []).append(f"{target} ttfb: {exc}")
            continue
        try:
            measured = asyncio.run(clients.measure_ttfb(running.port, env.args.ttfb_requests))
            out[target] = measured.summary()
            log(f"  {json.dumps(out[target])}")
        finally:
            if running.proc:
                env.procs.stop(running.proc)


def scenario_memory(env: Env, targets: list[str], results: dict[str, Any]) -> None:
    out: dict[str, Any] = results.setdefault("memory", {})
    for target in targets:
        if target not in PROXIES:
            continue
        log(f"memory: {target}, {env.args.streams} open streams to the slow mock")
        try:
            running = start_target(env, target, "slow", str(env.proxy_cpu))
        except BenchError as exc:
            log(f"  {target} failed to start: {exc}")
            results.setdefault("failures", []).append(f"{target} memory: {exc}")
            continue
        pid = running.pid
        assert pid is not None
        slow_port = env.upstream_ports["slow"]
        try:
            time.sleep(1.0)
            idle = rss_mb(pid)

            async def sample(pid: int = pid) -> dict[str, float]:
                await asyncio.sleep(env.args.hold)
                values = []
                for _ in range(5):
                    values.append(rss_mb(pid))
                    await asyncio.sleep(0.2)
                return {
                    "rss_streams_mb": round(max(values), 1),
                    "upstream_open": established(env.upstream_ports["slow"]),
                }

            held = asyncio.run(clients.hold_streams(running.port, env.args.streams, sample=sample))
            time.sleep(2.0)
            out[target] = (
                {"rss_idle_mb": round(idle, 1)}
                | held.summary()
                | {
                    "rss_after_close_mb": round(rss_mb(pid), 1),
                    # Upstream streams the proxy still holds 2 s after its clients went away.
                    "upstream_open_after_close": established(slow_port),
                    "alive_after": running.proc.alive() if running.proc else True,
                }
            )
            log(f"  {json.dumps(out[target])}")
        finally:
            if running.proc:
                env.procs.stop(running.proc)


def scenario_workers(env: Env, targets: list[str], results: dict[str, Any]) -> None:
    """One and two workers, both started, loaded in turn for a few rounds: a single pair of
    runs gave 1.32x-1.99x over three full runs of the same code, so the median counts."""
    out: dict[str, Any] = results.setdefault("workers", {})
    conns = 64
    for target in targets:
        if target not in PROXIES:
            continue
        started: dict[int, Running] = {}
        try:
            for workers in (1, 2):
                log(f"workers: {target} --workers {workers} on CPUs {env.both_cpus}")
                started[workers] = start_target(env, target, "json", env.both_cpus, workers)
                if env.args.warmup > 0:
                    run_wrk(env, started[workers].port, conns, env.args.warmup, False, None)
            rounds = [
                {str(n): _workers_round(env, started[n], conns) for n in (1, 2)}
                for _ in range(env.args.worker_rounds)
            ]
        except (BenchError, subprocess.TimeoutExpired) as exc:
            log(f"  failed: {exc}")
            results.setdefault("failures", []).append(f"{target} workers: {exc}")
            continue
        finally:
            for running in started.values():
                if running.proc:
                    env.procs.stop(running.proc)
        ratios = [r["2"]["rps"] / r["1"]["rps"] for r in rounds if r["1"]["rps"]]
        out[target] = {
            "1": {
                "rps": statistics.median(r["1"]["rps"] for r in rounds),
                "errors": sum(r["1"]["errors"] for r in rounds),
            },
            "2": {
                "rps": statistics.median(r["2"]["rps"] for r in rounds),
                "errors": sum(r["2"]["errors"] for r in rounds),
                "connections_per_worker": rounds[-1]["2"]["connections_per_worker"],
            },
            "ratio": round(statistics.median(ratios), 2) if ratios else None,
            "round_ratios": [round(r, 2) for r in ratios],
            "rounds": rounds,
        }


def scenario_cluster(env: Env, targets: list[str], results: dict[str, Any]) -> None:
    """Non-streaming throughput with sessions in a Redis Cluster of CLUSTER_MASTERS masters,
    beside the reference (which has no store) run just before it."""
    rows: list[dict[str, Any]] = results.setdefault("cluster", [])
    args = env.args
    if not env.cluster_ports:
        start_cluster(env)
        log(f"redis cluster masters :{env.cluster_ports}")
    for target in targets:
        if target not in PROXIES:
            continue
        log(f"cluster: {target} json")
        try:
            running = start_target(env, target, "json", str(env.proxy_cpu), cluster=True)
        except BenchError as exc:
            log(f"  {target} failed to start: {exc}")
            results.setdefault("failures", []).append(f"{target} cluster: {exc}")
            continue
        try:
            if target == "sentinel":
                failed = asyncio.run(clients.prime(running.port, args.pool))
                assert env.cluster is not None
                keys = env.cluster.keys_per_node()
                results["cluster_keys_per_master"] = keys
                log(f"  primed {args.pool} ids, {failed} failed; keys per master {keys}")
            if args.warmup > 0:
                run_wrk(env, running.port, 64, args.warmup, False, running.pid, env.cluster)
            for conns in args.conns:
                row = {"target": target, "mode": "json", "conns": conns}
                try:
                    row |= run_wrk(
                        env, running.port, conns, args.duration, False, running.pid, env.cluster
                    )
                except (BenchError, subprocess.TimeoutExpired) as exc:
                    row["failed"] = str(exc)
                rows.append(row)
                log(
                    f"  c={conns}: {row.get('rps', 0):.0f} req/s p99 {row.get('p99_ms')} ms "
                    f"errors {row.get('errors')} redis cmds/req {row.get('redis_commands_per_req')}"
                )
                time.sleep(0.5)
        except (BenchError, subprocess.TimeoutExpired) as exc:
            log(f"  {target} cluster: {exc}")
            results.setdefault("failures", []).append(f"{target} cluster: {exc}")
        finally:
            if running.proc:
                env.procs.stop(running.proc)


def _workers_round(env: Env, running: Running, conns: int) -> dict[str, Any]:
    split: list[list[int]] = []
    sampler = threading.Timer(
        env.args.duration / 2, lambda: split.append(connections_per_process(running.port))
    )
    sampler.start()
    try:
        row = run_wrk(env, running.port, conns, env.args.duration, False, running.pid)
    finally:
        sampler.cancel()
    row["connections_per_worker"] = split[0] if split else None
    log(
        f"  {running.proc.name if running.proc else running.target}: {row['rps']:.0f} req/s, "
        f"errors {row['errors']}"
    )
    return row


# --------------------------------------------------------------------------------------------
# Report


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def find_row(rows: list[dict[str, Any]], target: str, mode: str, conns: int) -> dict[str, Any]:
    for row in rows:
        if row["target"] == target and row["mode"] == mode and row["conns"] == conns:
            return row
    return {}


def add_ratios(results: dict[str, Any]) -> None:
    for table in ("throughput", "cluster"):
        rows = results.get(table, [])
        for row in rows:
            for base, key in ((REFERENCE, "vs_reference"), ("direct", "vs_direct")):
                other = find_row(rows, base, row["mode"], row["conns"])
                if row.get("rps") and other.get("rps"):
                    row[key] = round(row["rps"] / other["rps"], 3)


def goals(results: dict[str, Any], subject: str) -> list[tuple[str, str, str, bool | None]]:
    """(goal, measured, limit, passed) for one proxy; passed is None when not measured."""
    checks: list[tuple[str, str, str, bool | None]] = []
    rows = results.get("throughput", [])
    for mode in MODES:
        for conns in GOAL_CONNS:
            row = find_row(rows, subject, mode, conns)
            ratio = row.get("vs_reference")
            errors = row.get("errors")
            ok = None if ratio is None else (ratio >= GOAL_RATIO_VS_REFERENCE and errors == 0)
            checks.append((
                f"{mode} throughput at {conns} conns vs {REFERENCE}, zero errors",
                f"{fmt(ratio)}x, {fmt(errors)} errors",
                f">= {GOAL_RATIO_VS_REFERENCE}x, 0",
                ok,
            ))  # fmt: skip
    row, direct = find_row(rows, subject, "json", 1), find_row(rows, "direct", "json", 1)
    over = row["p50_ms"] - direct["p50_ms"] if row.get("p50_ms") and direct.get("p50_ms") else None
    checks.append(
        (
            "p50 latency over direct at 1 conn (json)",
            f"{fmt(over, 3)} ms",
            f"<= {GOAL_P50_OVER_DIRECT_MS} ms",
            None if over is None else over <= GOAL_P50_OVER_DIRECT_MS,
        )
    )
    ttfb = results.get("ttfb", {})
    mine, base = ttfb.get(subject, {}), ttfb.get("direct", {})
    over = (
        mine["ttfb_p50_ms"] - base["ttfb_p50_ms"]
        if "ttfb_p50_ms" in mine and "ttfb_p50_ms" in base
        else None
    )
    ok = None if over is None else over <= GOAL_TTFB_OVER_DIRECT_MS and mine["errors"] == 0
    checks.append(
        (
            "streaming TTFB p50 over direct (25 ms mock)",
            f"{fmt(over, 3)} ms",
            f"<= {GOAL_TTFB_OVER_DIRECT_MS} ms",
            ok,
        )
    )
    memory = results.get("memory", {}).get(subject, {})
    idle = memory.get("rss_idle_mb")
    checks.append(
        (
            "RSS idle",
            f"{fmt(idle, 1)} MB",
            f"<= {GOAL_RSS_IDLE_MB:.0f} MB",
            None if idle is None else idle <= GOAL_RSS_IDLE_MB,
        )
    )
    held = memory.get("rss_streams_mb")
    opened = memory.get("opened")
    ok = None
    if held is not None:
        ok = held <= GOAL_RSS_STREAMS_MB and opened == memory.get("requested")
    checks.append(
        (
            f"RSS with {memory.get('requested', '?')} open streams",
            f"{fmt(held, 1)} MB ({fmt(opened)} open)",
            f"<= {GOAL_RSS_STREAMS_MB:.0f} MB",
            ok,
        )
    )
    for conns in GOAL_CONNS:
        row = find_row(results.get("cluster", []), subject, "json", conns)
        if row:
            ratio, errors = row.get("vs_reference"), row.get("errors")
            checks.append((
                f"json throughput at {conns} conns over a Redis Cluster vs {REFERENCE}",
                f"{fmt(ratio)}x, {fmt(errors)} errors",
                f">= {GOAL_RATIO_VS_REFERENCE}x, 0",
                None if ratio is None else ratio >= GOAL_RATIO_VS_REFERENCE and errors == 0,
            ))  # fmt: skip
    workers = results.get("workers", {}).get(subject, {})
    ratio = workers.get("ratio")
    checks.append(
        (
            "--workers 2 vs 1 (64 conns, json)",
            f"{fmt(ratio)}x",
            f">= {GOAL_WORKERS_RATIO}x",
            None if ratio is None else ratio >= GOAL_WORKERS_RATIO,
        )
    )
    return checks


def report(results: dict[str, Any]) -> str:
    lines: list[str] = []
    meta = results["meta"]
    lines += [
        "# sentinel-proxy benchmark",
        "",
        f"- date: {meta['date']}",
        f"- machine: {meta['cpu_model']}, {meta['cpus']} CPUs, {meta['memory']}, {meta['kernel']}",
        f"- command: `{meta['command']}`",
        f"- software: Python {meta['python']}, {meta['nginx']}, {meta['wrk']}, {meta['redis']}",
        f"- pinning: proxy under test on CPU {meta['proxy_cpu']}; wrk, nginx, Redis and the "
        f"clients on CPU {meta['load_cpu']}; wrk -t1, {meta['duration']}s per run after a "
        f"{meta['warmup']}s warm-up at 64 conns; {meta['pool']} conversation ids",
        "",
    ]
    rows = results.get("throughput", [])
    if rows:
        lines += [
            "## Throughput and latency (one core for the proxy)",
            "",
            "| mode | conns | target | ok req/s | p50 ms | p99 ms | errors | vs aiohttp "
            "| vs direct | proxy CPU % | load CPU % | other procs CPU % | RSS peak MB "
            "| redis lookups/req |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        load_bound = False
        for mode in MODES:
            for conns in sorted({r["conns"] for r in rows}):
                for row in rows:
                    if row["mode"] != mode or row["conns"] != conns:
                        continue
                    if "failed" in row:
                        lines.append(
                            f"| {mode} | {conns} | {row['target']} | failed: "
                            f"{row['failed'][:80]} ||||||||||"
                        )
                        continue
                    mark = ""
                    if row["load_cpu_pct"] >= LOAD_BOUND_PCT and row["target"] != "direct":
                        mark, load_bound = " *", True
                    lines.append(
                        f"| {mode} | {conns} | {row['target']} | {row['rps']:.0f} "
                        f"| {fmt(row['p50_ms'])} | {fmt(row['p99_ms'])} | {row['errors']} "
                        f"| {fmt(row.get('vs_reference'))} | {fmt(row.get('vs_direct'))} "
                        f"| {fmt(row['proxy_cpu_pct'], 0)} | {fmt(row['load_cpu_pct'], 0)}{mark} "
                        f"| {fmt(row.get('other_cpu_pct'), 0)} "
                        f"| {fmt(row.get('rss_peak_mb'), 1)} "
                        f"| {fmt(row.get('redis_lookups_per_req'))} |"
                    )
        lines.append("")
        if load_bound:
            lines += [
                f"\\* the load CPU was at least {LOAD_BOUND_PCT:.0f}% busy: wrk and nginx may "
                "have held this number down.",
                "",
            ]
        for row in rows:
            if row.get("errors"):
                detail = {k: v for k, v in row["error_detail"].items() if v}
                lines.append(
                    f"- errors, {row['target']} {row['mode']} {row['conns']} conns: "
                    f"{json.dumps(detail)}"
                )
        lines += [
            "",
            "ok req/s: answers that were 2xx with the right body, per second (failed answers "
            "are not counted). "
            "proxy CPU and load CPU: how busy each core was; other procs: CPU used by processes "
            "that are not part of the benchmark (100 = one core), which makes numbers noisy.",
            "",
        ]
    ttfb = results.get("ttfb", {})
    if ttfb:
        direct = ttfb.get("direct", {}).get("ttfb_p50_ms")
        lines += [
            "## Streaming time to first byte (1 connection, 20 chunks 25 ms apart)",
            "",
            "| target | requests | TTFB p50 ms | TTFB p99 ms | over direct ms "
            "| whole stream p50 ms | errors |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for target, t in ttfb.items():
            over = t["ttfb_p50_ms"] - direct if direct is not None and "ttfb_p50_ms" in t else None
            lines.append(
                f"| {target} | {t['requests']} | {fmt(t.get('ttfb_p50_ms'), 3)} "
                f"| {fmt(t.get('ttfb_p99_ms'), 3)} | {fmt(over, 3)} "
                f"| {fmt(t.get('total_p50_ms'), 1)} | {t['errors']} |"
            )
        lines.append("")
    memory = results.get("memory", {})
    if memory:
        lines += [
            "## Memory (RSS of the proxy process tree)",
            "",
            "| target | at start MB | idle MB | with open streams MB | streams open "
            "| errors | after closing MB | upstream streams open: held / 2 s after closing |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for target, m in memory.items():
            start = results.get("rss_start_mb", {}).get(target)
            lines.append(
                f"| {target} | {fmt(start, 1)} | {fmt(m.get('rss_idle_mb'), 1)} "
                f"| {fmt(m.get('rss_streams_mb'), 1)} | {m.get('opened')}/{m.get('requested')} "
                f"| {m.get('errors')} | {fmt(m.get('rss_after_close_mb'), 1)} "
                f"| {fmt(m.get('upstream_open'))} / {fmt(m.get('upstream_open_after_close'))} |"
            )
        lines += [
            "",
            "idle: 1 s after start, before any request of this test. The reference proxy does "
            "not notice clients that leave, so its upstream streams stay open.",
            "",
        ]
    workers = results.get("workers", {})
    if workers:
        lines += [
            f"## Workers (not pinned: CPUs {meta['proxy_cpu']},{meta['load_cpu']}, "
            "shared with the load generator; json, 64 conns)",
            "",
            "| target | 1 worker req/s | 2 workers req/s | ratio | ratio per round "
            "| errors (1 / 2) | client connections per worker (2 workers) |",
            "|---|---:|---:|---:|---|---:|---|",
        ]
        for target, w in workers.items():
            one, two = w.get("1", {}), w.get("2", {})
            split = two.get("connections_per_worker")
            per_round = ", ".join(f"{r:.2f}" for r in w.get("round_ratios", [])) or "-"
            lines.append(
                f"| {target} | {fmt(one.get('rps'), 0)} | {fmt(two.get('rps'), 0)} "
                f"| {fmt(w.get('ratio'))} | {per_round} "
                f"| {fmt(one.get('errors'))} / {fmt(two.get('errors'))} "
                f"| {' / '.join(map(str, split)) if split else '-'} |"
            )
        lines += [
            "",
            "Both instances run at once and are loaded in turn, one wrk run each per round; "
            "req/s and the ratio are medians over the rounds. "
            "Client connections per worker: sampled halfway through the last round. A keep-alive "
            "connection stays with the worker that accepted it, so an uneven split caps the "
            "ratio whatever the proxy does. The reference runs uvicorn's workers, which share "
            "one listening socket; sentinel's each listen on their own (SO_REUSEPORT).",
            "",
        ]
    cluster = results.get("cluster", [])
    if cluster:
        keys = results.get("cluster_keys_per_master")
        lines += [
            f"## Redis Cluster ({CLUSTER_MASTERS} masters, no replicas, on the load CPU; json)",
            "",
            "| conns | target | ok req/s | p50 ms | p99 ms | errors | vs aiohttp | proxy CPU % "
            "| load CPU % | other procs CPU % | redis commands/req | redis bytes in/out per req |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in cluster:
            if "failed" in row:
                lines.append(f"| {row['conns']} | {row['target']} | failed: {row['failed'][:80]} |")
                continue
            lines.append(
                f"| {row['conns']} | {row['target']} | {row['rps']:.0f} | {fmt(row['p50_ms'])} "
                f"| {fmt(row['p99_ms'])} | {row['errors']} | {fmt(row.get('vs_reference'))} "
                f"| {fmt(row['proxy_cpu_pct'], 0)} | {fmt(row['load_cpu_pct'], 0)} "
                f"| {fmt(row.get('other_cpu_pct'), 0)} | {fmt(row.get('redis_commands_per_req'))} "
                f"| {fmt(row.get('redis_bytes_in_per_req'), 0)} / "
                f"{fmt(row.get('redis_bytes_out_per_req'), 0)} |"
            )
        lines += [
            "",
            f"Sessions per master after priming: {keys}. vs aiohttp: the reference proxy "
            "(no store) measured just before, one after the other; `bench/duel.py reference "
            "HEAD --cluster` measures the same ratio paired.",
            "",
        ]
    for subject in results.get("goal_subjects", []):
        checks = results["goals"][subject]
        met = sum(1 for c in checks if c[3])
        lines += [
            f"## Goals for {subject} ({met} of {len(checks)} met)",
            "",
            "| goal | measured | limit | result |",
            "|---|---|---|---|",
        ]
        for goal, measured, limit, ok in checks:
            verdict = "not measured" if ok is None else ("PASS" if ok else "FAIL")
            lines.append(f"| {goal} | {measured} | {limit} | {verdict} |")
        lines.append("")
    for failure in results.get("failures", []):
        lines.append(f"- failure: {failure.splitlines()[0][:300]}")
    for target, count in results.get("proxy_log_problems", {}).items():
        if count:
            lines.append(
                f"- {target}: {count} error/traceback lines in its logs (kept in "
                f"{results['meta']['tmp']})"
            )
    return "\n".join(lines).rstrip() + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results.get("throughput", []) if "rps" in r]
    if not rows:
        return
    fig, (ax_rps, ax_p99) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = {"direct": "tab:gray", "aiohttp": "tab:blue", "sentinel": "tab:red"}
    styles = {"json": "-", "sse": "--"}
    conns_all = sorted({r["conns"] for r in rows})
    for target in ALL_TARGETS:
        for mode in MODES:
            series = sorted(
                (r for r in rows if r["target"] == target and r["mode"] == mode),
                key=lambda r: int(r["conns"]),
            )
            if not series:
                continue
            xs = [r["conns"] for r in series]
            label = f"{target} {'streaming' if mode == 'sse' else 'non-streaming'}"
            kwargs: dict[str, Any] = {
                "color": colors.get(target),
                "linestyle": styles[mode],
                "marker": "o",
                "label": label,
            }
            ax_rps.plot(xs, [r["rps"] for r in series], **kwargs)
            ax_p99.plot(xs, [r["p99_ms"] for r in series], **kwargs)
    for ax, title, ylabel in (
        (ax_rps, "Throughput (proxy on one core)", "good answers/s"),
        (ax_p99, "p99 latency", "ms"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xticks(conns_all, [str(c) for c in conns_all])
        ax.set_xlabel("connections")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    ax_rps.set_yscale("log")
    ax_p99.set_yscale("log")
    ax_p99.legend(fontsize=8)
    meta = results["meta"]
    fig.suptitle(f"sentinel-proxy benchmark, {meta['date']}, {meta['cpu_model']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def first_line(argv: list[str]) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        text = (done.stdout + done.stderr).strip()
        return text.splitlines()[0] if text else "?"
    return "?"


def machine() -> dict[str, Any]:
    """The date, the hardware and the versions a benchmark's figures were read with."""
    cpu_model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    memory = "?"
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = int(Path("/proc/meminfo").read_text().splitlines()[0].split()[1])
        memory = f"{kb / 1024 / 1024:.0f} GiB RAM"
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu_model": cpu_model,
        "cpus": os.cpu_count(),
        "memory": memory,
        "kernel": f"Linux {platform.release()}",
        "python": platform.python_version(),
        "nginx": first_line(["nginx", "-v"]).replace("nginx version: ", ""),
        "wrk": first_line(["wrk", "--version"]).split(" [")[0],
        "redis": "Redis " + first_line(["redis-server", "--version"]).split()[2].lstrip("v="),
    }


def machine_info(env: Env) -> dict[str, Any]:
    args = env.args
    return machine() | {
        "command": shlex.join([Path(sys.executable).as_posix(), *sys.argv]),
        "proxy_cpu": env.proxy_cpu,
        "load_cpu": env.load_cpu,
        "duration": args.duration,
        "warmup": args.warmup,
        "pool": args.pool,
        "tmp": str(env.tmp),
    }


def count_log_problems(paths: list[Path]) -> int:
    count = 0
    for path in paths:
        with contextlib.suppress(OSError):
            for line in path.read_text(errors="replace").splitlines():
                if "Traceback" in line or " ERROR" in line or line.startswith("ERROR"):
                    count += 1
    return count


# --------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short runs (3 s, 1 s warm-up, 20 TTFB requests): a smoke test",
    )
    parser.add_argument(
        "--targets",
        default=",".join(ALL_TARGETS),
        help="comma-separated subset of direct,aiohttp,sentinel",
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(ALL_SCENARIOS),
        help="comma-separated subset of throughput,ttfb,memory,workers,cluster",
    )
    parser.add_argument("--conns", default="1,64,512", help="wrk connection counts")
    parser.add_argument("--duration", type=float, help="seconds per wrk run (default 10)")
    parser.add_argument(
        "--worker-rounds", type=int, default=3, help="rounds of the workers scenario (default 3)"
    )
    parser.add_argument("--warmup", type=float, help="warm-up seconds per target (default 3)")
    parser.add_argument("--ttfb-requests", type=int, help="TTFB requests (default 100)")
    parser.add_argument("--streams", type=int, default=1000, help="open streams for memory")
    parser.add_argument(
        "--hold",
        type=float,
        default=3.0,
        help="seconds to hold the open streams before sampling RSS",
    )
    parser.add_argument("--pool", type=int, default=10_000, help="distinct conversation ids")
    parser.add_argument("--echo-module", help="path of ngx_http_echo_module.so")
    parser.add_argument("--out", type=Path, default=BENCH / "out", help="output directory")
    parser.add_argument(
        "--from-json",
        type=Path,
        metavar="RESULTS_JSON",
        help="only print the tables and redraw the plot from a results.json",
    )
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp dir and logs")
    args = parser.parse_args(argv)
    args.targets = [t for t in args.targets.split(",") if t]
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    for value, allowed, what in (
        (args.targets, ALL_TARGETS, "target"),
        (args.scenarios, ALL_SCENARIOS, "scenario"),
    ):
        for item in value:
            if item not in allowed:
                parser.error(f"unknown {what} {item!r}; choose from {', '.join(allowed)}")
    args.conns = [int(c) for c in args.conns.split(",") if c]
    if args.duration is None:
        args.duration = 3.0 if args.quick else 10.0
    if args.warmup is None:
        args.warmup = 1.0 if args.quick else 3.0
    if args.ttfb_requests is None:
        args.ttfb_requests = 20 if args.quick else 100
    if args.quick and args.hold == 3.0:
        args.hold = 1.0
    return args


def raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return rerender(args.from_json, args.out)
    missing = check_requirements(args, args.targets)
    if missing:
        print("bench/run.py cannot run; missing:", file=sys.stderr)
        for item in missing:
            print(f"  - {item}", file=sys.stderr)
        return 2
    venv_python = ROOT / ".venv" / "bin" / "python"
    if "sentinel" in args.targets:
        check = subprocess.run(
            [str(venv_python if venv_python.exists() else sys.executable), "-m",
             "sentinel_proxy", "--help"],
            capture_output=True, text=True, cwd=ROOT, timeout=60,
        )  # fmt: skip
        if check.returncode != 0:
            print(
                f"`python -m sentinel_proxy --help` fails:\n{check.stderr[-1500:]}\n"
                "leave sentinel out with --targets direct,aiohttp",
                file=sys.stderr,
            )
            return 2

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    needed = 2 * args.streams + 2 * max(args.conns) + 500
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < needed:
        log(f"warning: RLIMIT_NOFILE is below {needed}; the memory scenario may fail")

    cpus = sorted(os.sched_getaffinity(0))
    proxy_cpu, load_cpu = cpus[0], cpus[1]
    os.sched_setaffinity(0, {load_cpu})  # this script and its clients live with the load

    # Explicit, so that Ctrl-C works even where SIGINT came in ignored (a background job).
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, raise_interrupt)
    tmp = Path(tempfile.mkdtemp(prefix="sentinel-bench-"))
    env = Env(args, Processes(tmp), tmp, proxy_cpu, load_cpu)
    if venv_python.exists():
        env.python = str(venv_python)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"meta": machine_info(env)}
    started = time.monotonic()
    keep = args.keep_tmp
    try:
        log(f"temp dir {tmp}; proxy on CPU {proxy_cpu}, load on CPU {load_cpu}")
        other = busy_check()
        results["meta"]["other_cpu_pct_at_start"] = other
        if other > 10.0:
            log(f"warning: other processes use {other}% of a CPU; the numbers will be noisy")
        start_redis(env)
        start_nginx(env)
        log(f"redis :{env.redis_port}, nginx {env.upstream_ports}")
        scenarios: dict[str, Callable[[Env, list[str], dict[str, Any]], None]] = {
            "throughput": scenario_throughput,
            "ttfb": scenario_ttfb,
            "memory": scenario_memory,
            "workers": scenario_workers,
            "cluster": scenario_cluster,
        }
        for name in ALL_SCENARIOS:
            if name in args.scenarios:
                scenarios[name](env, args.targets, results)
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        keep = True
        return 130
    except BenchError as exc:
        log(f"failed: {exc}")
        keep = True
        return 1
    finally:
        for stats in (env.redis, env.cluster):
            if stats:
                stats.close()
        env.procs.stop_all()
        results["meta"]["elapsed_s"] = round(time.monotonic() - started, 1)
        # The reference proxy does not stop streaming when a client leaves, so its logs fill
        # with shutdown cancellations after the memory test: only sentinel's are scanned.
        problems = {
            target: count_log_problems(paths)
            for target, paths in env.proxy_logs.items()
            if target != REFERENCE
        }
        results["proxy_log_problems"] = problems
        if keep or results.get("failures") or any(problems.values()):
            log(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    finish(results, args.out, args.targets)
    return 0


def finish(results: dict[str, Any], out: Path, targets: list[str]) -> None:
    """Ratios and goals; write results.json, results.md and throughput.png; print the tables."""
    add_ratios(results)
    subjects = [t for t in ("sentinel", "aiohttp") if t in targets]
    results["goal_subjects"] = subjects[:1]
    results["goals"] = {s: goals(results, s) for s in subjects}
    text = report(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(text)
    plot(results, out / "throughput.png")
    print(text)
    log(f"wrote results.json, results.md and throughput.png in {out}")


def rerender(path: Path, out: Path) -> int:
    """--from-json: the tables and the plot again from a results.json, without running."""
    results: dict[str, Any] = json.loads(path.read_text())
    targets = sorted({row["target"] for row in results.get("throughput", [])})
    targets += [t for t in results.get("ttfb", {}) if t not in targets]
    finish(results, out, targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
