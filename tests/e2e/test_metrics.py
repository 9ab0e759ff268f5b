"""/metrics of the real process: the whole server under `--workers`, labels from the
configuration only, and the series for time to first byte, streams and the session store."""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import Iterable
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.procs import connection_owner
from tests.support.proxy_process import TEST_AUTH, ProxyProcess, StartProxy
from tests.support.redis_server import RedisServer
from tests.support.upstream_stub import UpstreamStub
from tests.support.waiting import wait_for
from tests.support.workers import client_port, ready_workers

pytestmark = pytest.mark.e2e

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def config(upstream: UpstreamStub, redis_url: str, session: str = "") -> str:
    return (
        f'[session]\nredis_url = "{redis_url}"\n{session}\n'
        '[metrics]\nmodels = ["gpt-4o"]\n\n'
        f'[[providers]]\nname = "stub"\nbase_url = "{upstream.base_url}"\n\n'
        '[models.fast]\ntargets = [{ provider = "stub", model = "m-a" }]\n'
    )


def post(
    proxy: ProxyProcess, body: dict[str, Any], pids: Iterable[int] = ()
) -> tuple[httpx.Response, int | None]:
    """One request on a fresh connection, and which of `pids` served it."""
    with httpx.Client(trust_env=False, timeout=20.0) as client:
        response = client.post(f"{proxy.base_url}/chat/completions", json=body, headers=TEST_AUTH)
        pids = list(pids)
        owner = connection_owner(pids, proxy.port, client_port(response)) if pids else None
        return response, owner


def chat(conversation_id: str | None = None, model: str = "fast", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [], **extra}
    if conversation_id is not None:
        body["conversation_id"] = conversation_id
    return body


def scrape(proxy: ProxyProcess, pids: Iterable[int] = ()) -> tuple[Samples, int | None]:
    """Every sample of one scrape on a fresh connection, and which of `pids` answered it."""
    with httpx.Client(trust_env=False, timeout=20.0) as client:
        response = client.get(f"{proxy.url}/metrics")
        assert response.status_code == 200, response.text
        pids = list(pids)
        owner = connection_owner(pids, proxy.port, client_port(response)) if pids else None
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples, owner


def total(samples: Samples, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, found), v in samples.items() if n == name and wanted <= found)


def test_a_scrape_under_two_workers_counts_every_worker(
    start_proxy: StartProxy, upstream: UpstreamStub, redis_url: str
) -> None:
    proxy = start_proxy(config(upstream, redis_url), extra_args=("--workers", "2"))
    pids = ready_workers(proxy, 2)
    served: Counter[int | None] = Counter()
    # The kernel picks a worker for each new connection at random: go on until both served.
    while len(served) < 2 or sum(served.values()) < 10:
        assert sum(served.values()) < 60, f"requests were not spread over both workers: {served}"
        response, owner = post(proxy, chat(f"c-{sum(served.values())}"), pids)
        assert response.status_code == 200, response.text
        served[owner] += 1
    assert set(served) == set(pids)
    sent = sum(served.values())

    # A request is counted just after its response: wait until the last one is.
    wait_for(
        "every request counted", lambda: total(scrape(proxy)[0], "sentinel_requests_total") == sent
    )
    answered: set[int | None] = set()
    for _ in range(40):  # until each worker has answered a scrape
        samples, owner = scrape(proxy, pids)
        answered.add(owner)
        assert total(samples, "sentinel_requests_total") == sent, (owner, served)
        assert (
            total(samples, "sentinel_requests_total", model="m-a", provider="stub", status="2xx")
            == sent
        )
        assert total(samples, "sentinel_sessions_total", outcome="created") == sent
        assert total(samples, "sentinel_open_streams") == 0
        assert total(samples, "sentinel_time_to_first_byte_seconds_count") == sent
        if answered == set(pids):
            break
    assert answered == set(pids), f"every scrape reached the same worker: {answered}"


def test_a_dead_workers_counts_are_neither_lost_nor_counted_twice(
    start_proxy: StartProxy, upstream: UpstreamStub, redis_url: str
) -> None:
    proxy = start_proxy(config(upstream, redis_url), extra_args=("--workers", "2"))
    pids = ready_workers(proxy, 2)
    served: Counter[int | None] = Counter()
    while len(served) < 2:
        assert sum(served.values()) < 60, f"requests were not spread over both workers: {served}"
        response, owner = post(proxy, chat(f"c-{sum(served.values())}"), pids)
        assert response.status_code == 200
        served[owner] += 1
    sent = sum(served.values())
    wait_for(
        "every request counted", lambda: total(scrape(proxy)[0], "sentinel_requests_total") == sent
    )

    os.kill(pids[0], signal.SIGKILL)
    replaced = wait_for("a new worker", lambda: (p := ready_workers(proxy, 2)) != pids and p)
    assert pids[0] not in replaced
    for _ in range(6):  # scrapes reach either worker, the new one included
        samples, _ = scrape(proxy)
        assert total(samples, "sentinel_requests_total") == sent
        assert total(samples, "sentinel_sessions_total") == sent

    for index in range(4):
        assert post(proxy, chat(f"d-{index}"))[0].status_code == 200
    wait_for(
        "the later requests counted on top",
        lambda: total(scrape(proxy)[0], "sentinel_requests_total") == sent + 4,
    )


def test_labels_come_from_the_configuration_and_latencies_are_timed(
    start_proxy: StartProxy, upstream: UpstreamStub, redis_url: str
) -> None:
    upstream.configure_stream(chunks=5, delay=0.1)
    proxy = start_proxy(config(upstream, redis_url))
    assert post(proxy, chat("c-1"))[0].status_code == 200  # alias fast: target m-a
    assert post(proxy, chat(model="gpt-4o"))[0].status_code == 200  # [metrics] models
    assert post(proxy, chat(model="made-up-by-a-client"))[0].status_code == 200
    streamed, _ = post(proxy, chat("c-2", stream=True))
    assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")

    def counted() -> Samples | None:
        samples, _ = scrape(proxy)
        return samples if total(samples, "sentinel_requests_total") == 4 else None

    samples = wait_for("four requests counted", counted)
    requests = {
        dict(labels)["model"]: value
        for (name, labels), value in samples.items()
        if name == "sentinel_requests_total"
    }
    assert requests == {"m-a": 2, "gpt-4o": 1, "other": 1}
    assert all(dict(labels).get("status") in (None, "2xx") for _, labels in samples)
    ttfb = total(samples, "sentinel_time_to_first_byte_seconds_sum")
    assert total(samples, "sentinel_time_to_first_byte_seconds_count") == 4
    assert ttfb >= total(samples, "sentinel_upstream_latency_seconds_sum") > 0
    # One stream of seven events 0.1 s apart: about 0.6 s from its first byte to its last.
    assert total(samples, "sentinel_stream_duration_seconds_count") == 1
    assert 0.5 <= total(samples, "sentinel_stream_duration_seconds_sum") < 10
    # Two requests had a conversation id: two store calls, none failed.
    assert total(samples, "sentinel_store_latency_seconds_count") == 2
    assert total(samples, "sentinel_store_errors_total") == 0
    assert total(samples, "sentinel_store_breaker_open") == 0


def test_store_errors_and_the_breaker_are_reported(
    start_proxy: StartProxy, upstream: UpstreamStub, redis_url: str, redis_server: RedisServer
) -> None:
    session = "timeout_seconds = 0.2\nbreaker_failures = 2\nbreaker_reset_seconds = 0.5\n"
    proxy = start_proxy(config(upstream, redis_url, session))
    assert post(proxy, chat("c-up"))[0].status_code == 200

    redis_server.stop()
    try:
        for index in range(3):  # two failures open the breaker; the third is refused by it
            assert post(proxy, chat(f"c-down-{index}"))[0].status_code == 503
        samples, _ = scrape(proxy)
        assert total(samples, "sentinel_store_errors_total") == 3
        assert total(samples, "sentinel_store_breaker_open") == 1
        assert total(samples, "sentinel_store_latency_seconds_count") == 4
    finally:
        redis_server.start()

    wait_for("the store back", lambda: post(proxy, chat("c-back"))[0].status_code == 200)
    samples, _ = scrape(proxy)
    assert total(samples, "sentinel_store_breaker_open") == 0
