"""The reconciler's passes and the scheduler against real PostgreSQL and Redis (no Celery)."""

from __future__ import annotations

import base64
import time
import uuid
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from sqlalchemy import text

from app import presence
from app.ids import uuid7
from app.ingest import IngestUnavailable, IngestWriter
from app.routing import CHANNEL_TASK, RETRY_HELD, RETRY_ZSET, WEBSOCKET_TASK, retry_member
from tasks import reconcile
from tasks.outbox import stream_due
from tasks.stream import ensure_group, process_entries
from tests.helpers import count_rows

STREAM, GROUP = "notifications:stream", "notifier_group"
NOTE = {"user_id": "u1", "title": "t", "body": "b"}


@pytest.fixture
def cfg(make_app):
    """Settings with no grace: a notification counts as lost as soon as the stream is past it."""
    return make_app(RECONCILE_GRACE_SECONDS=0, RECONCILE_PUSH_AFTER_SECONDS=0).config["NOTIFIER"]


def _post(client, auth, **fields) -> str:
    body = {**NOTE, **fields}
    if "user_ids" in fields:
        del body["user_id"]
    r = client.post("/notifications", json=body, headers=auth)
    assert r.status_code == 202, r.json
    return r.json["id"]


def _stream_ids(rdb) -> list[str]:
    return [fields["id"] for _, fields in rdb.xrange(STREAM)] if rdb.exists(STREAM) else []


def _stream_dead_letter(pg, nid: str, redriven: bool) -> None:
    with pg.begin() as conn:
        conn.execute(
            text("INSERT INTO dead_letters (source, notification_id, payload, error, attempts, "
                 "redriven_at) VALUES ('stream', :n, '{}', 'poison', 5, "
                 "CASE WHEN :r THEN now() END)"),
            {"n": nid, "r": redriven},
        )  # fmt: skip


def _record(pg, rdb) -> list[int]:
    ids: list[int] = []
    process_entries(pg, list(rdb.xrange(STREAM)), lambda _, d, *__: ids.extend(d), 500)
    return ids


def test_a_notification_whose_entry_redis_lost_is_streamed_again(client, auth, pg, rdb, cfg):
    nid = _post(client, auth)
    rdb.flushdb()  # Redis restarted empty

    assert reconcile.restream_lost(pg, rdb, cfg) == 1
    [(_, fields)] = rdb.xrange(STREAM)
    assert fields["id"] == nid
    assert fields["restreamed"] == "1"


def test_a_failed_xadd_still_answers_202_and_the_reconciler_streams_the_row(
    client, auth, pg, rdb, cfg
):
    rdb.set(STREAM, "not a stream")  # every XADD now fails with WRONGTYPE
    nid = _post(client, auth)
    rdb.delete(STREAM)

    assert reconcile.restream_lost(pg, rdb, cfg) == 1
    assert _stream_ids(rdb) == [nid]


def test_redis_down_at_ingest_loses_nothing(make_app, auth, pg, rdb, cfg):
    down = make_app(REDIS_URL="redis://127.0.0.1:1/0").test_client()
    r = down.post("/notifications", json=NOTE, headers=auth)
    assert r.status_code == 202

    assert reconcile.restream_lost(pg, rdb, cfg) == 1
    assert _stream_ids(rdb) == [r.json["id"]]


def test_postgres_down_is_503_and_nothing_is_streamed(make_app, auth, rdb):
    broken = make_app(DATABASE_URL="postgresql+psycopg2://postgres@127.0.0.1:1/none").test_client()

    r = broken.post("/notifications", json=NOTE, headers=auth)

    assert r.status_code == 503
    assert r.json["error"] == "unavailable"
    assert "Retry-After" in r.headers
    assert not rdb.exists(STREAM)


def test_an_entry_still_waiting_in_the_stream_is_not_streamed_twice(
    client, auth, pg, rdb, make_app
):
    cfg = make_app(RECONCILE_GRACE_SECONDS=1).config["NOTIFIER"]
    _post(client, auth)
    ensure_group(rdb, STREAM, GROUP)
    rdb.xreadgroup(GROUP, "c1", {STREAM: ">"}, count=10)  # read, pending, not handled yet

    # Long after: the consumer is stuck, but the entry is still there for it.
    assert reconcile.restream_lost(pg, rdb, cfg, now=time.time() + 600) == 0
    assert len(_stream_ids(rdb)) == 1


def test_an_entry_not_yet_read_is_not_streamed_twice(client, auth, pg, rdb, make_app):
    cfg = make_app(RECONCILE_GRACE_SECONDS=1).config["NOTIFIER"]
    _post(client, auth)

    assert reconcile.restream_lost(pg, rdb, cfg, now=time.time() + 600) == 0


def test_a_fully_fanned_out_notification_is_left_alone(client, auth, pg, rdb, cfg):
    _post(client, auth, user_ids=["a", "b"], channels=["websocket", "webhook"])
    _record(pg, rdb)
    rdb.flushdb()

    assert reconcile.restream_lost(pg, rdb, cfg) == 0


def test_a_half_fanned_out_notification_is_streamed_again_and_finished(client, auth, pg, rdb, cfg):
    users = [f"u{i}" for i in range(50)]
    nid = _post(client, auth, user_ids=users)
    _record(pg, rdb)
    with pg.begin() as conn:  # as if the consumer died after its first chunks
        conn.execute(text("DELETE FROM deliveries WHERE user_id >= 'u3'"))
    rdb.flushdb()

    assert reconcile.restream_lost(pg, rdb, cfg) == 1
    enqueued = _record(pg, rdb)

    assert count_rows(pg, "deliveries") == 50
    # The restreamed entry also enqueues the copies recorded the first time: their delivery
    # tasks may have been lost with Redis too.
    assert len(enqueued) == 50
    assert _stream_ids(rdb) == [nid]


def test_a_notification_whose_entry_was_dead_lettered_is_not_streamed_again(
    client, auth, pg, rdb, cfg
):
    nid = _post(client, auth)
    _stream_dead_letter(pg, nid, redriven=False)
    rdb.flushdb()

    assert reconcile.restream_lost(pg, rdb, cfg) == 0


def test_each_run_reads_on_from_where_the_last_stopped(client, auth, pg, rdb, cfg):
    _post(client, auth)
    rdb.flushdb()
    assert reconcile.restream_lost(pg, rdb, cfg) == 1
    _record(pg, rdb)
    rdb.flushdb()

    assert reconcile.restream_lost(pg, rdb, cfg) == 0
    with pg.connect() as conn:
        marks = dict(conn.execute(text("SELECT name, value FROM reconciler_marks")).all())
    assert uuid.UUID(marks["notifications"]) >= reconcile.uuid_floor(time.time() - 5)


def test_a_restreamed_notification_lost_again_is_streamed_again(client, auth, pg, rdb, cfg):
    _post(client, auth)
    rdb.flushdb()
    assert reconcile.restream_lost(pg, rdb, cfg) == 1
    rdb.flushdb()  # lost a second time, before the consumer got to it

    assert reconcile.restream_lost(pg, rdb, cfg, now=time.time() + 1) == 1


def test_the_first_run_looks_back_only_as_far_as_configured(client, auth, pg, rdb, make_app):
    _post(client, auth)
    rdb.flushdb()
    cfg = make_app(RECONCILE_GRACE_SECONDS=0, RECONCILE_LOOKBACK_SECONDS=60).config["NOTIFIER"]

    assert reconcile.restream_lost(pg, rdb, cfg, now=time.time() + 120) == 0


def test_the_scheduler_streams_a_notification_only_once_due(client, auth, pg, rdb):
    due = datetime.now(UTC) + timedelta(seconds=1)
    nid = _post(client, auth, send_at=due.isoformat())
    assert stream_due(pg, rdb, STREAM, 100) == 0

    time.sleep(1.1)
    assert stream_due(pg, rdb, STREAM, 100) == 1
    assert stream_due(pg, rdb, STREAM, 100) == 0
    assert _stream_ids(rdb) == [nid]


def test_a_send_at_already_past_is_streamed_once_by_ingest(client, auth, pg, rdb):
    nid = _post(client, auth, send_at=(datetime.now(UTC) - timedelta(seconds=5)).isoformat())

    assert stream_due(pg, rdb, STREAM, 100) == 0
    assert _stream_ids(rdb) == [nid]


def test_a_due_scheduled_notification_lost_after_streaming_is_streamed_again(
    client, auth, pg, rdb, cfg
):
    nid = _post(client, auth, send_at=(datetime.now(UTC) + timedelta(seconds=1)).isoformat())
    time.sleep(1.1)
    assert stream_due(pg, rdb, STREAM, 100) == 1
    rdb.flushdb()

    assert reconcile.restream_lost(pg, rdb, cfg, now=time.time() + 1) == 1
    assert _stream_ids(rdb) == [nid]


# -- pass 3: websocket deliveries whose task was lost -----------------------------------------


class Pushed(list):
    def __call__(self, ids: list[int]) -> None:
        self.extend(ids)


def _online(rdb, *users: str) -> None:
    presence.mark_online(rdb, "node-1", users, 30)


def test_a_pending_delivery_of_a_connected_user_is_pushed_again(client, auth, pg, rdb, cfg):
    _post(client, auth, user_ids=["on", "off"])
    ids = _record(pg, rdb)
    _online(rdb, "on")
    pushed = Pushed()

    assert reconcile.repush_stale(pg, rdb, rdb, cfg, send=pushed) == 1
    assert pushed == [ids[0]]
    # Once: the next run reads on from there.
    assert reconcile.repush_stale(pg, rdb, rdb, cfg, send=pushed) == 0


def test_a_delivery_younger_than_the_push_delay_waits(client, auth, pg, rdb, make_app):
    cfg = make_app(RECONCILE_PUSH_AFTER_SECONDS=30).config["NOTIFIER"]
    _post(client, auth)
    _record(pg, rdb)
    _online(rdb, "u1")

    assert reconcile.repush_stale(pg, rdb, rdb, cfg, send=Pushed()) == 0
    assert reconcile.repush_stale(pg, rdb, rdb, cfg, send=Pushed()) == 0


def _queued_task(rdb, lane: str, ids: list[int]) -> None:
    """A websocket task as kombu's Redis transport keeps it in a lane's list."""
    body = base64.b64encode(orjson.dumps([[ids], {}, {}])).decode()
    rdb.lpush(
        lane,
        orjson.dumps(
            {"body": body, "headers": {"task": WEBSOCKET_TASK},
             "properties": {"body_encoding": "base64"}}
        ),
    )  # fmt: skip


def test_a_delivery_whose_task_still_waits_in_its_lane_is_not_pushed_twice(
    client, auth, pg, rdb, cfg
):
    _post(client, auth)
    ids = _record(pg, rdb)
    _online(rdb, "u1")
    _queued_task(rdb, "default", ids)  # the workers are behind, not dead
    pushed = Pushed()

    assert reconcile.repush_stale(pg, rdb, rdb, cfg, send=pushed) == 0
    rdb.delete("default")  # it ran... or was lost: the next run decides
    assert reconcile.repush_stale(pg, rdb, rdb, cfg, send=pushed) == 1


def test_other_tasks_waiting_in_a_lane_do_not_hold_the_push_back(client, auth, pg, rdb, cfg):
    _post(client, auth)
    _record(pg, rdb)
    _online(rdb, "u1")
    rdb.lpush("high", orjson.dumps({"body": "", "headers": {"task": "tasks.stream.watchdog"}}))

    assert reconcile.repush_stale(pg, rdb, rdb, cfg, send=Pushed()) == 1


def test_without_a_redis_broker_to_look_into_nothing_is_pushed(client, auth, pg, rdb, cfg):
    _post(client, auth)
    _record(pg, rdb)
    _online(rdb, "u1")

    assert reconcile.repush_stale(pg, rdb, None, cfg, send=Pushed()) == 0


# -- pass 4: external tries whose mirror was lost ---------------------------------------------


@pytest.fixture
def webhook_delivery(client, auth, pg, rdb):
    _post(client, auth, channels=["webhook"], webhook_url="http://127.0.0.1:9/hook")
    [delivery_id] = _record(pg, rdb)
    with pg.begin() as conn:  # recorded a minute ago
        conn.execute(text("UPDATE deliveries SET created_at = now() - interval '60 seconds'"))
    return delivery_id


def test_a_first_try_lost_with_redis_gets_its_mirror_back_unheld(pg, rdb, cfg, webhook_delivery):
    rdb.flushdb()

    assert reconcile.remirror_in_flight(pg, rdb, cfg) == 1
    member = retry_member(CHANNEL_TASK, [webhook_delivery, 1, "http://127.0.0.1:9/hook"])
    assert rdb.zscore(RETRY_ZSET, member) is not None
    assert rdb.hget(RETRY_HELD, member) is None  # so the sweeper sends it
    assert reconcile.remirror_in_flight(pg, rdb, cfg) == 0


def test_a_try_with_its_mirror_in_place_is_left_alone(pg, rdb, cfg, webhook_delivery):
    rdb.zadd(
        RETRY_ZSET,
        {retry_member(CHANNEL_TASK, [webhook_delivery, 1, "http://127.0.0.1:9/hook"]): 1},
    )

    assert reconcile.remirror_in_flight(pg, rdb, cfg) == 0


def test_the_next_try_after_a_failed_one_gets_its_mirror_back(pg, rdb, cfg, webhook_delivery):
    with pg.begin() as conn:
        conn.execute(
            text("INSERT INTO delivery_attempts (delivery_id, channel, attempt, started_at, "
                 "finished_at, outcome, next_retry_at) VALUES (:d, 'webhook', 1, "
                 "now() - interval '50 seconds', now() - interval '50 seconds', 'retry', "
                 "now() - interval '40 seconds')"),
            {"d": webhook_delivery},
        )  # fmt: skip
    rdb.flushdb()

    assert reconcile.remirror_in_flight(pg, rdb, cfg) == 1
    assert rdb.zrange(RETRY_ZSET, 0, -1) == [
        retry_member(CHANNEL_TASK, [webhook_delivery, 2, "http://127.0.0.1:9/hook"])
    ]


def test_reconcile_all_goes_on_when_redis_is_down(pg, make_app):
    app = make_app(REDIS_URL="redis://127.0.0.1:1/0", RECONCILE_GRACE_SECONDS=0)
    cfg = app.config["NOTIFIER"]

    done = reconcile.reconcile_all(pg, app.extensions["redis"], cfg)

    # The passes that need Redis failed; the one that found nothing to ask it ran.
    assert done == {"remirrored": 0}


def test_a_try_that_ran_meanwhile_does_not_get_a_stale_member_back(
    pg, rdb, cfg, webhook_delivery, monkeypatch
):
    url = "http://127.0.0.1:9/hook"
    unmirrored = reconcile._unmirrored

    def try_one_runs_meanwhile(client, tries):
        # Between the first read and the ZSET lookup, try 1 fails and schedules try 2.
        with pg.begin() as conn:
            conn.execute(
                text("INSERT INTO delivery_attempts (delivery_id, channel, attempt, started_at, "
                     "finished_at, outcome, next_retry_at) VALUES (:d, 'webhook', 1, "
                     "now() - interval '30 seconds', now() - interval '30 seconds', 'retry', "
                     "now() + interval '60 seconds')"),
                {"d": webhook_delivery},
            )  # fmt: skip
        rdb.zadd(RETRY_ZSET, {retry_member(CHANNEL_TASK, [webhook_delivery, 2, url]): 1})
        return unmirrored(client, tries)

    monkeypatch.setattr(reconcile, "_unmirrored", try_one_runs_meanwhile)

    assert reconcile.remirror_in_flight(pg, rdb, cfg) == 0
    assert rdb.zrange(RETRY_ZSET, 0, -1) == [retry_member(CHANNEL_TASK, [webhook_delivery, 2, url])]


def test_a_redriven_stream_dead_letter_lost_again_is_streamed_again(client, auth, pg, rdb, cfg):
    nid = _post(client, auth)
    _stream_dead_letter(pg, nid, redriven=True)
    rdb.flushdb()

    assert reconcile.restream_lost(pg, rdb, cfg) == 1


def test_a_request_that_waited_past_half_the_grace_is_refused_not_recorded(pg, rdb):
    writer = IngestWriter(pg, rdb, STREAM, 500, timedelta(hours=1), max_wait=5)
    stale = uuid7(int((time.time() - 10) * 1000))
    row = {"id": stale, "status": "queued", "recipients": ["u1"], "title": "t", "body": "b",
           "priority": "normal", "channels": ["websocket"]}  # fmt: skip
    try:
        with pytest.raises(IngestUnavailable):
            writer.submit(row, {"id": str(stale)}, None)
    finally:
        writer.close()

    assert count_rows(pg, "notifications") == 0
    assert not rdb.exists(STREAM)


def test_many_tries_in_flight_are_all_checked_over_several_runs(
    client, auth, pg, rdb, make_app, monkeypatch
):
    cfg = make_app(RECONCILE_GRACE_SECONDS=0, RECONCILE_BATCH=2).config["NOTIFIER"]
    monkeypatch.setattr(reconcile, "MAX_ROUNDS", 1)
    _post(client, auth, user_ids=[f"w{i}" for i in range(5)], channels=["webhook"],
          webhook_url="http://127.0.0.1:9/hook")  # fmt: skip
    _record(pg, rdb)
    with pg.begin() as conn:
        conn.execute(text("UPDATE deliveries SET created_at = now() - interval '60 seconds'"))
    rdb.flushdb()

    restored = [reconcile.remirror_in_flight(pg, rdb, cfg) for _ in range(4)]

    assert restored[:3] == [2, 2, 1]  # two a run, then the last one, then it starts over
    assert rdb.zcard(RETRY_ZSET) == 5
