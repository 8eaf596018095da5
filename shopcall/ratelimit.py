"""Token buckets by key, for the HTTP API: a client's requests (by its token) and failed authentications
(by address). In memory, per process: a limit protects this process and its database connections from a
runaway client loop and slows down token guessing; it is not an accounting of what a client may use."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable


class Buckets:
    """`rate` tokens a second per key, at most `burst` saved up. A key not seen is full."""

    def __init__(self, rate: float, burst: float, *, max_keys: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.max_keys, self.clock = rate, max(burst, 1.0), max_keys, clock
        self._buckets: dict[Hashable, tuple[float, float]] = {}  # key -> (tokens, at)

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def _level(self, key: Hashable, now: float) -> float:
        tokens, at = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - at) * self.rate)

    def _short(self, level: float) -> float:
        """Seconds until a bucket at `level` holds a whole token (0: it does)."""
        return 0.0 if level >= 1 else (1 - level) / self.rate

    def wait(self, key: Hashable) -> float:
        """Seconds until `key` has a token (0: it has one now); takes nothing."""
        return self._short(self._level(key, self.clock())) if self.enabled else 0.0

    def take(self, key: Hashable) -> float:
        """Take a token if there is one and return 0; else take nothing and return the seconds to wait."""
        if not self.enabled:
            return 0.0
        now = self.clock()
        level = self._level(key, now)
        if wait := self._short(level):
            return wait
        if key not in self._buckets and len(self._buckets) >= self.max_keys:
            self._forget_full(now)
        self._buckets[key] = (level - 1, now)
        return 0.0

    def _forget_full(self, now: float) -> None:
        """Keys whose bucket has filled up again are as good as unseen; if every key is still in use, the
        oldest half goes (many addresses at once: forgetting some is better than growing without end)."""
        self._buckets = {k: v for k, v in self._buckets.items() if self._level(k, now) < self.burst}
        if len(self._buckets) >= self.max_keys:
            keep = sorted(self._buckets.items(), key=lambda kv: kv[1][1])[len(self._buckets) // 2:]
            self._buckets = dict(keep)


def retry_after(seconds: float) -> str:
    """The Retry-After header's value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
