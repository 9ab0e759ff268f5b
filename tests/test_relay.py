"""Relaying a response to an ASGI client, and the watch on clients that leave or stop reading.

The client here is a fake ASGI `send` whose body sends can wait the way uvicorn's drain does
when its client does not read; tests/e2e/test_upstream_faults.py has the real server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import pytest

from sentinel_proxy.relay import DisconnectWatcher, relay
from sentinel_proxy.upstream import UpstreamResponse


class Body(httpx.AsyncByteStream):
    def __init__(self, chunks: Sequence[bytes], pause: float = 0.0) -> None:
        self._chunks = chunks
        self._pause = pause

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            if self._pause:
                await asyncio.sleep(self._pause)  # an upstream that generates slowly
            yield chunk


def upstream_response(
    status: int = 200,
    headers: Sequence[tuple[bytes, bytes]] = (),
    chunks: Sequence[bytes] = (b"data: 1\n\n",),
    pause: float = 0.0,
) -> UpstreamResponse:
    return UpstreamResponse(
        httpx.Response(status, headers=list(headers), stream=Body(chunks, pause))
    )


class Transport(asyncio.WriteTransport):
    def __init__(self) -> None:
        super().__init__()
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


class Client:
    """uvicorn's request cycle as the relay sees it: `send` is a method of an object that
    holds the connection's transport. `stall_at` makes that body send (0-based, the final
    empty one included) wait for ever; `read_time` makes each body send take that long."""

    def __init__(self, stall_at: int | None = None, read_time: float = 0.0) -> None:
        self.transport = Transport()
        self.messages: list[dict[str, Any]] = []
        self._stall_at = stall_at
        self._read_time = read_time
        self._bodies = 0

    async def send(self, message: dict[str, Any]) -> None:
        self.messages.append(message)
        if message["type"] != "http.response.body":
            return
        index, self._bodies = self._bodies, self._bodies + 1
        if index == self._stall_at:
            await asyncio.Event().wait()
        if self._read_time:
            await asyncio.sleep(self._read_time)  # a client that reads slowly

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages[1:])


async def never_disconnects() -> dict[str, Any]:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def serve(
    response: UpstreamResponse, client: Client, *, stall_seconds: float = 60.0
) -> tuple[DisconnectWatcher | None, float]:
    """Relay `response` to `client` in a task of its own, as uvicorn runs a request; return
    the watcher and how long the task ran. A cancelled task is not an error here."""
    watchers: list[DisconnectWatcher] = []

    async def request() -> None:
        watcher = DisconnectWatcher(
            never_disconnects, client.send, stall_seconds=stall_seconds, delay=0.01
        )
        watchers.append(watcher)
        try:
            await relay(response, client.send, extra_headers=[(b"x-extra", b"1")], watcher=watcher)
        finally:
            watcher.stop()

    started = time.monotonic()
    task = asyncio.create_task(request())
    try:
        await asyncio.wait_for(task, timeout=20)
    except asyncio.CancelledError:
        if not task.cancelled():
            raise
    return (watchers[0] if watchers else None), time.monotonic() - started


@pytest.mark.parametrize("status", [204, 304])
async def test_a_response_without_a_body_goes_without_its_content_length(status: int) -> None:
    # uvicorn would wait for those 10 bytes and fail the response with a traceback.
    response = upstream_response(
        status, [(b"Content-Length", b"10"), (b"ETag", b'"v1"')], chunks=[]
    )
    client = Client()
    await serve(response, client)
    start = client.messages[0]
    assert start["status"] == status
    assert start["headers"] == [(b"ETag", b'"v1"'), (b"x-extra", b"1")]
    assert client.messages[-1] == {"type": "http.response.body", "body": b"", "more_body": False}


async def test_other_responses_keep_their_content_length() -> None:
    response = upstream_response(200, [(b"content-length", b"9")], chunks=[b"data: 1\n\n"])
    client = Client()
    await serve(response, client)
    assert client.messages[0]["headers"][0] == (b"content-length", b"9")
    assert client.body == b"data: 1\n\n"


@pytest.mark.parametrize("stall_at", [1, 3], ids=["mid-body", "last-message"])
async def test_a_client_that_stops_reading_is_cut_off(stall_at: int) -> None:
    response = upstream_response(chunks=[b"a", b"b", b"c"])
    client = Client(stall_at=stall_at)

    watcher, took = await serve(response, client, stall_seconds=0.4)

    assert watcher is not None and watcher.stalled and watcher.fired
    assert client.transport.aborted, "the client connection was left to drain for ever"
    assert 0.4 <= took < 5.0


async def test_a_slow_upstream_is_not_a_stalled_client() -> None:
    # The relay waits on the upstream, not on the client: the upstream's own timeout decides.
    response = upstream_response(chunks=[b"x"] * 6, pause=0.15)
    client = Client()

    watcher, took = await serve(response, client, stall_seconds=0.2)

    assert watcher is not None and not watcher.stalled and not client.transport.aborted
    assert client.body == b"x" * 6
    assert took >= 0.6


async def test_a_client_that_reads_slowly_but_steadily_is_not_cut_off() -> None:
    response = upstream_response(chunks=[b"x"] * 8)
    client = Client(read_time=0.1)

    watcher, took = await serve(response, client, stall_seconds=0.3)

    assert watcher is not None and not watcher.stalled
    assert client.body == b"x" * 8
    assert took >= 0.8
