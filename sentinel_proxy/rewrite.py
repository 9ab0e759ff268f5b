"""Rewriting a client request into the upstream one: URL and credentials from the
configuration only, the `model` field from the route, the conversation id stripped."""

from __future__ import annotations

import functools
from urllib.parse import unquote_to_bytes

import httpx
import orjson

from sentinel_proxy.body import Edit, apply, insert_first, remove_member, replace_value
from sentinel_proxy.config import Config
from sentinel_proxy.exceptions import InvalidRequest, URITooLong
from sentinel_proxy.request import InboundRequest
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
# Where clients put API keys: OpenAI's Authorization, Azure's api-key, Anthropic's x-api-key.
CLIENT_CREDENTIALS = frozenset({b"authorization", b"api-key", b"x-api-key"})
# Header names the proxy alone sets: never taken from a client or from an upstream.
OWN_PREFIX = b"x-sentinel-"
_PREFIX = b"/v1"
# httpx refuses longer URLs.
MAX_URL_LENGTH = 65_536
# Percent-encoding is undone this many times when looking for dot segments.
_DECODE_ROUNDS = 3
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Distinct upstream URLs whose parsed form is kept: parsing one costs more than the rest
# of building the request.
_URL_CACHE_SIZE = 1024


def filter_headers(
    headers: list[tuple[bytes, bytes]], drop: frozenset[bytes] = HOP_BY_HOP
) -> list[tuple[bytes, bytes]]:
    """The headers less hop-by-hop ones, including those the Connection header names, and
    less the proxy's own x-sentinel-* names. `drop` must contain b"connection"."""
    kept: list[tuple[bytes, bytes]] = []
    named: set[bytes] | None = None
    for name, value in headers:
        lower = name.lower()
        if lower in drop:
            if lower == b"connection":
                named = (named or set()) | {t.strip().lower() for t in value.split(b",")}
            continue
        if lower.startswith(OWN_PREFIX):
            continue
        kept.append((name, value))
    if named:
        kept = [(n, v) for n, v in kept if n.lower() not in named]
    return kept


class Rewriter:
    """Built once from the configuration; `build` does the per-request part."""

    def __init__(self, config: Config) -> None:
        sources = config.session.id_sources
        drop = _REQUEST_DROP | {s.name.encode() for s in sources if s.kind == "header" and s.owned}
        self._auth = {
            p.name: (b"authorization", b"Bearer " + p.api_key.reveal().encode())
            for p in config.providers
            if p.api_key is not None
        }
        # A client's credentials go only to a provider that opts in; one with a key of its
        # own gets that key instead, the others none at all.
        self._drop = {
            p.name: drop if p.forward_client_key else drop | CLIENT_CREDENTIALS
            for p in config.providers
        }
        self._host = {p.name: (b"host", _netloc(p.base_url)) for p in config.providers}
        self._url = functools.lru_cache(maxsize=_URL_CACHE_SIZE)(_upstream_url)

    def build(
        self, inbound: InboundRequest, route: Route, cache_key: str | None = None
    ) -> httpx.Request:
        """The upstream request; `cache_key` goes in the body as prompt_cache_key."""
        auth = self._auth.get(route.provider.name)
        headers = filter_headers(inbound.headers, self._drop[route.provider.name])
        headers.append(self._host[route.provider.name])
        if auth is not None:
            headers.append(auth)
        body = rewrite_body(inbound, route, cache_key)
        if body or inbound.method in _BODY_METHODS:
            headers.append((b"content-length", str(len(body)).encode()))
        url = self._url(route.provider.base_url, inbound.raw_path, inbound.query)
        # Headers complete and the body as a stream: httpx then adds and re-parses nothing.
        return httpx.Request(inbound.method, url, headers=headers, stream=httpx.ByteStream(body))


def _upstream_url(base_url: str, path: bytes, query: bytes) -> httpx.URL:
    """The provider's base URL plus the request path less /v1: never a URL outside it."""
    if path != _PREFIX and not path.startswith(_PREFIX + b"/"):
        raise InvalidRequest("The request path must start with /v1/.")
    rest = path[len(_PREFIX) :]
    _check_path(rest)
    url = base_url + rest.decode("latin-1")
    if query:
        url += "?" + query.decode("latin-1")
    if len(url) > MAX_URL_LENGTH:
        raise URITooLong(f"The request URL is longer than {MAX_URL_LENGTH} bytes upstream.")
    try:
        parsed = httpx.URL(url)
        base = httpx.URL(base_url)
    except httpx.InvalidURL as exc:
        raise InvalidRequest("The request path or query string is not a valid URL.") from exc
    inside = base.raw_path.rstrip(b"/") + b"/"
    upstream_path = parsed.raw_path.split(b"?", 1)[0]
    if (parsed.scheme, parsed.netloc) != (base.scheme, base.netloc) or not (
        upstream_path == base.raw_path or upstream_path.startswith(inside)
    ):
        raise InvalidRequest("The request path leaves the API.")
    return parsed


def _check_path(path: bytes) -> None:
    """Refuse a path with dot segments, empty segments or backslashes, in plain sight or
    percent-encoded (even twice): an upstream or a server between may resolve them."""
    for _ in range(_DECODE_ROUNDS):
        if b"\\" in path or b"//" in path:
            break
        if any(segment.split(b";", 1)[0] in (b".", b"..") for segment in path.split(b"/")):
            break
        if b"%" not in path:
            return
        decoded = unquote_to_bytes(path)
        if decoded == path:
            return
        path = decoded
    raise InvalidRequest("The request path holds '.', '..', '//' or '\\' segments.")


def _netloc(base_url: str) -> bytes:
    return httpx.URL(base_url).netloc


def rewrite_body(inbound: InboundRequest, route: Route, cache_key: str | None = None) -> bytes:
    """The body to send: the client's bytes, less the conversation id member, with the
    route's model in place of the requested one and a prompt_cache_key added if given;
    every other byte as it came."""
    payload = inbound.payload
    if payload is None:
        return inbound.body
    body = inbound.body
    edits: list[Edit] = []
    added: list[bytes] = []
    if route.model is not None and route.model != inbound.model:
        value = orjson.dumps(route.model)
        if inbound.model_member is not None:
            edits.append(replace_value(inbound.model_member, value))
        else:
            added.append(b'"model":' + value)
    if cache_key is not None:
        added.append(b'"prompt_cache_key":' + orjson.dumps(cache_key))
    if inbound.id_member is not None:
        if added:
            # An added member takes the removed one's place: no comma to fix.
            start, _, end = inbound.id_member
            edits.append((start, end, added.pop()))
        else:
            edits.append(remove_member(body, inbound.id_member))
    if added:
        # Members follow the inserted ones unless the object was empty.
        comma = b"," if payload else b""
        edits.append(insert_first(body, b",".join(added) + comma))
    return apply(body, edits)
