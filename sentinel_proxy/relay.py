"""Relaying the upstream response to the client as it arrives, and noticing when the
client goes away."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from sentinel_proxy.rewrite import filter_headers
from sentinel_proxy.upstream import UpstreamResponse

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def relay(
    response: UpstreamResponse,
    send: Send,
    *,
    extra_headers: Iterable[tuple[bytes, bytes]],
    before_end: Callable[[], None],
) -> None:
    """Status, headers less hop-by-hop ones, then the body bytes exactly as they come.

    Raw ASGI sends, not StreamingResponse: same bytes at a fraction of the cost.
    `before_end` runs just before the last message, once nothing can be cut short."""
    headers = filter_headers(response.headers)
    headers.extend(extra_headers)
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    async for chunk in response.chunks():
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    before_end()
    await send({"type": "http.response.body", "body": b"", "more_body": False})


# Most requests are over sooner than this; only longer ones pay for a watching task.
WATCH_AFTER_SECONDS = 0.05


class DisconnectWatcher:
    """Cancels the task serving a request when its client disconnects.

    The request body has been read by then, so the next ASGI message can only be
    `http.disconnect`. uvicorn drops sends to a gone client silently, so without this
    a slow upstream stream would run on, and bill, for nobody. The watching task starts
    only once the request has lasted `delay`: a client that leaves earlier is noticed
    that much later, and the many short requests cost a timer instead of a task."""

    __slots__ = ("_receive", "_task", "_timer", "_waiter", "fired")

    def __init__(self, receive: Receive, *, delay: float = WATCH_AFTER_SECONDS) -> None:
        self.fired = False
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._receive = receive
        self._waiter: asyncio.Future[dict[str, Any]] | None = None
        self._timer = asyncio.get_running_loop().call_later(delay, self._watch)

    def _watch(self) -> None:
        self._waiter = asyncio.ensure_future(self._receive())
        self._waiter.add_done_callback(self._on_message)

    def _on_message(self, waiter: asyncio.Future[dict[str, Any]]) -> None:
        if waiter.cancelled() or waiter.exception() is not None:
            return
        if waiter.result().get("type") == "http.disconnect":
            self.fired = True
            self._task.cancel()

    def stop(self) -> None:
        self._timer.cancel()
        if self._waiter is not None:
            self._waiter.remove_done_callback(self._on_message)
            self._waiter.cancel()
            self._waiter = None
