"""Fuzz the request reader and the body rewriter with atheris (outside CI).

    python -m venv /tmp/fuzzenv && /tmp/fuzzenv/bin/pip install atheris -e .
    /tmp/fuzzenv/bin/python tests/fuzz/reader.py -max_total_time=600

Any exception other than the proxy's own 4xx is a finding; so is a forwarded body that no
longer parses, or one whose members other than model and conversation_id changed.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import atheris

with atheris.instrument_imports():
    from sentinel_proxy.body import find_member, plain_keys
    from sentinel_proxy.config import DEFAULT_ID_SOURCES, Provider
    from sentinel_proxy.exceptions import InvalidRequest, RequestTooLarge
    from sentinel_proxy.request import IdSources, read_request
    from sentinel_proxy.rewrite import rewrite_body
    from sentinel_proxy.routing import Route

ROUTE = Route(Provider("p", "http://p.test/v1"), "rewritten")
SCOPE = {
    "method": "POST",
    "path": "/v1/chat/completions",
    "raw_path": b"/v1/chat/completions",
    "query_string": b"",
    "headers": [(b"content-type", b"application/json"), (b"x-conversation-id", b"c")],
}


def _pairs(body: bytes) -> Any:
    return json.loads(body, object_pairs_hook=list)


async def _one(body: bytes) -> None:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        request = await read_request(
            SCOPE, receive, max_body_bytes=1 << 16, sources=IdSources(DEFAULT_ID_SOURCES)
        )
    except (InvalidRequest, RequestTooLarge):
        return
    forwarded = rewrite_body(request, ROUTE)
    if request.payload is None:
        assert forwarded == body
        return
    expected = [(k, v) for k, v in _pairs(body) if k not in ("model", "conversation_id")]
    got = _pairs(forwarded)
    assert got[0] == ("model", "rewritten") or ("model", "rewritten") in got, forwarded
    assert [(k, v) for k, v in got if k != "model"] == expected, (body, forwarded)
    find_member(forwarded, b'"model"', plain=plain_keys(forwarded))


def test_one(data: bytes) -> None:
    asyncio.run(_one(data))


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one)
    atheris.Fuzz()
