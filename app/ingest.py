"""Record-then-stream for accepted notifications, with group commit.

Each request hands its validated notification to the process's IngestWriter and waits.
One writer thread (a greenlet under gevent) takes everything that queued up while the
previous batch was being written, inserts it in one transaction, commits, appends every
entry to the Redis Stream in one pipeline, and only then wakes the requests: a 202 is
never sent for a row that is not committed. Nothing is written back after the XADD: a
row whose entry never reached Redis, or was lost there, is found and streamed again by
the reconciler (tasks/reconcile.py), which compares PostgreSQL with the stream.

Batching is what makes the throughput: one commit per notification tops out near
2,500/s on the target machine, while a few hundred rows per commit cost about the same.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import orjson
import redis
from sqlalchemy import Engine, insert, select, tuple_
from sqlalchemy.dialects.postgresql import insert as pg_insert

from app import db, metrics
from app.stream import entry_fields
from models import IdempotencyKey, Notification
from models.base import utcnow

log = logging.getLogger(__name__)

_STOP = object()
# After a failed XADD the writer leaves the stream alone this long: each try against an
# unreachable Redis costs a connect timeout, and requests queue behind it.
XADD_PAUSE_SECONDS = 1.0


class TooLate(Exception):
    """The request waited longer than the reconciler's grace for its commit."""


@dataclass(frozen=True)
class IdempotencyRequest:
    client: str
    key: str
    request_hash: str


@dataclass
class Outcome:
    """What a submitted notification came to: accepted, replayed, or an idempotency conflict."""

    kind: str  # "accepted" | "replayed" | "conflict"
    response: dict[str, Any]


@dataclass
class _Pending:
    """One request's notifications: committed together, in one transaction."""

    rows: list[dict[str, Any]]
    response: dict[str, Any]
    idem: IdempotencyRequest | None
    done: threading.Event = field(default_factory=threading.Event)
    outcome: Outcome | None = None
    error: BaseException | None = None


class IngestUnavailable(Exception):
    """The notification could not be recorded; nothing was accepted."""


class IngestWriter:
    """Batches notification inserts across concurrent requests of one process."""

    def __init__(
        self,
        engine: Engine,
        client: redis.Redis,
        stream_key: str,
        batch_max: int,
        idempotency_ttl: timedelta,
        max_wait: float = float("inf"),
    ) -> None:
        self._engine = engine
        self._redis = client
        self._stream_key = stream_key
        self._batch_max = batch_max
        self._idempotency_ttl = idempotency_ttl
        # The reconciler reads new notifications by their ids' time, a grace behind the
        # stream; a row committed later than that could fall behind its mark unseen. So a
        # request that has waited max_wait (half the grace) is refused, never committed.
        self._max_wait = max_wait
        self._xadd_paused_until = 0.0
        self._queue: queue.Queue[_Pending] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._start_lock = threading.Lock()

    def submit(
        self, row: dict[str, Any], response: dict[str, Any], idem: IdempotencyRequest | None
    ) -> Outcome:
        """Record `row` (and stream it), block until committed, and say what happened."""
        return self.submit_many([row], response, idem)

    def submit_many(
        self,
        rows: list[dict[str, Any]],
        response: dict[str, Any],
        idem: IdempotencyRequest | None,
    ) -> Outcome:
        """Record `rows` all or none, like `submit`; `response` answers them all."""
        if not rows:
            raise ValueError("nothing to record")
        self._ensure_thread()
        pending = _Pending(rows=rows, response=response, idem=idem)
        self._queue.put(pending)
        pending.done.wait()
        if pending.error is not None:
            raise IngestUnavailable(str(pending.error)) from pending.error
        assert pending.outcome is not None
        return pending.outcome

    def close(self) -> None:
        """Stop the writer (tests and orderly shutdowns)."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(_STOP)  # type: ignore[arg-type]
            self._thread.join(timeout=5)
        self._thread = None

    def _ensure_thread(self) -> None:
        # The writer must live in the serving process: gunicorn forks after import.
        if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
            return
        with self._start_lock:
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="ingest-writer", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            if batch[0] is _STOP:
                return
            # Counted in rows; one request's rows are never split across transactions.
            size = len(batch[0].rows)
            while size < self._batch_max:
                try:
                    pending = self._queue.get_nowait()
                except queue.Empty:
                    break
                batch.append(pending)
                size += len(pending.rows)
            try:
                self._write(batch)
            except BaseException as exc:  # never let the writer die with requests waiting
                log.exception("ingest batch failed")
                for pending in batch:
                    if not pending.done.is_set():
                        pending.error = exc
                        pending.done.set()

    def _write(self, batch: list[_Pending]) -> None:
        now = time.time()
        late = [p for p in batch if now - _id_time(p.rows[0]["id"]) > self._max_wait]
        for pending in late:
            pending.error = TooLate(f"waited over {self._max_wait:g}s to be recorded")
            pending.done.set()
        batch = [p for p in batch if not p.done.is_set()]
        if not batch:
            return
        try:
            fresh = self._commit(batch)
        except Exception:
            if len(batch) == 1:
                raise
            # One bad row must not fail the others it was batched with: retry alone.
            log.warning("ingest batch of %d failed; retrying requests one by one", len(batch))
            fresh = []
            for pending in batch:
                try:
                    fresh.extend(self._commit([pending]))
                except Exception as exc:
                    log.exception("ingest of %s failed", pending.rows[0]["id"])
                    pending.error = exc
        self._stream(fresh)
        for pending in batch:
            pending.done.set()

    def _commit(self, batch: list[_Pending]) -> list[_Pending]:
        """Insert the batch in one transaction; returns the rows that were new."""
        now = utcnow()
        if any(p.idem for p in batch):
            with self._engine.begin() as conn:
                fresh = self._insert(conn, batch, now)
        else:
            self._insert_all(batch, now)
            fresh = batch
        for pending in fresh:
            for row in pending.rows:
                row["created_at"] = now
            pending.outcome = Outcome("accepted", pending.response)
        return fresh

    def _insert_all(self, batch: list[_Pending], now: datetime) -> None:
        """Insert the batch in one statement.

        One statement is atomic on its own: no BEGIN and COMMIT round trips, and one JSON
        parameter instead of a bind parameter per column and row. Under gevent every round
        trip is a wait behind the requests that arrived meanwhile, so this is what keeps
        the writer's cycle short at a few hundred requests a second.
        """
        # The row's keys are column names set by the API code, never by a client.
        columns = ", ".join(dict.fromkeys(["created_at", *batch[0].rows[0]]))
        rows = orjson.dumps([{**r, "created_at": now} for p in batch for r in p.rows]).decode()
        with db.autocommit(self._engine) as conn:
            conn.exec_driver_sql(
                f"INSERT INTO notifications ({columns}) SELECT {columns} "
                "FROM json_populate_recordset(NULL::notifications, %(rows)s)",
                {"rows": rows},
            )

    def _insert(self, conn: Any, batch: list[_Pending], now: datetime) -> list[_Pending]:
        self._resolve_idempotency(conn, [p for p in batch if p.idem], now)
        fresh = [p for p in batch if p.outcome is None]
        if fresh:
            conn.execute(
                insert(Notification), [{**r, "created_at": now} for p in fresh for r in p.rows]
            )
        return fresh

    def _resolve_idempotency(self, conn: Any, batch: list[_Pending], now: datetime) -> None:
        """Claim each Idempotency-Key; a request whose key is taken replays or conflicts."""
        if not batch:
            return
        first: dict[tuple[str, str], _Pending] = {}
        for pending in batch:
            assert pending.idem is not None
            first.setdefault((pending.idem.client, pending.idem.key), pending)
        claim = pg_insert(IdempotencyKey).values(
            [
                {
                    "client": p.idem.client,
                    "key": p.idem.key,
                    "request_hash": p.idem.request_hash,
                    # A batch's key points at its first notification; the stored
                    # response names them all.
                    "notification_id": p.rows[0]["id"],
                    "response": p.response,
                    "created_at": now,
                }
                for p in first.values()
                if p.idem is not None
            ]
        )
        # An expired key (older than the TTL) is taken over as if it were new.
        claim = claim.on_conflict_do_update(
            index_elements=[IdempotencyKey.client, IdempotencyKey.key],
            set_={
                "request_hash": claim.excluded.request_hash,
                "notification_id": claim.excluded.notification_id,
                "response": claim.excluded.response,
                "created_at": claim.excluded.created_at,
            },
            where=IdempotencyKey.created_at < now - self._idempotency_ttl,
        ).returning(IdempotencyKey.client, IdempotencyKey.key)
        claimed = {(r.client, r.key) for r in conn.execute(claim)}

        taken = [k for k in first if k not in claimed]
        existing: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}
        if taken:
            rows = conn.execute(
                select(
                    IdempotencyKey.client,
                    IdempotencyKey.key,
                    IdempotencyKey.request_hash,
                    IdempotencyKey.response,
                ).where(tuple_(IdempotencyKey.client, IdempotencyKey.key).in_(taken))
            )
            existing = {(r.client, r.key): (r.request_hash, r.response) for r in rows}
        for pending in batch:
            assert pending.idem is not None
            key = (pending.idem.client, pending.idem.key)
            if key in claimed:
                if first[key] is pending:
                    continue  # the owner of the key: inserted as a fresh notification
                owner = first[key]
                stored = (owner.idem.request_hash, owner.response)  # type: ignore[union-attr]
            else:
                stored = existing.get(key, ("", {}))
            if stored[0] == pending.idem.request_hash:
                pending.outcome = Outcome("replayed", stored[1])
            else:
                pending.outcome = Outcome("conflict", stored[1])

    def _stream(self, fresh: list[_Pending]) -> None:
        """XADD every fresh row in one pipeline.

        A row scheduled for later (a `send_at` and no `streamed_at` yet) is left to the
        scheduler (tasks/outbox.py), which streams it when it is due. A failed XADD is only
        logged: the reconciler streams the row again once it finds no deliveries for it.
        """
        rows = [r for p in fresh for r in p.rows]
        accepted = len(rows)
        rows = [r for r in rows if not (r.get("send_at") and r.get("streamed_at") is None)]
        if rows and time.monotonic() < self._xadd_paused_until:
            log.warning("Redis failed a moment ago; %d notifications left to the reconciler",
                        len(rows))  # fmt: skip
            return
        if not rows:
            # Every row waits for its send_at. The rows are committed: a Redis error here
            # must not turn their 202 into a 503.
            with contextlib.suppress(redis.RedisError):
                metrics.count(self._redis, "notifications_accepted", n=accepted)
            return
        try:
            pipe = self._redis.pipeline(transaction=False)
            for row in rows:
                pipe.xadd(self._stream_key, entry_fields(row))
            metrics.count(pipe, "notifications_accepted", n=accepted)
            results = pipe.execute(raise_on_error=False)[: len(rows)]
        except redis.RedisError:
            log.warning("XADD of %d notifications failed; the reconciler will retry", len(rows))
            self._xadd_paused_until = time.monotonic() + XADD_PAUSE_SECONDS
            return
        for row, result in zip(rows, results, strict=True):
            if isinstance(result, Exception):
                log.warning("XADD of %s failed: %s", row["id"], result)
        if log.isEnabledFor(logging.DEBUG):
            for row in rows:
                log.debug(
                    "notification accepted",
                    extra={
                        "notification_id": str(row["id"]),
                        "recipients": len(row.get("recipients") or ()),
                    },
                )


def _id_time(notification_id: uuid.UUID) -> float:
    """When a UUIDv7 was made (its first 48 bits are Unix milliseconds)."""
    return (notification_id.int >> 80) / 1000
