"""Prometheus metrics of the whole server, every worker included.

Each worker process writes its values into files of its own in one directory (the
supervisor's under `--workers`, the lifespan's otherwise), in prometheus-client's
multiprocess format; a scrape, whichever worker answers it, sums every file with
prometheus-client's MultiProcessCollector. The values are plain stores into a memory map
(`_Values`): about 0.1 µs an increment, where prometheus-client's own multiprocess values
take about 0.8 µs (a lock, a pid check and a struct per write) and its in-process ones 0.4.

The files belong to a worker's slot, not to its process: the worker that replaces a dead
one continues its counters, so no sum ever goes down and no files pile up, and starts its
gauges afresh. Only one process at a time may write a slot's files.

Labels come from the configuration only: provider names, the models it names (aliases,
their targets, `[metrics] models`) or else `other`, status classes, session outcomes.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import mmap
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

from sentinel_proxy.config import Config
from sentinel_proxy.exceptions import StoreUnavailable
from sentinel_proxy.sessions import CircuitBreaker, Session, SessionStore
from sentinel_proxy.sessions.base import Maker

OTHER = "other"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
STREAM_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
_INITIAL_BYTES = 1 << 16
_INT = struct.Struct("i")


@dataclass(frozen=True, slots=True)
class MetricsSlot:
    """Where one worker of several writes its metrics: the shared directory and its slot."""

    directory: str
    worker: int


def forget_worker(directory: str, worker: int) -> None:
    """A worker is gone: its gauges (open streams and the like) stop counting now."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_path(directory, "gauge_livesum", worker))


class _Values:
    """Doubles in one memory-mapped file, each under a key, in prometheus-client's mmap
    format: the used length (4 bytes, then 4 of padding), then entries of a key length
    (4 bytes), the key padded to a multiple of 8, the value and a timestamp (8 bytes each).

    `cells[index(key)]` is the value: a write is one aligned 8-byte store, which readers in
    other processes see whole."""

    def __init__(self, path: str, *, fresh: bool) -> None:
        if fresh:
            # A new file, not a truncated one: a reader of the old file finishes reading it.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._file = open(path, "a+b")  # noqa: SIM115 - closed in close()
        size = os.fstat(self._file.fileno()).st_size
        if size == 0:
            size = _INITIAL_BYTES
            self._file.truncate(size)
        self._map = mmap.mmap(self._file.fileno(), size)
        self.cells = memoryview(self._map).cast("d")
        self._positions: dict[str, int] = {}
        used: int = _INT.unpack_from(self._map, 0)[0]
        if used == 0:
            used = 8
            self._map[0:4] = _INT.pack(used)
        position = 8
        while position < used:
            length: int = _INT.unpack_from(self._map, position)[0]
            key = self._map[position + 4 : position + 4 + length].decode()
            position += 4 + length + (8 - (length + 4) % 8)
            self._positions[key] = position // 8
            position += 16
        self._used = used

    def index(self, key: str) -> int:
        found = self._positions.get(key)
        if found is not None:
            return found
        encoded = key.encode()
        entry = _INT.pack(len(encoded)) + encoded + b" " * (8 - (len(encoded) + 4) % 8)
        entry += bytes(16)
        end = self._used + len(entry)
        if end > len(self._map):
            self._grow(end)
        self._map[self._used : end] = entry
        # The entry is complete before the used length covers it.
        self._map[0:4] = _INT.pack(end)
        self._used = end
        self._positions[key] = index = (end - 16) // 8
        return index

    def _grow(self, needed: int) -> None:
        size = len(self._map)
        while size < needed:
            size *= 2
        self.cells.release()
        self._map.close()
        self._file.truncate(size)
        self._map = mmap.mmap(self._file.fileno(), size)
        self.cells = memoryview(self._map).cast("d")

    def close(self) -> None:
        self.cells.release()
        self._map.close()
        self._file.close()


def _path(directory: str, kind: str, worker: int) -> str:
    # The collector reads the kind before the first '_' and, for gauges, the id after the last.
    return os.path.join(directory, f"{kind}_w{worker}.db")


def _key(metric: str, sample: str, labels: dict[str, str], help_text: str) -> str:
    """A key as prometheus-client's collector parses it."""
    return json.dumps([metric, sample, labels, help_text], sort_keys=True)


class _Counter:
    def __init__(self, values: _Values, name: str, help_text: str, labels: Sequence[str]) -> None:
        self._values = values
        self._name = name
        self._help = help_text
        self._labels = labels

    def cell(self, *label_values: str) -> int:
        labels = dict(zip(self._labels, label_values, strict=True))
        return self._values.index(_key(self._name, self._name + "_total", labels, self._help))

    def inc(self, cell: int) -> None:
        self._values.cells[cell] += 1


class _Histogram:
    """Bucket counts (not cumulative: the collector adds them up) and the sum."""

    def __init__(
        self,
        values: _Values,
        name: str,
        help_text: str,
        labels: Sequence[str],
        buckets: Sequence[float],
    ) -> None:
        self._values = values
        self._name = name
        self._help = help_text
        self._labels = labels
        self._bounds = tuple(buckets)
        self._children: dict[tuple[str, ...], tuple[tuple[int, ...], int]] = {}

    def observe(self, seconds: float, *label_values: str) -> None:
        child = self._children.get(label_values)
        if child is None:
            child = self._children[label_values] = self._child(label_values)
        buckets, total = child
        cells = self._values.cells
        cells[buckets[bisect.bisect_left(self._bounds, seconds)]] += 1
        cells[total] += seconds

    def _child(self, label_values: tuple[str, ...]) -> tuple[tuple[int, ...], int]:
        labels = dict(zip(self._labels, label_values, strict=True))
        buckets = tuple(
            self._values.index(
                _key(
                    self._name,
                    self._name + "_bucket",
                    {**labels, "le": repr(float(bound))},
                    self._help,
                )
            )
            for bound in (*self._bounds, float("inf"))
        )
        total = self._values.index(_key(self._name, self._name + "_sum", labels, self._help))
        return buckets, total


class Gauge:
    """A gauge summed over the live workers."""

    def __init__(self, values: _Values, name: str, help_text: str) -> None:
        self._values = values
        self._cell = values.index(_key(name, name, {}, help_text))

    def inc(self) -> None:
        self._values.cells[self._cell] += 1

    def dec(self) -> None:
        self._values.cells[self._cell] -= 1

    def set(self, value: float) -> None:
        self._values.cells[self._cell] = value


def model_labels(config: Config) -> dict[str, str]:
    """The model names counted under their own label: every other one is `other`."""
    names = set(config.aliases) | set(config.metrics.models)
    for alias in config.aliases.values():
        names.update(target.model for target in alias.targets)
    return {name: name for name in names}


class Metrics:
    """The server's metrics, as one worker writes them and any worker serves them."""

    def __init__(self, config: Config, slot: MetricsSlot | None = None) -> None:
        # One process alone: a directory of its own, removed at close.
        self._own_directory = slot is None
        if slot is None:
            slot = MetricsSlot(tempfile.mkdtemp(prefix="sentinel-metrics-"), 0)
        self.directory = slot.directory
        counters = self._counters = _Values(
            _path(slot.directory, "counter", slot.worker), fresh=False
        )
        histograms = self._histograms = _Values(
            _path(slot.directory, "histogram", slot.worker), fresh=False
        )
        gauges = self._gauges = _Values(
            _path(slot.directory, "gauge_livesum", slot.worker), fresh=True
        )
        self._models = model_labels(config)
        self._requests = _Counter(
            counters,
            "sentinel_requests",
            "Proxied requests by provider, model (as configured, else other) and status class.",
            ("provider", "model", "status"),
        )
        self._sessions = _Counter(
            counters,
            "sentinel_sessions",
            "Session outcomes of proxied requests: hit, created, none or degraded.",
            ("outcome",),
        )
        self._broken_streams = _Counter(
            counters,
            "sentinel_broken_streams",
            "Responses the upstream broke off or stalled in after they had started.",
            ("provider",),
        )
        self._failovers = _Counter(
            counters,
            "sentinel_failovers",
            "Requests retried on another target after this provider failed them.",
            ("provider",),
        )
        self._ejections = _Counter(
            counters,
            "sentinel_ejections",
            "Times a target of this provider was taken out of rotation.",
            ("provider",),
        )
        store_errors = _Counter(
            counters,
            "sentinel_store_errors",
            "Session store calls that failed (down, slow, or refused by the open breaker).",
            (),
        )
        self._store_errors = store_errors.cell()
        self._upstream_latency = _Histogram(
            histograms,
            "sentinel_upstream_latency_seconds",
            "Time from sending a request upstream to its response headers.",
            ("provider",),
            LATENCY_BUCKETS,
        )
        self._first_byte = _Histogram(
            histograms,
            "sentinel_time_to_first_byte_seconds",
            "Time from a request's arrival to the first body byte sent back to its client.",
            ("provider",),
            LATENCY_BUCKETS,
        )
        self._stream_duration = _Histogram(
            histograms,
            "sentinel_stream_duration_seconds",
            'Time from the first to the last body byte of a "stream": true response.',
            ("provider",),
            STREAM_BUCKETS,
        )
        self._store_latency = _Histogram(
            histograms,
            "sentinel_store_latency_seconds",
            "Time of a session store lookup or creation, failures included.",
            (),
            STORE_BUCKETS,
        )
        self.open_streams = Gauge(gauges, "sentinel_open_streams", "Responses being relayed now.")
        self._breaker_open = Gauge(
            gauges,
            "sentinel_store_breaker_open",
            "Workers whose session store circuit breaker is open (the store is not asked).",
        )
        self._request_cells: dict[tuple[str, str, int], int] = {}
        self._session_cells: dict[str, int] = {}
        self._provider_cells: dict[tuple[_Counter, str], int] = {}
        self._registry = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(self._registry, path=slot.directory)  # type: ignore[no-untyped-call]

    def configure(self, config: Config) -> None:
        """Label models by `config` from now on (a reloaded configuration); counts so far
        stay as they are."""
        self._models = model_labels(config)

    def request(self, provider: str, model: str | None, status: int, session: str | None) -> None:
        label = "" if model is None else self._models.get(model, OTHER)
        key = (provider, label, status // 100)
        cell = self._request_cells.get(key)
        if cell is None:
            cell = self._request_cells[key] = self._requests.cell(
                provider, label, f"{status // 100}xx"
            )
        cells = self._counters.cells
        cells[cell] += 1
        if session is not None:
            cell = self._session_cells.get(session)
            if cell is None:
                cell = self._session_cells[session] = self._sessions.cell(session)
            cells[cell] += 1

    def upstream_latency(self, provider: str, seconds: float) -> None:
        self._upstream_latency.observe(seconds, provider)

    def first_byte(self, provider: str, seconds: float) -> None:
        self._first_byte.observe(seconds, provider)

    def stream_duration(self, provider: str, seconds: float) -> None:
        self._stream_duration.observe(seconds, provider)

    def store_call(self, seconds: float, ok: bool) -> None:
        self._store_latency.observe(seconds)
        if not ok:
            self._counters.cells[self._store_errors] += 1

    def breaker_open(self, is_open: bool) -> None:
        self._breaker_open.set(1.0 if is_open else 0.0)

    def broken_stream(self, provider: str) -> None:
        self._count(self._broken_streams, provider)

    def failover(self, provider: str) -> None:
        """A request failed on `provider` and was retried on another target."""
        self._count(self._failovers, provider)

    def ejection(self, provider: str) -> None:
        """A target of `provider` was taken out of rotation."""
        self._count(self._ejections, provider)

    def _count(self, counter: _Counter, provider: str) -> None:
        cell = self._provider_cells.get((counter, provider))
        if cell is None:
            cell = self._provider_cells[(counter, provider)] = counter.cell(provider)
        self._counters.cells[cell] += 1

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self._registry), CONTENT_TYPE_LATEST

    def close(self) -> None:
        for values in (self._counters, self._histograms, self._gauges):
            values.close()
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)


class MeteredStore:
    """A session store whose lookups are timed and counted, and whose circuit breaker's
    state goes to the metrics when a call changes it (a scrape may reach another worker,
    so its state cannot be read at scrape time)."""

    def __init__(
        self, store: SessionStore, metrics: Metrics, breaker: CircuitBreaker | None = None
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._breaker = breaker
        self._open = False

    async def get_or_create(
        self, conversation_id: str, external_id: str | None, make: Maker
    ) -> tuple[Session, bool]:
        started = time.perf_counter()
        try:
            found = await self._store.get_or_create(conversation_id, external_id, make)
        except StoreUnavailable:
            self._done(started, False)
            raise
        self._done(started, True)
        return found

    def _done(self, started: float, ok: bool) -> None:
        self._metrics.store_call(time.perf_counter() - started, ok)
        if self._breaker is not None:
            is_open = self._breaker.state != "closed"
            if is_open is not self._open:
                self._open = is_open
                self._metrics.breaker_open(is_open)

    async def repin(self, failed: Session, replacement: Session) -> Session:
        return await self._store.repin(failed, replacement)

    def set_ttl(self, seconds: int) -> None:
        self._store.set_ttl(seconds)

    async def get(self, conversation_id: str, external_id: str | None = None) -> Session | None:
        return await self._store.get(conversation_id, external_id)

    async def delete(self, conversation_id: str, external_id: str | None = None) -> bool:
        return await self._store.delete(conversation_id, external_id)

    async def ping(self) -> bool:
        return await self._store.ping()

    async def aclose(self) -> None:
        await self._store.aclose()
