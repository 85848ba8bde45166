"""CPU the API key rate limit adds to a request, measured where it runs: in the API process.

    python scripts/bench_rate_limits.py [--requests 20000] [--redis redis://127.0.0.1:6379/9]

Times `RateLimits.admit` (what `_admit_api_key` calls once per request) with process CPU
time, over real Redis storage, alternating three configurations three times each and
printing the medians: the limit as shipped (units reserved from Redis ten at a time), one
Redis round trip per request (the same limit, nothing reserved), and the
in-process `memory://` storage for reference. Only this run's keys are deleted afterwards.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.rate_limits import RateLimits


def per_request_us(limits: RateLimits, requests: int) -> float:
    client = f"bench-{uuid.uuid4().hex}"
    limits.admit(client)  # connect and load the script first
    start = time.process_time()
    for _ in range(requests):
        limits.admit(client)
    return (time.process_time() - start) / requests * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/9")
    args = parser.parse_args()
    setups = {
        # Ten units per Redis round trip, as for the default 5,000/s (a limit high enough
        # that the measurement never reaches it).
        "shipped (reserve 10)": RateLimits(args.redis, 10**6, 2 * 10**6, 60),
        # The same limit taken one unit at a time: a Redis round trip (and a second for
        # the window's figures) per request, as a plain limiter would.
        "one round trip each": RateLimits(args.redis, 10**6, 2 * 10**6, 60),
        "memory:// (per process)": RateLimits("memory://", 10**6, 2 * 10**6, 60),
    }
    setups["one round trip each"]._reserve = 1
    results: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(3):
        for name, limits in setups.items():
            results[name].append(per_request_us(limits, args.requests))
    for name, runs in results.items():
        print(f"{name:26} median {statistics.median(runs):6.1f} us CPU per request "
              f"(runs: {', '.join(f'{r:.1f}' for r in runs)})")  # fmt: skip
    client = redis.Redis.from_url(args.redis)
    for key in client.scan_iter("LIMITS:*bench-*"):
        client.delete(key)
    return 0


if __name__ == "__main__":
    sys.exit(main())
