"""OpenTelemetry tracing: one span per proxied request, exported over OTLP/HTTP.

On only with the `otel` extra installed and an OTLP endpoint configured (config.py reads
the standard OTEL_* variables); otherwise nothing here is imported and a request pays one
`if`. The span continues the trace of the client's W3C `traceparent`, if any, and the
upstream receives a `traceparent` whose parent is this span (the client's `tracestate`
goes on as it came). Without tracing, both headers reach the upstream untouched.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import threading
from typing import TYPE_CHECKING, Any

from sentinel_proxy.config import TracingConfig
from sentinel_proxy.request import MODEL_PATHS

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span

logger = logging.getLogger("sentinel_proxy.tracing")

Headers = list[tuple[bytes, bytes]]
# Paths named in span names; any other (with ids in it: /v1/files/file-abc) gives the
# method alone, as OpenTelemetry's conventions ask of routes of unbounded cardinality.
_NAMED_PATHS = frozenset({*(path.decode() for path in MODEL_PATHS), "/v1/models"})
_TRACEPARENT = b"traceparent"
_TRACESTATE = b"tracestate"
# Bytes of the keyed hash of a conversation id kept in a span.
_HASH_BYTES = 16
# How long the end of the lifespan waits for the last spans to be exported.
FLUSH_SECONDS = 2.0


def create_tracing(settings: TracingConfig) -> Tracing | None:
    """The tracing of `settings`, or None when it is off or the extra is not installed."""
    if settings.endpoint is None:
        return None
    try:
        return Tracing(settings)
    except ImportError:
        logger.warning(
            "an OTLP endpoint is set but the otel extra is not installed "
            "(pip install 'sentinel-proxy[otel]'): tracing is off"
        )
        return None


# Bytes of the span's conversation hash key when none is configured.
_KEY_BYTES = 32


class Tracing:
    """A tracer provider with a batching OTLP/HTTP exporter (its own thread), made in the
    lifespan and shut down at its end, after up to FLUSH_SECONDS of sending what is left."""

    def __init__(self, settings: TracingConfig) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import SpanKind, Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        assert settings.endpoint is not None
        self._provider: TracerProvider = TracerProvider(
            resource=Resource.create({"service.name": settings.service_name}),
            shutdown_on_exit=False,
        )
        self._exporter = OTLPSpanExporter(endpoint=settings.endpoint)
        self._provider.add_span_processor(BatchSpanProcessor(self._exporter))
        self._tracer = self._provider.get_tracer("sentinel_proxy")
        self._propagator = TraceContextTextMapPropagator()
        self._server = SpanKind.SERVER
        self._error = Status(StatusCode.ERROR)
        key = settings.conversation_key
        self._key = key.reveal().encode() if key is not None else os.urandom(_KEY_BYTES)

    def start(self, method: str, path: str, headers: Headers) -> tuple[Span, Headers]:
        """A span for a request, and the request's headers with a `traceparent` naming it
        in place of the client's."""
        carrier: dict[str, str] = {}
        kept: Headers = []
        for name, value in headers:
            if name == _TRACEPARENT:
                carrier["traceparent"] = value.decode("latin-1")
                continue
            if name == _TRACESTATE:
                carrier["tracestate"] = value.decode("latin-1")
            kept.append((name, value))
        parent = self._propagator.extract(carrier) if carrier else None
        span = self._tracer.start_span(
            f"{method} {path}" if path in _NAMED_PATHS else method,
            context=parent,
            kind=self._server,
            attributes={"http.request.method": method, "url.path": path},
        )
        context = span.get_span_context()
        kept.append(
            (
                _TRACEPARENT,
                b"00-%032x-%016x-%02x" % (context.trace_id, context.span_id, context.trace_flags),
            )
        )
        return span, kept

    def finish(self, span: Span, fields: dict[str, Any], status: int) -> None:
        if span.is_recording():
            attributes: dict[str, str | int] = {
                "http.response.status_code": status,
                "sentinel.request_id": fields["request_id"],
            }
            for key in ("provider", "model", "session", "error"):
                value = fields.get(key)
                if value:
                    attributes["error.type" if key == "error" else f"sentinel.{key}"] = value
            conversation_id = fields.get("conversation_id")
            if conversation_id is not None:
                attributes["sentinel.conversation_hash"] = self.conversation_hash(conversation_id)
            span.set_attributes(attributes)
            if status >= 500:
                span.set_status(self._error)
        span.end()

    def conversation_hash(self, conversation_id: str) -> str:
        """The conversation id as spans show it: an HMAC-SHA256 under the configured key, so
        spans of one conversation can be found together and the id is not exported."""
        return hmac.digest(self._key, conversation_id.encode(), "sha256")[:_HASH_BYTES].hex()

    async def shutdown(self) -> None:
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        # A flush retries an unreachable collector for the exporter's whole timeout (10 s),
        # and the provider's own shutdown flushes first: flush in a thread that may be left
        # behind, then stop the exporter, which ends its retries.
        flushing = threading.Thread(
            target=self._provider.force_flush, name="otel-flush", daemon=True
        )
        flushing.start()
        flushing.join(FLUSH_SECONDS)
        self._exporter.shutdown()  # type: ignore[no-untyped-call]
