"""Delivery tasks: push recorded deliveries to the gateway nodes that hold the users' sockets.

A task takes a batch of delivery ids. Users with a live presence get the notification
through their nodes' Pub/Sub channels (one message per notification and node, however many
users it carries); the others are left pending, which is what the offline queue is:
their gateway replays it when they connect. A copy is published until it is acked, not
only while pending: a replay on one socket must not keep it from the user's others.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from typing import Any

import orjson
import redis
from celery import shared_task
from flask import current_app
from sqlalchemy import BigInteger, Engine, String, any_, bindparam, case, cast, func, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import OperationalError

from app import db, inbox, metrics, presence
from app.config import Config
from app.routing import WEBSOCKET_TASK
from models import Channel, DeadLetter, Delivery, DeliveryStatus, Notification
from tasks import retries
from tasks.stream import LANES

log = logging.getLogger(__name__)

TASK = WEBSOCKET_TASK
WEBSOCKET = Channel.WEBSOCKET.value


# Built once: a statement built per call costs more CPU than its round trip (construction
# and cache-key generation), and a task may carry a single delivery. One round trip reads
# the rows and their notifications' content; the content comes with the first row of each
# notification only, so a fan-out batch (hundreds of rows of one notification) decodes it
# once rather than once per row.
_FIRST_OF_ITS_NOTIFICATION = func.row_number().over(partition_by=Delivery.notification_id) == 1
_UNACKED = (
    select(
        Delivery.id,
        Delivery.user_id,
        # As text: the driver would build a UUID object for each of a fan-out's rows.
        cast(Delivery.notification_id, String).label("notification_id"),
        Delivery.lang.label("delivery_lang"),
        *(
            case((_FIRST_OF_ITS_NOTIFICATION, column)).label(column.key)
            for column in inbox.CONTENT_COLUMNS
            if column is not Notification.id
        ),
    )
    .join(Notification, Notification.id == Delivery.notification_id)
    .where(
        Delivery.id == any_(bindparam("ids", type_=ARRAY(BigInteger))),
        # Sent copies too: another socket's replay may have sent (and marked) this one
        # meanwhile, and the user's other sockets still need it; sockets drop repeats.
        Delivery.status.in_((DeliveryStatus.PENDING, DeliveryStatus.SENT)),
        Delivery.acked_at.is_(None),
        inbox.not_expired(),
    )
    # In seq order, so that a user's notifications in one task are published in order
    # (the window above sorts by notification id, which is not acceptance order).
    .order_by(Delivery.id)
)
_COUNTERS = (
    metrics.COUNTERS_KEY,
    metrics.field("deliveries", WEBSOCKET, "sent"),
    metrics.field("deliveries", WEBSOCKET, "offline"),
)


# Over this many distinct messages in a task, presence is looked up first: encoding (and
# shipping to Redis) a message for users who all turn out offline cost more than the extra
# round trip. A fan-out or a task of a few notifications stays at one script call.
PRESENCE_FIRST_OVER = 8


def warm_up(engine: Engine, connections: int | None = None) -> None:
    """Open `connections` of the autocommit pool (as many as it keeps, by default) and run
    the task's read once on each.

    On a fresh worker the first tasks paid for connecting (7-9 ms), compiling the read and
    the server's first look at the tables (9-21 ms). A user's first notification, alone in
    its task, then reached the socket after the next ones, which came 10 ms later in a
    second task on a thread that started as cold (docs/BENCHMARKS.md).
    """
    with contextlib.ExitStack() as held:
        first = held.enter_context(db.autocommit(engine))
        wanted = connections or first.engine.pool.size()  # type: ignore[attr-defined]
        conns = [first, *(held.enter_context(db.autocommit(engine)) for _ in range(wanted - 1))]
        for conn in conns:
            # A worker must start even while the table is locked (a migration, say): the
            # warm-up then gives up rather than wait, and the first tasks pay as before.
            conn.exec_driver_sql("SET lock_timeout = '200ms'")
            try:
                conn.execute(_UNACKED, {"ids": []})
            finally:
                conn.exec_driver_sql("RESET lock_timeout")


@dataclass
class WebsocketResult:
    sent: int
    offline: int


def deliver_websocket_batch(
    engine: Engine, client: redis.Redis, delivery_ids: list[int], presence_ttl: float
) -> WebsocketResult:
    """Publish the un-acked deliveries among `delivery_ids` to their users' nodes."""
    # Autocommit: a lone SELECT needs no BEGIN/ROLLBACK round trips.
    with db.autocommit(engine) as conn:
        rows = conn.execute(_UNACKED, {"ids": delivery_ids}).all()
    if not rows:
        return WebsocketResult(0, 0)
    # created_at is never NULL in a notification: set only on the row carrying the content.
    content = {r.notification_id: r for r in rows if r.created_at is not None}
    candidates = rows
    if len({(r.notification_id, r.delivery_lang) for r in rows}) > PRESENCE_FIRST_OVER:
        online = presence.nodes_for(client, sorted({r.user_id for r in rows}), presence_ttl)
        candidates = [r for r in rows if r.user_id in online]
    # One message per notification and language: templated ones differ per recipient's.
    variants: dict[tuple[str, str | None], int] = {}
    encoded: list[bytes] = []
    routed: list[tuple[str, int, int]] = []
    for row in candidates:
        variant = variants.get((row.notification_id, row.delivery_lang))
        if variant is None:
            variant = variants[(row.notification_id, row.delivery_lang)] = len(encoded)
            encoded.append(
                orjson.dumps(
                    {
                        "type": "notification",
                        "id": row.notification_id,
                        **inbox.content(content[row.notification_id], row.delivery_lang),
                    }
                )
            )
        routed.append((row.user_id, row.id, variant))
    reached = presence.route(
        client, encoded, routed, presence_ttl, _COUNTERS, also_offline=len(rows) - len(candidates)
    )
    sent = sorted(candidates[i].id for i in reached)
    if sent:
        inbox.mark_sent(engine, sent)
    if log.isEnabledFor(logging.DEBUG):
        published = set(sent)
        for row in rows:
            log.debug(
                "published to the user's gateway" if row.id in published else "left offline",
                extra={"notification_id": row.notification_id, "user_id": row.user_id,
                       "delivery_id": row.id},
            )  # fmt: skip
    return WebsocketResult(sent=len(sent), offline=len(rows) - len(sent))


@shared_task(name=TASK, ignore_result=True, bind=True)
def deliver_websocket(self: Any, delivery_ids: list[int], attempt: int = 1) -> dict[str, int]:
    cfg: Config = current_app.config["NOTIFIER"]
    client: redis.Redis = current_app.extensions["redis"]
    try:
        result = deliver_websocket_batch(
            current_app.extensions["db.engine"], client, delivery_ids, cfg.PRESENCE_TTL_SECONDS
        )
    except (redis.RedisError, OperationalError) as exc:
        # The next try goes back to the lane this one came from: a high-priority retry
        # must not wait behind the default lane's backlog.
        lane = (self.request.delivery_info or {}).get("routing_key")
        _failed(cfg, delivery_ids, attempt, exc, lane if lane in LANES else None)
        return {"sent": 0, "offline": 0}
    if attempt > 1:
        retries.done(client, TASK, [delivery_ids, attempt])
    return {"sent": result.sent, "offline": result.offline}


def _failed(
    cfg: Config, delivery_ids: list[int], attempt: int, exc: Exception, lane: str | None = None
) -> None:
    """Retry the batch with backoff (on `lane`, when given); after the last try record dead
    letters.

    The copies stay pending either way, so their users still get them on their next connect:
    an in-app notification is never dropped, only its live push. A retry the sweeper has
    to re-enqueue (its broker message was lost) goes by the task's route, the default lane.
    """
    client: redis.Redis = current_app.extensions["redis"]
    error = f"{type(exc).__name__}: {exc}"[:500]
    try:
        if attempt < cfg.RETRY_MAX_ATTEMPTS:
            delay = retries.retry_delay(cfg, attempt)
            log.warning(
                "websocket delivery try %d failed (%s); retry in %.1fs", attempt, error, delay
            )
            retries.schedule(
                client, TASK, [delivery_ids, attempt + 1], delay,
                send=functools.partial(retries.celery_send, queue=lane),
            )  # fmt: skip
            metrics.count_many(
                client,
                [
                    ("deliveries", (WEBSOCKET, "retry"), len(delivery_ids)),
                    ("retries_scheduled", (WEBSOCKET,), len(delivery_ids)),
                ],
            )
        else:
            log.error("websocket delivery failed %d times: %s", attempt, error)
            dead = _dead_letters(current_app.extensions["db.engine"], delivery_ids, attempt, error)
            metrics.count_many(
                client,
                [
                    ("deliveries", (WEBSOCKET, "failed"), len(delivery_ids)),
                    ("dead_letters", (WEBSOCKET,), dead),
                ],
            )
        if attempt > 1:
            retries.done(client, TASK, [delivery_ids, attempt])
    except (redis.RedisError, OperationalError):
        # Redis cannot take the retry (or PostgreSQL the dead letters): let the broker hand
        # this try out again later rather than drop it.
        log.exception("could not schedule the retry of %d deliveries", len(delivery_ids))
        raise


def _dead_letters(engine: Engine, delivery_ids: list[int], attempts: int, error: str) -> int:
    with engine.begin() as conn:
        rows = conn.execute(
            select(Delivery.id, Delivery.user_id, *inbox.MESSAGE_COLUMNS)
            .join(Notification, Notification.id == Delivery.notification_id)
            .where(Delivery.id.in_(delivery_ids), Delivery.acked_at.is_(None))
        ).all()
        if rows:
            conn.execute(
                pg_insert(DeadLetter),
                [
                    {
                        "source": Channel.WEBSOCKET.value,
                        "notification_id": r.notification_id,
                        "delivery_id": r.id,
                        "user_id": r.user_id,
                        "payload": orjson.loads(orjson.dumps(inbox.message(r))),
                        "error": error,
                        "attempts": attempts,
                    }
                    for r in rows
                ],
            )
    return len(rows)
