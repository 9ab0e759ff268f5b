"""Reading a client request: the body under its size cap, the JSON payload, the
conversation id (from the first of the configured sources that is present) and the
requested model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson

from sentinel_proxy.body import DuplicateMember, Member, find_member, plain_keys
from sentinel_proxy.config import BODY_ID_FIELD, MAX_NAME_LENGTH, IdSource, is_valid_name
from sentinel_proxy.exceptions import HeadersTooLarge, InvalidRequest, RequestTooLarge

MAX_CONVERSATION_ID_LENGTH = 256
# uvicorn's httptools parser takes headers of any size; nothing this large goes upstream.
MAX_HEADER_BYTES = 64 * 1024
BODY_FIELD = BODY_ID_FIELD
_ID_KEY = b'"conversation_id"'
_MODEL_KEY = b'"model"'
# Endpoints that generate: only their requests read, renew or make a conversation's pin.
GENERATION_PATHS = frozenset({b"/v1/chat/completions", b"/v1/completions", b"/v1/responses"})
# Endpoints that cannot be routed without a model.
MODEL_PATHS = GENERATION_PATHS | {b"/v1/embeddings"}


class ClientDisconnected(Exception):
    """The client went away before its request was read."""


class IdSources:
    """The configured conversation id sources, made ready for the reader once."""

    def __init__(self, sources: tuple[IdSource, ...]) -> None:
        self.order = sources
        self.headers = frozenset(s.name.encode() for s in sources if s.kind == "header")
        # Header sources that are the proxy's own: never forwarded.
        self.owned_headers = frozenset(
            s.name.encode() for s in sources if s.kind == "header" and s.owned
        )


@dataclass(slots=True)
class InboundRequest:
    method: str
    raw_path: bytes
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    # The JSON object of a JSON POST body; None for every other request, which goes
    # upstream byte for byte.
    payload: dict[str, Any] | None
    conversation_id: str | None
    model: str | None
    # The source the conversation id came from ("header:x-session-id"), when one did.
    id_source: str | None = None
    # Where the body's `model` and `conversation_id` members lie (null values included):
    # the one is rewritten in place, the other cut out, every other byte left as sent.
    model_member: Member | None = None
    id_member: Member | None = None

    authorization: bytes | None = None

    @property
    def needs_model(self) -> bool:
        return self.raw_path.rstrip(b"/") in MODEL_PATHS

    @property
    def generates(self) -> bool:
        return self.raw_path.rstrip(b"/") in GENERATION_PATHS


async def read_request(
    scope: dict[str, Any], receive: Any, *, max_body_bytes: int, sources: IdSources
) -> InboundRequest:
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    content_type = b""
    header_ids: dict[bytes, bytes] | None = None
    authorization: bytes | None = None
    encoded = False
    size = 0
    id_headers = sources.headers
    for name, value in headers:
        size += len(name) + len(value)
        if name == b"authorization":
            authorization = value
        elif name == b"content-length":
            if value.isdigit() and int(value) > max_body_bytes:
                raise _too_large(max_body_bytes)
        elif name == b"content-type":
            content_type = value
        elif name in id_headers:
            if header_ids is None:
                header_ids = {}
            header_ids.setdefault(name, value)
        elif name == b"content-encoding":
            encoded = True
    if size > MAX_HEADER_BYTES:
        raise HeadersTooLarge(f"The request headers are larger than {MAX_HEADER_BYTES} bytes.")
    body = await _read_body(receive, max_body_bytes)
    method: str = scope["method"]
    request = InboundRequest(
        method=method,
        raw_path=scope.get("raw_path") or scope["path"].encode(),
        query=scope.get("query_string", b""),
        headers=headers,
        body=body,
        payload=None,
        conversation_id=None,
        model=None,
        authorization=authorization,
    )
    # The SDKs send an empty JSON body to the .../cancel endpoints: it goes as it came.
    if method == "POST" and not encoded and body.strip() and _is_json(content_type):
        _read_payload(request)
    if header_ids is not None or request.payload is not None:
        _read_conversation_id(request, sources, header_ids or {})
    return request


def _read_payload(request: InboundRequest) -> None:
    body = request.body
    payload = _parse(body)
    if not isinstance(payload, dict):
        raise InvalidRequest("The JSON body of your request must be an object.")
    request.payload = payload
    plain = (BODY_FIELD in payload or "model" in payload) and plain_keys(body)
    if BODY_FIELD in payload:
        # The proxy's own field: cut out before forwarding, whichever source gave the id.
        request.id_member = _member(body, _ID_KEY, plain)
    if "model" in payload:
        request.model_member = _member(body, _MODEL_KEY, plain)
        model = payload["model"]
        if model is not None:
            request.model = check_model(model)


def _read_conversation_id(
    request: InboundRequest, sources: IdSources, header_ids: dict[bytes, bytes]
) -> None:
    payload = request.payload or {}
    owned: list[str] = []
    for source in sources.order:
        if source.kind == "header":
            raw = header_ids.get(source.name.encode())
            value = None if raw is None else _header_conversation_id(raw, source.name)
        else:
            found = payload.get(source.name)
            value = None if found is None else check_conversation_id(found, source.name)
        if value is None:
            continue
        if source.owned:
            owned.append(value)
        if request.conversation_id is None:
            request.conversation_id = value
            request.id_source = source.label
    if len(owned) > 1 and owned[0] != owned[1]:
        raise InvalidRequest(
            "The conversation id in the body and in the header differ.", param=BODY_FIELD
        )


def _parse(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        error = exc
    # orjson refuses some valid JSON that upstreams accept (a lone surrogate escape, a
    # number too large for a double): Python's parser takes those, and nothing else.
    try:
        return json.loads(body.decode(), parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise InvalidRequest(
            f"We could not parse the JSON body of your request: {error}"
        ) from error


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _member(body: bytes, key: bytes, plain: bool) -> Member:
    try:
        return find_member(body, key, plain=plain)
    except DuplicateMember as exc:
        name = str(exc)
        raise InvalidRequest(
            f"The JSON body of your request has more than one {name!r} member.", param=name
        ) from exc


def check_model(value: object) -> str:
    """A model name that can be stored, logged and sent back in a header, or a 400."""
    if not is_valid_name(value):
        raise InvalidRequest(
            f"model must be a non-empty string of at most {MAX_NAME_LENGTH} printable "
            "characters, no space at either end.",
            param="model",
        )
    assert isinstance(value, str)
    return value


async def _read_body(receive: Any, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _is_json(content_type: bytes) -> bool:
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or media.endswith(b"+json")


def check_conversation_id(value: object, field: str = BODY_FIELD) -> str:
    """A conversation id: a non-empty string of at most 256 printable characters. Longer
    is refused, never cut: a cut id could be another conversation's."""
    if (
        not isinstance(value, str)
        or not value
        or len(value) > MAX_CONVERSATION_ID_LENGTH
        or not value.isprintable()
    ):
        raise InvalidRequest(
            f"{field} must be a non-empty string of at most "
            f"{MAX_CONVERSATION_ID_LENGTH} printable characters.",
            param=field,
        )
    return value


def _header_conversation_id(value: bytes, header: str) -> str:
    try:
        return check_conversation_id(value.decode("ascii").strip(), header)
    except (UnicodeDecodeError, InvalidRequest) as exc:
        raise InvalidRequest(
            f"The {header} header must be a non-empty string of at most "
            f"{MAX_CONVERSATION_ID_LENGTH} printable characters.",
            param=header,
        ) from exc


def _too_large(limit: int) -> RequestTooLarge:
    return RequestTooLarge(f"The request body is larger than the limit of {limit} bytes.")
