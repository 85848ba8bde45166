"""Per-endpoint circuit breaker for webhooks: a receiver that keeps failing is left alone
for a while instead of being hammered by every retry of every delivery waiting for it.

State lives in Redis, shared by every channels worker: per endpoint URL, the count of
consecutive retryable failures and, once that reaches CIRCUIT_FAILURES, the time until
which the circuit is open. While open, first tries for the endpoint wait in the retry
ZSET until the circuit half-opens, spread over CIRCUIT_OPEN_SECONDS so they do not return
all at once; a try that still finds it open is not sent and fails fast, counted like any
failed try, its next one no sooner than the circuit half-opens. The first try sent after
the window is the probe: a success closes the circuit, a failure opens it again for twice
as long (up to CIRCUIT_MAX_OPEN_SECONDS). So a receiver that stays down gets a probe per
window and nothing else, and its deliveries still reach dead letters after
RETRY_MAX_ATTEMPTS tries rather than waiting on it forever.
"""

from __future__ import annotations

import hashlib
import time

import redis

PREFIX = "notifications:circuit:"

# KEYS[1] circuit; ARGV: now, failures threshold, base open seconds, max open seconds.
# Returns the open-until time (as a string) when this failure opened the circuit, else nil.
_FAILED = """
local fails = redis.call('HINCRBY', KEYS[1], 'fails', 1)
local ttl = tonumber(ARGV[4]) * 4 + 3600
if fails < tonumber(ARGV[2]) then
  redis.call('EXPIRE', KEYS[1], ttl)
  return false
end
local opens = redis.call('HINCRBY', KEYS[1], 'opens', 1)
local window = math.min(tonumber(ARGV[4]), tonumber(ARGV[3]) * 2 ^ (opens - 1))
local untl = tonumber(ARGV[1]) + window
redis.call('HSET', KEYS[1], 'open_until', tostring(untl))
redis.call('EXPIRE', KEYS[1], ttl)
return tostring(untl)
"""


def key(endpoint: str) -> str:
    return PREFIX + hashlib.sha256(endpoint.encode()).hexdigest()[:32]


class Circuits:
    def __init__(
        self, client: redis.Redis, failures: int, open_seconds: float, max_open_seconds: float
    ) -> None:
        self.redis = client
        self.failures = failures
        self.open_seconds = open_seconds
        self.max_open_seconds = max_open_seconds
        self._failed = client.register_script(_FAILED)

    def open_until(self, endpoint: str, now: float | None = None) -> float | None:
        """When the endpoint's circuit half-opens, if it is open now."""
        raw = self.redis.hget(key(endpoint), "open_until")
        if raw is None:
            return None
        until = float(raw)
        return until if until > (time.time() if now is None else now) else None

    def failed(self, endpoint: str, now: float | None = None) -> float | None:
        """Count a retryable failure; returns the open-until time if the circuit opened."""
        when = time.time() if now is None else now
        opened = self._failed(
            keys=[key(endpoint)],
            args=[when, self.failures, self.open_seconds, self.max_open_seconds],
        )
        return float(opened) if opened else None

    def succeeded(self, endpoint: str) -> None:
        self.redis.delete(key(endpoint))
