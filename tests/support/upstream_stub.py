"""A real OpenAI-compatible upstream on a loopback port, for the proxy to talk to.

The stub is a small ASGI app served by uvicorn in a background thread, on a socket bound here
(port 0), so there is no race for the port. It records every request it receives and answers:

- ``POST /v1/chat/completions``: a fixed ``chat.completion`` (pretty-printed, like OpenAI's) whose
  ``model`` echoes the request's; with ``"stream": true`` an SSE stream of
  ``chat.completion.chunk`` events followed by ``data: [DONE]``;
- ``GET /v1/models``: a model list;
- anything else: 404 in the OpenAI error shape.

Tests compare bytes with :meth:`UpstreamStub.chat_completion_body` and
:meth:`UpstreamStub.stream_body`, which return exactly what the stub sends, and read what the stub
received from :attr:`UpstreamStub.requests`. ``queue_response``/``queue_error`` make the next
request(s) answer something else; ``add_response_header`` adds a header (``set-cookie``) to every
answer; ``configure_stream``/``slow_stream`` shape the SSE stream; ``break_stream`` makes it end
without its terminating chunk (the connection cut, as an upstream that dies mid-stream),
``flood_stream`` makes it endless large events sent as fast as the reader takes them, and
``delay_response`` holds every answer's headers back, ``hold_streams`` holds streams before
their last event until the test lets them go. When a client (the proxy) drops
the connection in the middle of a stream, :attr:`UpstreamStub.upstream_disconnected` is set and
:attr:`UpstreamStub.disconnected_at` holds the ``time.monotonic()`` of that moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import uvicorn

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

CREATED = 1_700_000_000
COMPLETION_ID = "chatcmpl-stub0123456789"
REPLY_TEXT = "Hello! I am the upstream stub."
SYSTEM_FINGERPRINT = "fp_stub0001"
MODEL_IDS = ("gpt-4o-mini", "gpt-4o", "m-a", "m-b")
DEFAULT_STREAM_CHUNKS = 5


@dataclass
class RecordedRequest:
    """One request as the stub received it, and what it answered."""

    method: str
    path: str
    query_string: bytes
    headers: list[tuple[str, str]]
    body: bytes
    received_at: float
    response_status: int | None = None
    response_headers: list[tuple[str, str]] = field(default_factory=list)
    response_body: bytearray = field(default_factory=bytearray)
    response_complete: bool = False
    disconnected: bool = False

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        values = self.header_values(name)
        return values[0] if values else None

    def header_values(self, name: str) -> list[str]:
        wanted = name.lower()
        return [value for key, value in self.headers if key == wanted]

    @property
    def header_names(self) -> set[str]:
        return {key for key, _ in self.headers}

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class CannedResponse:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...]


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    """An OpenAI-shaped error body."""
    return json.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}, indent=2
    ).encode()


class UpstreamStub:
    """The stub server. ``start()`` it, ``stop()`` it; the fixtures do both."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests_changed = threading.Condition(self._lock)
        self._requests: list[RecordedRequest] = []
        self._canned: deque[CannedResponse] = deque()
        self._extra_headers: list[tuple[str, str]] = []
        self.stream_chunks = DEFAULT_STREAM_CHUNKS
        self.stream_delay = 0.0
        self.stream_break_after: int | None = None
        self.stream_flood: int | None = None
        self.stream_gate: threading.Event | None = None
        self.response_delay = 0.0
        self.upstream_disconnected = threading.Event()
        self.disconnected_at: float | None = None
        self.stream_started = threading.Event()
        self.stream_finished = threading.Event()
        self._closing = False
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self.port = 0

    # -- addresses ------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """What a provider's ``base_url`` should be to reach this stub."""
        return f"{self.url}/v1"

    @property
    def host_header(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- life cycle -----------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        self._socket = sock
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self,
            lifespan="off",
            ws="none",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=2,
        )
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(
            target=server.run,
            kwargs={"sockets": [sock]},
            name=f"upstream-stub-{self.port}",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"upstream stub on port {self.port} failed to start")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"upstream stub on port {self.port} not started in {timeout} s")
            time.sleep(0.01)  # readiness poll with a deadline

    def stop(self, timeout: float = 10.0) -> None:
        self._closing = True
        server, thread = self._server, self._thread
        if server is not None and thread is not None:
            server.should_exit = True
            thread.join(timeout=timeout / 2)
            if thread.is_alive():
                server.force_exit = True
                thread.join(timeout=timeout / 2)
            if thread.is_alive():
                raise RuntimeError(f"upstream stub on port {self.port} did not stop")
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None

    def reset(self) -> None:
        """Forget recorded requests, queued answers, extra headers and stream settings."""
        with self._lock:
            self._requests.clear()
            self._canned.clear()
            self._extra_headers.clear()
        self.stream_chunks = DEFAULT_STREAM_CHUNKS
        self.stream_delay = 0.0
        self.stream_break_after = None
        self.stream_flood = None
        self.response_delay = 0.0
        self.upstream_disconnected.clear()
        self.disconnected_at = None
        self.stream_started.clear()
        self.stream_finished.clear()

    # -- configuration --------------------------------------------------------------------
    def queue_response(
        self,
        status: int,
        body: bytes | dict[str, Any] | list[Any],
        headers: Iterable[tuple[str, str]] = (),
        times: int = 1,
    ) -> None:
        """Make the next ``times`` requests (any path) answer this instead."""
        raw = body if isinstance(body, bytes) else json.dumps(body, indent=2).encode()
        names = {name.lower() for name, _ in headers}
        all_headers = tuple((name.lower(), value) for name, value in headers)
        if "content-type" not in names:
            all_headers += (("content-type", "application/json"),)
        canned = CannedResponse(status, raw, all_headers)
        with self._lock:
            self._canned.extend([canned] * times)

    def queue_error(
        self,
        status: int,
        message: str,
        type_: str = "server_error",
        code: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
        times: int = 1,
    ) -> bytes:
        """Queue an OpenAI-shaped error; returns the body bytes it will send."""
        body = error_body(message, type_, code)
        self.queue_response(status, body, headers, times)
        return body

    def queue_rate_limit(self, message: str = "Rate limit reached for stub-model.") -> bytes:
        """A 429 with ``retry-after: 0`` so that SDKs do not wait."""
        return self.queue_error(
            429,
            message,
            type_="requests",
            code="rate_limit_exceeded",
            headers=[("retry-after", "0"), ("x-ratelimit-remaining-requests", "0")],
        )

    def add_response_header(self, name: str, value: str) -> None:
        """Add a header to every answer from now on (``set-cookie`` for instance)."""
        with self._lock:
            self._extra_headers.append((name.lower(), value))

    def configure_stream(self, chunks: int = DEFAULT_STREAM_CHUNKS, delay: float = 0.0) -> None:
        """``chunks`` content chunks (plus a role chunk, a final chunk and [DONE]), ``delay``
        seconds between two events."""
        self.stream_chunks = chunks
        self.stream_delay = delay

    def slow_stream(self, seconds: float = 30.0, interval: float = 0.1) -> None:
        """A stream that lasts about ``seconds``, one event every ``interval`` seconds."""
        self.configure_stream(chunks=max(1, int(seconds / interval)), delay=interval)

    def break_stream(self, after_events: int = 2) -> None:
        """Streams send ``after_events`` events, then the connection is cut: the body ends
        without its terminating chunk."""
        self.stream_break_after = after_events

    def flood_stream(self, event_size: int = 64 * 1024) -> None:
        """Streams send events of about ``event_size`` bytes, without end, as fast as the
        reader takes them, until the reader goes away (enough to fill every buffer between
        the stub and a client that stops reading)."""
        self.stream_flood = event_size

    def hold_streams(self) -> threading.Event:
        """Streams stop before their last event until the returned event is set."""
        self.stream_gate = threading.Event()
        return self.stream_gate

    def delay_response(self, seconds: float) -> None:
        """Every answer's headers wait ``seconds`` (a model thinking before it answers)."""
        self.response_delay = seconds

    def disconnected_count(self) -> int:
        """How many requests lost their reader before their response was complete."""
        with self._lock:
            return sum(1 for r in self._requests if r.disconnected)

    # -- what was received ----------------------------------------------------------------
    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> list[RecordedRequest]:
        """Block until at least ``count`` requests arrived; raise TimeoutError otherwise."""
        with self._requests_changed:
            if not self._requests_changed.wait_for(
                lambda: len(self._requests) >= count, timeout=timeout
            ):
                raise TimeoutError(
                    f"upstream stub received {len(self._requests)} request(s), expected {count}"
                )
            return list(self._requests)

    # -- what is sent ---------------------------------------------------------------------
    @staticmethod
    def chat_completion_body(model: str) -> bytes:
        """The exact bytes of the non-streaming answer for a request naming ``model``."""
        payload = {
            "id": COMPLETION_ID,
            "object": "chat.completion",
            "created": CREATED,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": REPLY_TEXT,
                        "refusal": None,
                        "annotations": [],
                    },
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": 12,
                "completion_tokens": 8,
                "total_tokens": 20,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {
                    "reasoning_tokens": 0,
                    "audio_tokens": 0,
                    "accepted_prediction_tokens": 0,
                    "rejected_prediction_tokens": 0,
                },
            },
            "service_tier": "default",
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        return (json.dumps(payload, indent=2) + "\n").encode()

    @staticmethod
    def stream_pieces(chunks: int) -> list[str]:
        return [f"tok{i} " for i in range(chunks)]

    @classmethod
    def stream_text(cls, chunks: int = DEFAULT_STREAM_CHUNKS) -> str:
        """The assistant text that a stream of ``chunks`` content chunks spells."""
        return "".join(cls.stream_pieces(chunks))

    @classmethod
    def stream_events(cls, model: str, chunks: int = DEFAULT_STREAM_CHUNKS) -> list[bytes]:
        """Every SSE event, in order, as sent (the last one is ``data: [DONE]``)."""

        def chunk(delta: dict[str, Any], finish_reason: str | None) -> bytes:
            payload = {
                "id": COMPLETION_ID,
                "object": "chat.completion.chunk",
                "created": CREATED,
                "model": model,
                "service_tier": "default",
                "system_fingerprint": SYSTEM_FINGERPRINT,
                "choices": [
                    {
                        "index": 0,
                        "delta": delta,
                        "logprobs": None,
                        "finish_reason": finish_reason,
                    }
                ],
            }
            return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"

        events = [chunk({"role": "assistant", "content": "", "refusal": None}, None)]
        events += [chunk({"content": piece}, None) for piece in cls.stream_pieces(chunks)]
        events.append(chunk({}, "stop"))
        events.append(b"data: [DONE]\n\n")
        return events

    @classmethod
    def stream_body(cls, model: str, chunks: int = DEFAULT_STREAM_CHUNKS) -> bytes:
        """The exact bytes of the SSE answer for a streaming request naming ``model``."""
        return b"".join(cls.stream_events(model, chunks))

    @staticmethod
    def models_body() -> bytes:
        payload = {
            "object": "list",
            "data": [
                {"id": model_id, "object": "model", "created": CREATED, "owned_by": "stub"}
                for model_id in MODEL_IDS
            ],
        }
        return (json.dumps(payload, indent=2) + "\n").encode()

    # -- the ASGI app ---------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        record = RecordedRequest(
            method=scope["method"],
            path=scope["path"],
            query_string=scope.get("query_string", b""),
            headers=[
                (name.decode("latin-1").lower(), value.decode("latin-1"))
                for name, value in scope["headers"]
            ],
            body=bytes(body),
            received_at=time.monotonic(),
        )
        with self._requests_changed:
            self._requests.append(record)
            self._requests_changed.notify_all()
            canned = self._canned.popleft() if self._canned else None
            extra_headers = list(self._extra_headers)

        if self.response_delay:
            await self._pause(self.response_delay, asyncio.Event())
        if canned is not None:
            await self._send_full(
                send, record, canned.status, list(canned.headers) + extra_headers, canned.body
            )
            return

        method, path = scope["method"], scope["path"]
        if method == "POST" and path == "/v1/chat/completions":
            try:
                request_json = json.loads(record.body)
                model = str(request_json["model"])
            except (ValueError, KeyError, TypeError):
                body_bytes = error_body("stub: bad chat request", "invalid_request_error", None)
                await self._send_json(send, record, 400, body_bytes, extra_headers)
                return
            if request_json.get("stream") is True:
                await self._send_stream(send, receive, record, model, extra_headers)
            else:
                body_bytes = self.chat_completion_body(model)
                await self._send_json(send, record, 200, body_bytes, extra_headers)
        elif method == "GET" and path == "/v1/models":
            await self._send_json(send, record, 200, self.models_body(), extra_headers)
        else:
            body_bytes = error_body(
                f"stub: no route for {method} {path}", "invalid_request_error", "unknown_url"
            )
            await self._send_json(send, record, 404, body_bytes, extra_headers)

    async def _send_json(
        self,
        send: Send,
        record: RecordedRequest,
        status: int,
        body: bytes,
        extra_headers: list[tuple[str, str]],
    ) -> None:
        headers = [("content-type", "application/json"), *extra_headers]
        await self._send_full(send, record, status, headers, body)

    async def _send_full(
        self,
        send: Send,
        record: RecordedRequest,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes,
    ) -> None:
        headers = [*headers, ("content-length", str(len(body)))]
        record.response_status = status
        record.response_headers = headers
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})
        record.response_body += body
        record.response_complete = True

    async def _send_stream(
        self,
        send: Send,
        receive: Receive,
        record: RecordedRequest,
        model: str,
        extra_headers: list[tuple[str, str]],
    ) -> None:
        events = self.stream_events(model, self.stream_chunks)
        delay = self.stream_delay
        finished = False
        gone = asyncio.Event()

        async def watch_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            if not finished:
                record.disconnected = True
                self.disconnected_at = time.monotonic()
                self.upstream_disconnected.set()
            gone.set()

        watcher = asyncio.create_task(watch_disconnect())
        try:
            headers = [
                ("content-type", "text/event-stream; charset=utf-8"),
                ("cache-control", "no-cache"),
                *extra_headers,
            ]
            record.response_status = 200
            record.response_headers = headers
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
                }
            )
            self.stream_started.set()
            if self.stream_flood is not None:
                await self._flood(send, gone, self.stream_flood)
                return
            all_sent = False
            for index, event in enumerate(events):
                if index and delay > 0:
                    await self._pause(delay, gone)
                if index == len(events) - 1 and self.stream_gate is not None:
                    while not (self.stream_gate.is_set() or gone.is_set() or self._closing):
                        await asyncio.sleep(0.01)
                if gone.is_set() or self._closing:
                    break
                if index == self.stream_break_after:
                    # Returning without the last message: uvicorn closes the connection.
                    return
                await send({"type": "http.response.body", "body": event, "more_body": True})
                record.response_body += event
            else:
                all_sent = True
            if not gone.is_set():
                # From here on a disconnect is the normal end of the exchange.
                finished = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                record.response_complete = all_sent
            if all_sent:
                self.stream_finished.set()
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _flood(self, send: Send, gone: asyncio.Event, size: int) -> None:
        event = b"data: " + b"x" * max(0, size - 8) + b"\n\n"
        while not gone.is_set() and not self._closing:
            await send({"type": "http.response.body", "body": event, "more_body": True})
            # uvicorn's send does not yield while the reader keeps up; the disconnect
            # watcher needs a turn of the loop.
            await asyncio.sleep(0)

    async def _pause(self, seconds: float, gone: asyncio.Event) -> None:
        """Wait ``seconds``, but return early when the peer is gone or the stub is closing."""
        deadline = time.monotonic() + seconds
        while not gone.is_set() and not self._closing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(gone.wait(), timeout=min(remaining, 0.05))
