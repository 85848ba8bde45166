"""The stream consumer: reads `notifications:stream` by consumer group and fans out deliveries.

For each group of entries (about RECORD_CHUNK deliveries) it expands recipients, records
the deliveries in PostgreSQL in bulk (a single entry's big fan-out in chunks, written on
CHUNK_WRITERS connections at once), enqueues delivery tasks per priority lane, and only
then XACKs; entries that arrived meanwhile are sorted in by priority between groups. Entries
left pending by a consumer that died are claimed with XAUTOCLAIM once idle longer than
STREAM_CLAIM_IDLE_MS; an entry handed out more than STREAM_MAX_DELIVERIES times goes to
the dead-letter table instead of looping.

`consume_stream` runs for STREAM_RUN_SECONDS and resubmits itself. It holds a lease in
Redis for its consumer name, so two tasks never consume under one name; the beat
`watchdog` starts a consumer whose lease has lapsed (its task died). The beat `trim`
task trims the stream below the oldest entry any group still needs.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import orjson
import redis
from celery import shared_task
from flask import current_app
from sqlalchemy import Connection, Engine, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session

from app import db, locales, metrics, preferences
from app.config import Config
from models import (
    Channel,
    DeadLetter,
    Delivery,
    DeliveryStatus,
    Notification,
    NotificationStatus,
    User,
)
from models.base import utcnow

log = logging.getLogger(__name__)

LEASE_PREFIX = "notifications:consumer-lease:"

# Renew the lease only if we still hold it; a lapsed lease may belong to a successor.
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
# Take the lease when it is free, or when it was reserved for us by the watchdog/predecessor.
_ACQUIRE = """
local held = redis.call('get', KEYS[1])
if held == false or held == ARGV[1] then
  redis.call('set', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""

# A stream entry as read: its id and fields.
StreamEntry = tuple[str, dict[str, str]]
# Delivery work for the workers: (lane, delivery ids, channel[, webhook endpoint]).
Enqueue = Callable[..., None]
# Deliveries per transaction: a fan-out's first delivery tasks start while the rest of its
# recipients are still being written, instead of after all 10,000 are.
RECORD_CHUNK = 1000
# Connections a big fan-out's chunks are written on at once: PostgreSQL inserts each
# chunk in one backend, and two keep both cores busy while the first tasks run.
CHUNK_WRITERS = 2
# The Celery queues of the priority lanes, in the order workers take them.
LANES = ("high", "default", "low")
RANK = {lane: i for i, lane in enumerate(LANES)}
WEBSOCKET = Channel.WEBSOCKET.value
EXTERNAL = (Channel.WEBHOOK.value, Channel.EMAIL.value)
CHANNELS = {WEBSOCKET, *EXTERNAL}


def lease_key(consumer: str) -> str:
    return LEASE_PREFIX + consumer


def lane_of(priority: str) -> str:
    """The Celery queue a priority's deliveries go to."""
    return {"high": "high", "low": "low"}.get(priority, "default")


def rank(priority: str) -> int:
    """Sort key of a priority: its lane's place in the order high, default, low."""
    return RANK[lane_of(priority)]


def ensure_group(client: redis.Redis, stream: str, group: str) -> None:
    """Create the consumer group from the stream's start (nothing already there is skipped)."""
    try:
        client.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


@dataclass
class _Entry:
    entry_id: str
    fields: dict[str, str]
    payload: dict[str, Any] | None
    error: str | None


def _decode(entry_id: str, fields: dict[str, str]) -> _Entry:
    try:
        payload = orjson.loads(fields["payload"])
        uuid.UUID(payload["id"])
        if not isinstance(payload.get("recipients"), list):
            raise ValueError("recipients must be a list")
        return _Entry(entry_id, fields, payload, None)
    except Exception as exc:
        return _Entry(entry_id, fields, None, f"undecodable stream entry: {exc!r}"[:500])


def _expired(payload: dict[str, Any], now: datetime) -> bool:
    expires_at = payload.get("expires_at")
    return bool(expires_at) and datetime.fromisoformat(expires_at) <= now


# A tuple, not a frozen dataclass: a 10,000-recipient fan-out builds 10,000 of them before
# its first chunk is written, and a dataclass took three times as long to build.
class NewDelivery(NamedTuple):
    notification_id: uuid.UUID
    user_id: str
    channel: str
    escalate_at: datetime | None = None
    lang: str | None = None
    # Muted by the user: recorded as skipped, with why, and never sent.
    skipped: str | None = None


class Inserted(NamedTuple):
    id: int
    notification_id: str
    channel: str
    status: str


# One statement: the rows come as one JSON parameter (PostgreSQL parses a single literal
# instead of seven arrays of a thousand quoted elements each), and the ids come back as one
# array per (notification, channel, status), so the driver builds a handful of result rows
# rather than one per recipient.
_RECORD = text(
    "WITH ins AS ("
    "INSERT INTO deliveries "
    "(notification_id, user_id, channel, status, escalate_at, lang, last_error) "
    "SELECT n, u, c, CAST(s AS delivery_status), e, l, m "
    "FROM json_to_recordset(CAST(:rows AS json)) "
    "AS r(n uuid, u text, c text, e timestamptz, l text, s text, m text) "
    "ON CONFLICT (notification_id, user_id, channel) DO NOTHING "
    "RETURNING id, notification_id, channel, status) "
    "SELECT notification_id::text, channel, status::text, array_agg(id) "
    "FROM ins GROUP BY 1, 2, 3"
)


def record_deliveries(conn: Connection | Session, rows: list[NewDelivery]) -> list[Inserted]:
    """Insert deliveries, skipping ones that exist; returns those inserted, in id order."""
    payload = orjson.dumps(
        [
            {
                "n": r.notification_id,
                "u": r.user_id,
                "c": r.channel,
                "e": r.escalate_at,
                "l": r.lang,
                "s": "skipped" if r.skipped else "pending",
                "m": r.skipped,
            }
            for r in rows
        ]
    ).decode()
    groups = conn.execute(_RECORD, {"rows": payload}).all()
    return sorted(
        Inserted(delivery_id, nid, channel, status)
        for nid, channel, status, ids in groups
        for delivery_id in ids
    )


@dataclass(frozen=True)
class Recipient:
    locale: str | None
    muted: dict[str, Any] | None


def recipients_info(conn: Connection, user_ids: set[str]) -> dict[str, Recipient]:
    """Locale and mutes of those recipients that have a users row."""
    if not user_ids:
        return {}
    rows = conn.execute(select(User.id, User.locale, User.muted).where(User.id.in_(list(user_ids))))
    return {r.id: Recipient(r.locale, r.muted) for r in rows}


def process_entries(
    engine: Engine,
    entries: list[tuple[str, dict[str, str]]],
    enqueue: Enqueue,
    delivery_batch: int,
    dead: dict[str, str] | None = None,
    replay: bool = True,
    critical: Collection[str] = (),
) -> list[str]:
    """Record deliveries for `entries` and enqueue them; returns the entry ids safe to XACK.

    `dead` maps entry ids to an error: those go to the dead-letter table instead; entries
    that cannot be decoded are added to it.
    Re-processing an entry creates no second delivery; with `replay` (entries that may
    have been handled before, e.g. claimed from a dead consumer) the deliveries that are
    still pending are enqueued again, since their first task may have been lost.
    """
    dead = dead if dead is not None else {}
    decoded = [_decode(eid, fields) for eid, fields in entries]
    now = utcnow()
    rows: list[NewDelivery] = []
    # Keyed by the notification id as text, the form the inserted rows come back in.
    priority_of: dict[str, str] = {}
    hook_of: dict[str, str] = {}
    expired_ids: list[uuid.UUID] = []
    live: list[_Entry] = []
    for e in decoded:
        if e.entry_id in dead or e.payload is None:
            dead.setdefault(e.entry_id, e.error or "")
            continue
        if _expired(e.payload, now):
            expired_ids.append(uuid.UUID(e.payload["id"]))
            continue
        live.append(e)

    # Only templated or categorised notifications need the recipients' preferences.
    wanted = {
        u
        for e in live
        if e.payload.get("renditions") or e.payload.get("category")  # type: ignore[union-attr]
        for u in e.payload["recipients"]  # type: ignore[index]
    }
    users: dict[str, Recipient] = {}
    if wanted:
        with engine.connect() as conn:
            users = recipients_info(conn, wanted)
    rank_of: dict[uuid.UUID, int] = {}
    for e in live:
        assert e.payload is not None
        nid = uuid.UUID(e.payload["id"])
        priority = str(e.payload.get("priority", "normal"))
        priority_of[str(nid)] = priority
        rank_of[nid] = rank(priority)
        if e.payload.get("webhook_url"):
            hook_of[str(nid)] = e.payload["webhook_url"]
        rows.extend(_deliveries_of(e.payload, nid, users, critical, now))
    # High priority first, so its chunk is the first committed and enqueued.
    rows.sort(key=lambda r: rank_of[r.notification_id])
    chunks = [rows[i : i + RECORD_CHUNK] for i in range(0, len(rows), RECORD_CHUNK)] or [[]]

    # The last chunk shares a transaction with the replay, expiries and dead letters, when
    # there are any; every other chunk is only its insert, one statement that needs no
    # transaction (BEGIN and COMMIT would be two more round trips per chunk).
    # Notifications whose pending deliveries are enqueued again: all of a replay's, and
    # those of entries the reconciler streamed again (their first tasks may be lost too).
    again = [
        uuid.UUID(e.payload["id"])  # type: ignore[index]
        for e in live
        if replay or e.fields.get("restreamed")
    ]
    tail = chunks.pop() if (again and rows) or expired_ids or dead else None
    chunks = [c for c in chunks if c]
    fresh: set[int] = set()
    with _chunk_writers(len(chunks)) as writes:
        # In chunk order, each enqueued as soon as it and those before it are committed;
        # a big fan-out's chunks are written on two connections at once.
        for to_send in writes(lambda chunk: _record_alone(engine, chunk), chunks):
            fresh.update(delivery_id for delivery_id, _, _ in to_send)
            _enqueue(to_send, enqueue, delivery_batch, priority_of, hook_of)
    if tail is not None:
        with engine.begin() as conn:
            to_send = _pending_of(record_deliveries(conn, tail)) if tail else []
            fresh.update(delivery_id for delivery_id, _, _ in to_send)
            if again and rows:
                to_send.extend(
                    (row.id, str(row.notification_id), row.channel)
                    for row in conn.execute(
                        select(Delivery.id, Delivery.notification_id, Delivery.channel).where(
                            Delivery.notification_id.in_(again),
                            Delivery.status == DeliveryStatus.PENDING,
                        )
                    )
                    if row.id not in fresh
                )
            _record_expired_and_dead(conn, expired_ids, dead, decoded)
        # Enqueue only after the commit that makes these deliveries visible to the workers.
        _enqueue(to_send, enqueue, delivery_batch, priority_of, hook_of)
    return [eid for eid, _ in entries]


def _pending_of(inserted: list[Inserted]) -> list[tuple[int, str, str]]:
    """What the workers get of freshly inserted deliveries: (id, notification, channel)."""
    pending = DeliveryStatus.PENDING.value
    return [(r.id, r.notification_id, r.channel) for r in inserted if r.status == pending]


def _record_alone(engine: Engine, chunk: list[NewDelivery]) -> list[tuple[int, str, str]]:
    with db.autocommit(engine) as conn:
        return _pending_of(record_deliveries(conn, chunk))


@contextlib.contextmanager
def _chunk_writers(chunks: int) -> Iterator[Callable[..., Iterator[Any]]]:
    """The `map` a read's chunks are written with: in this thread for one chunk, else on
    CHUNK_WRITERS threads (results still in chunk order)."""
    if chunks <= 1:
        yield map
        return
    pool = ThreadPoolExecutor(max_workers=CHUNK_WRITERS, thread_name_prefix="record")
    try:
        yield pool.map
    finally:
        # After a failed chunk the rest are not written: the entries stay pending, and
        # their retry records them.
        pool.shutdown(wait=True, cancel_futures=True)


def _record_expired_and_dead(
    conn: Connection, expired_ids: list[uuid.UUID], dead: dict[str, str], decoded: list[_Entry]
) -> None:
    if expired_ids:
        conn.execute(
            update(Notification)
            .where(Notification.id.in_(expired_ids))
            .values(status=NotificationStatus.EXPIRED)
        )
    if dead:
        by_id = {e.entry_id: e for e in decoded}
        conn.execute(
            pg_insert(DeadLetter),
            [
                {
                    "source": "stream",
                    "stream_entry_id": eid,
                    "notification_id": _maybe_uuid(by_id[eid].fields.get("id")),
                    "payload": by_id[eid].payload or {"fields": by_id[eid].fields},
                    "error": error,
                    "attempts": 0,
                }
                for eid, error in dead.items()
                if eid in by_id
            ],
        )


def _enqueue(
    to_send: list[tuple[int, str, str]],
    enqueue: Enqueue,
    delivery_batch: int,
    priority_of: dict[str, str],
    hook_of: dict[str, str],
) -> None:
    """Hand deliveries to the workers: batches per channel and lane, high lanes first."""
    if log.isEnabledFor(logging.DEBUG):
        per_notification: dict[str, int] = defaultdict(int)
        for _, nid, _ in to_send:
            per_notification[nid] += 1
        for nid, n in per_notification.items():
            log.debug("deliveries recorded", extra={"notification_id": nid, "deliveries": n})

    # A notification's own webhook_url is known here: its tries carry it, so an open
    # circuit holds them without a database round trip.
    lanes: dict[tuple[str, str, str | None], list[int]] = defaultdict(list)
    for delivery_id, nid, channel in sorted(to_send):
        endpoint = hook_of.get(nid) if channel == Channel.WEBHOOK.value else None
        lanes[(channel, lane_of(priority_of[nid]), endpoint)].append(delivery_id)
    order = {c: i for i, c in enumerate((WEBSOCKET, *EXTERNAL))}
    for (channel, lane, endpoint), ids in sorted(
        lanes.items(), key=lambda kv: (order[kv[0][0]], RANK[kv[0][1]], kv[0][2] or "")
    ):
        step = delivery_batch if channel == WEBSOCKET else len(ids) or 1
        for i in range(0, len(ids), step):
            if endpoint:
                enqueue(lane, ids[i : i + step], channel, endpoint)
            else:
                enqueue(lane, ids[i : i + step], channel)


def _deliveries_of(
    payload: dict[str, Any],
    nid: uuid.UUID,
    users: dict[str, Recipient],
    critical: Collection[str],
    now: datetime,
) -> Iterator[NewDelivery]:
    """One delivery per recipient and channel, in the recipient's language, muted or not."""
    channels = [c for c in payload.get("channels", [WEBSOCKET]) if c in CHANNELS]
    fallback = payload.get("fallback_after_seconds")
    escalate_at = now + timedelta(seconds=fallback) if fallback else None
    renditions = payload.get("renditions")
    category = payload.get("category")
    priority = str(payload.get("priority", "normal"))
    given_lang = payload.get("lang")
    if not users and not renditions:
        # No preferences to look at (the common case, and every big fan-out's): the same
        # delivery per channel for each recipient.
        for user_id in payload["recipients"]:
            for channel in channels:
                yield NewDelivery(
                    nid, user_id, channel, escalate_at if channel == WEBSOCKET else None,
                    given_lang,
                )  # fmt: skip
        return
    for user_id in payload["recipients"]:
        user = users.get(user_id)
        lang = given_lang
        if renditions:
            lang = locales.choose(
                [lang, user.locale if user else None],
                renditions["locales"],
                renditions["default"],
            )
        for channel in channels:
            skipped = None
            if user and preferences.is_muted(user.muted, category, channel, priority, critical):
                skipped = f"muted by the user: {channel} for category {category!r}"
            yield NewDelivery(
                nid, user_id, channel,
                escalate_at if channel == WEBSOCKET and not skipped else None,
                lang, skipped,
            )  # fmt: skip


def _maybe_uuid(value: str | None) -> uuid.UUID | None:
    try:
        return uuid.UUID(value) if value else None
    except ValueError:
        return None


# The fraction of its lease a consumer lets pass before renewing it.
RENEW_AFTER = 0.1

# PostgreSQL or Redis is down or the connection dropped: nothing is wrong with the entries.
UNREACHABLE = (OperationalError, InterfaceError, redis.ConnectionError, redis.TimeoutError)


class FailedEntries(Exception):
    """Entries that failed on their own; the rest of their read was handled and XACKed."""

    def __init__(self, entry_ids: list[str]) -> None:
        super().__init__(f"{len(entry_ids)} stream entries failed: {', '.join(entry_ids[:5])}")
        self.entry_ids = entry_ids


class StreamConsumer:
    """One named member of the consumer group, run for a bounded time."""

    def __init__(
        self, cfg: Config, engine: Engine, client: redis.Redis, name: str, enqueue: Enqueue
    ) -> None:
        self.cfg = cfg
        self.engine = engine
        self.redis = client
        self.name = name
        self.enqueue = enqueue
        self.token = secrets.token_hex(8)
        self._renew = client.register_script(_RENEW)
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self._lease_ms = int(cfg.STREAM_LEASE_SECONDS * 1000)
        self._renewed_at = float("-inf")

    def acquire(self, reserved_token: str | None) -> bool:
        """Take this consumer name's lease; False if another live task holds it."""
        held = bool(
            self._acquire(
                keys=[lease_key(self.name)],
                args=[reserved_token or "", self.token, self._lease_ms],
            )
        )
        if held:
            self._renewed_at = time.monotonic()
        return held

    def renew(self) -> bool:
        held = bool(self._renew(keys=[lease_key(self.name)], args=[self.token, self._lease_ms]))
        if held:
            self._renewed_at = time.monotonic()
        return held

    def _keep_lease(self) -> bool:
        """Renew the lease once RENEW_AFTER of it has passed since the last renewal.

        The lease runs for its full length from each renewal, so renewing on every read
        (hundreds a second under load) bought nothing but a round trip each time. A group
        of entries may start with up to that fraction of the lease used.
        """
        if time.monotonic() - self._renewed_at < self._lease_ms / 1000 * RENEW_AFTER:
            return True
        return self.renew()

    def hand_over(self) -> str:
        """Reserve the lease for a successor task; returns the token it must present."""
        successor = secrets.token_hex(8)
        self.redis.set(lease_key(self.name), successor, px=self._lease_ms)
        return successor

    def release(self) -> None:
        self._release(keys=[lease_key(self.name)], args=[self.token])

    def run(self, seconds: float, stop: Callable[[], bool] = lambda: False) -> int:
        """Consume until `seconds` pass, the lease is lost or `stop()`; returns entries handled."""
        cfg = self.cfg
        ensure_group(self.redis, cfg.STREAM_KEY, cfg.STREAM_GROUP)
        deadline = time.monotonic() + seconds
        next_claim = 0.0
        # First finish what this name left pending (a predecessor's work); a retry after a
        # failure of the entries themselves counts as another delivery of them.
        own_pending, count_retry = True, True
        backoff = 0.5
        handled = 0
        while time.monotonic() < deadline and not stop():
            if not self._keep_lease():
                log.warning("consumer %s lost its lease; stopping", self.name)
                break
            try:
                if time.monotonic() >= next_claim:
                    handled += self.claim_abandoned()
                    next_claim = time.monotonic() + cfg.STREAM_CLAIM_EVERY_SECONDS
                handled_now, own_pending = self.read_once(own_pending, count_retry)
                handled += handled_now
                backoff = 0.5
            except redis.ResponseError as exc:
                if "NOGROUP" in str(exc):
                    ensure_group(self.redis, cfg.STREAM_KEY, cfg.STREAM_GROUP)
                    continue
                raise
            except UNREACHABLE:
                # PostgreSQL or Redis is unreachable: the entries are fine, keep them pending
                # and retry without counting it against them.
                log.exception(
                    "consumer %s: store unreachable; retrying in %.1fs", self.name, backoff
                )
                own_pending, count_retry = True, False
                time.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
            except Exception:
                log.exception("consumer %s failed a batch; retrying it", self.name)
                own_pending, count_retry = True, True
                time.sleep(0.2)
        return handled

    def read_once(self, own_pending: bool, count_retry: bool = True) -> tuple[int, bool]:
        """Read and handle one batch; returns (entries handled, whether own pending remain)."""
        cfg = self.cfg
        reply = self.redis.xreadgroup(
            cfg.STREAM_GROUP,
            self.name,
            {cfg.STREAM_KEY: "0" if own_pending else ">"},
            count=cfg.STREAM_BATCH,
            block=None if own_pending else cfg.STREAM_BLOCK_MS,
        )
        entries = [(eid, fields) for _, batch in (reply or []) for eid, fields in batch]
        # In the pending history, an entry whose body was trimmed away comes back empty.
        gone = [eid for eid, fields in entries if not fields]
        entries = [(eid, fields) for eid, fields in entries if fields]
        if gone:
            self.redis.xack(cfg.STREAM_KEY, cfg.STREAM_GROUP, *gone)
        if not entries:
            return len(gone), False
        dead: dict[str, str] = {}
        if own_pending:
            ids = [eid for eid, _ in entries]
            if count_retry:
                # Re-reading our own pending entries does not raise their delivery count;
                # claiming them to ourselves does, which bounds a poison entry's retries.
                self.redis.xclaim(cfg.STREAM_KEY, cfg.STREAM_GROUP, self.name, 0, ids)
            dead = self._over_delivered(ids)
        self._handle(entries, dead, replay=own_pending)
        return len(entries), own_pending

    def claim_abandoned(self) -> int:
        """XAUTOCLAIM entries idle past the bound (their consumer died) and handle them."""
        cfg = self.cfg
        handled = 0
        cursor = "0-0"
        while True:
            cursor, claimed, deleted = self.redis.xautoclaim(
                cfg.STREAM_KEY,
                cfg.STREAM_GROUP,
                self.name,
                min_idle_time=cfg.STREAM_CLAIM_IDLE_MS,
                start_id=cursor,
                count=cfg.STREAM_BATCH,
            )
            if deleted:
                self.redis.xack(cfg.STREAM_KEY, cfg.STREAM_GROUP, *deleted)
            entries = [(eid, fields) for eid, fields in claimed if fields]
            if entries:
                log.info("consumer %s claimed %d abandoned entries", self.name, len(entries))
                self._handle(entries, self._over_delivered([eid for eid, _ in entries]))
                handled += len(entries)
            if cursor == "0-0":
                return handled

    def _over_delivered(self, entry_ids: list[str]) -> dict[str, str]:
        """Entries handed out more than STREAM_MAX_DELIVERIES times, with the reason."""
        cfg = self.cfg
        dead = {}
        # Only this consumer's: the entries were just read or claimed by it, and other
        # consumers' entries in the same id range would use up the count.
        for info in self.redis.xpending_range(
            cfg.STREAM_KEY, cfg.STREAM_GROUP, min=min(entry_ids, key=_id_key),
            max=max(entry_ids, key=_id_key), count=len(entry_ids) + 100, consumername=self.name,
        ):  # fmt: skip
            if (
                info["message_id"] in entry_ids
                and info["times_delivered"] > cfg.STREAM_MAX_DELIVERIES
            ):
                dead[info["message_id"]] = (
                    f"stream entry handed out {info['times_delivered']} times without success"
                )
        return dead

    def _handle(
        self, entries: list[StreamEntry], dead: dict[str, str], replay: bool = True
    ) -> None:
        """Process `entries` a group of about RECORD_CHUNK deliveries at a time, XACKing each.

        Between groups, entries that arrived meanwhile are read too and sorted in by priority
        (stream order kept within one priority): a high-priority notification waits for one
        group, not for a whole read of big low-priority fan-outs.
        """
        cfg = self.cfg
        todo = sorted(entries, key=_rank_of_entry) if not replay else list(entries)
        dead_letters = 0
        failed: list[str] = []
        while todo:
            group, todo = _take_group(todo, RECORD_CHUNK)
            # process_entries adds the undecodable entries to the dict it is given.
            group_dead = {eid: dead[eid] for eid, _ in group if eid in dead}
            done = self._process(group, group_dead, replay, failed)
            if done:
                self.redis.xack(cfg.STREAM_KEY, cfg.STREAM_GROUP, *done)
            dead_letters += len(group_dead)
            if not todo:
                break
            if not self._keep_lease():
                # The rest stays pending under this name for whoever holds the lease next.
                log.warning("consumer %s lost its lease mid-batch; stopping", self.name)
                break
            self._still_working_on(todo)
            if not replay and len(todo) < QUEUE_MAX_ENTRIES:
                reply = self.redis.xreadgroup(
                    cfg.STREAM_GROUP, self.name, {cfg.STREAM_KEY: ">"}, count=cfg.STREAM_BATCH
                )
                newer = [(eid, f) for _, batch in (reply or []) for eid, f in batch if f]
                if newer:
                    todo = sorted(todo + newer, key=_rank_of_entry)
        metrics.count(self.redis, "dead_letters", "stream", n=dead_letters)
        if failed:
            # Left pending: the retry claims them, which counts against their deliveries,
            # so one that keeps failing ends in the dead-letter table.
            raise FailedEntries(failed)

    def _process(
        self, group: list[StreamEntry], dead: dict[str, str], replay: bool, failed: list[str]
    ) -> list[str]:
        """process_entries for a group; the ids to XACK.

        When the group fails for a reason of its own (not an unreachable store), its entries
        are handled one at a time. An entry that fails alone is added to `failed` and left
        pending; the good entries beside it are recorded now, where they used to be retried
        with it until the delivery bound sent them all to the dead-letter table.
        """
        cfg = self.cfg

        def handle(entries: list[StreamEntry], entries_dead: dict[str, str], again: bool):
            return process_entries(
                self.engine, entries, self.enqueue, cfg.DELIVERY_BATCH, entries_dead,
                replay=again, critical=cfg.critical_categories,
            )  # fmt: skip

        try:
            return handle(group, dead, replay)
        except (*UNREACHABLE, redis.RedisError):
            raise
        except Exception:
            if len(group) == 1:
                log.exception("consumer %s: stream entry %s failed", self.name, group[0][0])
                failed.append(group[0][0])
                return []
            log.exception(
                "consumer %s: a group of %d entries failed; handling them one at a time",
                self.name, len(group),
            )  # fmt: skip
        done: list[str] = []
        for entry in group:
            alone = {entry[0]: dead[entry[0]]} if entry[0] in dead else {}
            try:
                # As a replay: the failed attempt may have committed some of its deliveries
                # without enqueueing them.
                done += handle([entry], alone, True)
            except (*UNREACHABLE, redis.RedisError):
                raise
            except Exception:
                log.exception("consumer %s: stream entry %s failed", self.name, entry[0])
                failed.append(entry[0])
                continue
            dead.update(alone)
        return done

    def _still_working_on(self, todo: list[StreamEntry]) -> None:
        """Reset the idle time of held entries about to look abandoned.

        A long read (big fan-outs behind each other) can hold entries past
        STREAM_CLAIM_IDLE_MS before their turn; another consumer would then claim and
        handle them too, and each claim counts toward the dead-letter bound. XCLAIM to this
        consumer with JUSTID resets the idle time without counting a delivery. Entries idle
        for less than half the bound are left alone, so one another consumer has claimed
        since is not taken back.
        """
        self.redis.xclaim(
            self.cfg.STREAM_KEY, self.cfg.STREAM_GROUP, self.name,
            self.cfg.STREAM_CLAIM_IDLE_MS // 2, [eid for eid, _ in todo], justid=True,
        )  # fmt: skip


# Entries a consumer holds read but unprocessed before it stops reading ahead for
# high-priority newcomers.
QUEUE_MAX_ENTRIES = 2000


def _rank_of_entry(entry: StreamEntry) -> int:
    return rank(entry[1].get("priority", "normal"))


def _take_group(
    entries: list[StreamEntry], deliveries: int
) -> tuple[list[StreamEntry], list[StreamEntry]]:
    """The leading entries that make about `deliveries` deliveries (at least one), and the rest.

    An entry's size is its recipient count as written at ingest (1 when absent).
    """
    total = 0
    for i, (_, fields) in enumerate(entries):
        try:
            total += max(1, int(fields.get("recipients", 1)))
        except ValueError:
            total += 1
        if total >= deliveries:
            return entries[: i + 1], entries[i + 1 :]
    return entries, []


def trim_stream(client: redis.Redis, stream: str) -> int:
    """XTRIM MINID below the oldest entry any group has not acknowledged; returns entries cut."""
    try:
        groups = client.xinfo_groups(stream)
    except redis.ResponseError:
        return 0
    if not groups:
        return 0  # nobody has read anything yet: everything is still needed
    floor: str | None = None
    for group in groups:
        summary = client.xpending(stream, group["name"])
        # With nothing pending, everything up to last-delivered-id is acked.
        keep_from = summary["min"] if summary["pending"] else group["last-delivered-id"]
        if keep_from == "0-0":
            return 0
        if floor is None or _id_key(keep_from) < _id_key(floor):
            floor = keep_from
    if floor is None:
        return 0
    return int(client.xtrim(stream, minid=floor, approximate=False))


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


def celery_enqueue(
    lane: str, delivery_ids: list[int], channel: str = WEBSOCKET, endpoint: str | None = None
) -> None:
    if channel == WEBSOCKET:
        from tasks.delivery import deliver_websocket

        deliver_websocket.apply_async(
            args=[delivery_ids],
            queue=lane,
            # Celery publishes to a direct queue through the anonymous exchange, which
            # kombu's Redis transport turns into a push onto the queue's list: no binding
            # is looked up, so declaring the queue on every publish (binding and hashing
            # it, a sixth of the publish's CPU) buys nothing.
            declare=[],
            # What Flower shows for the args, built without Celery's saferepr of the list.
            argsrepr=_ids_repr(delivery_ids),
        )
        return
    # One task per try of an external channel, each mirrored in the retry ZSET, so a first
    # try lost with its broker message is recovered like any retry.
    from tasks import channels

    attempts = channels.attempts_from_app()
    until = attempts.circuits.open_until(endpoint) if endpoint else None
    if endpoint and until is not None:
        attempts.hold(delivery_ids, endpoint, until)
        return
    for delivery_id in delivery_ids:
        attempts.schedule(delivery_id, 1, 0.0, endpoint)


def _ids_repr(delivery_ids: list[int]) -> str:
    # A few ids are shown whole; a longer batch as its first and last id and its size.
    if len(delivery_ids) <= 3:
        return f"[{delivery_ids!r}]"
    return f"[[{delivery_ids[0]}, ..., {delivery_ids[-1]}] ({len(delivery_ids)} ids)]"


def _worker_stopping() -> bool:
    # Set by the worker's SIGTERM/SIGQUIT handler; the consumer runs under the solo pool,
    # in the process that receives the signal, so Ctrl-C stops it within one read.
    from celery.worker import state

    # The flags hold an exit code once set, and EX_OK is 0 (== False): compare by identity.
    return any(
        flag is not None and flag is not False
        for flag in (state.should_stop, state.should_terminate)
    )


@shared_task(name="tasks.stream.consume_stream", bind=True, ignore_result=True)
def consume_stream(self: Any, consumer: str, lease_token: str | None = None) -> int:
    # acks_late (the default here) keeps the message unacked while it runs, so an idle
    # consumer worker, not this busy one, takes the next consumer's task. A copy redelivered
    # after a crash only finds the lease held, or takes over a lapsed one.
    cfg: Config = current_app.config["NOTIFIER"]
    worker = StreamConsumer(
        cfg, current_app.extensions["db.engine"], current_app.extensions["redis"], consumer,
        celery_enqueue,
    )  # fmt: skip
    if not worker.acquire(lease_token):
        log.info("consumer %s is already running; this copy exits", consumer)
        return 0
    try:
        handled = worker.run(cfg.STREAM_RUN_SECONDS, stop=_worker_stopping)
    except BaseException:
        worker.release()
        raise
    if _worker_stopping():
        worker.release()  # the watchdog restarts it wherever a consumer worker runs
    elif worker.renew():
        successor = worker.hand_over()
        consume_stream.apply_async(args=[consumer, successor], queue="stream")
    return handled


@shared_task(name="tasks.stream.watchdog", ignore_result=True)
def watchdog() -> list[str]:
    """Start a consumer task for every configured name whose lease has lapsed."""
    cfg: Config = current_app.config["NOTIFIER"]
    client: redis.Redis = current_app.extensions["redis"]
    started = []
    for name in cfg.consumer_names:
        reservation = secrets.token_hex(8)
        # Reserve the name before enqueueing, so a slow start is not started twice.
        ttl_ms = int(max(cfg.STREAM_LEASE_SECONDS, 30) * 1000)
        if client.set(lease_key(name), reservation, nx=True, px=ttl_ms):
            consume_stream.apply_async(args=[name, reservation], queue="stream")
            started.append(name)
    if started:
        log.info("watchdog started consumers %s", started)
    return started


@shared_task(name="tasks.stream.trim", ignore_result=True)
def trim() -> int:
    cfg: Config = current_app.config["NOTIFIER"]
    return trim_stream(current_app.extensions["redis"], cfg.STREAM_KEY)
