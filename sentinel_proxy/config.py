"""
Configuration: built once at start-up from the TOML file, the environment and the command
line (in rising precedence), frozen afterwards. Nothing but config*.py reads the
environment. config_routing.py reads the routing sections and config_values.py single
values; the rest of the package imports their types from here.
"""

from __future__ import annotations

import resource
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal
from urllib.parse import urlsplit

from redis.connection import parse_url

from sentinel_proxy.config_routing import DEFAULT_UPSTREAM_URL as DEFAULT_UPSTREAM_URL
from sentinel_proxy.config_routing import DEMO_DOMAIN as DEMO_DOMAIN
from sentinel_proxy.config_routing import DEMO_TARGETS as DEMO_TARGETS
from sentinel_proxy.config_routing import Alias as Alias
from sentinel_proxy.config_routing import Provider as Provider
from sentinel_proxy.config_routing import RoutingConfig as RoutingConfig
from sentinel_proxy.config_routing import Target as Target
from sentinel_proxy.config_routing import User as User
from sentinel_proxy.config_routing import (
    demo_routing,
    read_aliases,
    read_providers,
    read_routing,
    read_users,
)
from sentinel_proxy.config_values import MAX_NAME_LENGTH as MAX_NAME_LENGTH
from sentinel_proxy.config_values import (
    NAME_RULE,
    only_keys,
    parse_header_name,
    parse_redis_url,
    read_bool,
    read_env_int,
    read_int,
    read_name,
    read_seconds,
    read_str,
    read_table,
    read_toml,
)
from sentinel_proxy.config_values import Secret as Secret
from sentinel_proxy.config_values import is_valid_name as is_valid_name
from sentinel_proxy.exceptions import ConfigError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
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
# Redis refuses expiry times past a limit, and a decade is more than any conversation needs.
MAX_SESSION_TTL = 10 * 365 * 86_400
MAX_WORKERS = 256
DEFAULT_SERVICE_NAME = "sentinel-proxy"

LogFormat = Literal["text", "json"]
StoreErrorMode = Literal["closed", "open"]
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


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
    raw = read_toml(path) if path else {}
    only_keys(
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
    server = _server(read_table(raw, "server"), env, overrides or {})
    session = _session(read_table(raw, "session"), env)
    if demo:
        providers, aliases = demo_routing(raw)
    else:
        providers = read_providers(raw.get("providers"), env)
        aliases = read_aliases(read_table(raw, "models"), {p.name for p in providers})
    routing = read_routing(read_table(raw, "routing"), aliases)
    users = read_users(raw.get("users"), aliases, providers)
    config = Config(
        providers=providers,
        aliases=aliases,
        users=users,
        routing=routing,
        server=server,
        session=session,
        upstream=_upstream(read_table(raw, "upstream")),
        debug=_debug(read_table(raw, "debug")),
        metrics=_metrics(read_table(raw, "metrics")),
        tracing=_tracing(read_table(raw, "tracing"), env, session.hash_key),
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


def _server(raw: dict[str, Any], env: Mapping[str, str], cli: Mapping[str, Any]) -> ServerConfig:
    only_keys(
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
        merged["port"] = read_env_int(env, "SENTINEL_PORT")
    merged.update({k: v for k, v in cli.items() if v is not None})
    host = read_str(merged, "server.", "host", DEFAULT_HOST)
    port = read_int(merged, "server.", "port", DEFAULT_PORT, low=0, high=65535)
    log_level = read_str(merged, "server.", "log_level", "info").lower()
    if log_level not in LOG_LEVELS:
        raise ConfigError("server.log_level", f"must be one of {', '.join(LOG_LEVELS)}")
    log_format = read_str(merged, "server.", "log_format", "text")
    if log_format not in ("text", "json"):
        raise ConfigError("server.log_format", 'must be "text" or "json"')
    return ServerConfig(
        host=host,
        port=port,
        workers=read_int(merged, "server.", "workers", 1, low=1, high=MAX_WORKERS),
        log_level=log_level,
        log_format=log_format,  # type: ignore[arg-type]
        shutdown_grace_seconds=read_seconds(
            merged, "server.", "shutdown_grace_seconds", DEFAULT_SHUTDOWN_GRACE
        ),
        header_timeout_seconds=read_seconds(
            merged, "server.", "header_timeout_seconds", DEFAULT_HEADER_TIMEOUT
        ),
        body_min_rate_bytes_per_second=read_int(
            merged, "server.", "body_min_rate_bytes_per_second", DEFAULT_BODY_MIN_RATE, low=1
        ),
        body_rate_window_seconds=read_seconds(
            merged, "server.", "body_rate_window_seconds", DEFAULT_BODY_RATE_WINDOW
        ),
        max_connections=read_int(
            merged, "server.", "max_connections", DEFAULT_MAX_CLIENT_CONNECTIONS, low=1
        ),
    )


def _session(raw: dict[str, Any], env: Mapping[str, str]) -> SessionConfig:
    only_keys(
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
        merged["ttl_seconds"] = read_env_int(env, "SESSION_TTL_SECONDS")
    redis_url = merged.get("redis_url")
    if redis_url is not None:
        redis_url = parse_redis_url(read_str(merged, "session.", "redis_url", ""))
    id_sources = _id_sources(merged)
    hash_key = None
    if "implicit_key_env" in merged:
        variable = read_str(merged, "session.", "implicit_key_env", None)
        value = env.get(variable, "")
        if len(value.encode()) < MIN_HASH_KEY_BYTES:
            raise ConfigError(
                "session.implicit_key_env",
                f"environment variable {variable} must hold at least {MIN_HASH_KEY_BYTES} "
                "bytes (the same on every replica)",
            )
        hash_key = Secret(value)
    ttl = read_int(
        merged, "session.", "ttl_seconds", DEFAULT_SESSION_TTL, low=1, high=MAX_SESSION_TTL
    )
    renew = read_seconds(merged, "session.", "renew_interval_seconds", DEFAULT_RENEW_INTERVAL)
    mode = read_str(merged, "session.", "on_store_error", "closed")
    if mode not in ("closed", "open"):
        raise ConfigError("session.on_store_error", 'must be "closed" or "open"')
    cluster = read_bool(merged, "session.", "cluster", False)
    sentinels = _sentinels(merged.get("sentinels"))
    service = None
    if sentinels or "sentinel_service" in merged:
        service = read_name(merged, "session.", "sentinel_service")
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
    near_cache = read_bool(merged, "session.", "near_cache", True)
    return SessionConfig(
        redis_url=Secret(redis_url) if redis_url else None,
        ttl_seconds=ttl,
        id_sources=id_sources,
        hash_key=hash_key,
        on_store_error=mode,  # type: ignore[arg-type]
        timeout_seconds=read_seconds(merged, "session.", "timeout_seconds", DEFAULT_STORE_TIMEOUT),
        breaker_failures=read_int(
            merged, "session.", "breaker_failures", DEFAULT_BREAKER_FAILURES, low=1
        ),
        breaker_reset_seconds=read_seconds(
            merged, "session.", "breaker_reset_seconds", DEFAULT_BREAKER_RESET
        ),
        redis_max_connections=read_int(
            merged, "session.", "redis_max_connections", DEFAULT_REDIS_MAX_CONNECTIONS, low=1
        ),
        memory_max_sessions=read_int(
            merged, "session.", "memory_max_sessions", DEFAULT_MEMORY_MAX_SESSIONS, low=1
        ),
        cluster=cluster,
        sentinels=sentinels,
        sentinel_service=service,
        near_cache=near_cache,
        near_cache_max_entries=read_int(
            merged, "session.", "near_cache_max_entries", DEFAULT_NEAR_CACHE_ENTRIES, low=1
        ),
        near_cache_max_bytes=read_int(
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
        header = parse_header_name(raw["header"], "session.header")
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
            name = parse_header_name(name, key)
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


def _upstream(raw: dict[str, Any]) -> UpstreamConfig:
    only_keys(
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
        first_byte = chunk = read_seconds(
            raw, "upstream.", "read_timeout", DEFAULT_FIRST_BYTE_TIMEOUT
        )
    return UpstreamConfig(
        connect_timeout=read_seconds(raw, "upstream.", "connect_timeout", DEFAULT_CONNECT_TIMEOUT),
        first_byte_timeout=read_seconds(raw, "upstream.", "first_byte_timeout", first_byte),
        chunk_timeout=read_seconds(raw, "upstream.", "chunk_timeout", chunk),
        pool_timeout=read_seconds(raw, "upstream.", "pool_timeout", DEFAULT_POOL_TIMEOUT),
        stream_idle_seconds=read_seconds(
            raw, "upstream.", "stream_idle_seconds", DEFAULT_STREAM_IDLE_SECONDS
        ),
        max_connections=read_int(
            raw, "upstream.", "max_connections", DEFAULT_MAX_CONNECTIONS, low=1
        ),
        max_body_bytes=read_int(raw, "upstream.", "max_body_bytes", DEFAULT_MAX_BODY_BYTES, low=1),
    )


def _debug(raw: dict[str, Any]) -> DebugConfig:
    only_keys(raw, "debug.", {"enabled", "token"})
    enabled = read_bool(raw, "debug.", "enabled", False)
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


def _metrics(raw: dict[str, Any]) -> MetricsConfig:
    only_keys(raw, "metrics.", {"models"})
    models = raw.get("models", [])
    if not isinstance(models, list):
        raise ConfigError("metrics.models", "must be an array of model names")
    for index, model in enumerate(models):
        if not is_valid_name(model):
            raise ConfigError(f"metrics.models[{index}]", NAME_RULE)
    return MetricsConfig(models=tuple(models))


def _tracing(raw: dict[str, Any], env: Mapping[str, str], hash_key: Secret | None) -> TracingConfig:
    """On when OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT is set (as
    the OpenTelemetry SDK reads them), unless OTEL_SDK_DISABLED is true. The SDK reads the
    other OTEL_* variables (headers, timeout, sampler, batching, resource) itself."""
    only_keys(raw, "tracing.", {"conversation_key_env"})
    # The session's HMAC key, the same on every replica, unless tracing has one of its own.
    key = hash_key
    if "conversation_key_env" in raw:
        variable = read_str(raw, "tracing.", "conversation_key_env", None)
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
