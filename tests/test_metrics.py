from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sentinel_proxy.config import Alias, Config, MetricsConfig, Provider, Target
from sentinel_proxy.exceptions import StoreUnavailable
from sentinel_proxy.metrics import MeteredStore, Metrics, MetricsSlot, forget_worker
from sentinel_proxy.sessions import CircuitBreaker, Session
from sentinel_proxy.sessions.base import Maker

CONFIG = Config(
    providers=(Provider("a", "http://a.test/v1"), Provider("b", "http://b.test/v1")),
    aliases={"fast": Alias("fast", (Target("a", "m-a"), Target("b", "m-b")))},
    metrics=MetricsConfig(models=("gpt-4o",)),
)
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(metrics: Metrics) -> Samples:
    found: Samples = {}
    for family in text_string_to_metric_families(metrics.render()[0].decode()):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return samples(metrics).get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Metrics]:
    metrics = Metrics(CONFIG, MetricsSlot(str(tmp_path), 0))
    yield metrics
    metrics.close()


def test_model_labels_come_from_the_configuration(worker: Metrics) -> None:
    for model in ("fast", "m-a", "m-b", "gpt-4o", "invented-1", "invented-2", None):
        worker.request("a", model, 200, "none")

    requests = {
        dict(labels)["model"]: count
        for (name, labels), count in samples(worker).items()
        if name == "sentinel_requests_total"
    }
    assert requests == {"fast": 1, "m-a": 1, "m-b": 1, "gpt-4o": 1, "other": 2, "": 1}


def test_a_reloaded_configuration_labels_its_own_models(worker: Metrics) -> None:
    worker.request("a", "o3", 200, None)
    worker.configure(Config(providers=CONFIG.providers, metrics=MetricsConfig(models=("o3",))))
    worker.request("a", "o3", 200, None)
    worker.request("a", "gpt-4o", 200, None)

    assert value(worker, "sentinel_requests_total", provider="a", model="o3", status="2xx") == 1
    assert value(worker, "sentinel_requests_total", provider="a", model="other", status="2xx") == 2


def test_statuses_are_counted_by_class_and_outcomes_apart(worker: Metrics) -> None:
    for status in (200, 201, 404, 499, 502, 503):
        worker.request("a", "fast", status, "hit")
    worker.request("", None, 400, None)

    assert value(worker, "sentinel_requests_total", provider="a", model="fast", status="2xx") == 2
    assert value(worker, "sentinel_requests_total", provider="a", model="fast", status="4xx") == 2
    assert value(worker, "sentinel_requests_total", provider="a", model="fast", status="5xx") == 2
    assert value(worker, "sentinel_requests_total", provider="", model="", status="4xx") == 1
    assert value(worker, "sentinel_sessions_total", outcome="hit") == 6


def test_histograms_count_a_value_on_a_bound_in_that_bucket(worker: Metrics) -> None:
    worker.upstream_latency("a", 0.1)
    worker.upstream_latency("a", 1000.0)

    def bucket(le: str) -> float:
        return value(worker, "sentinel_upstream_latency_seconds_bucket", provider="a", le=le)

    assert (bucket("0.05"), bucket("0.1"), bucket("300.0"), bucket("+Inf")) == (0, 1, 1, 2)
    assert value(worker, "sentinel_upstream_latency_seconds_count", provider="a") == 2
    assert value(worker, "sentinel_upstream_latency_seconds_sum", provider="a") == 1000.1


def test_provider_counters(worker: Metrics) -> None:
    worker.failover("a")
    worker.failover("a")
    worker.ejection("b")
    worker.broken_stream("a")

    assert value(worker, "sentinel_failovers_total", provider="a") == 2
    assert value(worker, "sentinel_ejections_total", provider="b") == 1
    assert value(worker, "sentinel_broken_streams_total", provider="a") == 1


def test_a_scrape_of_any_worker_sums_every_worker(tmp_path: Path) -> None:
    workers = [Metrics(CONFIG, MetricsSlot(str(tmp_path), index)) for index in range(3)]
    try:
        for index, metrics in enumerate(workers):
            for _ in range(index + 1):
                metrics.request("a", "fast", 200, "created")
            metrics.open_streams.inc()
            metrics.first_byte("a", 0.2)

        for metrics in workers:
            assert (
                value(metrics, "sentinel_requests_total", provider="a", model="fast", status="2xx")
                == 6
            )
            assert value(metrics, "sentinel_open_streams") == 3
            assert value(metrics, "sentinel_time_to_first_byte_seconds_count", provider="a") == 3
    finally:
        for metrics in workers:
            metrics.close()


def test_a_replaced_worker_continues_its_counters_and_starts_its_gauges_afresh(
    tmp_path: Path,
) -> None:
    directory = str(tmp_path)
    other = Metrics(CONFIG, MetricsSlot(directory, 1))
    dead = Metrics(CONFIG, MetricsSlot(directory, 0))
    for _ in range(3):
        dead.request("a", "fast", 200, None)
    dead.open_streams.inc()
    dead.breaker_open(True)
    files = sorted(os.listdir(directory))
    assert value(other, "sentinel_open_streams") == 1

    forget_worker(directory, 0)  # the supervisor, when the worker has exited
    assert value(other, "sentinel_open_streams") == 0
    assert value(other, "sentinel_store_breaker_open") == 0
    replacement = Metrics(CONFIG, MetricsSlot(directory, 0))
    replacement.request("a", "fast", 200, None)

    assert value(other, "sentinel_requests_total", provider="a", model="fast", status="2xx") == 4
    assert value(other, "sentinel_open_streams") == 0
    assert sorted(os.listdir(directory)) == files
    for metrics in (dead, replacement, other):
        metrics.close()


def test_a_worker_that_was_not_forgotten_still_starts_its_gauges_at_zero(tmp_path: Path) -> None:
    dead = Metrics(CONFIG, MetricsSlot(str(tmp_path), 0))
    dead.open_streams.inc()
    replacement = Metrics(CONFIG, MetricsSlot(str(tmp_path), 0))
    assert value(replacement, "sentinel_open_streams") == 0
    dead.close()
    replacement.close()


def test_files_grow_past_their_first_size_and_keep_every_value(tmp_path: Path) -> None:
    models = tuple(f"model-{index:04d}" for index in range(1500))
    config = Config(providers=CONFIG.providers, metrics=MetricsConfig(models=models))
    metrics = Metrics(config, MetricsSlot(str(tmp_path), 0))
    for index, model in enumerate(models):
        metrics.request("a", model, 200, None)
        if index == 10:
            metrics.request("a", model, 200, None)
    assert os.path.getsize(tmp_path / "counter_w0.db") > 1 << 16

    reopened = Metrics(config, MetricsSlot(str(tmp_path), 1))
    found = samples(reopened)
    assert sum(v for (n, _), v in found.items() if n == "sentinel_requests_total") == 1501
    assert (
        found[
            (
                "sentinel_requests_total",
                frozenset({"provider": "a", "model": "model-0010", "status": "2xx"}.items()),
            )
        ]
        == 2
    )
    metrics.close()
    reopened.close()


def test_a_process_alone_has_a_directory_of_its_own_removed_at_close() -> None:
    metrics = Metrics(CONFIG)
    metrics.request("a", "fast", 200, None)
    assert value(metrics, "sentinel_requests_total", provider="a", model="fast", status="2xx") == 1
    directory = metrics.directory
    metrics.close()
    assert not os.path.exists(directory)


class FlakyStore:
    def __init__(self, breaker: CircuitBreaker) -> None:
        self.breaker = breaker
        self.up = True

    async def get_or_create(
        self, conversation_id: str, external_id: str | None, make: Maker
    ) -> tuple[Session, bool]:
        if not self.breaker.allow():
            raise StoreUnavailable("the breaker is open")
        if not self.up:
            self.breaker.failure()
            raise StoreUnavailable("down")
        self.breaker.success()
        return make(), True

    async def get(self, conversation_id: str, external_id: str | None = None) -> Session | None:
        return None

    async def delete(self, conversation_id: str, external_id: str | None = None) -> bool:
        return False

    async def ping(self) -> bool:
        return self.up

    async def aclose(self) -> None:
        pass


async def test_store_calls_are_timed_and_failures_counted_and_the_breaker_shown(
    worker: Metrics,
) -> None:
    now = [0.0]
    breaker = CircuitBreaker(failures=2, reset_seconds=5, clock=lambda: now[0])
    flaky = FlakyStore(breaker)
    store = MeteredStore(flaky, worker, breaker)

    def make() -> Session:
        return Session("c", "a", "m-a", 0)

    assert (await store.get_or_create("c", None, make))[1] is True
    flaky.up = False
    for _ in range(3):
        with pytest.raises(StoreUnavailable):
            await store.get_or_create("c", None, make)
    assert value(worker, "sentinel_store_errors_total") == 3
    assert value(worker, "sentinel_store_latency_seconds_count") == 4
    assert value(worker, "sentinel_store_breaker_open") == 1

    flaky.up = True
    now[0] = 10.0  # past the reset: the next call is the trial, and it succeeds
    await store.get_or_create("c", None, make)
    assert value(worker, "sentinel_store_breaker_open") == 0
    assert await store.ping() is True
