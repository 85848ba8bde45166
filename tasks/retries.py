"""The retry path: backoff, the Redis ZSET mirror of every scheduled try, and its sweeper.

A try that must happen later is scheduled twice: as a Celery task with a countdown, and as
a member of the ZSET `notifications:retries` (member = task name and arguments, score = due
time). The task removes its member once it has run. The sweeper, on beat, re-enqueues every
member overdue by RETRY_SWEEP_GRACE_SECONDS: that is how a try survives a broker message
lost with a SIGKILLed worker. A copy that runs twice is harmless: each try is claimed by a
unique (delivery, channel, attempt) row before anything is sent.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any

import orjson
import redis
from celery import shared_task
from flask import current_app

from app import metrics
from app.config import Config

log = logging.getLogger(__name__)

RETRY_ZSET = "notifications:retries"
SWEEP_BATCH = 1000

# (task name, args, countdown seconds): puts one task on the broker.
Send = Callable[[str, list[Any], float], None]


def backoff(attempt: int, base: float, cap: float, jitter: float, rng=random.random) -> float:
    """Delay after failed try `attempt` (1-based): base * 2**(attempt-1), jittered, capped."""
    delay = min(cap, base * 2 ** (attempt - 1))
    delay *= 1 + jitter * (2 * rng() - 1)
    return max(0.0, min(cap, delay))


def retry_delay(cfg: Config, attempt: int, retry_after: float | None = None) -> float:
    """The wait before the next try; a receiver's Retry-After is honoured up to the cap."""
    delay = backoff(attempt, cfg.RETRY_BASE_SECONDS, cfg.RETRY_MAX_DELAY_SECONDS, cfg.RETRY_JITTER)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(delay, cfg.RETRY_MAX_DELAY_SECONDS)


def member(task: str, args: list[Any]) -> str:
    return orjson.dumps({"task": task, "args": args}).decode()


def celery_send(task: str, args: list[Any], countdown: float, queue: str | None = None) -> None:
    """Enqueue by name; the queue is `queue`, or else comes from celeryconfig.task_routes."""
    current_app.extensions["celery"].send_task(
        task, args=args, countdown=countdown or None, queue=queue
    )


def schedule(
    client: redis.Redis,
    task: str,
    args: list[Any],
    delay: float,
    send: Send = celery_send,
    max_countdown: float | None = None,
    grace: float = 0.0,
) -> None:
    """Mirror the try in the ZSET, then enqueue it with a countdown.

    A delay over `max_countdown` (kept below the broker's visibility timeout, past which
    the broker would hand a countdown task out twice) is left to the sweeper alone: its
    member is scored `grace` early, so the sweeper enqueues it when it is due.
    """
    if max_countdown is not None and delay > max_countdown:
        client.zadd(RETRY_ZSET, {member(task, args): time.time() + delay - grace})
        return
    # Mirror first: a crash between the two leaves a member the sweeper acts on.
    client.zadd(RETRY_ZSET, {member(task, args): time.time() + delay})
    send(task, args, delay)


def done(client: redis.Redis, task: str, args: list[Any]) -> None:
    """The try ran (or was found already run): drop its mirror."""
    client.zrem(RETRY_ZSET, member(task, args))


def sweep(client: redis.Redis, grace: float, rearm: float, send: Send = celery_send) -> int:
    """Re-enqueue every mirrored try overdue by `grace`; returns how many."""
    now = time.time()
    overdue = client.zrangebyscore(RETRY_ZSET, "-inf", now - grace, start=0, num=SWEEP_BATCH)
    for raw in overdue:
        # Push its due time past the next sweeps first (XX: unless it finished meanwhile), so
        # one lost message is re-enqueued once per `rearm`, not on every sweep.
        if not client.zadd(RETRY_ZSET, {raw: now + rearm}, xx=True, ch=True):
            continue
        spec = orjson.loads(raw)
        send(spec["task"], spec["args"], 0)
    if overdue:
        log.warning("retry sweeper re-enqueued %d overdue tries", len(overdue))
        metrics.count(client, "retries_swept", n=len(overdue))
    return len(overdue)


@shared_task(name="tasks.retries.sweep", ignore_result=True)
def sweep_retries() -> int:
    cfg: Config = current_app.config["NOTIFIER"]
    return sweep(
        current_app.extensions["redis"], cfg.RETRY_SWEEP_GRACE_SECONDS, cfg.ATTEMPT_LEASE_SECONDS
    )
