"""The demo upstream of `sentinel-proxy --demo`: an OpenAI-compatible API answered in the
proxy's own process, with no network and no key.

Demo providers are ordinary providers whose base URL is on the reserved domain
DEMO_DOMAIN (`http://demo-a.sentinel.invalid/v1`). Their requests take the proxy's whole
path (session, routing, rewrite, the upstream client, the relay); only the last hop, the
transport, hands them to this module instead of a socket. The Upstream is built with
DemoTransport in front of the real transport when a provider is on that domain, so a
configuration without one never passes through here.

It answers chat completions (streamed word by word, framed as the real API frames its
server-sent events), `/models` and embeddings. A reply's text names the provider (the
host's first label) and the model it was asked for, so stickiness shows.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import struct
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import httpx
import orjson

from sentinel_proxy.config import DEMO_DOMAIN, DEMO_TARGETS

DEMO_MODELS = tuple(model for _, model in DEMO_TARGETS)
# Slow enough to watch a stream arrive, fast enough not to wait for it.
WORD_DELAY_SECONDS = 0.05
DEFAULT_DIMENSIONS = 256
MAX_DIMENSIONS = 4096
# A reply repeats the user's last message up to this many characters.
MAX_ECHO_CHARS = 1000
_SUFFIX = "." + DEMO_DOMAIN
_WORDS = re.compile(r"\S+\s*")
_JSON = (b"content-type", b"application/json")
_SSE = (b"content-type", b"text/event-stream; charset=utf-8")


def is_demo_url(url: str) -> bool:
    """Whether a provider's base URL is answered by the demo upstream."""
    return httpx.URL(url).host.endswith(_SUFFIX)


class DemoTransport(httpx.AsyncBaseTransport):
    """Answers requests to demo hosts in process; passes every other one to `fallback`."""

    def __init__(
        self, fallback: httpx.AsyncBaseTransport, *, word_delay: float = WORD_DELAY_SECONDS
    ) -> None:
        self._fallback = fallback
        self._word_delay = word_delay
        # Replies being streamed now: a client that goes away ends its own.
        self.open_streams = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if not host.endswith(_SUFFIX):
            return await self._fallback.handle_async_request(request)
        provider = host[: -len(_SUFFIX)]
        path = request.url.path.removeprefix("/v1")
        status = 200
        try:
            answer = self._answer(request.method, path, await request.aread(), provider)
        except _DemoError as exc:
            status, answer = exc.status, exc.body()
        if isinstance(answer, bytes):
            headers = [_JSON, (b"content-length", str(len(answer)).encode())]
            stream: httpx.AsyncByteStream = httpx.ByteStream(answer)
        else:
            headers, stream = [_SSE], answer
        return httpx.Response(
            status,
            headers=headers,
            stream=stream,
            request=request,
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        await self._fallback.aclose()

    def _answer(self, method: str, path: str, body: bytes, provider: str) -> bytes | _EventStream:
        """A JSON body, or the events of a streamed reply; _DemoError for an error."""
        if method == "POST" and path == "/chat/completions":
            payload = _payload(body)
            model = _model(payload)
            text = f"Hello from {provider} ({model})! You said: {_said(payload)}"
            if payload.get("stream") is True:
                return _EventStream(self._events(model, text, payload))
            return orjson.dumps(_completion(model, text, _prompt_tokens(payload)))
        if method == "POST" and path == "/embeddings":
            return orjson.dumps(_embeddings(_payload(body)))
        if method == "GET" and path == "/models":
            return orjson.dumps({"object": "list", "data": [_model_card(m) for m in DEMO_MODELS]})
        if method == "GET" and path.startswith("/models/"):
            name = path.removeprefix("/models/")
            if name not in DEMO_MODELS:
                raise _DemoError(
                    404, f"The model '{name}' does not exist", param="model", code="model_not_found"
                )
            return orjson.dumps(_model_card(name))
        raise _DemoError(404, f"Invalid URL ({method} /v1{path})")

    async def _events(
        self, model: str, text: str, payload: dict[str, Any]
    ) -> AsyncGenerator[bytes, None]:
        """The reply as the API streams it: `data: {chunk}\\n\\n` events, one per word,
        then `data: [DONE]\\n\\n`."""
        self.open_streams += 1
        try:
            options = payload.get("stream_options")
            usage = isinstance(options, dict) and options.get("include_usage") is True
            chunk: dict[str, Any] = {
                "id": _new_id("chatcmpl"),
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "system_fingerprint": None,
                "choices": [],
            }
            if usage:
                chunk["usage"] = None

            def event(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
                choice = {
                    "index": 0,
                    "delta": delta,
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
                return b"data: " + orjson.dumps({**chunk, "choices": [choice]}) + b"\n\n"

            yield event({"role": "assistant", "content": "", "refusal": None})
            words = _WORDS.findall(text)
            for word in words:
                await asyncio.sleep(self._word_delay)
                yield event({"content": word})
            yield event({}, "stop")
            if usage:
                last = {**chunk, "usage": _usage(_prompt_tokens(payload), len(words))}
                yield b"data: " + orjson.dumps(last) + b"\n\n"
            yield b"data: [DONE]\n\n"
        finally:
            self.open_streams -= 1


class _EventStream(httpx.AsyncByteStream):
    """A streamed reply; closing it (the client went away) ends its generator."""

    def __init__(self, events: AsyncGenerator[bytes, None]) -> None:
        self._events = events

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._events

    async def aclose(self) -> None:
        await self._events.aclose()


class _DemoError(Exception):
    """An error the demo upstream answers, in the OpenAI shape."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> bytes:
        return orjson.dumps(
            {
                "error": {
                    "message": self.message,
                    "type": "invalid_request_error",
                    "param": self.param,
                    "code": self.code,
                }
            }
        )


def _payload(body: bytes) -> dict[str, Any]:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _DemoError(400, "We could not parse the JSON body of your request.") from exc
    if not isinstance(payload, dict):
        raise _DemoError(400, "The JSON body of your request must be an object.")
    return payload


def _model(payload: dict[str, Any]) -> str:
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise _DemoError(400, "you must provide a model parameter", param="model")
    return model


def _said(payload: dict[str, Any]) -> str:
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _DemoError(400, "messages must be a non-empty array", param="messages")
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            text = " ".join(_texts(message.get("content"))).strip()
            if len(text) > MAX_ECHO_CHARS:
                text = text[:MAX_ECHO_CHARS] + "..."
            return text or "nothing"
    return "nothing"


def _texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        ]
    return []


def _prompt_tokens(payload: dict[str, Any]) -> int:
    # Words stand in for tokens.
    messages = payload.get("messages")
    words = 0
    for message in messages if isinstance(messages, list) else ():
        if isinstance(message, dict):
            words += sum(len(text.split()) for text in _texts(message.get("content")))
    return max(1, words)


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _completion(model: str, text: str, prompt_tokens: int) -> dict[str, Any]:
    return {
        "id": _new_id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": _usage(prompt_tokens, len(_WORDS.findall(text))),
    }


def _embeddings(payload: dict[str, Any]) -> dict[str, Any]:
    model = _model(payload)
    inputs = _inputs(payload.get("input"))
    dimensions = payload.get("dimensions", DEFAULT_DIMENSIONS)
    if (
        isinstance(dimensions, bool)
        or not isinstance(dimensions, int)
        or not 1 <= dimensions <= MAX_DIMENSIONS
    ):
        raise _DemoError(
            400, f"dimensions must be an integer from 1 to {MAX_DIMENSIONS}", param="dimensions"
        )
    encoding = payload.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise _DemoError(
            400, "encoding_format must be 'float' or 'base64'", param="encoding_format"
        )
    data = []
    tokens = 0
    for index, (key, count) in enumerate(inputs):
        tokens += count
        vector = _vector(key, dimensions)
        packed = struct.pack(f"<{dimensions}f", *vector)
        embedding: Any = (
            base64.b64encode(packed).decode()
            if encoding == "base64"
            else list(struct.unpack(f"<{dimensions}f", packed))
        )
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _inputs(raw: Any) -> list[tuple[bytes, int]]:
    """Each input as the bytes its vector is made from, with its token count: a string, an
    array of strings, an array of tokens, or an array of those."""
    if isinstance(raw, str):
        raw = [raw]
    elif isinstance(raw, list) and raw and all(_is_token(t) for t in raw):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise _DemoError(400, "input must be a non-empty string or array", param="input")
    inputs = []
    for item in raw:
        if isinstance(item, str) and item:
            inputs.append((item.encode(), max(1, len(item.split()))))
        elif isinstance(item, list) and item and all(_is_token(t) for t in item):
            inputs.append((orjson.dumps(item), len(item)))
        else:
            raise _DemoError(
                400, "each input must be a non-empty string or array of tokens", param="input"
            )
    return inputs


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _vector(key: bytes, dimensions: int) -> list[float]:
    """A unit vector that only the input decides: the same text, the same vector."""
    words = struct.unpack(f"<{dimensions}I", hashlib.shake_256(key).digest(4 * dimensions))
    values = [w / 2**31 - 1.0 for w in words]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    return [v / norm for v in values]


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "sentinel-demo"}


def _new_id(prefix: str) -> str:
    return f"{prefix}-demo{os.urandom(12).hex()}"
