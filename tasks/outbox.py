"""The scheduler: streams notifications whose `send_at` has come, and purges old idempotency keys.

Ingest records a notification whose `send_at` is ahead but does not stream it. This beat
task finds such rows once they are due (`streamed_at IS NULL`, by a partial index that
holds only the waiting ones), streams them and marks them streamed. Scheduled
notifications live in PostgreSQL until then, so they survive restarts of every process;
a stream entry lost after that is found by the reconciler (tasks/reconcile.py).
"""

from __future__ import annotations

import logging
from datetime import timedelta

import redis
from celery import shared_task
from flask import current_app
from sqlalchemy import Engine, delete, func, select, update

from app.stream import entry_fields
from models import IdempotencyKey, Notification
from models.base import utcnow

log = logging.getLogger(__name__)

SWEEP_BATCH = 1000


def stream_due(engine: Engine, client: redis.Redis, stream_key: str, limit: int) -> int:
    """Stream up to `limit` scheduled notifications that are due; returns how many."""
    with engine.begin() as conn:
        # SKIP LOCKED lets two schedulers (say, two beat instances by mistake) split the work.
        rows = (
            conn.execute(
                select(Notification.__table__)
                .where(
                    Notification.streamed_at.is_(None),
                    Notification.send_at.is_not(None),
                    Notification.send_at <= func.now(),
                )
                .order_by(Notification.send_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
            .mappings()
            .all()
        )
        if not rows:
            return 0
        pipe = client.pipeline(transaction=False)
        for row in rows:
            pipe.xadd(stream_key, entry_fields(dict(row)))
        pipe.execute()
        conn.execute(
            update(Notification)
            .where(Notification.id.in_([r["id"] for r in rows]))
            .values(streamed_at=utcnow())
        )
    log.info("scheduler streamed %d due notifications", len(rows))
    return len(rows)


def purge_expired_idempotency_keys(engine: Engine, ttl_seconds: int) -> int:
    """Delete Idempotency-Key records older than their TTL; returns how many."""
    with engine.begin() as conn:
        result = conn.execute(
            delete(IdempotencyKey).where(
                IdempotencyKey.created_at < utcnow() - timedelta(seconds=ttl_seconds)
            )
        )
    return result.rowcount


@shared_task(name="tasks.outbox.stream_scheduled", ignore_result=True)
def stream_scheduled() -> int:
    cfg = current_app.config["NOTIFIER"]
    total = 0
    while True:
        n = stream_due(
            current_app.extensions["db.engine"],
            current_app.extensions["redis"],
            cfg.STREAM_KEY,
            SWEEP_BATCH,
        )
        total += n
        if n < SWEEP_BATCH:
            return total


@shared_task(name="tasks.outbox.purge_idempotency_keys", ignore_result=True)
def purge_idempotency_keys() -> int:
    cfg = current_app.config["NOTIFIER"]
    return purge_expired_idempotency_keys(
        current_app.extensions["db.engine"], cfg.IDEMPOTENCY_TTL_SECONDS
    )
