"""Prometheus metrics of one process: requests, session outcomes, upstream latency, open
and broken streams."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Clients name models freely; past this many distinct names, new ones count as "other" so a
# client cannot grow the metrics without bound.
MAX_MODEL_LABELS = 200
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._requests = Counter(
            "sentinel_requests",
            "Proxied requests by provider, model and status.",
            ["provider", "model", "status"],
            registry=self.registry,
        )
        self._sessions = Counter(
            "sentinel_sessions",
            "Session outcomes of proxied requests: hit, created, none or degraded.",
            ["outcome"],
            registry=self.registry,
        )
        self._upstream_latency = Histogram(
            "sentinel_upstream_latency_seconds",
            "Time from sending a request upstream to its response headers.",
            ["provider"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.open_streams = Gauge(
            "sentinel_open_streams", "Responses being relayed now.", registry=self.registry
        )
        self._broken_streams = Counter(
            "sentinel_broken_streams",
            "Responses the upstream broke off or stalled in after they had started.",
            ["provider"],
            registry=self.registry,
        )
        self._failovers = Counter(
            "sentinel_failovers",
            "Requests moved to another target of their alias, by the provider that failed.",
            ["provider"],
            registry=self.registry,
        )
        self._ejections = Counter(
            "sentinel_ejections",
            "Targets left out of selection after failing in a row, by provider.",
            ["provider"],
            registry=self.registry,
        )
        self._models: set[str] = set()
        # Labelled children, looked up once: `labels()` costs more than the increment.
        self._request_counters: dict[tuple[str, str, int], Any] = {}
        self._session_counters: dict[str, Any] = {}
        self._latency: dict[str, Any] = {}

    def request(self, provider: str, model: str | None, status: int, session: str | None) -> None:
        label = model or ""
        counter = self._request_counters.get((provider, label, status))
        if counter is None:
            if label not in self._models:
                if len(self._models) >= MAX_MODEL_LABELS:
                    label = "other"
                else:
                    self._models.add(label)
            counter = self._requests.labels(provider, label, str(status))
            if label != "other":
                self._request_counters[(provider, label, status)] = counter
        counter.inc()
        if session is not None:
            outcome = self._session_counters.get(session)
            if outcome is None:
                outcome = self._session_counters[session] = self._sessions.labels(session)
            outcome.inc()

    def upstream_latency(self, provider: str, seconds: float) -> None:
        histogram = self._latency.get(provider)
        if histogram is None:
            histogram = self._latency[provider] = self._upstream_latency.labels(provider)
        histogram.observe(seconds)

    def broken_stream(self, provider: str) -> None:
        self._broken_streams.labels(provider).inc()

    def failover(self, provider: str) -> None:
        self._failovers.labels(provider).inc()

    def ejection(self, provider: str) -> None:
        self._ejections.labels(provider).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
