"""Errors the proxy makes itself, in the OpenAI shape, so SDKs raise their usual
exceptions (BadRequestError, RateLimitError, InternalServerError, ...)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import orjson

from sentinel_proxy.exceptions import ProxyError

Send = Callable[[dict[str, Any]], Awaitable[None]]

# Seconds a client should wait before retrying an error that passes by itself (a session
# store down, every connection busy); the OpenAI SDKs honour Retry-After on 503.
RETRY_AFTER_SECONDS = 1


def error_body(exc: ProxyError) -> bytes:
    return orjson.dumps(
        {
            "error": {
                "message": exc.message,
                "type": exc.error_type,
                "param": exc.param,
                "code": exc.code,
            }
        }
    )


def error_headers(exc: ProxyError, body: bytes) -> list[tuple[bytes, bytes]]:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if exc.retry_after:
        headers.append((b"retry-after", str(RETRY_AFTER_SECONDS).encode()))
    return headers


async def send_error(
    send: Send, exc: ProxyError, *, extra_headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    body = error_body(exc)
    headers = error_headers(exc, body)
    headers.extend(extra_headers)
    await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})
