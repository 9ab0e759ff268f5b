from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from sentinel_proxy.config import Alias, Config, Provider, Target
from sentinel_proxy.health import Health
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


THREE = Config(
    providers=(A, B, Provider("c", "http://c.test/v1")),
    aliases={
        "fast": Alias(
            "fast", (Target("a", "m-a", 1), Target("b", "m-b", 1), Target("c", "m-c", 0))
        ),
        "solo": Alias("solo", (Target("a", "m-a"),)),
        "strict": Alias(
            "strict", (Target("a", "m-a"), Target("b", "m-b")), on_target_failure="error"
        ),
    },
)


def test_a_weight_of_zero_is_never_selected() -> None:
    router = Router(THREE)
    picked = {router.select("fast").provider.name for _ in range(500)}
    assert picked == {"a", "b"}


def test_ejected_targets_are_left_out_while_others_remain() -> None:
    health = Health(threshold=1, cooldown=60)
    router = Router(THREE, health=health)
    health.failure(("a", "m-a"))
    assert {router.select("fast").provider.name for _ in range(200)} == {"b"}
    health.failure(("b", "m-b"))
    # Every usable target ejected: a choice is still made.
    assert {router.select("fast").provider.name for _ in range(200)} == {"a", "b"}


def test_a_replacement_is_another_target_of_the_alias_and_never_the_failed_one() -> None:
    router = Router(THREE)
    failed = router.select("fast")
    for _ in range(200):
        replacement = router.replacement(failed)
        assert replacement is not None and replacement.alias == "fast"
        assert replacement.target != failed.target and replacement.provider.name != "c"
    assert router.replacement(router.select("solo")) is None
    assert router.replacement(router.select("gpt-4o")) is None


def test_which_failures_fail_over() -> None:
    router = Router(THREE)
    assert router.can_fail_over(router.select("fast")) and router.fails_over(router.select("fast"))
    # One target only: the upstream's own answer goes back.
    assert not router.can_fail_over(router.select("solo"))
    # "error": a failure is a 503, not a retry.
    strict = router.select("strict")
    assert router.can_fail_over(strict) and not router.fails_over(strict)
    assert not router.can_fail_over(router.select("gpt-4o"))


def test_a_pin_knows_its_alias_preferring_the_requested_one() -> None:
    router = Router(THREE)
    assert router.pinned("a", "m-a", "strict").alias == "strict"  # type: ignore[union-attr]
    assert router.pinned("a", "m-a", "gpt-4o").alias == "fast"  # type: ignore[union-attr]
    assert router.pinned("a", "other", "fast").alias is None  # type: ignore[union-attr]
