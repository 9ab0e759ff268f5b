"""Errors the proxy makes itself, in the OpenAI shape, so SDKs raise their usual
exceptions (BadRequestError, RateLimitError, InternalServerError, ...).

The request id is in the `x-request-id` header, where the SDKs read it (`exc.request_id`),
and in the error object as `request_id`, which they keep in `exc.body` (an extra member
the OpenAI SDKs ignore), so a pasted error body names its request too."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import orjson

from sentinel_proxy.exceptions import ProxyError
from sentinel_proxy.logs import REQUEST_ID_HEADER, new_request_id

Send = Callable[[dict[str, Any]], Awaitable[None]]

# Seconds a client should wait before retrying an error that passes by itself (a session
# store down, every connection busy); the OpenAI SDKs honour Retry-After on 503.
RETRY_AFTER_SECONDS = 1


def error_body(exc: ProxyError, request_id: str | None = None) -> bytes:
    error: dict[str, str | None] = {
        "message": exc.message,
        "type": exc.error_type,
        "param": exc.param,
        "code": exc.code,
    }
    if request_id is not None:
        error["request_id"] = request_id
    return orjson.dumps({"error": error})


def error_headers(
    exc: ProxyError, body: bytes, request_id: str | None = None
) -> list[tuple[bytes, bytes]]:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if exc.retry_after:
        headers.append((b"retry-after", str(RETRY_AFTER_SECONDS).encode()))
    if request_id is not None:
        headers.append((REQUEST_ID_HEADER, request_id.encode()))
    return headers


async def send_error(
    send: Send,
    exc: ProxyError,
    *,
    request_id: str | None = None,
    extra_headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """Answer with `exc`, under `request_id` (a new one when None)."""
    if request_id is None:
        request_id = new_request_id()
    body = error_body(exc, request_id)
    headers = error_headers(exc, body, request_id)
    headers.extend(extra_headers)
    await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})
