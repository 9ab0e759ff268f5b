"""The proxy route: the one place that knows the whole flow of a request.

read the request → authenticate its client → find or create its session → route →
rewrite → send upstream (once more, elsewhere, if the target fails) → relay the response
back, with errors answered in the OpenAI shape."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from sentinel_proxy.config import Config, User
from sentinel_proxy.errors import send_error
from sentinel_proxy.exceptions import (
    ConfigurationChanged,
    InvalidRequest,
    ProxyError,
    StoreUnavailable,
    TargetUnavailable,
    UpstreamError,
)
from sentinel_proxy.health import Health, is_target_failure
from sentinel_proxy.identity import IMPLICIT, Identity
from sentinel_proxy.logs import (
    REQUEST_ID_HEADER,
    AccessLog,
    client_request_id,
    current_request_id,
    new_request_id,
)
from sentinel_proxy.metrics import Metrics
from sentinel_proxy.relay import DisconnectWatcher, Receive, Send, relay
from sentinel_proxy.request import ClientDisconnected, IdSources, InboundRequest, read_request
from sentinel_proxy.rewrite import Rewriter
from sentinel_proxy.routing import Route, Router
from sentinel_proxy.sessions import Session, SessionStore
from sentinel_proxy.tracing import Tracing
from sentinel_proxy.upstream import Upstream, UpstreamResponse
from sentinel_proxy.users import Users

logger = logging.getLogger("sentinel_proxy.proxy")

HIT, CREATED, NONE, DEGRADED = "hit", "created", "none", "degraded"
# The upstream's own request id, under a name of its own: x-request-id is the proxy's.
UPSTREAM_REQUEST_ID_HEADER = b"x-upstream-request-id"
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
        health: Health,
        store: SessionStore,
        upstream: Upstream,
        metrics: Metrics,
        tracing: Tracing | None = None,
    ) -> None:
        self._metrics = metrics
        self._tracing = tracing
        self._access_log = AccessLog()
        self._router = router
        self._health = health
        self._store = store
        self._upstream = upstream
        self._users = Users(config)
        self._rewriter = Rewriter(config)
        self._max_body = config.upstream.max_body_bytes
        self._sources = IdSources(config.session.id_sources)
        key = config.session.hash_key
        self._identity = Identity(key.reveal().encode() if key is not None else None)
        self._implicit = frozenset(a.name for a in config.aliases.values() if a.implicit_sessions)
        self._prompt_cache = any(p.prompt_cache for p in config.providers)
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
            self._access_log(fields)
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
            scope, receive, max_body_bytes=self._max_body, sources=self._sources
        )
        user = self._users.authenticate(inbound.authorization)
        if user is not None:
            fields["user"] = user.external_id
        fields["conversation_id"] = inbound.conversation_id
        route, outcome, session = await self._route(inbound, user)
        fields["session"] = outcome
        if outcome != NONE:
            fields["session_source"] = inbound.id_source
        if outcome == HIT and not self._router.healthy(route) and self._router.can_fail_over(route):
            # Pinned to an ejected target: move now rather than try it.
            route, session = await self._fail_over(route, session, fields)
        fields["provider"] = route.provider.name
        fields["model"] = route.model or inbound.model
        cache_key = None
        if session is not None and self._prompt_cache and _without_cache_key(inbound):
            cache_key = self._identity.prompt_cache_key(session.external_id, session.id)
        watcher = DisconnectWatcher(receive, send, stall_seconds=self._stream_idle)
        try:
            sent = time.perf_counter()
            response, route = await self._send(inbound, route, session, cache_key, fields)
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

    async def _send(
        self,
        inbound: InboundRequest,
        route: Route,
        session: Session | None,
        cache_key: str | None,
        fields: dict[str, Any],
    ) -> tuple[UpstreamResponse, Route]:
        """Send to the route's target; if it fails before answering (an error, a 5xx) and
        its alias fails over, once more to another target. At most two upstreams per
        request, and never the same one twice."""
        for retry in (False, True):
            wanted = cache_key if route.provider.prompt_cache else None
            request = self._rewriter.build(inbound, route, wanted)
            response: UpstreamResponse | None = None
            try:
                response = await self._upstream.send(request)
            except UpstreamError as exc:
                if route.alias is None:
                    raise
                error: ProxyError = exc
            else:
                if route.alias is None or not is_target_failure(status=response.status_code):
                    if route.alias is not None:
                        self._health.success(route.target)
                    return response, route
                error = UpstreamError(f"the upstream answered {response.status_code}")
            if self._health.failure(route.target):
                self._metrics.ejection(route.provider.name)
                logger.warning(
                    "target %s/%s ejected: %s", route.provider.name, route.model, error.message
                )
            if not retry and self._router.can_fail_over(route):
                if response is not None:
                    await response.aclose()
                route, session = await self._fail_over(route, session, fields)
                continue
            if response is not None:
                return response, route
            raise error
        raise AssertionError("unreachable")

    async def _fail_over(
        self, failed: Route, session: Session | None, fields: dict[str, Any]
    ) -> tuple[Route, Session | None]:
        """Another target of the failed route's alias, with the conversation re-pinned to
        it; or 503 (the pin kept) when the alias says so."""
        replacement = self._router.replacement(failed)
        if replacement is None or not self._router.fails_over(failed):
            raise TargetUnavailable(
                f"The target {failed.provider.name}/{failed.model} is failing; retry shortly."
            )
        fields["failover"] = failed.provider.name
        fields["provider"] = replacement.provider.name
        fields["model"] = replacement.model
        self._metrics.failover(failed.provider.name)
        if session is not None:
            moved = Session(
                session.id,
                replacement.provider.name,
                replacement.model or "",
                int(time.time()),
                session.external_id,
            )
            session = await self._store.repin(session, moved)
            pinned = self._router.pinned(session.provider, session.model, failed.alias)
            replacement = pinned or replacement
        logger.warning(
            "failing over from %s/%s to %s/%s (conversation %s)",
            failed.provider.name,
            failed.model,
            replacement.provider.name,
            replacement.model,
            fields.get("conversation_id"),
        )
        return replacement, session

    async def _route(
        self, inbound: InboundRequest, user: User | None
    ) -> tuple[Route, str, Session | None]:
        if inbound.payload is None:
            return self._router.default, NONE, None
        requested = inbound.model
        users = self._users
        users.check_allowed(user, requested)
        # Only generation endpoints read, renew or make a pin; the id is removed anyway.
        conversation_id = inbound.conversation_id if inbound.generates else None
        model = requested or (users.default_model(user) if inbound.generates else None)
        tenant = user.external_id if user is not None else None
        if conversation_id is None and model in self._implicit and inbound.generates:
            conversation_id = self._identity.implicit_id(tenant, inbound.payload)
            if conversation_id is not None:
                inbound.id_source = IMPLICIT
        if conversation_id is None:
            if model is None and inbound.needs_model:
                raise _model_required()
            users.check_allowed(user, model)
            return self._router.select(model), NONE, None
        external_id = tenant

        def make() -> Session:
            # A follow-up needs no model (its pin supplies one); a first request does.
            if model is None:
                raise _model_required()
            users.check_allowed(user, model)
            route = self._router.select(model)
            return Session(
                conversation_id,
                route.provider.name,
                route.model or model,
                int(time.time()),
                external_id,
            )

        try:
            session, created = await self._store.get_or_create(conversation_id, external_id, make)
        except StoreUnavailable:
            if not self._fail_open or model is None:
                raise
            logger.warning(
                "session store unavailable; routing conversation %s without stickiness",
                conversation_id,
            )
            users.check_allowed(user, model)
            return self._router.select(model), DEGRADED, None
        pinned = self._router.pinned(session.provider, session.model, model)
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
            return pinned, CREATED, session
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("session hit for conversation %s", session.id)
            if requested is not None and requested != session.model:
                logger.debug(
                    "conversation %s asked for model %s; pinned to %s",
                    session.id,
                    requested,
                    session.model,
                )
        return pinned, HIT, session


def _without_cache_key(inbound: InboundRequest) -> bool:
    payload = inbound.payload
    return payload is not None and "prompt_cache_key" not in payload


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
        (b"x-sentinel-session-source", "session_source"),
        (b"x-sentinel-failover", "failover"),
    ):
        value = fields.get(key)
        if value:
            headers.append((name, value.encode()))
    return headers
