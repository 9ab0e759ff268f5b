"""Relaying the upstream response to the client as it arrives, and noticing when the
client goes away or stops reading."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from sentinel_proxy.rewrite import filter_headers
from sentinel_proxy.upstream import UpstreamResponse

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

# uvicorn counts the body of these against their Content-Length and fails the response,
# yet they have no body: the header cannot go through.
_NO_BODY_STATUSES = (204, 304)


async def relay(
    response: UpstreamResponse,
    send: Send,
    *,
    extra_headers: Iterable[tuple[bytes, bytes]],
    watcher: DisconnectWatcher,
) -> float:
    """Status, headers less hop-by-hop ones, then the body bytes exactly as they come;
    returns the `time.perf_counter()` at which the first body bytes were sent (for an
    empty body: the end).

    Raw ASGI sends, not StreamingResponse: same bytes at a fraction of the cost. Every
    body send is counted on `watcher` (odd while it waits for the client)."""
    headers = filter_headers(response.headers)
    if response.status_code in _NO_BODY_STATUSES:
        headers = [(n, v) for n, v in headers if n.lower() != b"content-length"]
    headers.extend(extra_headers)
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    first_byte = 0.0
    async for chunk in response.chunks():
        watcher.sends += 1
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
        watcher.sends += 1
        if not first_byte:
            first_byte = time.perf_counter()
    watcher.finish()
    watcher.sends += 1
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    watcher.sends += 1
    return first_byte or time.perf_counter()


# Most requests are over sooner than this; only longer ones pay for a watching task.
WATCH_AFTER_SECONDS = 0.05
# SO_LINGER on with a zero timeout: closing sends a reset and drops unsent bytes.
_RESET = struct.pack("ii", 1, 0)
# A stalled send is noticed between stall_seconds and (1 + 1/STALL_CHECKS) * stall_seconds.
STALL_CHECKS = 4


class DisconnectWatcher:
    """Cancels the task serving a request when its client disconnects, or when it stops
    reading its response for `stall_seconds`.

    The request body has been read by then, so the next ASGI message can only be
    `http.disconnect`. uvicorn drops sends to a gone client silently, so without this
    a slow upstream stream would run on, and bill, for nobody. The watching task starts
    only once the request has lasted `delay`: a client that leaves earlier is noticed
    that much later, and the many short requests cost a timer instead of a task.

    A client that stops reading shows up as a send waiting in uvicorn's drain, which has
    no deadline, while the upstream's read timeout waits for it too (transport.py): the
    upstream connection would be held for ever. One timer per request, from `delay` on, checks every
    stall_seconds / STALL_CHECKS whether the same send is still waiting (`sends` is odd
    and unchanged): cheaper than a deadline around every send."""

    __slots__ = (
        "_receive",
        "_send",
        "_task",
        "_loop",
        "_timer",
        "_waiter",
        "_interval",
        "_finished",
        "_seen",
        "_idle_checks",
        "fired",
        "stalled",
        "sends",
    )

    def __init__(
        self,
        receive: Receive,
        send: Send,
        *,
        stall_seconds: float,
        delay: float = WATCH_AFTER_SECONDS,
    ) -> None:
        self.fired = False
        self.stalled = False
        self.sends = 0
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._receive = receive
        self._send = send
        self._waiter: asyncio.Future[dict[str, Any]] | None = None
        self._interval = stall_seconds / STALL_CHECKS
        self._finished = False
        self._seen = -1
        self._idle_checks = 0
        self._loop = asyncio.get_running_loop()
        self._timer = self._loop.call_later(delay, self._watch)

    def _watch(self) -> None:
        if not self._finished:
            self._waiter = asyncio.ensure_future(self._receive())
            self._waiter.add_done_callback(self._on_message)
        self._timer = self._loop.call_later(self._interval, self._check)

    def _on_message(self, waiter: asyncio.Future[dict[str, Any]]) -> None:
        if waiter.cancelled() or waiter.exception() is not None or self.fired:
            return
        if waiter.result().get("type") == "http.disconnect":
            self.fired = True
            self._task.cancel()

    def _check(self) -> None:
        sends = self.sends
        if sends & 1 and sends == self._seen:
            self._idle_checks += 1
            if self._idle_checks >= STALL_CHECKS:
                self._stall()
                return
        else:
            self._seen = sends
            self._idle_checks = 0
        self._timer = self._loop.call_later(self._interval, self._check)

    def _stall(self) -> None:
        self._stop_waiter()
        self.fired = self.stalled = True
        # Closing would wait for the unread bytes to drain, which they never do, and even
        # an aborted socket lingers in the kernel with them: reset the connection instead.
        # uvicorn's send is a method of the request's cycle, which holds the transport;
        # without it (another server) closing is all we can do.
        transport = getattr(getattr(self._send, "__self__", None), "transport", None)
        if isinstance(transport, asyncio.WriteTransport):
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            transport.abort()
        self._task.cancel()

    def finish(self) -> None:
        """The response is complete but for its last message: a disconnect now cuts
        nothing short. Stall checks go on until `stop`."""
        self._finished = True
        self._stop_waiter()

    def stop(self) -> None:
        self._timer.cancel()
        self._stop_waiter()

    def _stop_waiter(self) -> None:
        if self._waiter is not None:
            self._waiter.remove_done_callback(self._on_message)
            self._waiter.cancel()
            self._waiter = None
