"""The HTTP protocol under uvicorn: deadlines for reading a request, the size of its head,
and the connection cap's answer.

uvicorn's httptools protocol has no deadline before a first response (its keep-alive timer
starts after one, and any byte resets it), and httptools stores header lines of any size.
`ClientProtocol` subclasses it (uvicorn takes it as `http=`) and adds:

- a head deadline: a request's head must be complete `header_timeout_seconds` after its first
  byte (on a new connection: after the connection was accepted; between requests uvicorn's
  keep-alive timeout applies). Late: 408 and close; a connection that sent nothing is closed
  without an answer;
- a head size limit: a head (request line and headers, as sent) growing past MAX_HEADER_BYTES
  gets 431 as soon as it does; what follows is dropped, not parsed or buffered;
- a body rate: each `body_rate_window_seconds` of a body (the first is its grace) must bring
  `body_min_rate_bytes_per_second` on average, unless the app itself paused reading; slower:
  408 and close;
- the OpenAI shape for the 503 of uvicorn's `limit_concurrency` (`server.max_connections`);
- a response head that leaves with the first bytes of its body: uvicorn writes them apart,
  which costs a send() and a TCP segment each (`_HeadJoiningTransport`).

One timer per connection, re-armed lazily: a request only stores its deadline, and the timer,
when it fires, compares. A connection making quick requests re-arms it once per deadline
period, not once per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import resource
from collections.abc import Callable
from typing import Any

from uvicorn._types import ASGI3Application, ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.config import Config as UvicornConfig
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.server import ServerState

from sentinel_proxy.config import ServerConfig
from sentinel_proxy.errors import error_body, error_headers, send_error
from sentinel_proxy.exceptions import HeadersTooLarge, Overloaded, ProxyError, RequestTimeout
from sentinel_proxy.request import MAX_HEADER_BYTES

# A refused connection stays half-closed this long, so the client reads the answer: closing
# with its input unread makes the kernel send a reset, which can discard the answer in flight.
LINGER_SECONDS = 2.0

# A body write at most this large is joined to the head held before it; a larger one follows it.
JOIN_LIMIT = 64 * 1024

# What the connection is reading: between requests, a head, a body; or it was refused.
_IDLE, _HEAD, _BODY, _REFUSED = range(4)


def protocol_class(server: ServerConfig) -> Callable[..., ClientProtocol]:
    """uvicorn's `http` setting: ClientProtocol with the limits of `server`."""
    return functools.partial(ClientProtocol, limits=server)


def raise_file_limit(needed: int) -> None:
    """Raise this process's soft limit on open files to the hard one (worker processes
    inherit it), so that the connection cap, not accept(), is what refuses clients."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(soft, needed) if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


# Methods that run on every request call the base class by name: a zero-argument super()
# costs about 0.2 µs a call, several times a request.
_Base = HttpToolsProtocol


class ClientProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the deadlines and limits of the module docstring."""

    def __init__(
        self,
        config: UvicornConfig,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: ServerConfig,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._limits = limits
        self._phase = _HEAD
        # Head: its bytes so far. Body: bytes in the current window.
        self._count = 0
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        # When the timer fires; infinity when there is none.
        self._alarm = math.inf

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = self._joiner = _HeadJoiningTransport(transport, self.loop)
        self._begin(_HEAD, self._limits.header_timeout_seconds)

    def connection_lost(self, exc: Exception | None) -> None:
        self._phase = _REFUSED
        self._arm(math.inf)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        phase = self._phase
        if phase == _BODY:
            self._count += len(data)
            _Base.data_received(self, data)
            return
        if phase == _IDLE:
            # Any byte starts the next head's deadline: uvicorn's keep-alive timer restarts on
            # every byte, and blank lines before a request never begin one in the parser.
            self._begin(_HEAD, self._limits.header_timeout_seconds)
        elif phase == _REFUSED:
            return
        room = MAX_HEADER_BYTES - self._count
        if len(data) <= room:
            self._count += len(data)
            _Base.data_received(self, data)
            return
        # Parse only up to the limit: if the head has not ended there, it is too large.
        if room:
            _Base.data_received(self, data[:room])
        if self._phase == _HEAD:
            self._refuse(
                HeadersTooLarge(f"The request headers are larger than {MAX_HEADER_BYTES} bytes.")
            )
        elif not self.transport.is_closing():
            _Base.data_received(self, data[room:])

    def on_headers_complete(self) -> None:
        self._begin(_BODY, self._limits.body_rate_window_seconds)
        self._joiner.hold_next = True
        _Base.on_headers_complete(self)

    def on_message_complete(self) -> None:
        self._phase = _IDLE
        _Base.on_message_complete(self)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        if app is service_unavailable:  # uvicorn's limit_concurrency, in plain text
            app = _over_capacity
        _Base._start_asgi_task(self, cycle, app)

    def _begin(self, phase: int, seconds: float) -> None:
        self._phase = phase
        self._count = 0
        self._deadline = deadline = self.loop.time() + seconds
        if deadline < self._alarm:
            self._arm(deadline)

    def _arm(self, when: float) -> None:
        """Have the timer fire at `when` (never: infinity), instead of when it would."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None if when == math.inf else self.loop.call_at(when, self._check)
        self._alarm = when

    def _check(self) -> None:
        self._timer = None
        self._alarm = math.inf
        phase = self._phase
        if phase == _IDLE or phase == _REFUSED:
            return
        if self.loop.time() < self._deadline:
            self._arm(self._deadline)
            return
        limits = self._limits
        cycle = self.cycle
        if phase == _HEAD:
            if not self._count:
                self._refuse(None)
            elif cycle is None or cycle.response_complete:
                timeout = limits.header_timeout_seconds
                self._refuse(
                    RequestTimeout(f"The request headers did not arrive within {timeout:g} s.")
                )
            else:  # a pipelined head stalled while the previous response is being sent
                self._refuse(None)
            return
        window = limits.body_rate_window_seconds
        rate = limits.body_min_rate_bytes_per_second
        # Reading paused by the app (its buffer is full) is no fault of the client's.
        if self._count >= rate * window or self.flow.read_paused:
            self._begin(_BODY, window)
        elif cycle is not None and not cycle.response_started:
            self._refuse(
                RequestTimeout(f"The request body arrived slower than {rate} bytes per second.")
            )
        else:
            self._refuse(None)

    def _refuse(self, answer: ProxyError | None) -> None:
        """Stop reading requests; answer (`answer`) and close."""
        self._phase = _REFUSED
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # The app's receive() ends with a disconnect and its send() goes nowhere.
            cycle.disconnected = True
            cycle.message_event.set()
        transport = self.transport
        if answer is None or transport.is_closing():
            transport.close()
            return
        transport.write(_raw_response(answer))
        if transport.can_write_eof():
            transport.write_eof()
        # Read (and drop) until the client closes, or for LINGER_SECONDS.
        self.flow.resume_reading()
        self._arm(math.inf)
        self._timer = self.loop.call_later(LINGER_SECONDS, transport.close)


class _HeadJoiningTransport(asyncio.Transport):
    """The connection's transport, holding back the write after `hold_next` is set (the
    response head) until the next write, so both leave in one send(); or, when none comes in
    this turn of the loop (a stream's first chunk is still upstream), sending it alone then."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self.hold_next = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        held = self._held
        if held is not None:
            self._held = None
            if len(data) <= JOIN_LIMIT:
                self._transport.write(held + data)
                return
            self._transport.write(held)
        elif self.hold_next:
            self.hold_next = False
            self._held = bytes(data)
            self._loop.call_soon(self._flush)
            return
        self._transport.write(data)

    def _flush(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held)

    def writelines(self, list_of_data: Any) -> None:
        self._flush()
        self._transport.writelines(list_of_data)

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def get_write_buffer_size(self) -> int:
        held = self._held
        return self._transport.get_write_buffer_size() + (len(held) if held else 0)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)


def _raw_response(exc: ProxyError) -> bytes:
    body = error_body(exc)
    head = [STATUS_LINE[exc.status_code]]
    head += [name + b": " + value + b"\r\n" for name, value in error_headers(exc, body)]
    head.append(b"connection: close\r\n\r\n")
    return b"".join(head) + body


async def _over_capacity(
    scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
) -> None:
    await send_error(
        send,  # type: ignore[arg-type]
        Overloaded("The server has too many open connections; retry shortly."),
        extra_headers=[(b"connection", b"close")],
    )
