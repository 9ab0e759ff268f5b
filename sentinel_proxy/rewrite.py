"""Rewriting a client request into the upstream one: URL and credentials from the
configuration only, the `model` field from the route, the conversation id stripped."""

from __future__ import annotations

import functools

import httpx
import orjson

from sentinel_proxy.config import Config
from sentinel_proxy.request import BODY_FIELD, InboundRequest
from sentinel_proxy.routing import Route

# RFC 9110 section 7.6.1, plus the fields a proxy sets itself (host, content-length) and
# the ones that only make sense on the client's own connection.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
_REQUEST_DROP = HOP_BY_HOP | {b"host", b"content-length", b"expect"}
_PREFIX = b"/v1"
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Distinct upstream URLs whose parsed form is kept: parsing one costs more than the rest
# of building the request.
_URL_CACHE_SIZE = 1024


def filter_headers(
    headers: list[tuple[bytes, bytes]], drop: frozenset[bytes] = HOP_BY_HOP
) -> list[tuple[bytes, bytes]]:
    """The headers less hop-by-hop ones, including those the Connection header names.
    `drop` must contain b"connection"."""
    kept: list[tuple[bytes, bytes]] = []
    named: set[bytes] | None = None
    for name, value in headers:
        lower = name.lower()
        if lower in drop:
            if lower == b"connection":
                named = (named or set()) | {t.strip().lower() for t in value.split(b",")}
            continue
        kept.append((name, value))
    if named:
        kept = [(n, v) for n, v in kept if n.lower() not in named]
    return kept


class Rewriter:
    """Built once from the configuration; `build` does the per-request part."""

    def __init__(self, config: Config) -> None:
        self._drop = _REQUEST_DROP | {config.session.header.encode()}
        self._auth = {
            p.name: (b"authorization", b"Bearer " + p.api_key.reveal().encode())
            for p in config.providers
            if p.api_key is not None
        }
        self._host = {p.name: (b"host", _netloc(p.base_url)) for p in config.providers}
        self._url = functools.lru_cache(maxsize=_URL_CACHE_SIZE)(_upstream_url)

    def build(self, inbound: InboundRequest, route: Route) -> httpx.Request:
        drop = self._drop
        auth = self._auth.get(route.provider.name)
        if auth is not None:
            drop = drop | {b"authorization"}
        headers = filter_headers(inbound.headers, drop)
        headers.append(self._host[route.provider.name])
        if auth is not None:
            headers.append(auth)
        body = rewrite_body(inbound, route)
        if body or inbound.method in _BODY_METHODS:
            headers.append((b"content-length", str(len(body)).encode()))
        url = self._url(route.provider.base_url, inbound.raw_path, inbound.query)
        # Headers complete and the body as a stream: httpx then adds and re-parses nothing.
        return httpx.Request(inbound.method, url, headers=headers, stream=httpx.ByteStream(body))


def _upstream_url(base_url: str, path: bytes, query: bytes) -> httpx.URL:
    if path == _PREFIX or path.startswith(_PREFIX + b"/"):
        path = path[len(_PREFIX) :]
    url = base_url + path.decode("latin-1")
    if query:
        url += "?" + query.decode("latin-1")
    return httpx.URL(url)


def _netloc(base_url: str) -> bytes:
    return httpx.URL(base_url).netloc


def rewrite_body(inbound: InboundRequest, route: Route) -> bytes:
    """The body to send: the client's bytes untouched unless the model changes or the
    conversation id has to come out."""
    payload = inbound.payload
    if payload is None:
        return inbound.body
    model_changes = route.model is not None and payload.get("model") != route.model
    if not model_changes and not inbound.id_in_body:
        return inbound.body
    payload.pop(BODY_FIELD, None)
    if model_changes:
        payload["model"] = route.model
    return orjson.dumps(payload)
