"""ASGI wiring: the proxy route on raw ASGI, operational endpoints on Starlette, and the
lifespan that owns the upstream transport, the session store, the metrics and tracing.

What a configuration decides per request (the router, the rewriter, timeouts: the `Proxy`)
is built from it and reached through one reference; a reload builds a new one and swaps
that reference. A request holds the Proxy it started with, so it finishes on the old
configuration. The store and the upstream connections outlive reloads: pins stay pinned."""

from __future__ import annotations

import contextlib
import gc
import hmac
import logging
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route as StarletteRoute

from sentinel_proxy.config import Config
from sentinel_proxy.errors import error_body, error_headers
from sentinel_proxy.exceptions import (
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    ProxyError,
    Unauthorized,
)
from sentinel_proxy.health import Health
from sentinel_proxy.logs import REQUEST_ID_HEADER, client_request_id, new_request_id
from sentinel_proxy.metrics import MeteredStore, Metrics, MetricsSlot
from sentinel_proxy.proxy import Proxy
from sentinel_proxy.relay import Receive, Send
from sentinel_proxy.request import check_conversation_id
from sentinel_proxy.routing import Router
from sentinel_proxy.sessions import (
    CircuitBreaker,
    MemoryStore,
    RedisClusterStore,
    RedisSentinelStore,
    RedisStore,
    Session,
    SessionStore,
)
from sentinel_proxy.sessions.base import Acceptor
from sentinel_proxy.sessions.near import NearCache
from sentinel_proxy.tracing import Tracing, create_tracing
from sentinel_proxy.upstream import Upstream

logger = logging.getLogger("sentinel_proxy")
# The young generation is collected every GC_THRESHOLDS[0] allocations instead of 700: a
# request allocates hundreds of objects that reference counting frees anyway, and the
# collections cost throughput (bench/RESULTS.md).
GC_THRESHOLDS = (20_000, 20, 20)

# `accept` says whether a stored session can still be served by the current configuration.
StoreFactory = Callable[[Config, Acceptor], SessionStore]


def create_store(config: Config, accept: Acceptor) -> SessionStore:
    settings = config.session

    def breaker() -> CircuitBreaker:
        return CircuitBreaker(
            failures=settings.breaker_failures, reset_seconds=settings.breaker_reset_seconds
        )

    ttl, timeout = settings.ttl_seconds, settings.timeout_seconds
    size = settings.redis_max_connections
    store: RedisStore
    if settings.sentinels:
        assert settings.sentinel_service is not None
        store = RedisSentinelStore(
            # Its host is not used: the sentinels name the primary.
            settings.redis_url.reveal() if settings.redis_url else "redis://",
            sentinels=settings.sentinels,
            service=settings.sentinel_service,
            ttl_seconds=ttl,
            timeout=timeout,
            max_connections=size,
            breaker=breaker(),
            accept=accept,
        )
    elif settings.redis_url is None:
        return MemoryStore(
            ttl_seconds=ttl, max_sessions=settings.memory_max_sessions, accept=accept
        )
    elif settings.cluster:
        store = RedisClusterStore(
            settings.redis_url.reveal(),
            ttl_seconds=ttl,
            timeout=timeout,
            max_connections=size,
            breakers=breaker,
            accept=accept,
        )
    else:
        store = RedisStore(
            settings.redis_url.reveal(),
            ttl_seconds=ttl,
            timeout=timeout,
            max_connections=size,
            breaker=breaker(),
            accept=accept,
        )
    if not settings.near_cache:
        return store
    return NearCache(
        store,
        ttl_seconds=ttl,
        renew_interval=settings.renew_interval_seconds,
        max_entries=settings.near_cache_max_entries,
        max_bytes=settings.near_cache_max_bytes,
        timeout=timeout,
        accept=accept,
    )


class _Runtime:
    """What the lifespan builds and the routes use: the current configuration, what is
    built from it, and what outlives reloads (store, upstream connections, metrics)."""

    def __init__(self, config: Config, router: Router) -> None:
        self.config = config
        self.router = router
        self.proxy: Proxy | None = None
        self.store: SessionStore | None = None
        self.upstream: Upstream | None = None
        self.metrics: Metrics | None = None
        self.tracing: Tracing | None = None
        # Set by the first stop signal (server.py): readiness fails and connections close.
        self.draining = False


def create_app(
    config: Config,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    store_factory: StoreFactory = create_store,
    rand: Callable[[], float] = random.random,
    metrics_slot: MetricsSlot | None = None,
) -> Gateway:
    """The app of `config`; `metrics_slot`: where a worker of several writes its metrics
    (None: a process alone)."""
    runtime = _Runtime(config, Router(config, rand=rand))

    def accept(session: Session) -> bool:
        # The current router, not the one of the start: a reload may have removed the
        # provider, and such a session is replaced as one of an unknown provider.
        return runtime.router.pinned(session.provider, session.model) is not None

    def apply(config: Config) -> None:
        health = Health(
            threshold=config.routing.eject_after_failures, cooldown=config.routing.eject_seconds
        )
        router = Router(config, health=health, rand=rand)
        store, upstream, metrics = runtime.store, runtime.upstream, runtime.metrics
        if store is not None and upstream is not None and metrics is not None:
            # Same transport, so the same connections; new timeouts.
            upstream = upstream.reconfigured(config.upstream)
            store.set_ttl(config.session.ttl_seconds)
            metrics.configure(config)
            proxy = Proxy(
                config,
                router=router,
                health=health,
                store=store,
                upstream=upstream,
                metrics=metrics,
                tracing=runtime.tracing,
            )
            runtime.upstream, runtime.proxy = upstream, proxy
        runtime.config, runtime.router = config, router

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as resources:
            metrics = Metrics(runtime.config, metrics_slot)
            resources.callback(metrics.close)
            made = store_factory(runtime.config, accept)
            if isinstance(made, NearCache):
                made.count = metrics.near_cache
            breaker = made.breaker if isinstance(made, RedisStore | NearCache) else None
            store = MeteredStore(made, metrics, breaker)
            resources.push_async_callback(store.aclose)
            # Every Upstream of a reload shares this one's transport.
            upstream = Upstream(
                runtime.config.upstream, transport=transport, providers=runtime.config.providers
            )
            resources.push_async_callback(upstream.aclose)
            tracing = create_tracing(runtime.config.tracing)
            if tracing is not None:
                resources.push_async_callback(tracing.shutdown)
            try:
                if not await store.ping():
                    logger.warning("the session store does not answer yet; /readyz reports it")
                runtime.store, runtime.upstream = store, upstream
                runtime.metrics, runtime.tracing = metrics, tracing
                # From the configuration current now: a reload may have come during the ping.
                apply(runtime.config)
                # Everything made so far lives as long as the process: take it out of the
                # collector's sight, which otherwise walks it again and again under load.
                gc.freeze()
                thresholds = gc.get_threshold()
                gc.set_threshold(*GC_THRESHOLDS)
                logger.info(
                    "sentinel-proxy ready: config=%s providers=%s store=%s",
                    runtime.config.source,
                    ",".join(p.name for p in runtime.config.providers),
                    type(made).__name__,
                )
                yield
                gc.set_threshold(*thresholds)
            finally:
                runtime.proxy = runtime.upstream = runtime.store = runtime.metrics = None

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        store = runtime.store
        if runtime.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if runtime.proxy is None or store is None:
            return JSONResponse({"status": "starting"}, status_code=503)
        if await store.ping():
            return JSONResponse({"status": "ready", "store": "ok"})
        if runtime.config.session.on_store_error == "open":
            return JSONResponse({"status": "ready", "store": "unreachable"})
        return JSONResponse({"status": "unready", "store": "unreachable"}, status_code=503)

    async def metrics_endpoint(request: Request) -> Response:
        if runtime.metrics is None:
            return JSONResponse({"status": "starting"}, status_code=503)
        body, content_type = runtime.metrics.render()
        return Response(body, headers={"content-type": content_type})

    async def debug_session(request: Request) -> Response:
        debug = runtime.config.debug
        if not debug.enabled:
            # As if the route did not exist: it exists for a reload that enables it.
            raise NotFound(f"No route for {request.url.path}; the API is under /v1.")
        token = debug.token
        supplied = request.headers.get("authorization", "")
        expected = "Bearer " + (token.reveal() if token is not None else "")
        if token is None or not hmac.compare_digest(supplied.encode(), expected.encode()):
            raise Unauthorized("A valid debug token is required.")
        conversation_id = check_conversation_id(request.path_params["conversation_id"])
        assert runtime.store is not None
        if request.method == "DELETE":
            deleted = await runtime.store.delete(conversation_id)
            return JSONResponse({"id": conversation_id, "deleted": deleted})
        session = await runtime.store.get(conversation_id)
        if session is None:
            raise NotFound(f"No session for conversation {conversation_id}.")
        return Response(session.to_json(), media_type="application/json")

    routes = [
        StarletteRoute("/healthz", healthz, methods=["GET"]),
        StarletteRoute("/readyz", readyz, methods=["GET"]),
        StarletteRoute("/metrics", metrics_endpoint, methods=["GET"]),
        StarletteRoute(
            "/debug/session/{conversation_id:path}", debug_session, methods=["GET", "DELETE"]
        ),
    ]
    starlette = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={ProxyError: _proxy_error, HTTPException: _http_error},
    )
    return Gateway(starlette, runtime, apply)


class Gateway:
    """Sends /v1 straight to the proxy (raw ASGI, the hot path) and the rest to Starlette."""

    def __init__(
        self, starlette: Starlette, runtime: _Runtime, apply: Callable[[Config], None]
    ) -> None:
        self.starlette = starlette
        self._runtime = runtime
        self._apply = apply

    @property
    def config(self) -> Config:
        """The configuration new requests are served with."""
        return self._runtime.config

    def reload(self, config: Config) -> None:
        """Serve new requests with `config`; those in flight finish on the one they began
        with. Settings of config.RESTART_SETTINGS must be those of the running config."""
        self._apply(config)
        logger.debug("serving the reloaded configuration")

    def drain(self) -> None:
        """From now on /readyz fails and every response closes its connection."""
        self._runtime.draining = True

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if self._runtime.draining:
                send = _closing(send)
            path: str = scope["path"]
            if path == "/v1" or path.startswith("/v1/"):
                proxy = self._runtime.proxy
                if proxy is None:
                    raise RuntimeError("the proxy is served only inside the lifespan")
                await proxy(scope, receive, send)
                return
        await self.starlette(scope, receive, send)  # type: ignore[arg-type]


def _closing(send: Send) -> Send:
    async def closing_send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), (b"connection", b"close")]
        await send(message)

    return closing_send


async def _proxy_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProxyError)
    sent = request.headers.get(REQUEST_ID_HEADER.decode())
    request_id = (sent and client_request_id(sent.encode("latin-1"))) or new_request_id()
    body = error_body(exc, request_id)
    headers = {k.decode(): v.decode() for k, v in error_headers(exc, body, request_id)}
    return Response(body, status_code=exc.status_code, headers=headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error: ProxyError
    if exc.status_code == 404:
        error = NotFound(f"No route for {request.url.path}; the API is under /v1.")
    elif exc.status_code == 405:
        error = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}.")
    else:
        error = InvalidRequest(str(exc.detail))
    return await _proxy_error(request, error)
