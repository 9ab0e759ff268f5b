"""Small asyncio HTTP/1.1 clients for the benchmark (raw sockets, no client library).

- measure_ttfb: one keep-alive connection, N sequential streaming requests; for each, the time
  from sending the request to the first byte of the response body (and to the end).
- hold_streams: N concurrent streaming requests held open (for memory measurements).
- prime: one request for each conversation id of wrk's pool, so that the measured runs find
  every session already stored.

Both send the same chat body as bench/wrk/chat.lua, with "stream": true.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

CHAT_PATH = "/v1/chat/completions"


def chat_request(port: int, conversation_id: str, *, stream: bool, path: str = CHAT_PATH) -> bytes:
    """The raw bytes of one POST, with the same body shape as bench/wrk/chat.lua."""
    payload: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Benchmark request: reply with a short sentence."},
        ],
        "conversation_id": conversation_id,
    }
    if stream:
        payload["stream"] = True
    body = json.dumps(payload, separators=(",", ":")).encode()
    head = (
        f"POST {path} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        "Content-Type: application/json\r\n"
        "Authorization: Bearer sk-bench\r\n"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    )
    return head.encode() + body


class ResponseError(Exception):
    """A response that is not a complete 2xx."""


@dataclass
class Response:
    status: int
    keep_alive: bool
    body_bytes: int
    tail: bytes


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """A response's status and headers (names lower-cased)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            key, value = line.split(":", 1)
            headers[key.strip().lower()] = value.strip()
    return status, headers


async def read_response(
    reader: asyncio.StreamReader,
    on_first_body_byte: Callable[[], None] | None = None,
    on_chunk: Callable[[], Awaitable[None]] | None = None,
) -> Response:
    """Read one response (Content-Length, chunked or until EOF).

    on_first_body_byte is called as soon as the first byte of the body is on hand: for chunked
    bodies, once the first chunk-size line has arrived. on_chunk is awaited after every chunk.
    """
    status, headers = await read_head(reader)
    keep_alive = headers.get("connection", "").lower() != "close"
    total = 0
    tail = b""
    first = True
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailers
                break
            if first and on_first_body_byte is not None:
                on_first_body_byte()
            first = False
            data = await reader.readexactly(size + 2)
            total += size
            tail = (tail + data[:-2])[-64:]
            if on_chunk is not None:
                await on_chunk()
    elif "content-length" in headers:
        length = int(headers["content-length"])
        if length:
            data = await reader.readexactly(1)
            if on_first_body_byte is not None:
                on_first_body_byte()
            data += await reader.readexactly(length - 1)
            total = length
            tail = data[-64:]
    else:
        keep_alive = False
        while chunk := await reader.read(65536):
            if first and on_first_body_byte is not None:
                on_first_body_byte()
            first = False
            total += len(chunk)
            tail = (tail + chunk)[-64:]
            if on_chunk is not None:
                await on_chunk()
    return Response(status, keep_alive, total, tail)


async def prime(
    port: int, pool: int, *, passes: int = 2, concurrency: int = 64, timeout: float = 30.0
) -> int:
    """`passes` non-streaming requests for each of bench-0 .. bench-<pool-1>, one pass after
    the other, on `concurrency` keep-alive connections: the first pass makes the sessions,
    the second reads each back into the near-cache, as a conversation's second request
    does. Returns the number of requests that failed."""
    ids = iter([n for _ in range(passes) for n in range(pool)])
    failed = 0

    async def worker() -> None:
        nonlocal failed
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        try:
            for n in ids:
                try:
                    if reader is None or writer is None:
                        reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.write(chat_request(port, f"bench-{n}", stream=False))
                    response = await asyncio.wait_for(read_response(reader), timeout)
                except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
                    failed += 1
                    if writer is not None:
                        writer.close()
                    reader = writer = None
                    continue
                if not 200 <= response.status < 300:
                    failed += 1
                if not response.keep_alive:
                    writer.close()
                    reader = writer = None
        finally:
            if writer is not None:
                writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return failed


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(pct / 100.0 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def _stamp(times: list[float]) -> Callable[[], None]:
    def stamp() -> None:
        times.append(time.perf_counter())

    return stamp


@dataclass
class TtfbResult:
    requests: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    ttfb_ms: list[float] = field(default_factory=list)
    total_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "requests": self.requests,
            "errors": self.errors,
            "error_samples": self.error_samples[:5],
        }
        if self.ttfb_ms:
            out |= {
                "ttfb_p50_ms": statistics.median(self.ttfb_ms),
                "ttfb_p90_ms": percentile(self.ttfb_ms, 90),
                "ttfb_p99_ms": percentile(self.ttfb_ms, 99),
                "ttfb_min_ms": min(self.ttfb_ms),
                "total_p50_ms": statistics.median(self.total_ms),
            }
        return out


async def measure_ttfb(
    port: int, requests: int, *, warmup: int = 5, ids: int = 5, timeout: float = 30.0
) -> TtfbResult:
    """Sequential streaming requests on one keep-alive connection (reconnecting if closed).

    The warm-up requests use the same conversation ids as the measured ones, so the measured
    requests find their sessions already stored.
    """
    result = TtfbResult()
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    try:
        for i in range(warmup + requests):
            request = chat_request(port, f"bench-ttfb-{i % ids}", stream=True)
            first: list[float] = []
            try:
                if writer is None or reader is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                start = time.perf_counter()
                writer.write(request)
                response = await asyncio.wait_for(read_response(reader, _stamp(first)), timeout)
                end = time.perf_counter()
                if not first:
                    raise ResponseError("empty body")
                if not 200 <= response.status < 300:
                    raise ResponseError(f"status {response.status}")
                if not response.tail.rstrip().endswith(b"data: [DONE]"):
                    raise ResponseError(f"stream did not end in [DONE]: {response.tail!r}")
            except (
                TimeoutError,
                OSError,
                asyncio.IncompleteReadError,
                ValueError,
                ResponseError,
            ) as exc:
                if i >= warmup:
                    result.requests += 1
                    result.errors += 1
                    result.error_samples.append(f"{type(exc).__name__}: {exc}")
                if writer is not None:
                    writer.close()
                reader = writer = None
                continue
            if i >= warmup:
                result.requests += 1
                result.ttfb_ms.append((first[0] - start) * 1000.0)
                result.total_ms.append((end - start) * 1000.0)
            if not response.keep_alive:
                writer.close()
                reader = writer = None
    finally:
        if writer is not None:
            writer.close()
    return result


@dataclass
class HoldResult:
    requested: int
    opened: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    open_seconds: float = 0.0
    chunks: int = 0
    samples: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "requested": self.requested,
            "opened": self.opened,
            "errors": self.errors,
            "error_samples": self.error_samples[:5],
            "open_seconds": round(self.open_seconds, 3),
            "chunks_received": self.chunks,
        } | self.samples


async def hold_streams(
    port: int,
    count: int,
    *,
    sample: Callable[[], Awaitable[dict[str, float]]],
    open_timeout: float = 60.0,
    connect_concurrency: int = 100,
) -> HoldResult:
    """Open `count` streaming requests at once, wait until each has its first body byte, await
    `sample()` while they are all held open, then close them all."""
    result = HoldResult(requested=count)
    all_open = asyncio.Event()
    gate = asyncio.Semaphore(connect_concurrency)
    writers: list[asyncio.StreamWriter] = []

    def opened() -> None:
        result.opened += 1
        if result.opened + result.errors >= count:
            all_open.set()

    async def on_chunk() -> None:
        result.chunks += 1

    async def one(i: int) -> None:
        got_first = False

        def first() -> None:
            nonlocal got_first
            got_first = True
            opened()

        try:
            async with gate:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writers.append(writer)
                writer.write(chat_request(port, f"bench-hold-{i}", stream=True))
            response = await read_response(reader, first, on_chunk)
            if not 200 <= response.status < 300:
                raise ResponseError(f"status {response.status}")
        except asyncio.CancelledError:
            raise
        except (OSError, asyncio.IncompleteReadError, ValueError, ResponseError) as exc:
            result.errors += 1
            result.error_samples.append(f"{type(exc).__name__}: {exc}")
            if got_first:
                result.opened -= 1
            if result.opened + result.errors >= count:
                all_open.set()

    start = time.perf_counter()
    tasks = [asyncio.create_task(one(i)) for i in range(count)]
    try:
        try:
            await asyncio.wait_for(all_open.wait(), open_timeout)
        except TimeoutError:
            result.error_samples.append(f"only {result.opened} of {count} open in {open_timeout}s")
        result.open_seconds = time.perf_counter() - start
        result.samples = await sample()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for writer in writers:
            writer.close()
    return result
