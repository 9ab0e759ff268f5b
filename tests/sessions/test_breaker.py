from __future__ import annotations

from sentinel_proxy.sessions import CircuitBreaker


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_consecutive_failures_and_recovers_through_a_trial() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures=3, reset_seconds=5, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.failure()
    breaker.success()  # a success resets the count
    for _ in range(3):
        assert breaker.allow()
        breaker.failure()
    assert breaker.state == "open" and not breaker.allow()
    clock.now += 5
    assert breaker.allow()  # the one trial
    assert not breaker.allow()  # and only one
    breaker.failure()
    assert breaker.state == "open"
    clock.now += 5
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed" and breaker.allow()


def test_an_abandoned_trial_allows_another_later() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures=1, reset_seconds=2, clock=clock)
    breaker.failure()
    clock.now += 2
    assert breaker.allow()  # the trial is cancelled: neither success nor failure
    clock.now += 1
    assert not breaker.allow()
    clock.now += 1
    assert breaker.allow()
