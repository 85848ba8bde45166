"""Offline fallback: a notification with `fallback_after_seconds` whose in-app copy is still
un-acked by then is also sent through the user's configured email and webhook channels.

The consumer stamps the in-app delivery with `escalate_at`; this beat task picks the due
ones (SKIP LOCKED, so two beat runs never take the same), clears the stamp and records a
delivery for each configured channel the notification did not already use.
"""

from __future__ import annotations

from datetime import datetime

from celery import shared_task
from flask import current_app
from sqlalchemy import Engine, select, text, update
from sqlalchemy.orm import Session

from models import Channel, Delivery, Notification, User
from models.base import utcnow
from tasks.channels import attempts_from_app
from tasks.stream import NewDelivery, record_deliveries

BATCH = 1000


def escalate_due(engine: Engine, now: datetime, batch: int = BATCH) -> list[int]:
    """Record fallback deliveries for due, un-acked in-app copies; returns their ids."""
    with Session(engine) as db, db.begin():
        # Acked in time: the fallback is not needed.
        db.execute(
            update(Delivery)
            .where(Delivery.escalate_at <= now, Delivery.acked_at.is_not(None))
            .values(escalate_at=None)
        )
        due = db.execute(
            text(
                "UPDATE deliveries d SET escalate_at = NULL FROM ("
                " SELECT id FROM deliveries WHERE escalate_at <= :now AND acked_at IS NULL"
                " ORDER BY escalate_at LIMIT :batch FOR UPDATE SKIP LOCKED) due "
                "WHERE d.id = due.id RETURNING d.notification_id, d.user_id, d.lang"
            ),
            {"now": now, "batch": batch},
        ).all()
        if not due:
            return []
        users = {
            u.id: u
            for u in db.execute(select(User).where(User.id.in_({r.user_id for r in due}))).scalars()
        }
        hooks = dict(
            db.execute(
                select(Notification.id, Notification.webhook_url).where(
                    Notification.id.in_({r.notification_id for r in due})
                )
            ).all()
        )
        rows = []
        for nid, user_id, lang in due:
            user = users.get(user_id)
            # In the language the in-app copy was in; mutes and quiet hours apply when sent.
            if user is not None and user.email:
                rows.append(NewDelivery(nid, user_id, Channel.EMAIL.value, lang=lang))
            if hooks.get(nid) or (user is not None and user.webhook_url):
                rows.append(NewDelivery(nid, user_id, Channel.WEBHOOK.value, lang=lang))
        if not rows:
            return []
        return [r.id for r in record_deliveries(db, rows)]


@shared_task(name="tasks.escalation.escalate", ignore_result=True)
def escalate() -> int:
    ids = escalate_due(current_app.extensions["db.engine"], utcnow())
    attempts = attempts_from_app()
    for delivery_id in ids:
        attempts.schedule(delivery_id, 1, 0.0)
    return len(ids)
