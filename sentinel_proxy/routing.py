"""Routing: which provider and model serve a requested model. Pure; no I/O."""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from sentinel_proxy.config import Alias, Config, Provider


@dataclass(frozen=True, slots=True)
class Route:
    provider: Provider
    # None: the request's own model (or its lack of one) goes upstream unchanged.
    model: str | None


@dataclass(frozen=True, slots=True)
class _WeightedAlias:
    routes: tuple[Route, ...]
    cumulative: tuple[int, ...]

    @classmethod
    def build(cls, alias: Alias, providers: Mapping[str, Provider]) -> _WeightedAlias:
        routes = tuple(Route(providers[t.provider], t.model) for t in alias.targets)
        cumulative = tuple(itertools.accumulate(t.weight for t in alias.targets))
        return cls(routes, cumulative)

    def pick(self, rand: Callable[[], float]) -> Route:
        point = rand() * self.cumulative[-1]
        return self.routes[bisect.bisect_right(self.cumulative, point)]


class Router:
    """The routing table, built once from the configuration."""

    def __init__(self, config: Config, *, rand: Callable[[], float] = random.random) -> None:
        self._providers = {p.name: p for p in config.providers}
        self._aliases = {
            name: _WeightedAlias.build(alias, self._providers)
            for name, alias in config.aliases.items()
        }
        self._rand = rand
        self.default = Route(config.providers[0], None)

    def select(self, model: str | None) -> Route:
        """A fresh choice: an alias picks one of its targets by weight; any other model
        goes to the first provider unchanged."""
        if model is None:
            return self.default
        alias = self._aliases.get(model)
        return alias.pick(self._rand) if alias is not None else self.default

    def pinned(self, provider: str, model: str) -> Route | None:
        """The route a stored session names, or None when its provider is gone."""
        found = self._providers.get(provider)
        return None if found is None else Route(found, model)
