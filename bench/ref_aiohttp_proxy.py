"""Reference proxy for the benchmark: the 1.0x throughput baseline.

A raw ASGI app (no framework, no sessions, no JSON parsing) that forwards each request to
BENCH_UPSTREAM with one shared aiohttp.ClientSession and streams the response back with raw
ASGI send calls. Run by uvicorn with uvloop and httptools:

    BENCH_UPSTREAM=http://127.0.0.1:8080 python -m uvicorn ref_aiohttp_proxy:app \
        --app-dir bench --loop uvloop --http httptools --no-access-log
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

UPSTREAM = os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:8080").rstrip("/")
REQUEST_DROP = {b"connection", b"keep-alive", b"transfer-encoding", b"host", b"content-length"}
# uvicorn adds its own date and server headers; content-length is kept (no chunking for JSON).
RESPONSE_DROP = {b"connection", b"keep-alive", b"transfer-encoding", b"date", b"server"}
session: aiohttp.ClientSession | None = None


async def lifespan(receive: Receive, send: Send) -> None:
    global session
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
            session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            if session is not None:
                await session.close()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        return await lifespan(receive, send)
    assert scope["type"] == "http" and session is not None
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    headers = {k.decode(): v.decode() for k, v in scope["headers"] if k not in REQUEST_DROP}
    query = scope["query_string"]
    url = UPSTREAM + scope["raw_path"].decode() + ("?" + query.decode() if query else "")
    async with session.request(scope["method"], url, headers=headers, data=body) as resp:
        out = [(k.lower(), v) for k, v in resp.raw_headers if k.lower() not in RESPONSE_DROP]
        await send({"type": "http.response.start", "status": resp.status, "headers": out})
        async for chunk in resp.content.iter_any():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
