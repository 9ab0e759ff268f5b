"""Passive health of alias targets, and which upstream outcomes count as a target failing.

A target (a provider and model of an alias) that fails `threshold` times in a row is
ejected: left out of new selections for `cooldown` seconds, then offered again, and one
more failure ejects it again at once (as Envoy's outlier detection). Each process keeps
its own view.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sentinel_proxy.exceptions import ProxyError, UpstreamError

TargetKey = tuple[str, str]


def is_target_failure(*, status: int | None = None, error: ProxyError | None = None) -> bool:
    """Whether an upstream outcome before any byte reached the client is the target's
    failure (retried elsewhere): a connect error, reset, timeout or a 5xx answer."""
    if error is not None:
        return isinstance(error, UpstreamError)
    return status is not None and status >= 500


class Health:
    def __init__(
        self,
        *,
        threshold: int,
        cooldown: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._threshold = threshold
        self._cooldown = cooldown
        self._clock = clock
        self._failures: dict[TargetKey, int] = {}
        self._ejected_until: dict[TargetKey, float] = {}

    def any_ejected(self) -> bool:
        return bool(self._ejected_until)

    def ejected(self, target: TargetKey) -> bool:
        until = self._ejected_until.get(target)
        if until is None:
            return False
        if self._clock() < until:
            return True
        # Cooled down: offered again, one failure away from another ejection.
        del self._ejected_until[target]
        self._failures[target] = self._threshold - 1
        return False

    def failure(self, target: TargetKey) -> bool:
        """Count a failure; True when it ejects the target now."""
        count = self._failures.get(target, 0) + 1
        self._failures[target] = count
        if count >= self._threshold and target not in self._ejected_until:
            self._ejected_until[target] = self._clock() + self._cooldown
            return True
        return False

    def success(self, target: TargetKey) -> None:
        if self._failures:
            self._failures.pop(target, None)
