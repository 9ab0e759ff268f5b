"""Errors the proxy makes itself, in the OpenAI shape, so SDKs raise their usual
exceptions (BadRequestError, RateLimitError, InternalServerError, ...)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import orjson

from sentinel_proxy.exceptions import ProxyError, StoreUnavailable, UpstreamPoolExhausted

Send = Callable[[dict[str, Any]], Awaitable[None]]

# Seconds a client should wait before retrying while the session store is down or every
# upstream connection is busy; the OpenAI SDKs honour Retry-After on 503.
RETRY_AFTER_SECONDS = 1
_RETRYABLE = (StoreUnavailable, UpstreamPoolExhausted)


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
    if isinstance(exc, _RETRYABLE):
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
