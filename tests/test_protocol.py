"""ClientProtocol on a fake loop and transport: the head size limit to the byte, deadlines
measured in the loop's own (fake) time, and the one timer per connection."""

from __future__ import annotations

import dataclasses
import json
import resource
import subprocess
import sys
from collections.abc import Callable, Coroutine, Generator
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState

from sentinel_proxy.config import ServerConfig
from sentinel_proxy.protocol import JOIN_LIMIT, LINGER_SECONDS, ClientProtocol, protocol_class
from sentinel_proxy.request import MAX_HEADER_BYTES

LIMITS = ServerConfig(
    header_timeout_seconds=10.0, body_min_rate_bytes_per_second=1000, body_rate_window_seconds=5.0
)
GET = b"GET /v1/models HTTP/1.1\r\nhost: proxy\r\n\r\n"


class FakeTimer:
    def __init__(self, when: float, callback: Callable[..., None], args: tuple[Any, ...]) -> None:
        self._when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def when(self) -> float:
        return self._when

    def cancel(self) -> None:
        self.cancelled = True


class Pending:
    """An awaitable that never completes: an app waiting for ever."""

    def __await__(self) -> Generator[None, None, None]:
        while True:
            yield


class FakeTask:
    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        pass


class FakeLoop:
    """The loop calls the protocol makes, in a time that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.timers: list[FakeTimer] = []
        self.armed: list[FakeTimer] = []
        self.ready: list[Callable[[], None]] = []
        self.suspended: list[Coroutine[Any, Any, None]] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[..., None], *args: Any) -> FakeTimer:
        timer = FakeTimer(when, callback, args)
        self.timers.append(timer)
        self.armed.append(timer)
        return timer

    def call_soon(self, callback: Callable[[], None]) -> None:
        self.ready.append(callback)

    def run_ready(self) -> None:
        """The rest of this turn of the loop: the callbacks `call_soon` queued."""
        ready, self.ready = self.ready, []
        for callback in ready:
            callback()

    def call_later(self, delay: float, callback: Callable[..., None], *args: Any) -> FakeTimer:
        return self.call_at(self.now + delay, callback, *args)

    def create_task(self, coro: Coroutine[Any, Any, None]) -> FakeTask:
        # Runs the app up to its first wait; apps here never wait on the real loop.
        try:
            coro.send(None)
        except StopIteration:
            pass
        else:
            self.suspended.append(coro)
        return FakeTask()

    def advance(self, seconds: float) -> None:
        self.run_ready()
        end = self.now + seconds
        while True:
            due = [t for t in self.timers if not t.cancelled and t.when() <= end]
            if not due:
                break
            timer = min(due, key=FakeTimer.when)
            self.timers.remove(timer)
            self.now = max(self.now, timer.when())
            timer.callback(*timer.args)
        self.now = end

    def close(self) -> None:
        for coro in self.suspended:
            coro.close()


class FakeTransport:
    def __init__(self) -> None:
        self.written = bytearray()
        self.writes: list[bytes] = []
        self.closing = False
        self.eof_written = False
        self.reading = True

    def get_extra_info(self, name: str) -> Any:
        return {"sockname": ("127.0.0.1", 8080), "peername": ("127.0.0.1", 50000)}.get(name)

    def write(self, data: bytes) -> None:
        assert not self.eof_written, "written after the end of the output"
        assert not self.closing, "written after close"
        self.written += data
        self.writes.append(bytes(data))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def close(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


async def answer(scope: Any, receive: Any, send: Any) -> None:
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"ok"})


async def wait_for_ever(scope: Any, receive: Any, send: Any) -> None:
    await Pending()


class Connection:
    def __init__(self, app: Any, limits: ServerConfig = LIMITS) -> None:
        config = uvicorn.Config(app=app, lifespan="off", proxy_headers=False, log_config=None)
        self.loop = FakeLoop()
        self.transport = FakeTransport()
        self.state = ServerState()
        self.protocol = protocol_class(limits)(
            config=config, server_state=self.state, app_state={}, _loop=self.loop
        )
        assert isinstance(self.protocol, ClientProtocol)
        self.protocol.connection_made(self.transport)  # type: ignore[arg-type]

    def send(self, data: bytes, chunk: int | None = None) -> None:
        step = chunk or len(data) or 1
        for start in range(0, len(data), step):
            self.protocol.data_received(data[start : start + step])

    @property
    def requests_started(self) -> int:
        return self.state.total_requests + len(self.loop.suspended)

    def status(self) -> int | None:
        if not self.transport.written:
            return None
        return int(self.transport.written.split(b" ", 2)[1])

    def error(self) -> dict[str, Any]:
        body = bytes(self.transport.written).split(b"\r\n\r\n", 1)[1]
        payload: dict[str, Any] = json.loads(body)["error"]
        return payload

    def close(self) -> None:
        if not self.transport.closing:
            self.transport.close()
        self.protocol.connection_lost(None)
        self.loop.close()


@pytest.fixture
def connect() -> Generator[Callable[..., Connection], None, None]:
    made: list[Connection] = []

    def factory(app: Any = answer, limits: ServerConfig = LIMITS) -> Connection:
        made.append(Connection(app, limits))
        return made[-1]

    yield factory
    for connection in made:
        connection.close()


def head_of(size: int) -> bytes:
    """A GET head of exactly `size` bytes, its blank line included."""
    start = b"GET /v1/models HTTP/1.1\r\nhost: proxy\r\nx-pad: "
    end = b"\r\n\r\n"
    return start + b"a" * (size - len(start) - len(end)) + end


@pytest.mark.parametrize("chunk", [None, 1000, 7])
def test_a_head_of_exactly_the_limit_is_read(
    connect: Callable[..., Connection], chunk: int | None
) -> None:
    connection = connect()
    connection.send(head_of(MAX_HEADER_BYTES), chunk)
    assert connection.status() == 200
    assert connection.requests_started == 1


@pytest.mark.parametrize("chunk", [None, 1000, 7])
def test_a_head_one_byte_over_the_limit_gets_431_and_nothing_more_is_parsed(
    connect: Callable[..., Connection], chunk: int | None
) -> None:
    connection = connect()
    connection.send(head_of(MAX_HEADER_BYTES + 1), chunk)
    connection.send(GET)

    assert connection.status() == 431
    assert connection.error()["code"] == "request_headers_too_large"
    assert connection.transport.eof_written
    assert connection.requests_started == 0
    connection.loop.advance(LINGER_SECONDS)
    assert connection.transport.closing


def test_the_body_read_with_its_head_does_not_count_as_head(
    connect: Callable[..., Connection],
) -> None:
    connection = connect(wait_for_ever)
    head = b"POST /v1/embeddings HTTP/1.1\r\nhost: proxy\r\ncontent-length: 200000\r\n\r\n"
    connection.send(head + b"x" * 200_000)
    assert connection.status() is None
    assert connection.requests_started == 1
    assert not connection.transport.closing


def test_a_head_not_complete_at_the_deadline_gets_408(
    connect: Callable[..., Connection],
) -> None:
    connection = connect()
    connection.send(b"GET /v1/models HTTP/1.1\r\n")
    connection.loop.advance(9.9)
    assert connection.status() is None
    connection.loop.advance(0.1)
    assert connection.status() == 408
    assert connection.error()["code"] == "request_timeout"


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(
    connect: Callable[..., Connection],
) -> None:
    connection = connect()
    connection.loop.advance(10.0)
    assert connection.transport.closing
    assert connection.transport.written == b""


def test_blank_lines_between_requests_do_not_hold_a_connection_open(
    connect: Callable[..., Connection],
) -> None:
    connection = connect()
    connection.send(GET)
    assert connection.status() == 200
    connection.transport.written.clear()
    # Each blank line restarts uvicorn's keep-alive timer and begins no request.
    for _ in range(10):
        connection.send(b"\r\n")
        connection.loop.advance(0.999)
    assert not connection.transport.closing
    connection.loop.advance(0.01)
    assert connection.status() == 408


def test_an_idle_keep_alive_connection_has_its_whole_deadline_for_the_next_head(
    connect: Callable[..., Connection],
) -> None:
    limits = dataclasses.replace(LIMITS, header_timeout_seconds=1.0)
    connection = connect(answer, limits)
    connection.send(GET)
    connection.loop.advance(4.0)  # longer than the deadline, within uvicorn's keep-alive
    connection.send(b"GET /v1/models HTTP/1.1\r\n")
    connection.loop.advance(0.9)
    connection.send(b"host: proxy\r\n\r\n")
    assert connection.state.total_requests == 2
    assert not connection.transport.closing


def test_many_requests_on_one_connection_arm_one_timer(
    connect: Callable[..., Connection],
) -> None:
    connection = connect(answer, dataclasses.replace(LIMITS, body_rate_window_seconds=10.0))
    for _ in range(200):
        connection.send(GET)
        connection.loop.advance(0.01)
    assert connection.state.total_requests == 200
    checks = [t for t in connection.loop.armed if t.callback == connection.protocol._check]
    assert len(checks) == 1


def test_a_body_slower_than_the_minimum_rate_gets_408(
    connect: Callable[..., Connection],
) -> None:
    connection = connect(wait_for_ever)
    connection.send(
        b"POST /v1/embeddings HTTP/1.1\r\nhost: proxy\r\ncontent-length: 100000\r\n\r\n"
    )
    # 5000 bytes in the first window of 5 s: the minimum, just.
    for _ in range(5):
        connection.send(b"x" * 1000)
        connection.loop.advance(1.0)
    assert connection.status() is None
    for _ in range(5):
        connection.send(b"x" * 999)
        connection.loop.advance(1.0)
    assert connection.status() == 408
    assert "slower than 1000 bytes per second" in connection.error()["message"]


def test_a_body_the_app_is_not_reading_is_not_the_clients_fault(
    connect: Callable[..., Connection],
) -> None:
    connection = connect(wait_for_ever)
    connection.send(
        b"POST /v1/embeddings HTTP/1.1\r\nhost: proxy\r\ncontent-length: 100000\r\n\r\n"
    )
    connection.protocol.flow.pause_reading()
    connection.loop.advance(20.0)
    assert connection.status() is None
    connection.protocol.flow.resume_reading()
    connection.loop.advance(5.0)
    assert connection.status() == 408


def start(headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {"type": "http.response.start", "status": 200, "headers": headers}


def test_a_head_and_its_body_leave_in_one_write(connect: Callable[..., Connection]) -> None:
    connection = connect()
    connection.send(GET + GET)
    writes = connection.transport.writes
    assert len(writes) == 2
    assert all(w.startswith(b"HTTP/1.1 200 OK\r\n") and w.endswith(b"\r\n\r\nok") for w in writes)


def test_a_head_whose_body_is_not_there_yet_leaves_at_the_end_of_the_loop_turn(
    connect: Callable[..., Connection],
) -> None:
    async def head_then_wait(scope: Any, receive: Any, send: Any) -> None:
        await send(start([(b"content-type", b"text/event-stream")]))
        await Pending()

    connection = connect(head_then_wait)
    connection.send(GET)
    assert connection.transport.writes == []
    connection.loop.run_ready()
    assert connection.status() == 200
    assert connection.transport.written.endswith(b"\r\n\r\n")


def test_a_body_past_the_join_limit_follows_its_head(connect: Callable[..., Connection]) -> None:
    body = b"x" * (JOIN_LIMIT + 1)

    async def large(scope: Any, receive: Any, send: Any) -> None:
        await send(start([(b"content-length", str(len(body)).encode())]))
        await send({"type": "http.response.body", "body": body})

    connection = connect(large)
    connection.send(GET)
    head, sent = connection.transport.writes
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")
    assert sent == body


def test_a_held_head_is_written_before_the_connection_closes(
    connect: Callable[..., Connection],
) -> None:
    async def head_then_fail(scope: Any, receive: Any, send: Any) -> None:
        await send(start([(b"content-length", b"2")]))
        raise RuntimeError("the app failed after its head")

    connection = connect(head_then_fail)
    connection.send(GET)
    assert connection.status() == 200
    assert connection.transport.closing


def test_the_soft_file_limit_is_raised_to_the_hard_one() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"the hard limit on open files is only {hard}")
    # In a process of its own, whose soft limit is first lowered.
    script = (
        "import resource; from sentinel_proxy.protocol import raise_file_limit; "
        f"resource.setrlimit(resource.RLIMIT_NOFILE, (256, {hard})); "
        "raise_file_limit(300); print(*resource.getrlimit(resource.RLIMIT_NOFILE))"
    )

    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )

    soft_after, hard_after = map(int, done.stdout.split())
    assert hard_after == hard
    assert soft_after == (300 if hard == resource.RLIM_INFINITY else hard)
