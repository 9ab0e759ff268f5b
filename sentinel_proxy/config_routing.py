"""Configuration of routing: providers, aliases and their targets, users, and --demo's."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from sentinel_proxy.config_values import (
    MAX_NAME_LENGTH,
    NAME_RULE,
    Secret,
    is_valid_name,
    only_keys,
    parse_base_url,
    read_bool,
    read_int,
    read_name,
    read_seconds,
    read_str,
)
from sentinel_proxy.exceptions import ConfigError

DEFAULT_UPSTREAM_URL = "https://api.openai.com/v1"
DEFAULT_PROVIDER_NAME = "openai"
# Passive health: consecutive failures that take a target out of selection, and for how long.
DEFAULT_EJECT_AFTER_FAILURES = 5
DEFAULT_EJECT_SECONDS = 30.0
# --demo: providers on a reserved domain (RFC 2606: `.invalid` never resolves), answered by
# the in-process demo upstream (demo.py), behind one alias of equal weights.
DEMO_DOMAIN = "sentinel.invalid"
DEMO_ALIAS = "demo"
DEMO_TARGETS = (("demo-a", "demo-small"), ("demo-b", "demo-large"))
_OPENAI_HOST = "api.openai.com"
_EXTERNAL_ID = re.compile(r"[A-Za-z0-9._-]+")
_SHA256 = re.compile(r"[0-9a-f]{64}")

TargetFailureMode = Literal["reselect", "error"]


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


def read_providers(raw: Any, env: Mapping[str, str]) -> tuple[Provider, ...]:
    if raw is None:
        url = env.get("SENTINEL_UPSTREAM_URL") or DEFAULT_UPSTREAM_URL
        # With no configuration the proxy is a pass-through: the client's key goes on.
        base_url = parse_base_url("SENTINEL_UPSTREAM_URL", url)
        provider = Provider(
            DEFAULT_PROVIDER_NAME,
            base_url,
            forward_client_key=True,
            prompt_cache=urlsplit(base_url).hostname == _OPENAI_HOST,
        )
        return (provider,)
    providers: list[Provider] = []
    for prefix, item in _tables(
        raw, "providers", "must be a non-empty array of tables ([[providers]])"
    ):
        only_keys(
            item,
            prefix,
            {"name", "base_url", "api_key_env", "forward_client_key", "prompt_cache"},
        )
        name = read_name(item, prefix, "name")
        if any(p.name == name for p in providers):
            raise ConfigError(f"{prefix}name", f"provider {name!r} is defined twice")
        api_key = variable = None
        if "api_key_env" in item:
            variable = read_str(item, prefix, "api_key_env", None)
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
        forward = read_bool(item, prefix, "forward_client_key", False)
        if forward and api_key is not None:
            raise ConfigError(
                f"{prefix}forward_client_key", "cannot go with api_key_env: choose one key"
            )
        base_url = parse_base_url(f"{prefix}base_url", read_str(item, prefix, "base_url", None))
        # On by default where the API is known to take the field: OpenAI's own.
        openai = urlsplit(base_url).hostname == _OPENAI_HOST
        providers.append(
            Provider(
                name=name,
                base_url=base_url,
                api_key=api_key,
                forward_client_key=forward,
                prompt_cache=read_bool(item, prefix, "prompt_cache", openai),
                api_key_env=variable,
            )
        )
    return tuple(providers)


def demo_routing(raw: Mapping[str, Any]) -> tuple[tuple[Provider, ...], dict[str, Alias]]:
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


def read_aliases(raw: dict[str, Any], providers: set[str]) -> dict[str, Alias]:
    aliases: dict[str, Alias] = {}
    for name, table in raw.items():
        prefix = f"models.{name}."
        if not is_valid_name(name):
            raise ConfigError(f"models.{name!r}", NAME_RULE)
        if not isinstance(table, dict):
            raise ConfigError(f"models.{name}", "must be a table with a targets array")
        only_keys(table, prefix, {"targets", "on_target_failure", "implicit_sessions"})
        on_failure = read_str(table, prefix, "on_target_failure", "reselect")
        if on_failure not in ("reselect", "error"):
            raise ConfigError(f"{prefix}on_target_failure", 'must be "reselect" or "error"')
        targets: list[Target] = []
        for key, item in _tables(
            table.get("targets"), f"{prefix}targets", "must be a non-empty array"
        ):
            only_keys(item, key, {"provider", "model", "weight"})
            provider = read_str(item, key, "provider", None)
            if provider not in providers:
                raise ConfigError(f"{key}provider", f"unknown provider {provider!r}")
            model = read_name(item, key, "model")
            weight = read_int(item, key, "weight", 1, low=0)
            if any((t.provider, t.model) == (provider, model) for t in targets):
                raise ConfigError(f"{key}model", f"{provider}/{model} is a target twice")
            targets.append(Target(provider=provider, model=model, weight=weight))
        if not any(t.weight for t in targets):
            raise ConfigError(f"{prefix}targets", "every target has weight 0: none can serve")
        aliases[name] = Alias(
            name=name,
            targets=tuple(targets),
            on_target_failure=on_failure,  # type: ignore[arg-type]
            implicit_sessions=read_bool(table, prefix, "implicit_sessions", False),
        )
    return aliases


def read_routing(raw: dict[str, Any], aliases: Mapping[str, Alias]) -> RoutingConfig:
    only_keys(raw, "routing.", {"default_model", "eject_after_failures", "eject_seconds"})
    default = None
    if "default_model" in raw:
        default = _alias_name(raw, "routing.", "default_model", aliases)
    return RoutingConfig(
        default_model=default,
        eject_after_failures=read_int(
            raw, "routing.", "eject_after_failures", DEFAULT_EJECT_AFTER_FAILURES, low=1
        ),
        eject_seconds=read_seconds(raw, "routing.", "eject_seconds", DEFAULT_EJECT_SECONDS),
    )


def read_users(
    raw: Any, aliases: Mapping[str, Alias], providers: tuple[Provider, ...]
) -> tuple[User, ...]:
    if raw is None:
        return ()
    users: list[User] = []
    for prefix, item in _tables(raw, "users", "must be a non-empty array of tables ([[users]])"):
        only_keys(item, prefix, {"external_id", "key_sha256", "tier", "models"})
        external_id = read_str(item, prefix, "external_id", None)
        if len(external_id) > MAX_NAME_LENGTH or not _EXTERNAL_ID.fullmatch(external_id):
            raise ConfigError(
                f"{prefix}external_id",
                f"must be letters, digits, '-', '_' or '.' (never ':'), at most {MAX_NAME_LENGTH}",
            )
        digest = read_str(item, prefix, "key_sha256", None).lower()
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
    name = read_str(raw, prefix, key, None)
    if name not in aliases:
        raise ConfigError(f"{prefix}{key}", f"{name!r} is no alias ([models.{name}])")
    return name


def _tables(raw: Any, key: str, message: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """The tables of the array at `key`, each with the prefix its own keys are named by;
    ConfigError(key, message) when it is no non-empty array."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError(key, message)
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ConfigError(f"{key}[{index}]", "must be a table")
        yield f"{key}[{index}].", item
