"""The reconciler: PostgreSQL is the source of truth; this puts back what Redis or a worker lost.

Redis (the stream, the broker's messages, the retry ZSET) may lose its data at any moment:
an empty restart, a flush, a failover to a lagging replica. A worker may die holding
messages. PostgreSQL still says what was accepted and what was delivered, so this beat
task compares the two, every RECONCILE_SECONDS, in four passes. Each reads only a recent
window from where the last run stopped (marks kept in PostgreSQL, `reconciler_marks`) or
the small set still in flight, through indexes:

1. Notifications accepted but not fully fanned out (fewer deliveries than recipients x
   channels), by the id range of new rows (ids are time-ordered UUIDv7), and older than
   the oldest entry the consumer group has not finished by RECONCILE_GRACE_SECONDS: the
   group finishes entries in stream order within that bound, so such a notification's
   entry is gone. It is streamed again, marked `restreamed`; deliveries are unique per
   (notification, user, channel), so the replay records only the missing ones.
2. The same check for rows the scheduler or this reconciler streamed (by `streamed_at`).
3. Websocket deliveries still pending RECONCILE_PUSH_AFTER_SECONDS after they were
   recorded, whose user is connected: their task was lost. They are pushed again, except
   those a delivery task still waiting in its lane may carry (no amplification when the
   workers are only behind).
4. Webhook and email deliveries in flight whose next try has no member in the retry ZSET:
   the member is put back, unheld, and the retry sweeper sends it.
"""

from __future__ import annotations

import base64
import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import orjson
import redis
from celery import shared_task
from flask import current_app
from sqlalchemy import Connection, Engine, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert

from app import metrics, presence
from app.config import Config
from app.redis_client import make_redis
from app.routing import CHANNEL_TASK, RETRY_HELD, RETRY_ZSET, WEBSOCKET_TASK, retry_member
from app.stream import entry_fields
from models import Notification, ReconcilerMark
from models.base import utcnow
from tasks import retries
from tasks.stream import LANES

log = logging.getLogger(__name__)

MARK_NEW = "notifications"
MARK_RESTREAMED = "restreamed"
MARK_WEBSOCKET = "websocket"
MARK_EXTERNAL = "external"
# Batches one run reads per pass at most; a run after a long outage catches up over several.
MAX_ROUNDS = 10
# Oldest messages looked at per lane to tell which deliveries may still be queued.
QUEUE_PEEK = 20

# A notification is missing deliveries when fewer are recorded than its recipients times
# its channels (both deduplicated at ingest); expired, dead-lettered and scheduled-but-not-
# yet-due ones are not. One row back: how many were read, the last id, the missing ids.
_MISSING = (
    "n.status = 'queued' AND (n.expires_at IS NULL OR n.expires_at > now()) "
    "AND (SELECT count(*) FROM deliveries d WHERE d.notification_id = n.id) "
    "< cardinality(n.recipients) * cardinality(n.channels) "
    "AND NOT EXISTS (SELECT 1 FROM dead_letters dl "
    "WHERE dl.notification_id = n.id AND dl.source = 'stream' AND dl.redriven_at IS NULL)"
)
_SCAN_NEW = text(
    "WITH scan AS ("
    "SELECT n.id, n.streamed_at IS NULL AND n.send_at IS NULL AND " + _MISSING + " AS missing "
    "FROM notifications n WHERE n.id > CAST(:after AS uuid) AND n.id < CAST(:before AS uuid) "
    "ORDER BY n.id LIMIT :limit) "
    "SELECT count(*) AS scanned, max(id::text) AS last, "
    "coalesce(array_agg(id) FILTER (WHERE missing), '{}') AS missing FROM scan"
)
_SCAN_RESTREAMED = text(
    "SELECT n.id FROM notifications n "
    "WHERE n.streamed_at IS NOT NULL AND n.streamed_at >= :since AND n.streamed_at < :until "
    "AND " + _MISSING
)
# Deliveries after the mark, in id order; `upto` is the last id before the first one younger
# than the push delay (ids and insert times agree but for rows of concurrent inserts).
_SCAN_WEBSOCKET = text(
    "WITH scan AS ("
    "SELECT id, user_id, channel, status, created_at FROM deliveries "
    "WHERE id > :after ORDER BY id LIMIT :limit), "
    "edge AS (SELECT count(*) AS scanned, coalesce(min(id) FILTER "
    "(WHERE created_at >= now() - make_interval(secs => :age)) - 1, max(id)) AS upto "
    "FROM scan) "
    "SELECT edge.scanned, edge.upto, s.id, s.user_id FROM edge LEFT JOIN scan s "
    "ON s.id <= edge.upto AND s.channel = 'websocket' AND s.status = 'pending' "
    "ORDER BY s.id"
)
# Webhook and email deliveries in flight (a partial index holds only those) with their
# latest try, and the addresses their tries are named by.
_SCAN_EXTERNAL = text(
    "SELECT d.id, d.channel, d.series_start, d.deferred_until, d.created_at, "
    "n.webhook_url AS given, u.webhook_url AS own, a.attempt, a.started_at, a.finished_at, "
    "a.outcome::text AS outcome, a.next_retry_at "
    "FROM deliveries d JOIN notifications n ON n.id = d.notification_id "
    "LEFT JOIN users u ON u.id = d.user_id "
    "LEFT JOIN LATERAL (SELECT attempt, started_at, finished_at, outcome, next_retry_at "
    "FROM delivery_attempts a WHERE a.delivery_id = d.id AND a.channel = d.channel "
    "ORDER BY a.attempt DESC LIMIT 1) a ON true "
    "WHERE d.status = 'pending' AND d.channel <> 'websocket' AND d.id > :after "
    "AND (CAST(:ids AS bigint[]) IS NULL OR d.id = ANY(CAST(:ids AS bigint[]))) "
    "ORDER BY d.id LIMIT :limit"
)


def uuid_floor(unix_seconds: float) -> uuid.UUID:
    """The smallest UUIDv7 of that millisecond: ids below it were made before it."""
    return uuid.UUID(int=max(0, int(unix_seconds * 1000)) << 80)


def stream_floor(client: redis.Redis, stream: str, group: str) -> float | None:
    """Unix time of the oldest entry `group` has not finished, None when none waits.

    That is the oldest pending entry (read, not yet XACKed) or the first entry after the
    group's last-delivered id, whichever is older; every entry before the group was made
    counts when it does not exist yet. Entry ids are Redis's clock in milliseconds.
    """
    try:
        groups = client.xinfo_groups(stream)
    except redis.ResponseError:
        return None  # no stream: nothing waits
    info = next((g for g in groups if g["name"] == group), None)
    ids: list[str] = []
    if info is None:
        first = client.xrange(stream, "-", "+", count=1)
    else:
        if info["pending"]:
            ids.append(client.xpending(stream, group)["min"])
        first = client.xrange(stream, "(" + info["last-delivered-id"], "+", count=1)
    ids += [eid for eid, _ in first]
    if not ids:
        return None
    return min(int(eid.split("-")[0]) for eid in ids) / 1000


def _mark(conn: Connection, name: str) -> str | None:
    return conn.scalar(select(ReconcilerMark.value).where(ReconcilerMark.name == name))


def _set_mark(conn: Connection, name: str, value: str) -> None:
    stmt = pg_insert(ReconcilerMark).values(name=name, value=value, updated_at=utcnow())
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=[ReconcilerMark.name],
            set_={"value": stmt.excluded.value, "updated_at": stmt.excluded.updated_at},
        )
    )


def _restream(conn: Connection, client: redis.Redis, stream: str, ids: list[Any]) -> int:
    """XADD the notifications again and note when; returns how many."""
    if not ids:
        return 0
    rows = (
        conn.execute(select(Notification.__table__).where(Notification.id.in_(ids)))
        .mappings()
        .all()
    )
    pipe = client.pipeline(transaction=False)
    for row in rows:
        pipe.xadd(stream, entry_fields(dict(row), restreamed=True))
    pipe.execute()
    # After the XADD: the new entry is older than this mark, so pass 2 finds it finished
    # (or lost again) once the group is past it.
    conn.execute(
        Notification.__table__.update().where(Notification.id.in_(ids)).values(streamed_at=utcnow())
    )
    log.warning("reconciler streamed %d notifications again (their entries were lost)", len(rows))
    return len(rows)


def restream_lost(
    engine: Engine, client: redis.Redis, cfg: Config, now: float | None = None
) -> int:
    """Passes 1 and 2: stream again the notifications whose stream entry was lost."""
    now = time.time() if now is None else now
    floor = stream_floor(client, cfg.STREAM_KEY, cfg.STREAM_GROUP)
    cutoff = min(now if floor is None else floor, now) - cfg.RECONCILE_GRACE_SECONDS
    restreamed = 0
    with engine.begin() as conn:
        after = _mark(conn, MARK_NEW) or str(uuid_floor(now - cfg.RECONCILE_LOOKBACK_SECONDS))
        before = uuid_floor(cutoff)
        for _ in range(MAX_ROUNDS):
            if uuid.UUID(after) >= before:
                break
            scan = conn.execute(
                _SCAN_NEW, {"after": after, "before": str(before), "limit": cfg.RECONCILE_BATCH}
            ).one()
            restreamed += _restream(conn, client, cfg.STREAM_KEY, list(scan.missing))
            if scan.scanned < cfg.RECONCILE_BATCH:
                # Everything below `before` is checked; the next run starts there.
                after = str(uuid.UUID(int=before.int - 1))
                break
            after = scan.last
        _set_mark(conn, MARK_NEW, after)

        since = _mark(conn, MARK_RESTREAMED)
        since_at = (
            datetime.fromisoformat(since)
            if since
            else datetime.fromtimestamp(now - cfg.RECONCILE_LOOKBACK_SECONDS, UTC)
        )
        until_at = datetime.fromtimestamp(cutoff, UTC)
        if until_at > since_at:
            ids = list(conn.scalars(_SCAN_RESTREAMED, {"since": since_at, "until": until_at}))
            restreamed += _restream(conn, client, cfg.STREAM_KEY, ids)
            _set_mark(conn, MARK_RESTREAMED, until_at.isoformat())
    if restreamed:
        metrics.count(client, "reconciled", "restreamed", n=restreamed)
    return restreamed


def _websocket_ids(raw: str) -> list[int] | None:
    """The delivery ids a queued websocket task carries (kombu's Redis message), or None."""
    try:
        message = orjson.loads(raw)
        if message.get("headers", {}).get("task") != WEBSOCKET_TASK:
            return None
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        ids = orjson.loads(body)[0][0]
        return [int(i) for i in ids]
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def oldest_queued_delivery(broker: redis.Redis) -> int | None:
    """The lowest delivery id among the oldest websocket tasks waiting in the lanes.

    None when no websocket task waits; 0 when a lane's oldest QUEUE_PEEK messages are all
    other tasks (or unreadable) and more wait behind them: nothing can be ruled out.
    """
    oldest: int | None = None
    for lane in LANES:
        # kombu pushes on the left and workers pop on the right: the right end is oldest.
        raws = broker.lrange(lane, -QUEUE_PEEK, -1)
        found = [min(ids) for raw in raws if (ids := _websocket_ids(raw))]
        if found:
            oldest = min(found) if oldest is None else min(oldest, *found)
        elif len(raws) >= QUEUE_PEEK:
            return 0
    return oldest


def repush_stale(
    engine: Engine,
    client: redis.Redis,
    broker: redis.Redis | None,
    cfg: Config,
    send: Callable[[list[int]], None] | None = None,
) -> int:
    """Pass 3: push again the websocket deliveries whose task was lost; returns how many.

    Without a Redis broker to look into, nothing is pushed: a delivery whose task only waits
    in a backed-up lane must not be sent a second time (it is in the user's inbox anyway).
    """
    if broker is None:
        return 0
    send = _send_websocket if send is None else send
    queued = oldest_queued_delivery(broker)
    pushed = 0
    with engine.begin() as conn:
        after = int(_mark(conn, MARK_WEBSOCKET) or 0)
        for _ in range(MAX_ROUNDS):
            rows = conn.execute(
                _SCAN_WEBSOCKET,
                {
                    "after": after,
                    "limit": cfg.RECONCILE_BATCH,
                    "age": cfg.RECONCILE_PUSH_AFTER_SECONDS,
                },
            ).all()
            scanned, upto = rows[0].scanned, rows[0].upto
            if not scanned or upto is None:
                break
            if queued is not None:
                upto = min(upto, queued - 1)
            stale = [(r.id, r.user_id) for r in rows if r.id is not None and r.id <= upto]
            if stale:
                online = presence.nodes_for(
                    client, sorted({u for _, u in stale}), cfg.PRESENCE_TTL_SECONDS
                )
                ids = [i for i, u in stale if u in online]
                for i in range(0, len(ids), cfg.DELIVERY_BATCH):
                    send(ids[i : i + cfg.DELIVERY_BATCH])
                pushed += len(ids)
            if upto <= after:
                break
            after = upto
            if scanned < cfg.RECONCILE_BATCH or upto < rows[0].upto:
                break
        _set_mark(conn, MARK_WEBSOCKET, str(after))
    if pushed:
        log.warning(
            "reconciler pushed %d websocket deliveries again (their tasks were lost)", pushed
        )
        metrics.count(client, "reconciled", "repushed", n=pushed)
    return pushed


def _send_websocket(ids: list[int]) -> None:
    # The high lane: these are late already, and the default lane may be long.
    retries.celery_send(WEBSOCKET_TASK, [ids], 0, queue="high")


def _next_try(row: Any, grace: float, now: datetime) -> tuple[int, datetime] | None:
    """The try a delivery in flight waits for and when it is due, or None when its state
    changed within `grace` (its member may be on its way) or it waits for nothing."""
    if row.attempt is None or row.attempt < row.series_start:
        attempt, due, changed = row.series_start, row.created_at, row.created_at
    elif row.finished_at is None:
        attempt, due, changed = row.attempt, row.started_at, row.started_at
    elif row.outcome in ("retry", "lost"):
        attempt, changed = row.attempt + 1, row.finished_at
        due = row.next_retry_at or row.finished_at
    else:
        return None
    if changed > now - timedelta(seconds=grace):
        return None
    if row.deferred_until is not None and row.deferred_until > due:
        due = row.deferred_until
    return attempt, due


def _expected_tries(rows: list[Any], grace: float, now: datetime) -> dict[int, _Try]:
    """Each delivery's awaited try: its member, when it is due, and the names it may have."""
    tries = {}
    for row in rows:
        found = _next_try(row, grace, now)
        if found is None:
            continue
        attempt, due = found
        # Tries are named by whichever address rode along when they were scheduled.
        names = [
            retry_member(CHANNEL_TASK, [row.id, attempt, *([e] if e else [])])
            for e in dict.fromkeys([None, row.given, row.own])
        ]
        endpoint = (row.given or row.own) if row.channel == "webhook" else None
        member = retry_member(CHANNEL_TASK, [row.id, attempt, *([endpoint] if endpoint else [])])
        tries[row.id] = _Try(member, due.timestamp(), names)
    return tries


class _Try(NamedTuple):
    member: str
    due: float
    names: list[str]


def _unmirrored(client: redis.Redis, tries: dict[int, _Try]) -> set[int]:
    """The deliveries none of whose names for the awaited try is in the retry ZSET."""
    order = list(tries)
    scores = client.zmscore(RETRY_ZSET, [n for d in order for n in tries[d].names])
    missing, at = set(), 0
    for delivery_id in order:
        width = len(tries[delivery_id].names)
        if all(s is None for s in scores[at : at + width]):
            missing.add(delivery_id)
        at += width
    return missing


def remirror_in_flight(engine: Engine, client: redis.Redis, cfg: Config) -> int:
    """Pass 4: put back the retry ZSET member of every external try that lost it.

    A delivery whose member is missing is read again before its member is put back: a try
    that ran between the first read and the ZSET lookup has moved on to the next one,
    whose member is there, and must not get a stale copy of the one before. A run reads at
    most MAX_ROUNDS batches and the next goes on from there (the mark wraps around at the
    end), so many deliveries in flight are all checked, over several runs.
    """
    now = utcnow()
    grace = cfg.RECONCILE_GRACE_SECONDS
    with engine.connect() as conn:
        after = int(_mark(conn, MARK_EXTERNAL) or 0)
    restored = 0
    for _ in range(MAX_ROUNDS):
        with engine.connect() as conn:
            rows = conn.execute(
                _SCAN_EXTERNAL, {"after": after, "ids": None, "limit": cfg.RECONCILE_BATCH}
            ).all()
        if not rows:
            after = 0  # the end: the next run starts over
            break
        tries = _expected_tries(rows, grace, now)
        missing = _unmirrored(client, tries) if tries else set()
        if missing:
            with engine.connect() as conn:
                again = conn.execute(
                    _SCAN_EXTERNAL, {"after": 0, "ids": sorted(missing), "limit": len(missing)}
                ).all()
            still = _expected_tries(again, grace, now)
            pipe = client.pipeline(transaction=False)
            for delivery_id in missing:
                if delivery_id in still and still[delivery_id] == tries[delivery_id]:
                    member = tries[delivery_id].member
                    pipe.zadd(RETRY_ZSET, {member: tries[delivery_id].due}, nx=True)
                    pipe.hdel(RETRY_HELD, member)  # nobody holds it: the sweeper sends it
                    restored += 1
            pipe.execute()
        after = rows[-1].id
        if len(rows) < cfg.RECONCILE_BATCH:
            after = 0
            break
    with engine.begin() as conn:
        _set_mark(conn, MARK_EXTERNAL, str(after))
    if restored:
        log.warning("reconciler put back %d lost webhook/email tries", restored)
        metrics.count(client, "reconciled", "remirrored", n=restored)
    return restored


_brokers: dict[str, redis.Redis] = {}


def _broker(cfg: Config, client: redis.Redis) -> redis.Redis | None:
    url = cfg.broker_url
    if url == cfg.REDIS_URL:
        return client
    if not url.startswith(("redis://", "rediss://")):
        return None
    if url not in _brokers:
        _brokers[url] = make_redis(url)
    return _brokers[url]


def reconcile_all(engine: Engine, client: redis.Redis, cfg: Config) -> dict[str, int]:
    """Run every pass; one that fails (say, Redis is still down) does not stop the others."""
    done: dict[str, int] = {}
    passes = {
        "restreamed": lambda: restream_lost(engine, client, cfg),
        "repushed": lambda: repush_stale(engine, client, _broker(cfg, client), cfg),
        "remirrored": lambda: remirror_in_flight(engine, client, cfg),
    }
    for name, run in passes.items():
        try:
            done[name] = run()
        except Exception:
            log.warning("reconciler pass %s failed; the next run tries again", name, exc_info=True)
    return done


@shared_task(name="tasks.reconcile.reconcile", ignore_result=True)
def reconcile() -> dict[str, int]:
    return reconcile_all(
        current_app.extensions["db.engine"],
        current_app.extensions["redis"],
        current_app.config["NOTIFIER"],
    )
