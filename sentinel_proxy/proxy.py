"""The proxy route: the one place that knows the whole flow of a request.

read the request → find or create its session → route → rewrite → send upstream →
relay the response back, with errors answered in the OpenAI shape."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from sentinel_proxy.config import Config
from sentinel_proxy.errors import send_error
from sentinel_proxy.exceptions import (
    ConfigurationChanged,
    InvalidRequest,
    ProxyError,
    StoreUnavailable,
)
from sentinel_proxy.logs import access_log
from sentinel_proxy.metrics import Metrics
from sentinel_proxy.relay import DisconnectWatcher, Receive, Send, relay
from sentinel_proxy.request import ClientDisconnected, InboundRequest, read_request
from sentinel_proxy.rewrite import Rewriter
from sentinel_proxy.routing import Route, Router
from sentinel_proxy.sessions import Session, SessionStore
from sentinel_proxy.upstream import Upstream

logger = logging.getLogger("sentinel_proxy.proxy")

HIT, CREATED, NONE, DEGRADED = "hit", "created", "none", "degraded"
# Logged and counted (never sent) for a client that left before its response was complete,
# or stopped reading it.
CLIENT_CLOSED_REQUEST = 499


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
    ) -> None:
        self._metrics = metrics
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
        fields: dict[str, Any] = {
            "request_id": os.urandom(8).hex(),
            "method": scope["method"],
            "path": scope["path"],
        }
        status = 0
        try:
            status = await self._serve(scope, receive, send, fields)
        except ProxyError as exc:
            status = exc.status_code
            fields["error"] = exc.code
            await send_error(send, exc, extra_headers=_outcome_headers(fields))
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

    async def _serve(
        self, scope: dict[str, Any], receive: Receive, send: Send, fields: dict[str, Any]
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
            self._metrics.open_streams.inc()
            try:
                await relay(response, send, extra_headers=_outcome_headers(fields), watcher=watcher)
            except ProxyError as exc:
                # The response has started: all that is left is to cut the connection, so
                # the client sees a truncated body rather than a complete-looking one. It
                # counts as the error it would have been, not as the status it began with.
                fields["error"] = "broken_stream"
                fields["upstream_status"] = response.status_code
                self._metrics.broken_stream(route.provider.name)
                logger.warning(
                    "broken stream from %s (request %s): %s",
                    route.provider.name,
                    fields["request_id"],
                    exc.message,
                )
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
        if pinned is None:
            # The store accepts what the current configuration serves: pinned, by a request
            # after a reload, to a provider this request's older configuration lacks.
            raise ConfigurationChanged("The configuration changed during this request; retry it.")
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


def _outcome_headers(fields: dict[str, Any]) -> list[tuple[bytes, bytes]]:
    headers = [(b"x-sentinel-request-id", fields["request_id"].encode())]
    for name, key in (
        (b"x-sentinel-provider", "provider"),
        (b"x-sentinel-model", "model"),
        (b"x-sentinel-session", "session"),
    ):
        value = fields.get(key)
        if value:
            headers.append((name, value.encode()))
    return headers
