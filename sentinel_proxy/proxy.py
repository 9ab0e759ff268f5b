"""The proxy route: the one place that knows the whole flow of a request.

read the request → find or create its session → route → rewrite → send upstream →
relay the response back, with errors answered in the OpenAI shape."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from sentinel_proxy.config import Config
from sentinel_proxy.errors import send_error
from sentinel_proxy.exceptions import InvalidRequest, ProxyError, StoreUnavailable
from sentinel_proxy.logs import (
    REQUEST_ID_HEADER,
    access_log,
    client_request_id,
    current_request_id,
    new_request_id,
)
from sentinel_proxy.metrics import Metrics
from sentinel_proxy.relay import DisconnectWatcher, Receive, Send, relay
from sentinel_proxy.request import ClientDisconnected, InboundRequest, read_request
from sentinel_proxy.rewrite import Rewriter
from sentinel_proxy.routing import Route, Router
from sentinel_proxy.sessions import Session, SessionStore
from sentinel_proxy.tracing import Tracing
from sentinel_proxy.upstream import Upstream

logger = logging.getLogger("sentinel_proxy.proxy")

HIT, CREATED, NONE, DEGRADED = "hit", "created", "none", "degraded"
# Logged and counted (never sent) for a client that left before its response was complete,
# or stopped reading it.
CLIENT_CLOSED_REQUEST = 499
# The upstream's own request id (OpenAI's, say) reaches the client under this name: the
# x-request-id the client reads is the proxy's, the one in its logs and errors.
UPSTREAM_REQUEST_ID_HEADER = b"x-upstream-request-id"


class Proxy:
    """An ASGI app for everything under /v1."""

    def __init__(
        self,
        config: Config,
        *,
        router: Router,
        store: SessionStore,
        upstream: Upstream,
        metrics: Metrics,
        tracing: Tracing | None = None,
    ) -> None:
        self._metrics = metrics
        self._tracing = tracing
        self._router = router
        self._store = store
        self._upstream = upstream
        self._rewriter = Rewriter(config)
        self._max_body = config.upstream.max_body_bytes
        self._id_header = config.session.header.encode()
        self._fail_open = config.session.on_store_error == "open"
        self._stream_idle = config.upstream.stream_idle_seconds

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        request_id = _request_id(scope)
        token = current_request_id.set(request_id)
        fields: dict[str, Any] = {
            "request_id": request_id,
            "method": scope["method"],
            "path": scope["path"],
        }
        span = None
        if self._tracing is not None:
            span, scope["headers"] = self._tracing.start(
                scope["method"], scope["path"], scope["headers"]
            )
        status = 0
        try:
            status = await self._serve(scope, receive, send, fields, started)
        except ProxyError as exc:
            status = exc.status_code
            fields["error"] = exc.code
            await send_error(
                send, exc, request_id=request_id, extra_headers=_outcome_headers(fields)
            )
        except ClientDisconnected:
            status = CLIENT_CLOSED_REQUEST
            fields["error"] = "client_disconnected"
        finally:
            fields["status"] = status
            fields["duration_ms"] = round((time.perf_counter() - started) * 1000, 2)
            access_log(fields)
            self._metrics.request(
                fields.get("provider", ""), fields.get("model"), status, fields.get("session")
            )
            if span is not None:
                assert self._tracing is not None
                self._tracing.finish(span, fields, status)
            current_request_id.reset(token)

    async def _serve(
        self,
        scope: dict[str, Any],
        receive: Receive,
        send: Send,
        fields: dict[str, Any],
        started: float,
    ) -> int:
        inbound = await read_request(
            scope, receive, max_body_bytes=self._max_body, id_header=self._id_header
        )
        fields["conversation_id"] = inbound.conversation_id
        route, outcome = await self._route(inbound)
        fields["provider"] = route.provider.name
        fields["model"] = route.model or inbound.model
        fields["session"] = outcome
        request = self._rewriter.build(inbound, route)
        watcher = DisconnectWatcher(receive, send, stall_seconds=self._stream_idle)
        try:
            sent = time.perf_counter()
            response = await self._upstream.send(request)
            waited = time.perf_counter() - sent
            fields["upstream_ms"] = round(waited * 1000, 2)
            self._metrics.upstream_latency(route.provider.name, waited)
            _keep_upstream_request_id(response.headers)
            headers = _outcome_headers(fields)
            headers.append((REQUEST_ID_HEADER, fields["request_id"].encode()))
            self._metrics.open_streams.inc()
            try:
                first_byte = await relay(response, send, extra_headers=headers, watcher=watcher)
                self._metrics.first_byte(route.provider.name, first_byte - started)
                if inbound.payload is not None and inbound.payload.get("stream") is True:
                    self._metrics.stream_duration(
                        route.provider.name, time.perf_counter() - first_byte
                    )
            except ProxyError as exc:
                # The response has started: all that is left is to cut the connection, so
                # the client sees a truncated body rather than a complete-looking one. It
                # counts as the error it would have been, not as the status it began with.
                fields["error"] = "broken_stream"
                fields["upstream_status"] = response.status_code
                self._metrics.broken_stream(route.provider.name)
                logger.warning("broken stream from %s: %s", route.provider.name, exc.message)
                return exc.status_code
            finally:
                self._metrics.open_streams.dec()
                await response.aclose()
            return response.status_code
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if watcher.fired and task is not None and task.uncancel() == 0:
                fields["error"] = "client_stalled" if watcher.stalled else "client_disconnected"
                return CLIENT_CLOSED_REQUEST
            raise
        finally:
            watcher.stop()

    async def _route(self, inbound: InboundRequest) -> tuple[Route, str]:
        if inbound.payload is None:
            return self._router.default, NONE
        model = inbound.model
        conversation_id = inbound.conversation_id
        if conversation_id is None:
            if model is None and inbound.needs_model:
                raise _model_required()
            return self._router.select(model), NONE

        def make() -> Session:
            # A follow-up needs no model (its pin supplies one); a first request does.
            if model is None:
                raise _model_required()
            route = self._router.select(model)
            return Session(
                conversation_id, route.provider.name, route.model or model, int(time.time())
            )

        try:
            session, created = await self._store.get_or_create(conversation_id, None, make)
        except StoreUnavailable:
            if not self._fail_open or model is None:
                raise
            logger.warning(
                "session store unavailable; routing conversation %s without stickiness",
                conversation_id,
            )
            return self._router.select(model), DEGRADED
        pinned = self._router.pinned(session.provider, session.model)
        assert pinned is not None  # the store only returns sessions the router accepts
        if created:
            logger.debug("session miss for conversation %s", session.id)
            logger.info(
                "Created new session for conversation %s: provider=%s model=%s",
                session.id,
                session.provider,
                session.model,
            )
            return pinned, CREATED
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("session hit for conversation %s", session.id)
            if model != session.model:
                logger.debug(
                    "conversation %s asked for model %s; pinned to %s",
                    session.id,
                    model,
                    session.model,
                )
        return pinned, HIT


def _model_required() -> InvalidRequest:
    return InvalidRequest("model field is required", param="model")


def _request_id(scope: dict[str, Any]) -> str:
    """The client's x-request-id when it is one to keep, else a new one; the headers that
    go upstream then carry the id, and only it."""
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    for name, value in headers:
        if name == REQUEST_ID_HEADER:
            request_id = client_request_id(value)
            if request_id is not None:
                return request_id
            headers = [(n, v) for n, v in headers if n != REQUEST_ID_HEADER]
            break
    request_id = new_request_id()
    scope["headers"] = [*headers, (REQUEST_ID_HEADER, request_id.encode())]
    return request_id


def _keep_upstream_request_id(headers: list[tuple[bytes, bytes]]) -> None:
    """Rename the upstream's x-request-id, so the client's x-request-id is ours alone."""
    for index, (name, value) in enumerate(headers):
        if len(name) == len(REQUEST_ID_HEADER) and name.lower() == REQUEST_ID_HEADER:
            headers[index] = (UPSTREAM_REQUEST_ID_HEADER, value)


def _outcome_headers(fields: dict[str, Any]) -> list[tuple[bytes, bytes]]:
    headers = []
    for name, key in (
        (b"x-sentinel-provider", "provider"),
        (b"x-sentinel-model", "model"),
        (b"x-sentinel-session", "session"),
    ):
        value = fields.get(key)
        if value:
            headers.append((name, value.encode()))
    return headers
