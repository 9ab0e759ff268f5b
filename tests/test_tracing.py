from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest

from sentinel_proxy.config import Secret, TracingConfig
from sentinel_proxy.tracing import Tracing, create_tracing
from tests.support.otlp_receiver import OTLPReceiver

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


@pytest.fixture
async def tracing(otlp_receiver: OTLPReceiver) -> AsyncIterator[Tracing]:
    made = create_tracing(
        TracingConfig(endpoint=otlp_receiver.url + "/v1/traces", conversation_key=Secret("k" * 32))
    )
    assert made is not None
    yield made
    await made.shutdown()


def test_without_an_endpoint_the_tracing_sdk_is_not_even_imported() -> None:
    # redis-py 8 imports opentelemetry's metrics API by itself when it is installed: the
    # tracing SDK and the exporter are what only tracing would bring in.
    code = (
        "import sys\n"
        "from sentinel_proxy.config import load_config\n"
        "from sentinel_proxy.app import create_app\n"
        "from sentinel_proxy.tracing import create_tracing\n"
        "config = load_config(None, env={})\n"
        "create_app(config)\n"
        "assert create_tracing(config.tracing) is None\n"
        "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk.trace', "
        "'opentelemetry.exporter'))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"


def test_without_the_extra_tracing_is_off_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A None in sys.modules makes the import fail, as for a package that is not installed.
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    with caplog.at_level(logging.WARNING, "sentinel_proxy.tracing"):
        made = create_tracing(TracingConfig(endpoint="http://127.0.0.1:9/v1/traces"))
    assert made is None
    assert "otel extra is not installed" in caplog.text


async def test_the_clients_traceparent_is_replaced_by_one_naming_the_span(
    tracing: Tracing,
) -> None:
    headers = [
        (b"host", b"proxy"),
        (b"traceparent", f"00-{TRACE_ID}-{CLIENT_SPAN}-01".encode()),
        (b"tracestate", b"vendor=1"),
        (b"x-other", b"kept"),
    ]

    span, sent = tracing.start("POST", "/v1/files/file-1", headers)
    context = span.get_span_context()
    tracing.finish(span, {"request_id": "r"}, 200)

    assert f"{context.trace_id:032x}" == TRACE_ID
    assert span.parent is not None and f"{span.parent.span_id:016x}" == CLIENT_SPAN  # type: ignore[attr-defined]
    assert span.name == "POST"  # type: ignore[attr-defined]
    assert sent == [
        (b"host", b"proxy"),
        (b"tracestate", b"vendor=1"),
        (b"x-other", b"kept"),
        (b"traceparent", f"00-{TRACE_ID}-{context.span_id:016x}-01".encode()),
    ]


async def test_a_malformed_traceparent_starts_a_new_trace(tracing: Tracing) -> None:
    span, sent = tracing.start("GET", "/v1/models", [(b"traceparent", b"00-nonsense-01")])
    tracing.finish(span, {"request_id": "r"}, 200)

    context = span.get_span_context()
    assert span.parent is None  # type: ignore[attr-defined]
    assert span.name == "GET /v1/models"  # type: ignore[attr-defined]
    assert sent[0][1].startswith(f"00-{context.trace_id:032x}-{context.span_id:016x}-".encode())


async def test_an_unsampled_client_trace_stays_unsampled_and_costs_no_attributes(
    tracing: Tracing, otlp_receiver: OTLPReceiver
) -> None:
    span, sent = tracing.start(
        "POST", "/v1/embeddings", [(b"traceparent", f"00-{TRACE_ID}-{CLIENT_SPAN}-00".encode())]
    )
    tracing.finish(span, {"request_id": "r", "conversation_id": "c"}, 200)

    assert not span.is_recording()
    assert sent[0][1].endswith(b"-00")
    await tracing.shutdown()
    assert otlp_receiver.spans == []


def test_conversation_hashes_are_keyed() -> None:
    def hashed(key: str) -> str:
        made = Tracing(
            TracingConfig(endpoint="http://127.0.0.1:9/v1/traces", conversation_key=Secret(key))
        )
        return made.conversation_hash("c-1")

    assert hashed("a" * 32) == hashed("a" * 32) != hashed("b" * 32)
    assert len(hashed("a" * 32)) == 32 and "c-1" not in hashed("a" * 32)
