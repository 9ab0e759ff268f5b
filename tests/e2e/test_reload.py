"""SIGHUP reloads the configuration file, in one process and under `--workers`: new requests
use the new file, a stream that began before finishes on the old one, pins stay while their
provider does, a bad file keeps the running configuration with one line naming the key, and
a worker started after the reload serves the new configuration."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest

from tests.support.procs import connection_owner, worker_pids
from tests.support.proxy_process import TEST_AUTH, ProxyProcess, StartProxy
from tests.support.streams import start_stream
from tests.support.upstream_stub import UpstreamStub
from tests.support.waiting import wait_for
from tests.support.workers import client_port, kill_a_worker, ready_workers

pytestmark = pytest.mark.e2e

RELOADED = "configuration reloaded from"
NOT_RELOADED = "configuration not reloaded"
BAD_TARGET = '[models.broken]\ntargets = [{ provider = "nowhere", model = "m" }]\n'


def config(
    providers: dict[str, UpstreamStub], target: str, redis_url: str | None = None, extra: str = ""
) -> str:
    """`providers` by name, and the alias `fast` that sends everything to provider `target`."""
    text = extra
    if redis_url is not None:
        text += f'[session]\nredis_url = "{redis_url}"\n\n'
    for name, stub in providers.items():
        text += f'[[providers]]\nname = "{name}"\nbase_url = "{stub.base_url}"\n\n'
    return text + f'[models.fast]\ntargets = [{{ provider = "{target}", model = "m-{target}" }}]\n'


def lines(proxy: ProxyProcess, words: str) -> list[str]:
    return [line for line in proxy.stderr_text().splitlines() if words in line]


def sighup(proxy: ProxyProcess, text: str, outcome: str = RELOADED, group: bool = False) -> str:
    """Rewrite the config file, send SIGHUP (to the process group: as a terminal's hangup),
    and return the log line that tells the outcome."""
    assert proxy.config_path is not None
    proxy.config_path.write_text(text)
    before = len(lines(proxy, outcome))
    if group:
        os.killpg(proxy.pid, signal.SIGHUP)
    else:
        proxy.send_signal(signal.SIGHUP)
    found = wait_for(outcome, lambda: lines(proxy, outcome)[before:])
    assert len(found) == 1, found
    return found[0]


class Served(NamedTuple):
    provider: str
    model: str
    session: str
    # Which of the workers served it (None: no workers).
    worker: int | None


def chat(
    proxy: ProxyProcess, conversation_id: str | None = None, workers: Sequence[int] = ()
) -> Served:
    """A chat request for the alias `fast` on a fresh connection."""
    body: dict[str, object] = {"model": "fast", "messages": []}
    if conversation_id is not None:
        body["conversation_id"] = conversation_id
    with httpx.Client(trust_env=False, timeout=20.0) as client:
        response = client.post(f"{proxy.base_url}/chat/completions", json=body, headers=TEST_AUTH)
        assert response.status_code == 200, response.text
        worker = (
            connection_owner(list(workers), proxy.port, client_port(response)) if workers else None
        )
    headers = response.headers
    return Served(
        headers["x-sentinel-provider"],
        headers["x-sentinel-model"],
        headers["x-sentinel-session"],
        worker,
    )


def test_sighup_serves_the_new_file_while_older_streams_and_pins_go_on(
    start_proxy: StartProxy, upstream: UpstreamStub, second_upstream: UpstreamStub
) -> None:
    a, b = upstream, second_upstream
    release = a.hold_streams()
    proxy = start_proxy(config({"a": a}, "a"))
    assert chat(proxy, "kept")[:3] == ("a", "m-a", "created")
    stream = start_stream(proxy, "fast")
    assert stream.headers["x-sentinel-provider"] == "a"

    line = sighup(proxy, config({"a": a, "b": b}, "b"))
    assert line.endswith("providers a,b, 1 alias(es); changed: providers, aliases")
    assert chat(proxy)[:3] == ("b", "m-b", "none")
    assert chat(proxy, "kept")[:3] == ("a", "m-a", "hit")
    assert chat(proxy, "new")[:3] == ("b", "m-b", "created")
    assert [r.json()["model"] for r in b.requests] == ["m-b", "m-b"]

    # Provider a leaves: its pin is replaced as one of an unknown provider.
    sighup(proxy, config({"b": b}, "b"))
    assert chat(proxy, "kept")[:3] == ("b", "m-b", "created")
    assert chat(proxy, "kept")[:3] == ("b", "m-b", "hit")

    assert stream.is_alive()
    release.set()
    stream.join(30)
    assert stream.error is None
    assert stream.body == UpstreamStub.stream_body("m-a")
    assert [r.json()["model"] for r in a.requests] == ["m-a", "m-a", "m-a"]
    assert proxy.terminate() == 0


def test_a_bad_file_keeps_the_running_config_and_restart_settings_wait(
    start_proxy: StartProxy, upstream: UpstreamStub, second_upstream: UpstreamStub
) -> None:
    a, b = upstream, second_upstream
    proxy = start_proxy(config({"a": a}, "a"))
    line = sighup(proxy, config({"a": a}, "b"), outcome=NOT_RELOADED)
    assert line.endswith(
        "configuration not reloaded, still serving the previous one: "
        "models.fast.targets[0].provider: unknown provider 'b'"
    )
    assert proxy.running
    assert chat(proxy)[:3] == ("a", "m-a", "none")

    line = sighup(proxy, "[server\n", outcome=NOT_RELOADED)
    assert f"previous one: config: {proxy.config_path} is not valid TOML: " in line
    assert chat(proxy)[:3] == ("a", "m-a", "none")

    # The file's port loses to --port, as at the start; the grace period waits for a restart.
    server = f"[server]\nport = {proxy.port + 1}\nshutdown_grace_seconds = 1\n\n"
    sighup(proxy, config({"b": b}, "b", extra=server))
    (waiting,) = lines(proxy, "at the next start")
    assert waiting.endswith(
        "configuration reload: server.shutdown_grace_seconds changed in the file and "
        "take(s) effect at the next start; the running values stay until then"
    )
    assert chat(proxy)[:3] == ("b", "m-b", "none")
    assert len(lines(proxy, NOT_RELOADED)) == 2
    assert proxy.terminate() == 0


def test_sighup_reloads_every_worker_and_the_workers_started_later(
    upstream: UpstreamStub, second_upstream: UpstreamStub, redis_url: str, tmp_path: Path
) -> None:
    a, b = upstream, second_upstream
    proxy = ProxyProcess(
        config({"a": a}, "a", redis_url),
        tmp_path,
        extra_args=("--workers", "2"),
        process_group=True,
    )
    try:
        proxy.start()
        pids = ready_workers(proxy, 2)
        assert chat(proxy, "kept")[:3] == ("a", "m-a", "created")

        # A hangup reaches the whole group; the supervisor alone reads the file.
        sighup(proxy, config({"a": a, "b": b}, "b", redis_url), group=True)
        on_b: set[int | None] = set()

        def every_worker_on_b() -> bool:
            answer = chat(proxy, workers=pids)
            if answer.provider == "b":
                on_b.add(answer.worker)
            return on_b >= set(pids)

        wait_for("every worker to serve the new file", every_worker_on_b)
        answers = [chat(proxy, workers=pids) for _ in range(20)]
        assert {answer[:3] for answer in answers} == {("b", "m-b", "none")}
        assert {answer.worker for answer in answers} == set(pids)
        kept = [chat(proxy, "kept", workers=pids) for _ in range(10)]
        assert {answer[:3] for answer in kept} == {("a", "m-a", "hit")}
        assert worker_pids(proxy.pid, proxy.port) == pids, "a worker died of the hangup"
        assert len(lines(proxy, RELOADED)) == 1

        sighup(proxy, config({"a": a}, "nowhere", redis_url), outcome=NOT_RELOADED, group=True)
        assert {chat(proxy)[:3] for _ in range(10)} == {("b", "m-b", "none")}

        # The replacement serves the supervisor's configuration: the reloaded one, not the
        # broken file, which it never reads.
        after, replacement = kill_a_worker(proxy, pids)
        by_replacement = 0
        deadline = time.monotonic() + 20
        while by_replacement < 5:
            assert time.monotonic() < deadline, "the replacement served no requests"
            answer = chat(proxy, workers=after)
            assert answer[:3] == ("b", "m-b", "none")
            by_replacement += answer.worker == replacement
        assert len(lines(proxy, NOT_RELOADED)) == 1
        assert proxy.terminate() == 0
    finally:
        proxy.stop()
