"""Measurements behind docs/capacity.md: what a session costs Redis, and what a request costs
Redis, on this machine.

    .venv/bin/python bench/capacity.py [--sessions 1000000] [--requests 20000]

Starts its own redis-server twice on free ports (never the shared one on 6379): a plain one,
and one in cluster mode that owns every slot (a cluster node keeps more per key). For each
kind of session it stores `--sessions` of them as the store writes them (SET ... EX 86400,
values from `Session.to_json`): a client's conversation id (a UUID, 36 characters) without
users; the same with users (`sentinel:session:{external_id}:{id}`, an `external_id` in the
value); an implicit session's id (`implicit-` and 32 hex digits, as identity.py makes them).
Then it reports:

- bytes per session: the growth of INFO `used_memory` over the fill, divided by the count
  (what a sizing needs: keys, values, expiry entries, allocator rounding), and the mean
  `MEMORY USAGE` of 2,000 random keys (the key and value alone);
- per request, driving the real `RedisStore` (64 concurrent callers) through a counting TCP
  relay (tests/support/fault_relay.py): Redis commands (INFO commandstats), bytes to Redis
  and back (the relay's counts: the store's traffic alone), and Redis CPU (INFO
  `used_cpu_user` + `used_cpu_sys`) for a hit and for a creation; and for hits from one
  caller at a time, whose commands are never pipelined (Redis's most CPU per command).

Prints a markdown table and writes bench/out/capacity.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from sentinel_proxy.sessions import CircuitBreaker, RedisStore, Session  # noqa: E402
from sentinel_proxy.sessions.base import session_key  # noqa: E402
from tests.support.fault_relay import FaultRelay  # noqa: E402

TTL = 86_400
EXTERNAL_ID = "team-analytics"
SAMPLES = 2_000


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_redis(workdir: Path, *, cluster: bool) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    workdir.mkdir(parents=True)
    argv = [
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no", "--dir", str(workdir), "--daemonize", "no",
    ]  # fmt: skip
    if cluster:
        argv += ["--cluster-enabled", "yes", "--cluster-port", str(free_port())]
    log = (workdir / "redis.log").open("wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 15
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    if cluster:
        client.execute_command("CLUSTER ADDSLOTSRANGE", 0, 16383)
        while client.execute_command("CLUSTER INFO")["cluster_state"] != "ok":
            time.sleep(0.05)
    client.close()
    return proc, port


# name: (implicit ids, users)
KINDS = {"no users": (False, False), "with users": (False, True), "implicit ids": (True, False)}


def session_for(kind: str) -> Session:
    implicit, users = KINDS[kind]
    conversation_id = f"implicit-{uuid.uuid4().hex}" if implicit else str(uuid.uuid4())
    return Session(
        conversation_id,
        "openai",
        "gpt-4o-mini",
        int(time.time()),
        EXTERNAL_ID if users else None,
    )


def fill(client: redis.Redis, count: int, kind: str) -> list[str]:
    """`count` sessions, as the store writes them; returns a sample of their keys."""
    sample: list[str] = []
    batch = 10_000
    for start in range(0, count, batch):
        pipe = client.pipeline(transaction=False)
        for _ in range(min(batch, count - start)):
            made = session_for(kind)
            pipe.set(made.key, made.to_json(), ex=TTL)
            if len(sample) < SAMPLES * 5 and random.random() < 0.02:
                sample.append(made.key)
        pipe.execute()
    return random.sample(sample, min(SAMPLES, len(sample)))


def memory(client: redis.Redis, count: int, kind: str) -> dict[str, Any]:
    client.flushall()
    time.sleep(0.2)
    before = int(client.info("memory")["used_memory"])
    began = time.monotonic()
    sample = fill(client, count, kind)
    elapsed = time.monotonic() - began
    info = client.info("memory")
    after = int(info["used_memory"])
    usage = [int(client.memory_usage(key, samples=0) or 0) for key in sample]
    key_bytes = [len(key.encode()) for key in sample]
    value_bytes = [len(client.get(key) or b"") for key in sample[:200]]
    return {
        "sessions": count,
        "keys": int(client.dbsize()),
        "used_memory_growth_per_session": round((after - before) / count, 1),
        "memory_usage_mean": round(sum(usage) / len(usage), 1),
        "key_bytes_mean": round(sum(key_bytes) / len(key_bytes), 1),
        "value_bytes_mean": round(sum(value_bytes) / len(value_bytes), 1),
        "used_memory_rss": int(info["used_memory_rss"]),
        "used_memory": after,
        "fill_seconds": round(elapsed, 1),
    }


async def per_request(port: int, requests: int, kind: str) -> dict[str, Any]:
    """Commands, bytes and Redis CPU per creation and per hit, through the real store."""
    relay = FaultRelay(("127.0.0.1", port))
    relay.start()
    store = RedisStore(
        relay.url("redis", "/0"),
        ttl_seconds=TTL,
        timeout=5.0,
        max_connections=64,
        breaker=CircuitBreaker(failures=1000, reset_seconds=1),
    )
    admin = redis.Redis(port=port)
    made = [session_for(kind) for _ in range(requests)]
    out: dict[str, Any] = {}
    try:
        await store.ping()
        for phase, callers in (("create", 64), ("hit", 64), ("hit, one caller", 1)):
            count = requests if callers > 1 else requests // 4
            admin.config_resetstat()
            before = admin.info("all")
            sent, received = relay.bytes_from_clients, relay.bytes_from_server
            queue = made[:count]

            async def caller(queue: list[Session] = queue) -> None:
                while queue:
                    candidate = queue.pop()
                    await store.get_or_create(
                        candidate.id, candidate.external_id, lambda c=candidate: c
                    )

            await asyncio.gather(*(caller() for _ in range(callers)))
            after = admin.info("all")
            stats = {
                name.removeprefix("cmdstat_"): int(value["calls"])
                for name, value in after.items()
                if name.startswith("cmdstat_") and name not in ("cmdstat_info",)
            }
            stats.pop("config|resetstat", None)
            cpu = sum(after[k] - before[k] for k in ("used_cpu_user", "used_cpu_sys"))
            out[phase] = {
                "commands": {k: round(v / count, 3) for k, v in stats.items()},
                "bytes_in": round((relay.bytes_from_clients - sent) / count, 1),
                "bytes_out": round((relay.bytes_from_server - received) / count, 1),
                "redis_cpu_us": round(cpu / count * 1e6, 2),
                "key_bytes": len(session_key(made[0].id, made[0].external_id)),
                "value_bytes": len(made[0].to_json()),
            }
    finally:
        await store.aclose()
        admin.close()
        relay.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sessions", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--out", type=Path, default=BENCH / "out")
    args = parser.parse_args(argv)
    if shutil.which("redis-server") is None:
        print("redis-server is needed", file=sys.stderr)
        return 2
    # SIGTERM ends it through the `finally` below, which stops its redis-servers.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    tmp = Path(tempfile.mkdtemp(prefix="sentinel-capacity-"))
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    procs = []
    try:
        for mode in ("standalone", "cluster"):
            proc, port = start_redis(tmp / mode, cluster=mode == "cluster")
            procs.append(proc)
            client = redis.Redis(port=port)
            version = client.info("server")["redis_version"]
            results["redis"] = version
            for kind in KINDS:
                name = f"{mode}, {kind}"
                print(f"[capacity] {name}: filling {args.sessions} sessions", file=sys.stderr)
                row = memory(client, args.sessions, kind)
                client.flushall()
                row |= asyncio.run(per_request(port, args.requests, kind))
                results[name] = row
                print(f"[capacity] {name}: {json.dumps(row)}", file=sys.stderr)
            client.flushall()
            client.close()
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "capacity.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"Redis {results['redis']}, {args.sessions} sessions, {args.requests} requests\n")
    print(
        "| store | bytes/session (used_memory) | MEMORY USAGE | key B | value B "
        "| create: commands, in/out B, Redis CPU us | hit: commands, in/out B, Redis CPU us "
        "| hit, one caller: Redis CPU us |"
    )
    print("|---|---:|---:|---:|---:|---|---|---:|")
    for name, row in results.items():
        if not isinstance(row, dict):
            continue
        cells = []
        for phase in ("create", "hit"):
            p = row[phase]
            commands = " + ".join(f"{v:g} {k.upper()}" for k, v in p["commands"].items())
            cells.append(f"{commands}, {p['bytes_in']:g}/{p['bytes_out']:g}, {p['redis_cpu_us']:g}")
        print(
            f"| {name} | {row['used_memory_growth_per_session']:g} | {row['memory_usage_mean']:g} "
            f"| {row['key_bytes_mean']:g} | {row['value_bytes_mean']:g} | {cells[0]} | {cells[1]} "
            f"| {row['hit, one caller']['redis_cpu_us']:g} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
