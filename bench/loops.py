"""Which event loop takes on new connections while saturated: uvloop against asyncio's own.

    .venv/bin/python bench/loops.py [--rounds 5] [--conns 512] [--seconds 10]

No proxy here: a hello-world ASGI app (this module's `app`) under uvicorn with httptools,
pinned to the first CPU, driven by wrk on the second with the benchmark's chat body, once per
loop per round, the loops alternating. wrk opens all its connections at once, and the app
records when the first request of each reaches it, so besides wrk's figures the table gives
`last first request`: how long after the first connection's first request the last
connection's first request arrived. A loop that is slow to take on connections while busy
shows it there, and in wrk's timeouts (answers over 5 s).

Why sentinel-proxy runs on asyncio's loop: bench/RESULTS.md gives this script's figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import run
from run import BENCH, BenchError, Processes, log

BODY = b'{"object":"chat.completion","choices":[]}' + b" " * 1000
_first_seen: dict[int, float] = {}


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] == "/first-seen":
        times = list(_first_seen.values())
        spread = max(times) - min(times) if times else 0.0
        body = json.dumps({"connections": len(times), "spread_s": spread}).encode()
    else:
        _first_seen.setdefault(scope["client"][1], time.monotonic())
        body = BODY
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def one_round(procs: Processes, loop: str, args: argparse.Namespace) -> dict[str, Any]:
    port = run.free_port(set())
    argv = [
        sys.executable, "-m", "uvicorn", "loops:app", "--app-dir", str(BENCH),
        "--host", "127.0.0.1", "--port", str(port), "--loop", loop, "--http", "httptools",
        "--no-access-log", "--log-level", "warning", "--lifespan", "off",
        "--backlog", "4096", "--timeout-graceful-shutdown", "2",
    ]  # fmt: skip
    proc = procs.start(f"hello-{loop}", argv, "0")
    try:
        url = f"http://127.0.0.1:{port}"
        run.wait_until(
            f"{url}/first-seen", lambda: run.http_status(f"{url}/first-seen")[0] == 200, proc
        )
        wrk = run.wrk_argv(
            "1", port, conns=args.conns, seconds=args.seconds, stream=False, pool=10_000
        )
        done = subprocess.run(wrk, capture_output=True, text=True, timeout=args.seconds + 60)
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("BENCH_RESULT ")), "")
        if not line:
            raise BenchError(f"wrk failed: {done.stdout[-500:]}{done.stderr[-500:]}")
        result: dict[str, Any] = json.loads(line.split(" ", 1)[1])
        result["first_seen"] = json.loads(run.http_status(f"{url}/first-seen")[1])
        return result
    finally:
        procs.stop(proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--conns", type=int, default=512)
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="sentinel-loops-") as tmp:
        procs = Processes(Path(tmp))
        try:
            for number in range(1, args.rounds + 1):
                for loop in ("uvloop", "asyncio"):
                    r = one_round(procs, loop, args)
                    rows.append(
                        f"| {loop} | {number} | {r['rps']:.0f} | {r['lat_p50_us'] / 1000:.0f} "
                        f"| {r['lat_p99_us'] / 1000:.0f} | {r['lat_max_us'] / 1000:.0f} "
                        f"| {r['err_timeout']} | {r['first_seen']['connections']} "
                        f"| {r['first_seen']['spread_s']:.2f} |"
                    )
                    log(rows[-1])
        finally:
            procs.stop_all()
    print(f"\n{args.conns} connections, {args.seconds} s per run, app on CPU 0, wrk on CPU 1\n")
    print("| loop | round | req/s | p50 ms | p99 ms | max ms | timeouts | connections "
          "| last first request, s |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
