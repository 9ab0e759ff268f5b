"""
Configuration: built once at start-up from the TOML file, the environment and the command
line (in rising precedence), frozen afterwards. Nothing else in the package reads the
environment.
"""

from __future__ import annotations

import math
import re
import resource
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal
from urllib.parse import urlsplit

from redis.connection import parse_url

from sentinel_proxy.exceptions import ConfigError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_UPSTREAM_URL = "https://api.openai.com/v1"
DEFAULT_PROVIDER_NAME = "openai"
DEFAULT_SESSION_TTL = 86_400
DEFAULT_SESSION_HEADER = "x-conversation-id"
BODY_ID_FIELD = "conversation_id"
# Body fields offered as id sources; a header source may name any header but reserved ones.
_BODY_ID_FIELDS = frozenset({BODY_ID_FIELD, "prompt_cache_key", "user"})
# An HMAC key shorter than this is refused.
MIN_HASH_KEY_BYTES = 16
DEFAULT_STORE_TIMEOUT = 0.25
DEFAULT_BREAKER_FAILURES = 5
DEFAULT_BREAKER_RESET = 5.0
DEFAULT_MEMORY_MAX_SESSIONS = 100_000
DEFAULT_NEAR_CACHE_ENTRIES = 100_000
DEFAULT_NEAR_CACHE_BYTES = 64 * 1024 * 1024
DEFAULT_RENEW_INTERVAL = 60.0
DEFAULT_REDIS_MAX_CONNECTIONS = 256
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
DEFAULT_CONNECT_TIMEOUT = 10.0
# Reasoning models can think for minutes before their first token.
DEFAULT_FIRST_BYTE_TIMEOUT = 600.0
DEFAULT_CHUNK_TIMEOUT = 300.0
DEFAULT_POOL_TIMEOUT = 5.0
# As Envoy's stream idle timeout.
DEFAULT_STREAM_IDLE_SECONDS = 300.0
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_SHUTDOWN_GRACE = 30.0
DEFAULT_HEADER_TIMEOUT = 10.0
# 1 KiB/s averaged over 10 s: far below any real link, far above a slowloris trickle.
DEFAULT_BODY_MIN_RATE = 1024
DEFAULT_BODY_RATE_WINDOW = 10.0
DEFAULT_MAX_CLIENT_CONNECTIONS = 1024
# File descriptors a worker holds besides its connections: listening socket, logs, the loop's.
FILE_DESCRIPTOR_RESERVE = 64
# Passive health: consecutive failures that take a target out of selection, and for how long.
DEFAULT_EJECT_AFTER_FAILURES = 5
DEFAULT_EJECT_SECONDS = 30.0
# Redis refuses expiry times past a limit, and a decade is more than any conversation needs.
MAX_SESSION_TTL = 10 * 365 * 86_400
# No timeout or grace period of the proxy's is meant to last longer.
MAX_SECONDS = 7 * 86_400
MAX_WORKERS = 256
# Provider and model names travel in response headers, metric labels and log lines.
MAX_NAME_LENGTH = 256
# --demo: providers on a reserved domain (RFC 2606: `.invalid` never resolves), answered by
# the in-process demo upstream (demo.py), behind one alias of equal weights.
DEMO_DOMAIN = "sentinel.invalid"
DEMO_ALIAS = "demo"
DEMO_TARGETS = (("demo-a", "demo-small"), ("demo-b", "demo-large"))
DEFAULT_SERVICE_NAME = "sentinel-proxy"
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

LogFormat = Literal["text", "json"]
StoreErrorMode = Literal["closed", "open"]
TargetFailureMode = Literal["reselect", "error"]
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


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


@dataclass(frozen=True, slots=True)
class IdSource:
    """Where a conversation id may come from: a top-level body field or a header."""

    kind: Literal["body", "header"]
    name: str
    # The proxy's own (conversation_id, x-conversation-id): removed before forwarding. The
    # others belong to the client's protocol and go upstream as sent.
    owned: bool

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.name}"


DEFAULT_ID_SOURCES = (
    IdSource("body", BODY_ID_FIELD, owned=True),
    IdSource("header", DEFAULT_SESSION_HEADER, owned=True),
)


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    base_url: str
    # The key the proxy sends; None: the provider gets the client's own Authorization
    # when forward_client_key is set, and no credentials otherwise.
    api_key: Secret | None = None
    forward_client_key: bool = False
    # Send a prompt_cache_key derived from the session when the client sent none.
    prompt_cache: bool = False
    # The variable the key was read from: what check-config shows instead of the key.
    api_key_env: str | None = None


@dataclass(frozen=True, slots=True)
class Target:
    provider: str
    model: str
    weight: int = 1


@dataclass(frozen=True, slots=True)
class Alias:
    name: str
    # Weight 0 targets are configured but never selected.
    targets: tuple[Target, ...]
    on_target_failure: TargetFailureMode = "reselect"
    # A request with no conversation id gets one from the start of its conversation.
    implicit_sessions: bool = False


@dataclass(frozen=True, slots=True)
class User:
    """A client of the proxy, known by the SHA-256 of its key."""

    external_id: str
    key_sha256: bytes
    # The alias routed to when the user names no model; None: routing.default_model.
    tier: str | None = None
    # What the user may ask for; None: anything.
    models: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    # The alias routed to when a request names no model, has no pin and its user no tier.
    default_model: str | None = None
    eject_after_failures: int = DEFAULT_EJECT_AFTER_FAILURES
    eject_seconds: float = DEFAULT_EJECT_SECONDS


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    workers: int = 1
    log_level: str = "info"
    log_format: LogFormat = "text"
    shutdown_grace_seconds: float = DEFAULT_SHUTDOWN_GRACE
    # Client connections (protocol.py): deadlines, body rate, cap per worker.
    header_timeout_seconds: float = DEFAULT_HEADER_TIMEOUT
    body_min_rate_bytes_per_second: int = DEFAULT_BODY_MIN_RATE
    body_rate_window_seconds: float = DEFAULT_BODY_RATE_WINDOW
    max_connections: int = DEFAULT_MAX_CLIENT_CONNECTIONS


@dataclass(frozen=True, slots=True)
class SessionConfig:
    redis_url: Secret | None = None
    ttl_seconds: int = DEFAULT_SESSION_TTL
    # In order: the first present gives the conversation id.
    id_sources: tuple[IdSource, ...] = DEFAULT_ID_SOURCES
    # The HMAC key of implicit session ids and prompt-cache keys, the same on every replica.
    hash_key: Secret | None = None
    on_store_error: StoreErrorMode = "closed"
    # The whole budget of one store call, pool wait included.
    timeout_seconds: float = DEFAULT_STORE_TIMEOUT
    breaker_failures: int = DEFAULT_BREAKER_FAILURES
    breaker_reset_seconds: float = DEFAULT_BREAKER_RESET
    redis_max_connections: int = DEFAULT_REDIS_MAX_CONNECTIONS
    memory_max_sessions: int = DEFAULT_MEMORY_MAX_SESSIONS
    # Pins kept in each process, invalidated by Redis (sessions/near.py); Redis only.
    near_cache: bool = True
    near_cache_max_entries: int = DEFAULT_NEAR_CACHE_ENTRIES
    near_cache_max_bytes: int = DEFAULT_NEAR_CACHE_BYTES
    # With the near-cache, a key's TTL is renewed at most this often per process (and at
    # least every half TTL).
    renew_interval_seconds: float = DEFAULT_RENEW_INTERVAL
    # redis_url names any node of a Redis Cluster.
    cluster: bool = False
    # Redis Sentinel: (host, port) of each sentinel, and the name of the monitored primary.
    sentinels: tuple[tuple[str, int], ...] = ()
    sentinel_service: str | None = None

    @property
    def shared(self) -> bool:
        """Whether sessions live in Redis, shared by every process."""
        return self.redis_url is not None or bool(self.sentinels)


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    # To the response headers, and from them to the first body bytes.
    first_byte_timeout: float = DEFAULT_FIRST_BYTE_TIMEOUT
    # Silence between two reads of the body after its first bytes.
    chunk_timeout: float = DEFAULT_CHUNK_TIMEOUT
    # Wait for a free connection when all max_connections are busy.
    pool_timeout: float = DEFAULT_POOL_TIMEOUT
    # A client that takes none of its response for this long is cut off.
    stream_idle_seconds: float = DEFAULT_STREAM_IDLE_SECONDS
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


@dataclass(frozen=True, slots=True)
class DebugConfig:
    enabled: bool = False
    token: Secret | None = None


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    # Model names counted under their own label besides aliases and their targets.
    models: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TracingConfig:
    # The OTLP/HTTP URL spans are sent to; None: tracing is off.
    endpoint: str | None = None
    service_name: str = DEFAULT_SERVICE_NAME
    # The HMAC key of the conversation ids in spans; None: one of this process's own
    # (the hashes then differ between processes).
    conversation_key: Secret | None = None


@dataclass(frozen=True, slots=True)
class Config:
    providers: tuple[Provider, ...]
    aliases: Mapping[str, Alias] = field(default_factory=dict)
    users: tuple[User, ...] = ()
    routing: RoutingConfig = RoutingConfig()
    server: ServerConfig = ServerConfig()
    session: SessionConfig = SessionConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    debug: DebugConfig = DebugConfig()
    metrics: MetricsConfig = MetricsConfig()
    tracing: TracingConfig = TracingConfig()
    source: str = "defaults"
    # Loaded for --demo: providers and aliases are the built-in demo ones.
    demo: bool = False

    def provider(self, name: str) -> Provider | None:
        for provider in self.providers:
            if provider.name == name:
                return provider
        return None


def load_config(
    path: str | None = None,
    *,
    env: Mapping[str, str],
    overrides: Mapping[str, Any] | None = None,
    demo: bool = False,
) -> Config:
    """Build the configuration, or raise ConfigError naming the offending key. With `demo`,
    the providers and aliases are the built-in demo ones and the file may name none."""
    path = path or env.get("SENTINEL_CONFIG") or None
    raw = _read_toml(path) if path else {}
    _only(
        raw,
        "",
        {
            "server",
            "session",
            "upstream",
            "providers",
            "models",
            "routing",
            "users",
            "debug",
            "metrics",
            "tracing",
        },
    )
    server = _server(_table(raw, "server"), env, overrides or {})
    session = _session(_table(raw, "session"), env)
    if demo:
        providers, aliases = _demo_routing(raw)
    else:
        providers = _providers(raw.get("providers"), env)
        aliases = _aliases(_table(raw, "models"), {p.name for p in providers})
    routing = _routing(_table(raw, "routing"), aliases)
    users = _users(raw.get("users"), aliases, providers)
    config = Config(
        providers=providers,
        aliases=aliases,
        users=users,
        routing=routing,
        server=server,
        session=session,
        upstream=_upstream(_table(raw, "upstream")),
        debug=_debug(_table(raw, "debug")),
        metrics=_metrics(_table(raw, "metrics")),
        tracing=_tracing(_table(raw, "tracing"), env, session.hash_key),
        source=path or "defaults",
        demo=demo,
    )
    implicit = [name for name, alias in aliases.items() if alias.implicit_sessions]
    if implicit and session.hash_key is None:
        raise ConfigError(
            f"models.{implicit[0]}.implicit_sessions",
            "needs session.implicit_key_env: the HMAC key, the same on every replica",
        )
    if not session.shared and server.workers > 1:
        raise ConfigError(
            "server.workers",
            f"{server.workers} workers need a shared session store: set session.redis_url "
            "or session.sentinels (the in-memory store lives in one process)",
        )
    _check_file_limit(config)
    return config


def file_descriptors(config: Config) -> int:
    """File descriptors one worker may hold at once: client and upstream connections, the
    Redis pool and a reserve."""
    redis = config.session.redis_max_connections if config.session.shared else 0
    return (
        config.server.max_connections
        + config.upstream.max_connections
        + redis
        + FILE_DESCRIPTOR_RESERVE
    )


# Settings held by what lives as long as the process: the listening sockets, the workers,
# the protocol class and logging (all of [server]), the session store's connections and the
# upstream pool. A reload keeps their running values.
RESTART_SETTINGS: Mapping[str, tuple[str, ...]] = {
    "server": tuple(f.name for f in fields(ServerConfig)),
    "session": (
        "redis_url",
        "timeout_seconds",
        "breaker_failures",
        "breaker_reset_seconds",
        "redis_max_connections",
        "memory_max_sessions",
        "near_cache",
        "near_cache_max_entries",
        "near_cache_max_bytes",
        "renew_interval_seconds",
        "cluster",
        "sentinels",
        "sentinel_service",
    ),
    "upstream": ("max_connections",),
    # The exporter is made at start.
    "tracing": ("endpoint", "service_name"),
}


def keep_restart_settings(running: Config, loaded: Config) -> tuple[Config, list[str]]:
    """`loaded` with the running values of RESTART_SETTINGS, and the keys of those whose
    loaded value differs (and so waits for a restart)."""
    waiting: list[str] = []
    sections: dict[str, Any] = {}
    for section, names in RESTART_SETTINGS.items():
        old, new = getattr(running, section), getattr(loaded, section)
        kept = {name: getattr(old, name) for name in names}
        waiting += [f"{section}.{name}" for name in names if getattr(new, name) != kept[name]]
        sections[section] = replace(new, **kept)
    return replace(loaded, **sections), waiting


def _check_file_limit(config: Config) -> None:
    # The soft limit is raised to the hard one at start (protocol.raise_file_limit); past the
    # hard one, accept() would fail where the connection cap should answer 503.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    needed = file_descriptors(config)
    if hard != resource.RLIM_INFINITY and needed > hard:
        raise ConfigError(
            "server.max_connections",
            f"{config.server.max_connections} client connections with the upstream and Redis "
            f"pools need {needed} file descriptors, above this process's hard limit of "
            f"{hard} (ulimit -Hn)",
        )


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError("config", f"{path} is not UTF-8 text") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path} is not valid TOML: {exc}") from exc


def _table(raw: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(key, "must be a table")
    return value


def _only(table: Mapping[str, Any], prefix: str, known: set[str]) -> None:
    for key in table:
        if key not in known:
            raise ConfigError(f"{prefix}{key}", f"unknown key (expected one of {sorted(known)})")


def _server(raw: dict[str, Any], env: Mapping[str, str], cli: Mapping[str, Any]) -> ServerConfig:
    _only(
        raw,
        "server.",
        {
            "host",
            "port",
            "workers",
            "log_level",
            "log_format",
            "shutdown_grace_seconds",
            "header_timeout_seconds",
            "body_min_rate_bytes_per_second",
            "body_rate_window_seconds",
            "max_connections",
        },
    )
    merged = {**raw}
    if "SENTINEL_HOST" in env:
        merged["host"] = env["SENTINEL_HOST"]
    if "SENTINEL_PORT" in env:
        merged["port"] = _env_int(env, "SENTINEL_PORT")
    merged.update({k: v for k, v in cli.items() if v is not None})
    host = _str(merged, "server.", "host", DEFAULT_HOST)
    port = _int(merged, "server.", "port", DEFAULT_PORT, low=0, high=65535)
    log_level = _str(merged, "server.", "log_level", "info").lower()
    if log_level not in LOG_LEVELS:
        raise ConfigError("server.log_level", f"must be one of {', '.join(LOG_LEVELS)}")
    log_format = _str(merged, "server.", "log_format", "text")
    if log_format not in ("text", "json"):
        raise ConfigError("server.log_format", 'must be "text" or "json"')
    return ServerConfig(
        host=host,
        port=port,
        workers=_int(merged, "server.", "workers", 1, low=1, high=MAX_WORKERS),
        log_level=log_level,
        log_format=log_format,  # type: ignore[arg-type]
        shutdown_grace_seconds=_float(
            merged, "server.", "shutdown_grace_seconds", DEFAULT_SHUTDOWN_GRACE
        ),
        header_timeout_seconds=_float(
            merged, "server.", "header_timeout_seconds", DEFAULT_HEADER_TIMEOUT
        ),
        body_min_rate_bytes_per_second=_int(
            merged, "server.", "body_min_rate_bytes_per_second", DEFAULT_BODY_MIN_RATE, low=1
        ),
        body_rate_window_seconds=_float(
            merged, "server.", "body_rate_window_seconds", DEFAULT_BODY_RATE_WINDOW
        ),
        max_connections=_int(
            merged, "server.", "max_connections", DEFAULT_MAX_CLIENT_CONNECTIONS, low=1
        ),
    )


def _session(raw: dict[str, Any], env: Mapping[str, str]) -> SessionConfig:
    _only(
        raw,
        "session.",
        {
            "redis_url",
            "ttl_seconds",
            "header",
            "id_sources",
            "implicit_key_env",
            "on_store_error",
            "timeout_seconds",
            "breaker_failures",
            "breaker_reset_seconds",
            "redis_max_connections",
            "memory_max_sessions",
            "cluster",
            "sentinels",
            "sentinel_service",
            "near_cache",
            "near_cache_max_entries",
            "near_cache_max_bytes",
            "renew_interval_seconds",
        },
    )
    merged = {**raw}
    if env.get("SENTINEL_REDIS_URL"):
        merged["redis_url"] = env["SENTINEL_REDIS_URL"]
    if "SESSION_TTL_SECONDS" in env:
        merged["ttl_seconds"] = _env_int(env, "SESSION_TTL_SECONDS")
    redis_url = merged.get("redis_url")
    if redis_url is not None:
        redis_url = _redis_url(_str(merged, "session.", "redis_url", ""))
    id_sources = _id_sources(merged)
    hash_key = None
    if "implicit_key_env" in merged:
        variable = _str(merged, "session.", "implicit_key_env", None)
        value = env.get(variable, "")
        if len(value.encode()) < MIN_HASH_KEY_BYTES:
            raise ConfigError(
                "session.implicit_key_env",
                f"environment variable {variable} must hold at least {MIN_HASH_KEY_BYTES} "
                "bytes (the same on every replica)",
            )
        hash_key = Secret(value)
    ttl = _int(merged, "session.", "ttl_seconds", DEFAULT_SESSION_TTL, low=1, high=MAX_SESSION_TTL)
    renew = _float(merged, "session.", "renew_interval_seconds", DEFAULT_RENEW_INTERVAL)
    mode = _str(merged, "session.", "on_store_error", "closed")
    if mode not in ("closed", "open"):
        raise ConfigError("session.on_store_error", 'must be "closed" or "open"')
    cluster = _bool(merged, "session.", "cluster", False)
    sentinels = _sentinels(merged.get("sentinels"))
    service = None
    if sentinels or "sentinel_service" in merged:
        service = _name(merged, "session.", "sentinel_service")
        if not sentinels:
            raise ConfigError("session.sentinel_service", "needs session.sentinels")
    if cluster:
        if sentinels:
            raise ConfigError("session.sentinels", "cannot go with session.cluster: choose one")
        if redis_url is None:
            raise ConfigError("session.cluster", "needs session.redis_url: any node of the cluster")
        if urlsplit(redis_url).scheme == "unix":
            raise ConfigError("session.redis_url", "a cluster is reached over TCP, not unix://")
        database = parse_url(redis_url).get("db") or 0  # type: ignore[no-untyped-call]
        if int(database) != 0:
            raise ConfigError("session.redis_url", "a Redis Cluster has database 0 only")
    elif sentinels and redis_url is not None and urlsplit(redis_url).scheme == "unix":
        raise ConfigError("session.redis_url", "the sentinels name a TCP primary: not unix://")
    near_cache = _bool(merged, "session.", "near_cache", True)
    return SessionConfig(
        redis_url=Secret(redis_url) if redis_url else None,
        ttl_seconds=ttl,
        id_sources=id_sources,
        hash_key=hash_key,
        on_store_error=mode,  # type: ignore[arg-type]
        timeout_seconds=_float(merged, "session.", "timeout_seconds", DEFAULT_STORE_TIMEOUT),
        breaker_failures=_int(
            merged, "session.", "breaker_failures", DEFAULT_BREAKER_FAILURES, low=1
        ),
        breaker_reset_seconds=_float(
            merged, "session.", "breaker_reset_seconds", DEFAULT_BREAKER_RESET
        ),
        redis_max_connections=_int(
            merged, "session.", "redis_max_connections", DEFAULT_REDIS_MAX_CONNECTIONS, low=1
        ),
        memory_max_sessions=_int(
            merged, "session.", "memory_max_sessions", DEFAULT_MEMORY_MAX_SESSIONS, low=1
        ),
        cluster=cluster,
        sentinels=sentinels,
        sentinel_service=service,
        near_cache=near_cache,
        near_cache_max_entries=_int(
            merged, "session.", "near_cache_max_entries", DEFAULT_NEAR_CACHE_ENTRIES, low=1
        ),
        near_cache_max_bytes=_int(
            merged, "session.", "near_cache_max_bytes", DEFAULT_NEAR_CACHE_BYTES, low=1024
        ),
        renew_interval_seconds=renew,
    )


def _sentinels(raw: Any) -> tuple[tuple[str, int], ...]:
    """`["host:port", ...]` ("[::1]:26379" for IPv6) as (host, port) pairs."""
    if raw is None:
        return ()
    key = "session.sentinels"
    if not isinstance(raw, list) or not raw:
        raise ConfigError(key, 'must be a non-empty array of "host:port" strings')
    found: list[tuple[str, int]] = []
    for index, item in enumerate(raw):
        problem = f'[{index}] must be "host:port" (a port from 1 to 65535)'
        if not isinstance(item, str) or not item.isascii() or not item.isprintable():
            raise ConfigError(key, problem)
        try:
            parts = urlsplit(f"//{item}")
            host, port = parts.hostname, parts.port
        except ValueError:
            raise ConfigError(key, problem) from None
        if not host or not port or " " in item or parts.path or parts.username:
            raise ConfigError(key, problem)
        if (host, port) in found:
            raise ConfigError(key, f"[{index}] {item} is named twice")
        found.append((host, port))
    return tuple(found)


def _id_sources(raw: Mapping[str, Any]) -> tuple[IdSource, ...]:
    if "header" in raw:
        # The older spelling: our body field, then this header instead of x-conversation-id.
        if "id_sources" in raw:
            raise ConfigError(
                "session.header", 'drop it: id_sources says it ("header:<name>") and more'
            )
        header = _header_name(raw["header"], "session.header")
        return (DEFAULT_ID_SOURCES[0], IdSource("header", header, owned=True))
    if "id_sources" not in raw:
        return DEFAULT_ID_SOURCES
    listed = raw["id_sources"]
    if not isinstance(listed, list) or not listed:
        raise ConfigError("session.id_sources", "must be a non-empty array of sources")
    sources: list[IdSource] = []
    for index, item in enumerate(listed):
        key = f"session.id_sources[{index}]"
        kind, _, name = item.partition(":") if isinstance(item, str) else ("", "", "")
        if kind == "body" and name in _BODY_ID_FIELDS:
            source = IdSource("body", name, owned=name == BODY_ID_FIELD)
        elif kind == "header":
            name = _header_name(name, key)
            source = IdSource("header", name, owned=name == DEFAULT_SESSION_HEADER)
        else:
            raise ConfigError(
                key,
                f'must be "header:<name>" or "body:<field>" with a field of '
                f"{sorted(_BODY_ID_FIELDS)}",
            )
        if source in sources:
            raise ConfigError(key, f"{source.label} is listed twice")
        sources.append(source)
    return tuple(sources)


def _header_name(value: object, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, "must be an HTTP header name")
    header = value.lower()
    if not header.isascii() or not all(c.isalnum() or c == "-" for c in header):
        raise ConfigError(key, "must be an HTTP header name")
    if header in _RESERVED_HEADERS or header.startswith("x-sentinel-"):
        raise ConfigError(key, f"{header} means something else: choose another")
    return header


def _providers(raw: Any, env: Mapping[str, str]) -> tuple[Provider, ...]:
    if raw is None:
        url = env.get("SENTINEL_UPSTREAM_URL") or DEFAULT_UPSTREAM_URL
        # With no configuration the proxy is a pass-through: the client's key goes on.
        base_url = _base_url("SENTINEL_UPSTREAM_URL", url)
        provider = Provider(
            DEFAULT_PROVIDER_NAME,
            base_url,
            forward_client_key=True,
            prompt_cache=urlsplit(base_url).hostname == _OPENAI_HOST,
        )
        return (provider,)
    if not isinstance(raw, list) or not raw:
        raise ConfigError("providers", "must be a non-empty array of tables ([[providers]])")
    providers: list[Provider] = []
    for index, item in enumerate(raw):
        prefix = f"providers[{index}]."
        if not isinstance(item, dict):
            raise ConfigError(f"providers[{index}]", "must be a table")
        _only(
            item,
            prefix,
            {"name", "base_url", "api_key_env", "forward_client_key", "prompt_cache"},
        )
        name = _name(item, prefix, "name")
        if any(p.name == name for p in providers):
            raise ConfigError(f"{prefix}name", f"provider {name!r} is defined twice")
        api_key = variable = None
        if "api_key_env" in item:
            variable = _str(item, prefix, "api_key_env", None)
            if not env.get(variable):
                raise ConfigError(
                    f"{prefix}api_key_env", f"environment variable {variable} is not set"
                )
            key = env[variable]
            if not key.isascii() or not key.isprintable() or key.strip() != key:
                raise ConfigError(
                    f"{prefix}api_key_env",
                    f"environment variable {variable} holds spaces, control characters or "
                    "non-ASCII text (a trailing newline?)",
                )
            api_key = Secret(key)
        forward = _bool(item, prefix, "forward_client_key", False)
        if forward and api_key is not None:
            raise ConfigError(
                f"{prefix}forward_client_key", "cannot go with api_key_env: choose one key"
            )
        base_url = _base_url(f"{prefix}base_url", _str(item, prefix, "base_url", None))
        # On by default where the API is known to take the field: OpenAI's own.
        openai = urlsplit(base_url).hostname == _OPENAI_HOST
        providers.append(
            Provider(
                name=name,
                base_url=base_url,
                api_key=api_key,
                forward_client_key=forward,
                prompt_cache=_bool(item, prefix, "prompt_cache", openai),
                api_key_env=variable,
            )
        )
    return tuple(providers)


def _demo_routing(raw: Mapping[str, Any]) -> tuple[tuple[Provider, ...], dict[str, Alias]]:
    for key, table in (("providers", "[[providers]]"), ("models", "[models]")):
        if key in raw:
            # Refused rather than merged: which provider came first would be a guess. A file
            # that wants both names the demo providers' base URLs itself.
            raise ConfigError(
                key,
                f"--demo brings its own providers and the alias {DEMO_ALIAS!r}: remove "
                f"{table} from the file, or start without --demo",
            )
    providers = tuple(Provider(name, f"http://{name}.{DEMO_DOMAIN}/v1") for name, _ in DEMO_TARGETS)
    targets = tuple(Target(provider, model) for provider, model in DEMO_TARGETS)
    return providers, {DEMO_ALIAS: Alias(DEMO_ALIAS, targets)}


def _base_url(key: str, url: str) -> str:
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


def _redis_url(url: str) -> str:
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


def _aliases(raw: dict[str, Any], providers: set[str]) -> dict[str, Alias]:
    aliases: dict[str, Alias] = {}
    for name, table in raw.items():
        prefix = f"models.{name}."
        if not is_valid_name(name):
            raise ConfigError(f"models.{name!r}", _NAME_RULE)
        if not isinstance(table, dict):
            raise ConfigError(f"models.{name}", "must be a table with a targets array")
        _only(table, prefix, {"targets", "on_target_failure", "implicit_sessions"})
        on_failure = _str(table, prefix, "on_target_failure", "reselect")
        if on_failure not in ("reselect", "error"):
            raise ConfigError(f"{prefix}on_target_failure", 'must be "reselect" or "error"')
        targets_raw = table.get("targets")
        if not isinstance(targets_raw, list) or not targets_raw:
            raise ConfigError(f"{prefix}targets", "must be a non-empty array")
        targets: list[Target] = []
        for index, item in enumerate(targets_raw):
            key = f"{prefix}targets[{index}]."
            if not isinstance(item, dict):
                raise ConfigError(f"{prefix}targets[{index}]", "must be a table")
            _only(item, key, {"provider", "model", "weight"})
            provider = _str(item, key, "provider", None)
            if provider not in providers:
                raise ConfigError(f"{key}provider", f"unknown provider {provider!r}")
            model = _name(item, key, "model")
            weight = _int(item, key, "weight", 1, low=0)
            if any((t.provider, t.model) == (provider, model) for t in targets):
                raise ConfigError(f"{key}model", f"{provider}/{model} is a target twice")
            targets.append(Target(provider=provider, model=model, weight=weight))
        if not any(t.weight for t in targets):
            raise ConfigError(f"{prefix}targets", "every target has weight 0: none can serve")
        aliases[name] = Alias(
            name=name,
            targets=tuple(targets),
            on_target_failure=on_failure,  # type: ignore[arg-type]
            implicit_sessions=_bool(table, prefix, "implicit_sessions", False),
        )
    return aliases


def _routing(raw: dict[str, Any], aliases: Mapping[str, Alias]) -> RoutingConfig:
    _only(raw, "routing.", {"default_model", "eject_after_failures", "eject_seconds"})
    default = None
    if "default_model" in raw:
        default = _alias_name(raw, "routing.", "default_model", aliases)
    return RoutingConfig(
        default_model=default,
        eject_after_failures=_int(
            raw, "routing.", "eject_after_failures", DEFAULT_EJECT_AFTER_FAILURES, low=1
        ),
        eject_seconds=_float(raw, "routing.", "eject_seconds", DEFAULT_EJECT_SECONDS),
    )


def _users(
    raw: Any, aliases: Mapping[str, Alias], providers: tuple[Provider, ...]
) -> tuple[User, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        raise ConfigError("users", "must be a non-empty array of tables ([[users]])")
    users: list[User] = []
    for index, item in enumerate(raw):
        prefix = f"users[{index}]."
        if not isinstance(item, dict):
            raise ConfigError(f"users[{index}]", "must be a table")
        _only(item, prefix, {"external_id", "key_sha256", "tier", "models"})
        external_id = _str(item, prefix, "external_id", None)
        if len(external_id) > MAX_NAME_LENGTH or not _EXTERNAL_ID.fullmatch(external_id):
            raise ConfigError(
                f"{prefix}external_id",
                f"must be letters, digits, '-', '_' or '.' (never ':'), at most {MAX_NAME_LENGTH}",
            )
        digest = _str(item, prefix, "key_sha256", None).lower()
        if not _SHA256.fullmatch(digest):
            raise ConfigError(f"{prefix}key_sha256", "must be 64 hex digits (SHA-256 of the key)")
        models = None
        if "models" in item:
            listed = item["models"]
            if not isinstance(listed, list) or not all(is_valid_name(m) for m in listed):
                raise ConfigError(f"{prefix}models", "must be an array of model names")
            models = frozenset(listed)
        tier = None
        if "tier" in item:
            tier = _alias_name(item, prefix, "tier", aliases)
            if models is not None and tier not in models:
                raise ConfigError(f"{prefix}tier", f"{tier!r} is not among the user's models")
        for other in users:
            if other.external_id == external_id:
                raise ConfigError(f"{prefix}external_id", f"{external_id!r} is defined twice")
            if other.key_sha256.hex() == digest:
                raise ConfigError(f"{prefix}key_sha256", "is another user's key")
        users.append(User(external_id, bytes.fromhex(digest), tier, models))
    for index, provider in enumerate(providers):
        # Authenticated clients' keys are the proxy's business, never an upstream's. The
        # demo upstream runs in this process and needs no key.
        demo = (urlsplit(provider.base_url).hostname or "").endswith("." + DEMO_DOMAIN)
        if provider.api_key is None and not demo:
            raise ConfigError(
                f"providers[{index}].api_key_env",
                f"provider {provider.name!r} needs its own key when [[users]] are configured",
            )
    return tuple(users)


def _alias_name(raw: Mapping[str, Any], prefix: str, key: str, aliases: Mapping[str, Alias]) -> str:
    name = _str(raw, prefix, key, None)
    if name not in aliases:
        raise ConfigError(f"{prefix}{key}", f"{name!r} is no alias ([models.{name}])")
    return name


def _upstream(raw: dict[str, Any]) -> UpstreamConfig:
    _only(
        raw,
        "upstream.",
        {
            "connect_timeout",
            "first_byte_timeout",
            "chunk_timeout",
            "pool_timeout",
            "stream_idle_seconds",
            "read_timeout",
            "max_connections",
            "max_body_bytes",
        },
    )
    first_byte, chunk = DEFAULT_FIRST_BYTE_TIMEOUT, DEFAULT_CHUNK_TIMEOUT
    if "read_timeout" in raw:
        # The older key meant both; configurations that set it keep working.
        if "first_byte_timeout" in raw or "chunk_timeout" in raw:
            raise ConfigError(
                "upstream.read_timeout",
                "replaced by first_byte_timeout and chunk_timeout: set those, not both kinds",
            )
        first_byte = chunk = _float(raw, "upstream.", "read_timeout", DEFAULT_FIRST_BYTE_TIMEOUT)
    return UpstreamConfig(
        connect_timeout=_float(raw, "upstream.", "connect_timeout", DEFAULT_CONNECT_TIMEOUT),
        first_byte_timeout=_float(raw, "upstream.", "first_byte_timeout", first_byte),
        chunk_timeout=_float(raw, "upstream.", "chunk_timeout", chunk),
        pool_timeout=_float(raw, "upstream.", "pool_timeout", DEFAULT_POOL_TIMEOUT),
        stream_idle_seconds=_float(
            raw, "upstream.", "stream_idle_seconds", DEFAULT_STREAM_IDLE_SECONDS
        ),
        max_connections=_int(raw, "upstream.", "max_connections", DEFAULT_MAX_CONNECTIONS, low=1),
        max_body_bytes=_int(raw, "upstream.", "max_body_bytes", DEFAULT_MAX_BODY_BYTES, low=1),
    )


def _debug(raw: dict[str, Any]) -> DebugConfig:
    _only(raw, "debug.", {"enabled", "token"})
    enabled = _bool(raw, "debug.", "enabled", False)
    if not enabled:
        return DebugConfig()
    token = raw.get("token")
    if (
        not isinstance(token, str)
        or len(token) < 16
        or not token.isascii()
        or not token.isprintable()
        or " " in token
    ):
        raise ConfigError(
            "debug.token",
            "must be at least 16 printable ASCII characters, no spaces, when enabled",
        )
    return DebugConfig(enabled=True, token=Secret(token))


_OPENAI_HOST = "api.openai.com"
_EXTERNAL_ID = re.compile(r"[A-Za-z0-9._-]+")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _metrics(raw: dict[str, Any]) -> MetricsConfig:
    _only(raw, "metrics.", {"models"})
    models = raw.get("models", [])
    if not isinstance(models, list):
        raise ConfigError("metrics.models", "must be an array of model names")
    for index, model in enumerate(models):
        if not is_valid_name(model):
            raise ConfigError(f"metrics.models[{index}]", _NAME_RULE)
    return MetricsConfig(models=tuple(models))


def _tracing(raw: dict[str, Any], env: Mapping[str, str], hash_key: Secret | None) -> TracingConfig:
    """On when OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT is set (as
    the OpenTelemetry SDK reads them), unless OTEL_SDK_DISABLED is true. The SDK reads the
    other OTEL_* variables (headers, timeout, sampler, batching, resource) itself."""
    _only(raw, "tracing.", {"conversation_key_env"})
    # The session's HMAC key, the same on every replica, unless tracing has one of its own.
    key = hash_key
    if "conversation_key_env" in raw:
        variable = _str(raw, "tracing.", "conversation_key_env", None)
        if not env.get(variable):
            raise ConfigError(
                "tracing.conversation_key_env", f"environment variable {variable} is not set"
            )
        key = Secret(env[variable])
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or None
    name = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    if endpoint is None and env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        name = "OTEL_EXPORTER_OTLP_ENDPOINT"
        endpoint = env[name].rstrip("/") + "/v1/traces"
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        endpoint = None
    if endpoint is not None:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(name, "must be an http:// or https:// URL")
    return TracingConfig(
        endpoint=endpoint,
        service_name=env.get("OTEL_SERVICE_NAME") or DEFAULT_SERVICE_NAME,
        conversation_key=key,
    )


_NAME_RULE = f"must be at most {MAX_NAME_LENGTH} printable characters, no space at either end"


def _name(raw: Mapping[str, Any], prefix: str, key: str) -> str:
    value = _str(raw, prefix, key, None)
    if not is_valid_name(value):
        raise ConfigError(f"{prefix}{key}", _NAME_RULE)
    return value


def _bool(raw: Mapping[str, Any], prefix: str, key: str, default: bool) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{prefix}{key}", "must be true or false")
    return value


def _str(raw: Mapping[str, Any], prefix: str, key: str, default: str | None) -> str:
    value = raw.get(key, default)
    if value is None:
        raise ConfigError(f"{prefix}{key}", "is required")
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{prefix}{key}", "must be a non-empty string")
    return value


def _int(
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


def _float(raw: Mapping[str, Any], prefix: str, key: str, default: float) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{prefix}{key}", "must be a number of seconds")
    if not math.isfinite(value) or value <= 0 or value > MAX_SECONDS:
        raise ConfigError(f"{prefix}{key}", f"must be above 0 and at most {MAX_SECONDS}")
    return float(value)


def _env_int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError as exc:
        raise ConfigError(name, f"must be an integer, got {env[name]!r}") from exc
