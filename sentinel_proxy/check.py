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
        else:
            key = "the client's own (its Authorization goes upstream)"
        yield f"  {provider.name:<{width}}  {provider.base_url}  key: {key}"


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
    yield f"other models: to {config.providers[0].name}, unchanged"


def _sessions(config: Config) -> Iterator[str]:
    session = config.session
    yield (f"conversation id: the body field conversation_id or the header {session.header}")
    if session.redis_url is None:
        yield (
            f"sessions: in memory (this process only, at most {session.memory_max_sessions}), "
            f"ttl {session.ttl_seconds} s"
        )
    else:
        yield (
            f"sessions: Redis at {_redis_location(session.redis_url.reveal())}, "
            f"ttl {session.ttl_seconds} s, store errors: {session.on_store_error}"
        )


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
    _sessions,
)
