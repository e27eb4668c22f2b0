"""Token-bucket rate limits for the WebSocket API, per session and per client address.

Kept in the process: a front end protects itself (sockets, frames) before anything
reaches the engine, whose moderation keeps the shared, per-user flood counters.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

Clock = Callable[[], float]


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """At most ``rate`` events per ``window`` seconds per key, with bursts up to ``rate``.

    Memory stays bounded: a full bucket is the same as no bucket, so buckets that have
    refilled are dropped whenever the table grows past ``max_keys``.
    """

    def __init__(
        self, rate: int, window: float, *, max_keys: int = 100_000, clock: Clock = time.monotonic
    ) -> None:
        self.rate = rate
        self.window = window
        self._per_second = rate / window
        self._max_keys = max_keys
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def take(self, key: str) -> float:
        """Spend one token of ``key``: 0.0 if allowed, else the seconds until one is back."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max_keys:
                self._prune(now)
            bucket = self._buckets[key] = _Bucket(float(self.rate), now)
        else:
            bucket.tokens = min(float(self.rate),
                                bucket.tokens + (now - bucket.at) * self._per_second)
            bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self._per_second

    def _prune(self, now: float) -> None:
        full = [
            key for key, b in self._buckets.items()
            if b.tokens + (now - b.at) * self._per_second >= self.rate
        ]
        for key in full:
            del self._buckets[key]
        if len(self._buckets) >= self._max_keys:
            # Under attack from more addresses than the table holds: forget the oldest.
            for key in list(self._buckets)[: len(self._buckets) // 2]:
                del self._buckets[key]
