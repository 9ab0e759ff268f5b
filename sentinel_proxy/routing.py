"""Routing: which provider and model serve a requested model, and which target takes over
when one fails. Pure decisions; the proxy acts on them."""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from sentinel_proxy.config import Alias, Config, Provider
from sentinel_proxy.health import Health


@dataclass(frozen=True, slots=True)
class Route:
    provider: Provider
    # None: the request's own model (or its lack of one) goes upstream unchanged.
    model: str | None
    # The alias the route was chosen from, when it was: its other targets can take over.
    alias: str | None = None

    @property
    def target(self) -> tuple[str, str]:
        return self.provider.name, self.model or ""


@dataclass(frozen=True, slots=True)
class _WeightedAlias:
    routes: tuple[Route, ...]
    weights: tuple[int, ...]
    cumulative: tuple[int, ...]

    @classmethod
    def build(cls, alias: Alias, providers: Mapping[str, Provider]) -> _WeightedAlias:
        routes = tuple(Route(providers[t.provider], t.model, alias.name) for t in alias.targets)
        weights = tuple(t.weight for t in alias.targets)
        return cls(routes, weights, tuple(itertools.accumulate(weights)))

    @property
    def usable(self) -> int:
        return sum(1 for weight in self.weights if weight)

    def pick(self, rand: Callable[[], float]) -> Route:
        point = rand() * self.cumulative[-1]
        return self.routes[bisect.bisect_right(self.cumulative, point)]

    def pick_among(self, rand: Callable[[], float], keep: Callable[[Route], bool]) -> Route | None:
        """A weighted pick among the routes `keep` accepts, or None."""
        kept = [(r, w) for r, w in zip(self.routes, self.weights, strict=True) if w and keep(r)]
        if not kept:
            return None
        point = rand() * sum(w for _, w in kept)
        for route, weight in kept:
            point -= weight
            if point < 0:
                return route
        return kept[-1][0]


class Router:
    """The routing table, built once from the configuration."""

    def __init__(
        self,
        config: Config,
        *,
        health: Health | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._providers = {p.name: p for p in config.providers}
        self._aliases = {
            name: _WeightedAlias.build(alias, self._providers)
            for name, alias in config.aliases.items()
        }
        self._failure_modes = {name: a.on_target_failure for name, a in config.aliases.items()}
        # Which aliases hold a target: a pin names its target, not the alias it came from.
        self._holders: dict[tuple[str, str], list[str]] = {}
        for name, alias in config.aliases.items():
            for target in alias.targets:
                self._holders.setdefault((target.provider, target.model), []).append(name)
        self._health = health or Health(threshold=1 << 30, cooldown=0)
        self._rand = rand
        self.default = Route(config.providers[0], None)

    def is_alias(self, model: str | None) -> bool:
        return model in self._aliases

    def select(self, model: str | None) -> Route:
        """A fresh choice: an alias picks one of its targets by weight, leaving out ejected
        ones while any other is left; any other model goes to the first provider unchanged."""
        if model is None:
            return self.default
        alias = self._aliases.get(model)
        if alias is None:
            return self.default
        if self._health.any_ejected():
            healthy = alias.pick_among(self._rand, self._healthy)
            if healthy is not None:
                return healthy
        return alias.pick(self._rand)

    def pinned(self, provider: str, model: str, requested: str | None = None) -> Route | None:
        """The route a stored session names, or None when its provider is gone. Its alias is
        the requested one when that holds the target, else the first that does."""
        found = self._providers.get(provider)
        if found is None:
            return None
        holders = self._holders.get((provider, model))
        alias = None
        if holders:
            alias = requested if requested in holders else holders[0]
        return Route(found, model, alias)

    def healthy(self, route: Route) -> bool:
        return route.alias is None or not self._health.ejected(route.target)

    def replacement(self, failed: Route) -> Route | None:
        """Another target of the failed route's alias, never the failed one; healthy ones
        first. None for a route of no alias, or an alias with nothing else to offer."""
        if failed.alias is None:
            return None
        alias = self._aliases[failed.alias]
        other = failed.target

        def healthy_other(route: Route) -> bool:
            return route.target != other and self._healthy(route)

        return alias.pick_among(self._rand, healthy_other) or alias.pick_among(
            self._rand, lambda route: route.target != other
        )

    def fails_over(self, route: Route) -> bool:
        """Whether a failure of this route is retried elsewhere, rather than answered 503."""
        return route.alias is not None and self._failure_modes[route.alias] == "reselect"

    def can_fail_over(self, route: Route) -> bool:
        """Whether a failure of this route is anything but the upstream's own answer: an
        alias that fails over to another target, or one that answers 503 instead."""
        if route.alias is None:
            return False
        return not self.fails_over(route) or self._aliases[route.alias].usable > 1

    def _healthy(self, route: Route) -> bool:
        return not self._health.ejected(route.target)
