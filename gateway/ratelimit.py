"""Rate limits for what bad input may cost: log lines and device_fault points.

One job: bound the work a flood of bad messages makes (a warning per key per interval, a
token bucket for points) while every rejection is still counted by the caller.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

# The service's logger: operators filter on it, the messages stay where they were.
log = logging.getLogger("gateway.service")


class RateLimitedLog:
    """Logs a given key at most once per interval, counting what it held back."""

    def __init__(self, interval_s: float, monotonic: Callable[[], float]) -> None:
        self.interval_s = interval_s
        self._monotonic = monotonic
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def warning(self, key: str, msg: str, **fields: object) -> None:
        now = self._monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._suppressed[key] += 1
            return
        if len(self._last) > 100_000:
            self._last.clear()
        self._last[key] = now
        fields["suppressed_since_last"] = self._suppressed.pop(key, 0)
        log.warning(msg, extra=fields)


class TokenBucket:
    """At most `rate` per second on average, with bursts of `burst`."""

    def __init__(self, rate: float, burst: float, monotonic: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = burst
        self._monotonic = monotonic
        self._tokens = burst
        self._at = monotonic()

    def take(self) -> bool:
        now = self._monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True
