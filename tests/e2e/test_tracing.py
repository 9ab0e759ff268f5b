"""Tracing on the real process: with an OTLP endpoint, one span per proxied request, sent to
a local OTLP/HTTP receiver, and the upstream's traceparent names it as parent; without one,
the client's traceparent and tracestate reach the upstream as sent."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from tests.support.otlp_receiver import OTLPReceiver
from tests.support.ports import free_port
from tests.support.proxy_process import TEST_AUTH, ProxyProcess, StartProxy
from tests.support.upstream_stub import UpstreamStub

pytestmark = pytest.mark.e2e

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CLIENT_SPAN_ID}-01"
TRACESTATE = "vendor=opaque-value,other=1"
SPAN_SERVER = 2  # opentelemetry.proto.trace.v1.Span.SPAN_KIND_SERVER
STATUS_ERROR = 2


def stub_config(upstream: UpstreamStub) -> str:
    return (
        f'[[providers]]\nname = "stub"\nbase_url = "{upstream.base_url}"\n\n'
        '[models.fast]\ntargets = [{ provider = "stub", model = "m-a" }]\n'
    )


def tracing_env(receiver: OTLPReceiver) -> dict[str, str]:
    # Export batches every 50 ms rather than every 5 s.
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "50"}


def post(proxy: ProxyProcess, headers: dict[str, str], body: dict[str, Any]) -> httpx.Response:
    with httpx.Client(trust_env=False, timeout=20.0) as client:
        return client.post(
            f"{proxy.base_url}/chat/completions", json=body, headers={**TEST_AUTH, **headers}
        )


def test_a_span_continues_the_clients_trace_and_parents_the_upstream_request(
    start_proxy: StartProxy, upstream: UpstreamStub, otlp_receiver: OTLPReceiver
) -> None:
    proxy = start_proxy(stub_config(upstream), env=tracing_env(otlp_receiver))
    body = {"model": "fast", "messages": [], "conversation_id": "c-traced"}

    response = post(proxy, {"traceparent": TRACEPARENT, "tracestate": TRACESTATE}, body)

    assert response.status_code == 200
    [span] = otlp_receiver.wait_for_spans(1)
    assert (span.trace_id, span.parent_span_id) == (TRACE_ID, CLIENT_SPAN_ID)
    assert span.name == "POST /v1/chat/completions" and span.kind == SPAN_SERVER
    assert span.resource["service.name"] == "sentinel-proxy"
    attributes = span.attributes
    assert attributes["sentinel.provider"] == "stub"
    assert attributes["sentinel.model"] == "m-a"
    assert attributes["sentinel.session"] == "created"
    assert attributes["http.response.status_code"] == 200
    assert attributes["sentinel.request_id"] == response.headers["x-request-id"]
    # The conversation id is there as a keyed hash only.
    assert len(attributes["sentinel.conversation_hash"]) == 32
    assert not any("c-traced" in str(value) for value in attributes.values())

    received = upstream.requests[0]
    assert received.header_values("traceparent") == [f"00-{TRACE_ID}-{span.span_id}-01"]
    assert span.span_id != CLIENT_SPAN_ID
    assert received.header_values("tracestate") == [TRACESTATE]

    # The same conversation hashes alike in the next span.
    post(proxy, {}, body)
    later = otlp_receiver.wait_for_spans(2)[1]
    assert later.attributes["sentinel.session"] == "hit"
    assert (
        later.attributes["sentinel.conversation_hash"] == attributes["sentinel.conversation_hash"]
    )


def test_without_a_client_trace_the_span_starts_one(
    start_proxy: StartProxy, upstream: UpstreamStub, otlp_receiver: OTLPReceiver
) -> None:
    proxy = start_proxy(stub_config(upstream), env=tracing_env(otlp_receiver))

    post(proxy, {}, {"model": "gpt-4o-mini", "messages": []})

    [span] = otlp_receiver.wait_for_spans(1)
    assert span.parent_span_id == ""
    [traceparent] = upstream.requests[0].header_values("traceparent")
    version, trace_id, parent_id, flags = traceparent.split("-")
    assert (version, trace_id, parent_id) == ("00", span.trace_id, span.span_id)
    assert int(flags, 16) & 1, "sampled"


def test_a_failed_request_is_an_error_span(
    start_proxy: StartProxy, upstream: UpstreamStub, otlp_receiver: OTLPReceiver
) -> None:
    upstream.queue_error(500, "the model fell over")
    proxy = start_proxy(stub_config(upstream), env=tracing_env(otlp_receiver))

    assert post(proxy, {}, {"model": "fast", "messages": []}).status_code == 500

    [span] = otlp_receiver.wait_for_spans(1)
    assert span.status_code == STATUS_ERROR
    assert span.attributes["http.response.status_code"] == 500


def test_spans_left_in_the_batch_are_sent_at_shutdown(
    start_proxy: StartProxy, upstream: UpstreamStub, otlp_receiver: OTLPReceiver
) -> None:
    env = {**tracing_env(otlp_receiver), "OTEL_BSP_SCHEDULE_DELAY": "600000"}
    proxy = start_proxy(stub_config(upstream), env=env)
    post(proxy, {}, {"model": "fast", "messages": []})

    assert proxy.terminate() == 0

    assert len(otlp_receiver.spans) == 1


def test_without_tracing_the_clients_trace_headers_pass_unchanged(
    start_proxy: StartProxy, upstream: UpstreamStub, otlp_receiver: OTLPReceiver
) -> None:
    # OTEL_SDK_DISABLED wins over the endpoint, as in the OpenTelemetry SDK.
    env = {**tracing_env(otlp_receiver), "OTEL_SDK_DISABLED": "true"}
    proxy = start_proxy(stub_config(upstream), env=env)

    post(proxy, {"traceparent": TRACEPARENT, "tracestate": TRACESTATE}, {"model": "fast"})

    received = upstream.requests[0]
    assert received.header_values("traceparent") == [TRACEPARENT]
    assert received.header_values("tracestate") == [TRACESTATE]
    assert proxy.terminate() == 0
    assert otlp_receiver.spans == []


def test_a_collector_that_is_down_costs_the_requests_nothing(
    start_proxy: StartProxy, upstream: UpstreamStub
) -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    proxy = start_proxy(stub_config(upstream), env=env)

    for _ in range(5):
        assert post(proxy, {}, {"model": "fast", "messages": []}).status_code == 200

    started = time.monotonic()
    assert proxy.terminate() == 0
    assert time.monotonic() - started < 5, "the exit waited for the collector"
