"""The retry path: backoff, the Redis ZSET mirror of every scheduled try, and its sweeper.

A try that must happen later is scheduled twice: as a Celery task with a countdown, and as
a member of the ZSET `notifications:retries` (member = task name and arguments, score = due
time). The task removes its member once it has run.

Who holds each try's broker message is kept beside it, in the hash
`notifications:retries:held` (app/routing.py): "queued" once it is published, then the id
of the worker process that received it (a worker holds a countdown task in memory until
it is due, and takes a try from a backed-up queue only when a thread is free). Each
worker process keeps a heartbeat key alive while it runs. The sweeper, on beat, looks at
every member overdue by RETRY_SWEEP_GRACE_SECONDS and enqueues it again only when nobody
holds it (the reconciler put the member back after Redis lost it, or a crash came between
mirror and publish) or its holder's heartbeat has lapsed (a SIGKILLed worker). A try that
is only waiting, in a queue or in a live worker, is left alone: re-enqueueing it would
feed the very backlog that made it late. A copy that runs twice is still harmless: each try is
claimed by a unique (delivery, channel, attempt) row before anything is sent.
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
from app.routing import (
    LEFT_TO_SWEEPER,
    QUEUED,
    RETRY_HELD,
    RETRY_ZSET,
    WORKER_PREFIX,
    retry_member,
)

log = logging.getLogger(__name__)

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


member = retry_member


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
    key = member(task, args)
    if max_countdown is not None and delay > max_countdown:
        pipe = client.pipeline(transaction=False)
        pipe.zadd(RETRY_ZSET, {key: time.time() + delay - grace})
        pipe.hset(RETRY_HELD, key, LEFT_TO_SWEEPER)
        pipe.execute()
        return
    # Mirror first: a crash between the two leaves a member the sweeper acts on.
    pipe = client.pipeline(transaction=False)
    pipe.zadd(RETRY_ZSET, {key: time.time() + delay})
    pipe.hset(RETRY_HELD, key, QUEUED)
    pipe.execute()
    try:
        send(task, args, delay)
    except Exception:
        # Not published after all: nobody holds it but the sweeper.
        client.hset(RETRY_HELD, key, LEFT_TO_SWEEPER)
        raise


def done(client: redis.Redis, task: str, args: list[Any]) -> None:
    """The try ran (or was found already run): drop its mirror."""
    key = member(task, args)
    pipe = client.pipeline(transaction=False)
    pipe.zrem(RETRY_ZSET, key)
    pipe.hdel(RETRY_HELD, key)
    pipe.execute()


def sweep(client: redis.Redis, grace: float, rearm: float, send: Send = celery_send) -> int:
    """Enqueue every mirrored try overdue by `grace` that no queue or live worker holds: those
    left to the sweeper, and lost ones; returns how many."""
    now = time.time()
    enqueued = lost = 0
    start = 0
    while True:
        overdue = client.zrangebyscore(
            RETRY_ZSET, "-inf", now - grace, start=start, num=SWEEP_BATCH
        )
        if not overdue:
            break
        holders = client.hmget(RETRY_HELD, overdue)
        workers = sorted({h for h in holders if h and h != QUEUED})
        alive = dict(
            zip(workers, client.mget([WORKER_PREFIX + w for w in workers]), strict=True)
        ) if workers else {}  # fmt: skip
        for raw, holder in zip(overdue, holders, strict=True):
            if holder == QUEUED or (holder and alive.get(holder)):
                start += 1  # waiting in a queue or in a live worker: it will run
                continue
            # Push its due time past the next sweeps first (XX: unless it finished
            # meanwhile), so a lost try is re-enqueued once per `rearm`, not every sweep.
            if not client.zadd(RETRY_ZSET, {raw: now + rearm}, xx=True, ch=True):
                continue  # finished meanwhile: gone from the range
            client.hset(RETRY_HELD, raw, QUEUED)
            spec = orjson.loads(raw)
            try:
                send(spec["task"], spec["args"], 0)
            except Exception:
                log.warning("could not enqueue %s; the next sweep tries again", raw, exc_info=True)
                client.hset(RETRY_HELD, raw, LEFT_TO_SWEEPER)
                continue
            enqueued += 1
            lost += holder != LEFT_TO_SWEEPER
        if len(overdue) < SWEEP_BATCH:
            break
    if lost:
        log.warning("retry sweeper sent %d lost tries again", lost)
    if enqueued:
        metrics.count_many(
            client,
            [("retries_swept", ("due",), enqueued - lost), ("retries_swept", ("lost",), lost)],
        )
    return enqueued


@shared_task(name="tasks.retries.sweep", ignore_result=True)
def sweep_retries() -> int:
    cfg: Config = current_app.config["NOTIFIER"]
    return sweep(
        current_app.extensions["redis"], cfg.RETRY_SWEEP_GRACE_SECONDS, cfg.ATTEMPT_LEASE_SECONDS
    )
