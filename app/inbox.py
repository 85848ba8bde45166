"""A user's websocket deliveries as an inbox: the offline queue, acks and read marks.

Shared by the gateway (replay on connect, acks over the socket) and the HTTP inbox API.
Functions take a Connection and leave committing to their caller, except `mark_sent`,
a fire-and-forget status write that commits itself in one round trip.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from sqlalchemy import Connection, Engine, and_, func, or_, select, text, update

from app import db
from models import Channel, Delivery, DeliveryStatus, Notification
from models.base import utcnow

WEBSOCKET = Channel.WEBSOCKET.value
UNACKED = (DeliveryStatus.PENDING, DeliveryStatus.SENT)

# A notification's own columns that `content` reads.
_CONTENT = (
    Notification.title,
    Notification.body,
    Notification.data,
    Notification.priority,
    Notification.category,
    Notification.lang,
    Notification.created_at,
    Notification.renditions,
)
# What a client's notification frame is built from (see `message`).
MESSAGE_COLUMNS = (
    Delivery.id,
    Delivery.notification_id,
    Delivery.status,
    Delivery.read_at,
    *_CONTENT,
    Delivery.lang.label("delivery_lang"),
)
CONTENT_COLUMNS = (Notification.id, *_CONTENT)
# Muted copies are recorded (as skipped) but are not the user's to see.
VISIBLE = Delivery.status != DeliveryStatus.SKIPPED


def message(row: Any) -> dict[str, Any]:
    """The JSON a client receives for one delivery row: a templated notification in the
    rendition of the recipient's language, with that language as `lang`."""
    return {"type": "notification", "id": str(row.notification_id), "seq": row.id,
            **content(row, row.delivery_lang)}  # fmt: skip


def content(n: Any, delivery_lang: str | None) -> dict[str, Any]:
    """A notification row's part of the frame, in the rendition of `delivery_lang` if it
    has one (`n` carries the CONTENT_COLUMNS)."""
    title, body, lang = n.title, n.body, n.lang
    if n.renditions and delivery_lang in n.renditions["locales"]:
        rendition = n.renditions["locales"][delivery_lang]
        title, body, lang = rendition.get("title"), rendition.get("body"), delivery_lang
    return {
        "title": title,
        "body": body,
        "data": n.data,
        "priority": str(n.priority),
        "category": n.category,
        "lang": lang,
        "created_at": n.created_at.isoformat(),
    }


def not_expired() -> Any:
    return or_(Notification.expires_at.is_(None), Notification.expires_at > func.now())


def unacked(conn: Connection, user_id: str, after_seq: int = 0, limit: int = 500) -> list[Any]:
    """The user's un-acked notifications after `after_seq`, oldest first."""
    return list(
        conn.execute(
            select(*MESSAGE_COLUMNS)
            .join(Notification, Notification.id == Delivery.notification_id)
            .where(
                Delivery.user_id == user_id,
                Delivery.channel == WEBSOCKET,
                VISIBLE,
                VISIBLE,
                Delivery.acked_at.is_(None),
                Delivery.id > after_seq,
                not_expired(),
            )
            .order_by(Delivery.id)
            .limit(limit)
        )
    )


def history(
    conn: Connection, user_id: str, before_seq: int | None, limit: int, unread_only: bool
) -> list[Any]:
    """The user's notifications, newest first, before `before_seq`."""
    query = (
        select(*MESSAGE_COLUMNS)
        .join(Notification, Notification.id == Delivery.notification_id)
        .where(Delivery.user_id == user_id, Delivery.channel == WEBSOCKET, VISIBLE)
        .order_by(Delivery.id.desc())
        .limit(limit)
    )
    if before_seq is not None:
        query = query.where(Delivery.id < before_seq)
    if unread_only:
        query = query.where(Delivery.read_at.is_(None))
    return list(conn.execute(query))


def unread_count(conn: Connection, user_id: str) -> int:
    return int(
        conn.scalar(
            select(func.count())
            .select_from(Delivery)
            .where(
                Delivery.user_id == user_id,
                Delivery.channel == WEBSOCKET,
                VISIBLE,
                VISIBLE,
                Delivery.read_at.is_(None),
            )
        )
        or 0
    )


def mark_sent(engine: Engine, delivery_ids: list[int]) -> None:
    """Pending deliveries that reached a socket become sent (still un-acked); commits itself."""
    if not delivery_ids:
        return
    # One round trip: both statements run as one implicit transaction. A lost "sent" mark
    # costs nothing (the copy stays in the offline queue until acked), so this commit need
    # not wait for the WAL flush.
    with db.autocommit(engine) as conn:
        conn.exec_driver_sql(
            "SET LOCAL synchronous_commit = off; "
            "UPDATE deliveries SET status = 'sent', sent_at = now() "
            "WHERE id = ANY(%(ids)s) AND status = 'pending'",
            {"ids": delivery_ids},
        )


def ack(conn: Connection, user_id: str, notification_ids: list[uuid.UUID]) -> list[str]:
    """Mark the user's copies delivered (out of the offline queue); returns the ids changed."""
    if not notification_ids:
        return []
    # An ack lost in a crash only means the notification is offered again on the next
    # connect (clients dedupe by id), so acks need not wait for the WAL flush.
    conn.execute(text("SET LOCAL synchronous_commit = off"))
    now = utcnow()
    rows = conn.execute(
        update(Delivery)
        .where(
            Delivery.user_id == user_id,
            Delivery.channel == WEBSOCKET,
            VISIBLE,
            Delivery.notification_id.in_(notification_ids),
            Delivery.acked_at.is_(None),
        )
        .values(
            status=DeliveryStatus.ACKED, acked_at=now, sent_at=func.coalesce(Delivery.sent_at, now)
        )
        .returning(Delivery.notification_id)
    )
    return [str(r.notification_id) for r in rows]


def ack_many(engine: Engine, acks: list[tuple[str, uuid.UUID]]) -> None:
    """Ack (user, notification) pairs from many sockets in one statement; commits itself.

    The gateway buffers socket acks and flushes them together, so a fan-out's thousands of
    acks cost a handful of round trips instead of one transaction each.
    """
    if not acks:
        return
    with db.autocommit(engine) as conn:
        conn.exec_driver_sql(
            "SET LOCAL synchronous_commit = off; "
            "UPDATE deliveries d SET status = 'acked', acked_at = now(), "
            "sent_at = coalesce(d.sent_at, now()) "
            "FROM json_to_recordset(%(acks)s::json) AS a(u text, n uuid) "
            "WHERE d.user_id = a.u AND d.notification_id = a.n "
            "AND d.channel = 'websocket' AND d.acked_at IS NULL AND d.status <> 'skipped'",
            # One JSON literal rather than two arrays of quoted elements: cheaper to build
            # here and to parse there, at a thousand acks a flush.
            {"acks": orjson.dumps([{"u": u, "n": n} for u, n in acks]).decode()},
        )


def mark_read(
    conn: Connection, user_id: str, notification_ids: list[uuid.UUID] | None
) -> list[str]:
    """Mark the user's copies read (and acked); None means all of them. Returns ids changed."""
    now = utcnow()
    where = [
        Delivery.user_id == user_id,
        Delivery.channel == WEBSOCKET,
        VISIBLE,
        Delivery.read_at.is_(None),
    ]
    if notification_ids is not None:
        if not notification_ids:
            return []
        where.append(Delivery.notification_id.in_(notification_ids))
    rows = conn.execute(
        update(Delivery)
        .where(and_(*where))
        .values(
            read_at=now,
            status=DeliveryStatus.ACKED,
            acked_at=func.coalesce(Delivery.acked_at, now),
            sent_at=func.coalesce(Delivery.sent_at, now),
        )
        .returning(Delivery.notification_id)
    )
    return [str(r.notification_id) for r in rows]
