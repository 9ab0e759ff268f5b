"""Readers of single configuration values: each checks one TOML or environment value and
raises ConfigError naming its key."""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from redis.connection import parse_url

from sentinel_proxy.exceptions import ConfigError

# No timeout or grace period of the proxy's is meant to last longer.
MAX_SECONDS = 7 * 86_400
# Provider and model names travel in response headers, metric labels and log lines.
MAX_NAME_LENGTH = 256
NAME_RULE = f"must be at most {MAX_NAME_LENGTH} printable characters, no space at either end"
# Headers that mean something else to HTTP or to the proxy: never a conversation id.
_RESERVED_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "host",
        "content-type",
        "content-length",
        "content-encoding",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "expect",
    }
)


def is_valid_name(value: object) -> bool:
    """A provider or model name: at most MAX_NAME_LENGTH printable characters."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_NAME_LENGTH
        and value.isprintable()
        and value.strip() == value
    )


class Secret:
    """A string that never shows itself in a repr, a log line or a traceback."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError("config", f"{path} is not UTF-8 text") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path} is not valid TOML: {exc}") from exc


def read_table(raw: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(key, "must be a table")
    return value


def only_keys(table: Mapping[str, Any], prefix: str, known: set[str]) -> None:
    for key in table:
        if key not in known:
            raise ConfigError(f"{prefix}{key}", f"unknown key (expected one of {sorted(known)})")


def read_name(raw: Mapping[str, Any], prefix: str, key: str) -> str:
    value = read_str(raw, prefix, key, None)
    if not is_valid_name(value):
        raise ConfigError(f"{prefix}{key}", NAME_RULE)
    return value


def read_bool(raw: Mapping[str, Any], prefix: str, key: str, default: bool) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{prefix}{key}", "must be true or false")
    return value


def read_str(raw: Mapping[str, Any], prefix: str, key: str, default: str | None) -> str:
    value = raw.get(key, default)
    if value is None:
        raise ConfigError(f"{prefix}{key}", "is required")
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{prefix}{key}", "must be a non-empty string")
    return value


def read_int(
    raw: Mapping[str, Any],
    prefix: str,
    key: str,
    default: int,
    *,
    low: int,
    high: int | None = None,
) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{prefix}{key}", "must be an integer")
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ConfigError(f"{prefix}{key}", f"must be {bounds}, got {value}")
    return value


def read_seconds(raw: Mapping[str, Any], prefix: str, key: str, default: float) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{prefix}{key}", "must be a number of seconds")
    if not math.isfinite(value) or value <= 0 or value > MAX_SECONDS:
        raise ConfigError(f"{prefix}{key}", f"must be above 0 and at most {MAX_SECONDS}")
    return float(value)


def read_env_int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError as exc:
        raise ConfigError(name, f"must be an integer, got {env[name]!r}") from exc


def parse_header_name(value: object, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, "must be an HTTP header name")
    header = value.lower()
    if not header.isascii() or not all(c.isalnum() or c == "-" for c in header):
        raise ConfigError(key, "must be an HTTP header name")
    if header in _RESERVED_HEADERS or header.startswith("x-sentinel-"):
        raise ConfigError(key, f"{header} means something else: choose another")
    return header


def parse_base_url(key: str, url: str) -> str:
    parts = urlsplit(url)
    if "@" in parts.netloc:
        # Never repeated in the message: it may hold a password.
        raise ConfigError(key, "must not hold credentials (user:password@); use api_key_env")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(key, f"{url!r} is not an http:// or https:// URL")
    if parts.query or parts.fragment:
        raise ConfigError(key, "must not have a query string or fragment")
    if not url.isascii() or not url.isprintable() or " " in url:
        raise ConfigError(key, f"{url!r} holds spaces, control or non-ASCII characters")
    try:
        parts.port  # noqa: B018 - urlsplit checks the port lazily
    except ValueError as exc:
        raise ConfigError(key, f"{url!r} has a bad port") from exc
    return url.rstrip("/")


def parse_redis_url(url: str) -> str:
    """The URL as given, once redis-py's own parser has read it the way the store will.
    No message repeats the URL: it may hold a password."""
    key = "session.redis_url"
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(key, "must be a redis://, rediss:// or unix:// URL")
    if parts.fragment or "#" in url:
        raise ConfigError(key, "holds '#': percent-encode it in a password (%23)")
    try:
        parsed = parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise ConfigError(
            key, "cannot be parsed: percent-encode ':', '/', '?', '@' or '%' in a password"
        ) from exc
    if parts.scheme != "unix":
        database = parts.path.strip("/")
        if database and not database.isdigit():
            raise ConfigError(key, "the path must be a database number (redis://host:6379/0)")
        if "host" not in parsed:
            raise ConfigError(key, "names no host")
    return url
