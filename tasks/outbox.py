"""The outbox sweeper: streams notifications that were committed but never reached Redis.

Ingest commits before it XADDs; if the XADD fails or the process dies in between, the
row keeps `streamed_at IS NULL`. This beat task finds such rows once they are older than
a grace period (so it does not race the writer that is still streaming them) and streams
them. A rare duplicate entry is harmless: deliveries are unique per notification and user.

It is also the scheduler: ingest leaves a notification whose `send_at` is ahead unstreamed,
and this sweep streams it once it is due. Scheduled notifications live in PostgreSQL until
then, so they survive restarts of every process.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import redis
from celery import shared_task
from flask import current_app
from sqlalchemy import Engine, delete, func, or_, select, update

from app.stream import entry_fields
from models import IdempotencyKey, Notification
from models.base import utcnow

log = logging.getLogger(__name__)

SWEEP_BATCH = 1000


def stream_unstreamed(
    engine: Engine, client: redis.Redis, stream_key: str, grace_seconds: float, limit: int
) -> int:
    """Stream up to `limit` recorded-but-unstreamed notifications; returns how many."""
    cutoff = utcnow() - timedelta(seconds=grace_seconds)
    with engine.begin() as conn:
        # SKIP LOCKED lets two sweepers (say, two beat instances by mistake) split the work.
        rows = (
            conn.execute(
                select(Notification.__table__)
                .where(
                    Notification.streamed_at.is_(None),
                    Notification.created_at < cutoff,
                    # Scheduled notifications wait here until their send_at.
                    or_(Notification.send_at.is_(None), Notification.send_at <= func.now()),
                )
                .order_by(Notification.created_at)
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
    log.info("outbox sweeper streamed %d notifications", len(rows))
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


@shared_task(name="tasks.outbox.sweep_unstreamed", ignore_result=True)
def sweep_unstreamed() -> int:
    cfg = current_app.config["NOTIFIER"]
    total = 0
    while True:
        n = stream_unstreamed(
            current_app.extensions["db.engine"],
            current_app.extensions["redis"],
            cfg.STREAM_KEY,
            cfg.OUTBOX_GRACE_SECONDS,
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
