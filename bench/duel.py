"""Which of two commits of sentinel-proxy costs less CPU per request: a paired comparison.

    bench/duel.py BASE CANDIDATE [--rounds 6] [--seconds 4] [--stream] [--conns 64]

Both commits run at once, each checked out into a temporary git worktree, both pinned to the
first CPU and both loaded at the same time by a wrk of their own (64 connections unless
--conns says otherwise) on the second. The scheduler splits the first CPU between the two
saturated processes, so the ratio of their throughputs is the inverse ratio of their CPU
cost per request, and whatever the machine does meanwhile hits both alike. Running them one
after the other instead (as bench/run.py must, to measure each against the reference) let
two runs of the same code differ by 15% on the benchmark machine; here the same code against
itself stays within 5%.

Prints the candidate's throughput over the base's for each round and their median: 1.10
means the candidate serves 10% more requests on the same CPU; then each side's errors over
the measured rounds (wrk's socket errors, non-2xx answers and wrong bodies, which the
throughputs leave out). Same set-up as bench/run.py:
Redis and the nginx mock on the second CPU, a conversation id in every body. With --cluster,
both keep their sessions in a Redis Cluster of three masters there (`cluster = true`); with
`--cluster candidate` only the candidate does, so `duel.py HEAD HEAD --cluster candidate`
is what the cluster costs over one Redis.

Either side may be `reference` instead of a commit: the aiohttp reference proxy of
bench/run.py. `bench/duel.py reference HEAD` is then the throughput goal measured paired:
sentinel-proxy's requests per core as a fraction of the reference's.

Scenarios: `--extra TOML` is appended to sentinel-proxy's configuration (its first lines
still belong to the provider's table), `--base-extra`/`--candidate-extra` to one side's
only; `--session`/`--base-session`/`--candidate-session` go in its [session] table;
`--wrk-arg` passes an argument to wrk/chat.lua (key=..., model=..., implicit); `--env
NAME=VALUE` sets a variable for sentinel-proxy (a provider key, an HMAC key);
`--redis-delay-ms N` puts Redis behind a relay that holds each read N/2 ms each way.

`--latency` measures latency instead: in each round one wrk of one connection goes to the
nginx mock directly, then to the base, then to the candidate, one after the other (two
processes sharing a CPU would add each other's latency), and prints each side's p50 over the
direct p50 of the same round, medians across rounds. `duel.py HEAD HEAD --latency
--redis-delay-ms 1 --base-session "near_cache = false"` is what the near-cache saves when
Redis is 1 ms away.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import clients
import run
from run import ROOT, BenchError, Env, Processes, log


def worktree(tmp: Path, role: str, commit: str) -> Path:
    path = tmp / role
    done = subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), commit],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if done.returncode != 0:
        raise BenchError(f"git worktree add {commit} failed: {done.stderr.strip()}")
    return path


def start_sentinel(
    env: Env, tree: Path, name: str, upstream: str, extra: str = "", session: str = ""
) -> tuple[int, run.Proc]:
    port = run.free_port(env.ports)
    cluster = env.args.cluster in ("both", name)
    config = run.sentinel_config(
        env, upstream, extra, name=f"-{name}", cluster=cluster, session=session
    )
    argv = [
        env.python, "-m", "sentinel_proxy", "--config", str(config),
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "info",
    ]  # fmt: skip
    variables = dict(os.environ)
    variables.update(item.split("=", 1) for item in env.args.env)
    if name == "candidate":
        variables.update(item.split("=", 1) for item in env.args.candidate_env)
    # `python -m` puts the working directory first on sys.path: the worktree's package wins.
    proc = env.procs.start(name, argv, str(env.proxy_cpu), env=variables, cwd=tree)
    ready = f"http://127.0.0.1:{port}/readyz"
    run.wait_until(f"{name} {ready} = 200", lambda: run.http_status(ready)[0] == 200, proc, 60)
    return port, proc


REFERENCE = "reference"


def paired_round(
    env: Env, ports: tuple[int, int], seconds: float, errors: list[int] | None = None
) -> list[int]:
    """Both wrks at once; the good answers each got. Each side's errors (socket errors,
    non-2xx answers, wrong bodies) are added to `errors`."""
    args = env.args
    runs = [
        subprocess.Popen(
            run.wrk_argv(
                env.load_cpus,
                port,
                conns=args.conns,
                seconds=seconds,
                stream=args.stream,
                pool=args.pool,
                extra=args.wrk_arg,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for port in ports
    ]
    good = []
    for wrk in runs:
        out, err = wrk.communicate(timeout=seconds + 60)
        line = next((ln for ln in out.splitlines() if ln.startswith("BENCH_RESULT ")), None)
        if wrk.returncode != 0 or line is None:
            raise BenchError(f"wrk failed ({wrk.returncode}): {out[-500:]}{err[-500:]}")
        raw = json.loads(line.split(" ", 1)[1])
        good.append(int(raw["requests"]) - int(raw["non2xx"]) - int(raw["bad_body"]))
        if errors is not None:
            kinds = ("err_connect", "err_read", "err_write", "err_timeout", "non2xx", "bad_body")
            errors[len(good) - 1] += sum(int(raw[kind]) for kind in kinds)
    return good


def latency_p50_ms(env: Env, port: int, seconds: float) -> float:
    """The p50 of one wrk connection to port."""
    args = env.args
    argv = run.wrk_argv(
        env.load_cpus, port, conns=1, seconds=seconds, stream=args.stream, pool=args.pool,
        extra=args.wrk_arg,
    )  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("BENCH_RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise BenchError(
            f"wrk failed ({done.returncode}): {done.stdout[-500:]}{done.stderr[-500:]}"
        )
    raw = json.loads(line.split(" ", 1)[1])
    if int(raw["non2xx"]) or int(raw["bad_body"]):
        raise BenchError(
            f"wrk to :{port} got {raw['non2xx']} non-2xx, {raw['bad_body']} bad bodies"
        )
    return float(raw["lat_p50_us"]) / 1000.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", help=f"git revision to compare against, or {REFERENCE!r}")
    parser.add_argument("candidate", help=f"git revision to compare, or {REFERENCE!r}")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per round")
    parser.add_argument("--stream", action="store_true", help="streaming requests")
    parser.add_argument("--conns", type=int, default=64, help="connections of each wrk")
    parser.add_argument("--pool", type=int, default=10_000, help="distinct conversation ids")
    parser.add_argument(
        "--cluster",
        nargs="?",
        const="both",
        choices=("both", "base", "candidate"),
        help=f"sessions in a Redis Cluster of {run.CLUSTER_MASTERS} masters (cluster = true); "
        "`--cluster candidate` gives the cluster to the candidate only (the base keeps one "
        "Redis): what the cluster costs",
    )
    parser.add_argument("--echo-module", help="path of ngx_http_echo_module.so")
    parser.add_argument("--session", default="", help="TOML lines for both sides' [session]")
    parser.add_argument("--base-session", default="", help="TOML lines for the base's [session]")
    parser.add_argument(
        "--candidate-session", default="", help="TOML lines for the candidate's [session]"
    )
    parser.add_argument("--extra", default="", help="TOML appended to both sides' config")
    parser.add_argument("--base-extra", default="", help="TOML appended to the base's config")
    parser.add_argument(
        "--candidate-extra", default="", help="TOML appended to the candidate's config"
    )
    parser.add_argument(
        "--wrk-arg", action="append", default=[], help="an argument of wrk/chat.lua"
    )
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for sentinel-proxy")
    parser.add_argument(
        "--candidate-env", action="append", default=[], help="NAME=VALUE for the candidate only"
    )
    parser.add_argument(
        "--latency", action="store_true", help="p50 added at one connection, not throughput"
    )
    parser.add_argument(
        "--redis-delay-ms", type=float, default=0.0, help="Redis behind a relay this slow"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with_reference = REFERENCE in (args.base, args.candidate)
    missing = run.check_requirements(
        args, ["sentinel", "aiohttp"] if with_reference else ["sentinel"]
    )
    if missing:
        print("bench/duel.py cannot run; missing:\n  - " + "\n  - ".join(missing), file=sys.stderr)
        return 2
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[1]})
    tmp = Path(tempfile.mkdtemp(prefix="sentinel-duel-"))
    env = Env(args, Processes(tmp), tmp, cpus[0], cpus[1])
    venv_python = ROOT / ".venv" / "bin" / "python"
    if venv_python.exists():
        env.python = str(venv_python)
    trees: list[Path] = []
    upstream = "sse" if args.stream else "json"
    relays = []
    stores = []
    try:
        run.start_nginx(env)
        ports = []
        extras = {"base": args.base_extra, "candidate": args.candidate_extra}
        sessions = {"base": args.base_session, "candidate": args.candidate_session}
        for role, commit in (("base", args.base), ("candidate", args.candidate)):
            if commit == REFERENCE:
                port = run.start_target(env, "aiohttp", upstream, str(env.proxy_cpu)).port
                log(f"{role}: the reference proxy on :{port}")
            else:
                # A Redis of each side's own: one side's writes (each GETEX renews a TTL)
                # would otherwise invalidate the other side's near-cache at every request.
                if args.cluster in ("both", role):
                    run.start_cluster(env, f"cluster-{role}")
                    stores.append(env.cluster)
                else:
                    run.start_redis(env, f"redis-{role}")
                    stores.append(env.redis)
                if args.redis_delay_ms:
                    relays.append(run.delayed_redis(env, args.redis_delay_ms / 1000))
                trees.append(worktree(tmp, role, commit))
                extra = args.extra + extras[role]
                session = args.session + sessions[role]
                port, _ = start_sentinel(env, trees[-1], role, upstream, extra, session)
                if args.wrk_arg:
                    log(f"{role} {commit} on :{port}; the warm-up primes its ids")
                else:
                    failed = asyncio.run(clients.prime(port, args.pool))
                    log(f"{role} {commit} on :{port}; primed {args.pool} ids, {failed} failed")
            ports.append(port)
        # With wrk arguments the warm-up goes round the whole pool (it primes the sessions).
        paired_round(env, (ports[0], ports[1]), max(2.0, args.pool / 400) if args.wrk_arg else 2)
        ratios = []
        errors = [0, 0]
        added: dict[str, list[float]] = {"base": [], "candidate": []}
        for number in range(1, args.rounds + 1):
            if args.latency:
                direct = latency_p50_ms(env, env.upstream_ports[upstream], args.seconds)
                for role, port in zip(added, ports, strict=True):
                    added[role].append(latency_p50_ms(env, port, args.seconds) - direct)
                log(
                    f"round {number}: direct p50 {direct:.3f} ms, added: base "
                    f"{added['base'][-1]:.3f} ms, candidate {added['candidate'][-1]:.3f} ms"
                )
                continue
            base, candidate = paired_round(env, (ports[0], ports[1]), args.seconds, errors)
            ratios.append(candidate / max(base, 1))
            log(f"round {number}: base {base}, candidate {candidate}: {ratios[-1]:.3f}")
            time.sleep(0.5)
    except BenchError as exc:
        log(f"failed: {exc}; logs in {tmp}")
        return 1
    finally:
        for relay in relays:
            relay.stop()
        for stats in stores:
            if stats:
                stats.close()
        env.procs.stop_all()
        for tree in trees:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                capture_output=True, timeout=60,
            )  # fmt: skip
    mode = "streaming" if args.stream else "non-streaming"
    if args.cluster:
        who = "" if args.cluster == "both" else f" for the {args.cluster} only"
        mode += f", sessions in a {run.CLUSTER_MASTERS}-master Redis Cluster{who}"
    if args.redis_delay_ms:
        mode += f", Redis {args.redis_delay_ms:g} ms away"
    if args.latency:
        print(
            f"p50 added over direct, {mode}, 1 connection, {args.rounds} rounds of "
            f"{args.seconds:g} s: base {args.base} {statistics.median(added['base']):.3f} ms, "
            f"candidate {args.candidate} {statistics.median(added['candidate']):.3f} ms"
        )
        return 0
    print(
        f"{args.candidate} vs {args.base}, {mode}, {args.conns} connections each, "
        f"{args.rounds} rounds "
        f"of {args.seconds:g} s: {' '.join(f'{r:.3f}' for r in ratios)}; "
        f"median {statistics.median(ratios):.3f}; errors: base {errors[0]}, "
        f"candidate {errors[1]}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
