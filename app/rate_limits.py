"""Rate limits: per API key, and on failed authentications per client address.

Counts live in Redis (the `limits` library's storage and sliding-window-counter strategy,
the engine of flask-limiter), so every API process shares one count per key. A key may send
RATE_LIMIT_PER_SECOND on average and RATE_LIMIT_BURST at once: the window is BURST / RATE
seconds long and holds BURST requests.

One Redis round trip per request cost 50-75 us of CPU in the API process, more than the
whole budget for a limit (docs/BENCHMARKS.md). So each process takes its key's units from
Redis up to RESERVE at a time (never more than 1 % of the window's units) and spends them
locally for at most RESERVE_SECONDS; close to the limit it goes back to one unit per
request. Units a process reserved and did not spend count as used until their window
passes, so a key can be refused up to 1 % of its limit per process early, never let
through late.

Failed authentications are counted per client address; an address past
AUTH_FAILURES_PER_MINUTE gets 429 for every request until its minute has passed, its good
keys included, so guessing keys is throttled. The block itself is remembered per process.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from limits import RateLimitItem, parse, storage, strategies

RESERVE = 10
RESERVE_SECONDS = 0.1
BLOCKED_MAX = 100_000


@dataclass(frozen=True)
class Verdict:
    """What a request is told about its key's limit (the RateLimit-* headers)."""

    allowed: bool
    limit: int
    remaining: int
    reset_seconds: int


class RateLimits:
    def __init__(
        self, storage_uri: str, per_second: int, burst: int, auth_failures_per_minute: int
    ) -> None:
        self._strategy = strategies.SlidingWindowCounterRateLimiter(
            storage.storage_from_string(storage_uri)
        )
        self.enabled = per_second > 0
        burst = max(burst, per_second)
        window = max(1, round(burst / per_second)) if self.enabled else 1
        self._item: RateLimitItem = parse(f"{max(burst, 1)} per {window} seconds")
        self._reserve = max(1, min(RESERVE, burst // 100))
        self._auth_item = (
            parse(f"{auth_failures_per_minute} per 1 minute") if auth_failures_per_minute else None
        )
        # Per key: (units left here, taken at, units left in Redis then); per address:
        # blocked until (wall clock).
        self._reserved: dict[str, tuple[int, float, int]] = {}
        self._blocked: dict[str, float] = {}
        self._lock = threading.Lock()

    def admit(self, client: str) -> Verdict:
        """Count one request of `client`; whether it is within its limit."""
        limit = self._item.amount
        now = time.monotonic()
        with self._lock:
            left, taken, elsewhere = self._reserved.get(client, (0, 0.0, 0))
            if left > 0 and now - taken < RESERVE_SECONDS:
                self._reserved[client] = (left - 1, taken, elsewhere)
                return Verdict(True, limit, elsewhere + left - 1, self._item.get_expiry())
        if self._reserve > 1 and self._strategy.hit(self._item, "key", client, cost=self._reserve):
            stats = self._strategy.get_window_stats(self._item, "key", client)
            with self._lock:
                self._reserved[client] = (self._reserve - 1, now, stats.remaining)
            return Verdict(
                True, limit, stats.remaining + self._reserve - 1, _seconds_until(stats.reset_time)
            )
        # Too few units left to reserve: one at a time, so the last ones are not wasted.
        allowed = self._strategy.hit(self._item, "key", client)
        stats = self._strategy.get_window_stats(self._item, "key", client)
        return Verdict(allowed, limit, stats.remaining, _seconds_until(stats.reset_time))

    def blocked_for(self, address: str) -> int:
        """Seconds `address` is still refused for its failed authentications (0: not)."""
        until = self._blocked.get(address)
        if until is None:
            return 0
        left = until - time.time()
        if left <= 0:
            self._blocked.pop(address, None)
            return 0
        return math.ceil(left)

    def failed(self, address: str) -> int:
        """Count a failed authentication; seconds the address is now blocked for (0: not)."""
        if self._auth_item is None:
            return 0
        if self._strategy.hit(self._auth_item, "auth-failure", address):
            return 0
        reset = self._strategy.get_window_stats(self._auth_item, "auth-failure", address)
        with self._lock:
            if len(self._blocked) >= BLOCKED_MAX:
                self._blocked.clear()  # a flood of addresses: their Redis counts still bite
            self._blocked[address] = reset.reset_time
        return _seconds_until(reset.reset_time)


def _seconds_until(unix_time: float) -> int:
    return max(1, math.ceil(unix_time - time.time()))
