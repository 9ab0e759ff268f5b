"""What `sentinel-proxy check-config` prints: a loaded configuration as the proxy would run
it, in words. One function per section (SECTIONS); a new part of the configuration is one
more function there.

No secret is ever shown: a provider key by the variable it comes from, a Redis URL without
its credentials or query string."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

from sentinel_proxy.config import Config
from sentinel_proxy.demo import is_demo_url


def describe(config: Config) -> str:
    return "".join(f"{line}\n" for section in SECTIONS for line in section(config))


def _source(config: Config) -> Iterator[str]:
    source = "no file (defaults and environment)" if config.source == "defaults" else config.source
    yield f"configuration: {source}" + (" with --demo" if config.demo else "")
    server = config.server
    workers = "1 worker" if server.workers == 1 else f"{server.workers} workers"
    yield f"listen: {server.host}:{server.port}, {workers}"


def _providers(config: Config) -> Iterator[str]:
    yield "providers (the first also serves every model that is no alias):"
    width = max(len(p.name) for p in config.providers)
    for provider in config.providers:
        if is_demo_url(provider.base_url):
            key = "none (built-in demo upstream, in process)"
        elif provider.api_key_env is not None:
            key = f"${provider.api_key_env}"
        elif provider.forward_client_key:
            key = "the client's own (its Authorization goes upstream)"
        else:
            key = "none (a client's credentials are not sent)"
        cache = ", prompt_cache_key added" if provider.prompt_cache else ""
        yield f"  {provider.name:<{width}}  {provider.base_url}  key: {key}{cache}"


def _aliases(config: Config) -> Iterator[str]:
    if not config.aliases:
        yield "aliases: none"
    else:
        yield "aliases (a request for one gets one of its targets, by weight):"
        width = max(len(name) for name in config.aliases)
        for alias in config.aliases.values():
            total = sum(t.weight for t in alias.targets)
            names = [f"{t.provider}/{t.model}" for t in alias.targets]
            column = max(len(n) for n in names)
            for index, (target, name) in enumerate(zip(alias.targets, names, strict=True)):
                label = alias.name if index == 0 else ""
                share = f"{100 * target.weight / total:.3g}%"
                yield f"  {label:<{width}}  -> {name:<{column}}  weight {target.weight} ({share})"
            on_failure = (
                "another target, re-pinned"
                if alias.on_target_failure == "reselect"
                else "503, pin kept"
            )
            implicit = "; implicit sessions" if alias.implicit_sessions else ""
            yield f"  {'':<{width}}  on target failure: {on_failure}{implicit}"
    yield f"other models: to {config.providers[0].name}, unchanged"


def _routing(config: Config) -> Iterator[str]:
    routing = config.routing
    default = routing.default_model or "none (400: model field is required)"
    yield f"requests naming no model: {default}"
    yield (
        f"ejection: after {routing.eject_after_failures} failures in a row, "
        f"for {routing.eject_seconds:g} s"
    )


def _users(config: Config) -> Iterator[str]:
    if not config.users:
        yield "users: none (clients are not authenticated)"
        return
    yield "users (every /v1 request needs one's key):"
    width = max(len(u.external_id) for u in config.users)
    for user in config.users:
        tier = user.tier or config.routing.default_model or "none"
        models = "any" if user.models is None else ", ".join(sorted(user.models))
        yield f"  {user.external_id:<{width}}  tier: {tier}  models: {models}"


def _sessions(config: Config) -> Iterator[str]:
    session = config.session
    labels = ", then ".join(
        source.label + ("" if source.owned else " (forwarded)") for source in session.id_sources
    )
    yield f"conversation id: {labels}"
    tail = f"ttl {session.ttl_seconds} s, store errors: {session.on_store_error}"
    if session.sentinels:
        sentinels = ", ".join(f"{host}:{port}" for host, port in session.sentinels)
        service = session.sentinel_service
        yield f"sessions: Redis primary of {service!r} (sentinels {sentinels}), {tail}"
    elif session.redis_url is None:
        yield (
            f"sessions: in memory (this process only, at most {session.memory_max_sessions}), "
            f"ttl {session.ttl_seconds} s"
        )
    elif session.cluster:
        yield f"sessions: Redis Cluster via {_redis_location(session.redis_url.reveal())}, {tail}"
    else:
        yield f"sessions: Redis at {_redis_location(session.redis_url.reveal())}, {tail}"


def _redis_location(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix:{parts.path}"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = parts.port or 6379
    return f"{parts.scheme}://{host}:{port}{parts.path or '/0'}"


SECTIONS: tuple[Callable[[Config], Iterator[str]], ...] = (
    _source,
    _providers,
    _aliases,
    _routing,
    _users,
    _sessions,
)
