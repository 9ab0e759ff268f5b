from __future__ import annotations

from sentinel_proxy.exceptions import StoreUnavailable, UpstreamTimeout, UpstreamUnavailable
from sentinel_proxy.health import Health, is_target_failure

TARGET = ("p", "m")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_failures_in_a_row_eject_for_the_cooldown_then_one_more_ejects_again() -> None:
    clock = Clock()
    health = Health(threshold=3, cooldown=10, clock=clock)
    assert [health.failure(TARGET) for _ in range(3)] == [False, False, True]
    assert health.ejected(TARGET) and health.any_ejected()
    clock.now = 9.9
    assert health.ejected(TARGET)
    clock.now = 10.0
    assert not health.ejected(TARGET)
    assert health.failure(TARGET)  # offered again, one failure away
    assert health.ejected(TARGET)


def test_a_success_starts_the_count_again() -> None:
    health = Health(threshold=2, cooldown=10, clock=Clock())
    health.failure(TARGET)
    health.success(TARGET)
    assert not health.failure(TARGET)
    assert not health.ejected(TARGET) and not health.any_ejected()


def test_what_counts_as_a_target_failing() -> None:
    assert is_target_failure(status=500) and is_target_failure(status=503)
    assert not is_target_failure(status=429) and not is_target_failure(status=404)
    assert is_target_failure(error=UpstreamUnavailable("reset"))
    assert is_target_failure(error=UpstreamTimeout("slow"))
    assert not is_target_failure(error=StoreUnavailable("down"))
