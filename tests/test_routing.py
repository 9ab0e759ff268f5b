from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from sentinel_proxy.config import Alias, Config, Provider, Target
from sentinel_proxy.routing import Router

A = Provider("a", "http://a.test/v1")
B = Provider("b", "http://b.test/v1")
CONFIG = Config(
    providers=(A, B),
    aliases={"fast": Alias("fast", (Target("a", "m-a", 3), Target("b", "m-b", 1)))},
)


def sequence(*values: float) -> Iterator[float]:
    yield from values


def test_unknown_model_goes_to_the_first_provider_unchanged() -> None:
    route = Router(CONFIG).select("gpt-4o")
    assert route.provider is A
    assert route.model is None


def test_no_model_goes_to_the_first_provider() -> None:
    assert Router(CONFIG).select(None).provider is A


def test_alias_picks_by_weight() -> None:
    points = sequence(0.0, 0.74, 0.75, 0.99)
    router = Router(CONFIG, rand=lambda: next(points))
    picked = [router.select("fast") for _ in range(4)]
    assert [(r.provider.name, r.model) for r in picked] == [
        ("a", "m-a"),
        ("a", "m-a"),
        ("b", "m-b"),
        ("b", "m-b"),
    ]


def test_weights_hold_over_many_picks() -> None:
    router = Router(CONFIG)
    counts = Counter(router.select("fast").provider.name for _ in range(4000))
    assert 2700 < counts["a"] < 3300


def test_pinned_route_and_vanished_provider() -> None:
    router = Router(CONFIG)
    route = router.pinned("b", "anything")
    assert route is not None and route.provider is B and route.model == "anything"
    assert router.pinned("gone", "m") is None
