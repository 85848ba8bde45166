"""Dead letters for operators: list them, and redrive them (HTTP API and CLI share these).

Redriving a delivery starts a fresh series of tries (numbered on after the old ones) and
marks the dead letter redriven; it is never deleted. A stream entry that could not be
processed is redriven by appending its notification to the stream again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis
from sqlalchemy import Engine, Select, func, select, update
from sqlalchemy.orm import Session

from app.routing import CHANNEL_TASK, WEBSOCKET_TASK
from app.stream import entry_fields
from models import Channel, DeadLetter, Delivery, DeliveryAttempt, DeliveryStatus, Notification
from models.base import utcnow

EXTERNAL = {Channel.WEBHOOK.value, Channel.EMAIL.value}


@dataclass
class Redrive:
    id: int
    redriven: bool
    reason: str | None = None


def filtered(criteria: dict[str, Any]) -> Select[tuple[DeadLetter]]:
    q = select(DeadLetter)
    if "channel" in criteria:
        q = q.where(DeadLetter.source == criteria["channel"])
    if "user_id" in criteria:
        q = q.where(DeadLetter.user_id == criteria["user_id"])
    if "since" in criteria:
        q = q.where(DeadLetter.created_at >= criteria["since"])
    if "until" in criteria:
        q = q.where(DeadLetter.created_at < criteria["until"])
    if not criteria.get("include_redriven", True):
        q = q.where(DeadLetter.redriven_at.is_(None))
    return q


def as_json(d: DeadLetter, full: bool = False) -> dict[str, Any]:
    out = {
        "id": d.id,
        "created_at": d.created_at.isoformat(),
        "channel": d.source,
        "notification_id": str(d.notification_id) if d.notification_id else None,
        "delivery_id": d.delivery_id,
        "user_id": d.user_id,
        "error": d.error,
        "attempts": d.attempts,
        "redriven_at": d.redriven_at.isoformat() if d.redriven_at else None,
    }
    if full:
        out["payload"] = d.payload
        out["history"] = d.history or []
        out["stream_entry_id"] = d.stream_entry_id
    return out


def redrive(engine: Engine, client: redis.Redis, stream_key: str, ids: list[int]) -> list[Redrive]:
    """Redrive the dead letters `ids`; what needs a worker is enqueued after the commit."""
    from tasks import retries

    results: list[Redrive] = []
    tries: list[tuple[int, int]] = []
    pushes: list[int] = []
    streamed: list[dict[str, str]] = []
    now = utcnow()
    with Session(engine) as db, db.begin():
        letters = db.execute(
            select(DeadLetter)
            .where(DeadLetter.id.in_(ids))
            .order_by(DeadLetter.id)
            .with_for_update()
        ).scalars()
        for d in letters:
            if d.redriven_at is not None:
                results.append(Redrive(d.id, False, "already redriven"))
                continue
            if d.source in EXTERNAL and d.delivery_id is not None:
                first = _restart_series(db, d.delivery_id)
                if first is None:
                    results.append(Redrive(d.id, False, "its delivery no longer exists"))
                    continue
                tries.append((d.delivery_id, first))
            elif d.source == Channel.WEBSOCKET.value and d.delivery_id is not None:
                pushes.append(d.delivery_id)  # the copy is still in the offline queue
            elif d.notification_id is not None and (n := db.get(Notification, d.notification_id)):
                streamed.append(entry_fields(_row(n)))
                # So the reconciler checks it again once the stream is past it.
                n.streamed_at = now
            else:
                results.append(Redrive(d.id, False, "undecodable entry: nothing to send again"))
                continue
            d.redriven_at = now
            results.append(Redrive(d.id, True))
    for delivery_id, attempt in tries:
        retries.schedule(client, CHANNEL_TASK, [delivery_id, attempt], 0.0)
    if pushes:
        retries.celery_send(WEBSOCKET_TASK, [pushes], 0)
    if streamed:
        pipe = client.pipeline(transaction=False)
        for fields in streamed:
            pipe.xadd(stream_key, fields)
        pipe.execute()
    return results


def _restart_series(db: Session, delivery_id: int) -> int | None:
    last = db.scalar(
        select(func.max(DeliveryAttempt.attempt)).where(DeliveryAttempt.delivery_id == delivery_id)
    )
    first = (last or 0) + 1
    changed = db.execute(
        update(Delivery)
        .where(Delivery.id == delivery_id)
        .values(status=DeliveryStatus.PENDING, series_start=first, last_error=None)
    ).rowcount
    return first if changed else None


def _row(n: Notification) -> dict[str, Any]:
    return {c.key: getattr(n, c.key) for c in Notification.__mapper__.column_attrs}


def matching_ids(db: Session, criteria: dict[str, Any], limit: int) -> list[int]:
    q = filtered({**criteria, "include_redriven": False}).order_by(DeadLetter.id).limit(limit)
    return [d.id for d in db.execute(q).scalars()]
