"""The consumer's plain functions against real Redis and PostgreSQL (no Celery)."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from app.config import Config
from tasks import stream
from tasks.delivery import TASK
from tasks.stream import (
    RECORD_CHUNK,
    StreamConsumer,
    celery_enqueue,
    ensure_group,
    lane_of,
    lease_key,
    process_entries,
    trim_stream,
)

STREAM, GROUP = "notifications:stream", "notifier_group"
NOTE = {"title": "t", "body": "b"}


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[int]]] = []
        self.external: list[tuple[str, list[int]]] = []

    def __call__(
        self, lane: str, ids: list[int], channel: str = "websocket", endpoint: str | None = None
    ) -> None:
        if channel == "websocket":
            self.calls.append((lane, ids))
        else:
            self.external.append((channel, ids))

    @property
    def ids(self) -> list[int]:
        return [i for _, ids in self.calls for i in ids]


def _post(client, auth, **fields) -> str:
    r = client.post("/notifications", json={**NOTE, **fields}, headers=auth)
    assert r.status_code == 202, r.json
    return r.json["id"]


def _entries(rdb):
    return [(eid, fields) for eid, fields in rdb.xrange(STREAM)]


def _deliveries(pg) -> int:
    with pg.connect() as conn:
        return conn.scalar(text("SELECT count(*) FROM deliveries"))


def test_process_entries_records_one_delivery_per_recipient_and_enqueues_by_lane(
    client, auth, pg, rdb
):
    _post(client, auth, user_ids=["a", "b", "c"], priority="low")
    _post(client, auth, user_id="d", priority="high")
    enqueue = Recorder()

    acked = process_entries(pg, _entries(rdb), enqueue, delivery_batch=2)

    assert len(acked) == 2
    assert _deliveries(pg) == 4
    lanes = [lane for lane, _ in enqueue.calls]
    assert lanes == ["high", "low", "low"]  # high first; low split into batches of 2
    assert sorted(enqueue.ids) == [1, 2, 3, 4]


def test_fan_out_larger_than_a_chunk_is_recorded_and_enqueued_once_high_first(
    client, auth, pg, rdb
):
    many = RECORD_CHUNK * 2 + RECORD_CHUNK // 2
    _post(client, auth, user_ids=[f"u{i}" for i in range(many)], priority="low")
    _post(client, auth, user_id="vip", priority="high")
    enqueue = Recorder()

    process_entries(pg, _entries(rdb), enqueue, delivery_batch=500)

    assert _deliveries(pg) == many + 1
    assert enqueue.calls[0][0] == "high"
    assert sorted(enqueue.ids) == list(range(1, many + 2))
    again = Recorder()
    process_entries(pg, _entries(rdb), again, delivery_batch=500)
    assert _deliveries(pg) == many + 1
    assert sorted(again.ids) == list(range(1, many + 2))  # all still pending: offered again


def test_a_failed_chunk_of_a_fan_out_fails_the_read_and_its_retry_records_every_recipient(
    client, auth, pg, rdb, monkeypatch
):
    many = RECORD_CHUNK * 4
    _post(client, auth, user_ids=[f"u{i}" for i in range(many)])
    real = stream.record_deliveries
    calls = []

    def second_chunk_fails(conn, rows):
        calls.append(len(rows))
        if len(calls) == 2:
            raise OperationalError("INSERT", {}, Exception("connection lost"))
        return real(conn, rows)

    monkeypatch.setattr(stream, "record_deliveries", second_chunk_fails)
    first = Recorder()
    with pytest.raises(OperationalError):
        process_entries(pg, _entries(rdb), first, delivery_batch=500, replay=False)
    # Nothing after the failed chunk was enqueued, so nothing is XACKed on a partial read.
    assert len(first.ids) <= RECORD_CHUNK

    monkeypatch.setattr(stream, "record_deliveries", real)
    again = Recorder()
    process_entries(pg, _entries(rdb), again, delivery_batch=500, replay=True)

    assert _deliveries(pg) == many
    # Every pending delivery is offered once, the ones the failed read had enqueued included.
    with pg.connect() as conn:
        recorded = set(conn.scalars(text("SELECT id FROM deliveries")))
    assert sorted(again.ids) == sorted(recorded)


def test_replayed_entries_create_no_duplicates(client, auth, pg, rdb):
    _post(client, auth, user_ids=["a", "b"])
    process_entries(pg, _entries(rdb), Recorder(), delivery_batch=100)
    with pg.begin() as conn:
        conn.execute(text("UPDATE deliveries SET status = 'sent' WHERE user_id = 'a'"))
    again = Recorder()

    process_entries(pg, _entries(rdb), again, delivery_batch=100)

    assert _deliveries(pg) == 2
    assert len(again.ids) == 1  # only b is still pending and worth another task


def test_undecodable_entry_goes_to_dead_letters(pg, rdb):
    rdb.xadd(STREAM, {"id": "x", "payload": "{broken"})

    acked = process_entries(pg, _entries(rdb), Recorder(), delivery_batch=100)

    assert len(acked) == 1
    with pg.connect() as conn:
        row = conn.execute(text("SELECT source, error FROM dead_letters")).one()
    assert row.source == "stream"
    assert "undecodable" in row.error


def test_expired_notification_is_not_delivered(client, auth, pg, rdb):
    soon = datetime.now(UTC) + timedelta(seconds=0.3)
    nid = _post(client, auth, user_id="a", expires_at=soon.isoformat())
    time.sleep(0.5)  # it expires while waiting in the stream
    process_entries(pg, _entries(rdb), Recorder(), delivery_batch=100)

    assert _deliveries(pg) == 0
    with pg.connect() as conn:
        assert conn.scalar(text("SELECT status FROM notifications WHERE id = :i"), {"i": nid}) == (
            "expired"
        )


def test_each_requested_channel_gets_its_own_delivery_and_work_item(client, auth, pg, rdb):
    _post(client, auth, user_ids=["a", "b"], channels=["email", "webhook"])
    enqueue = Recorder()
    process_entries(pg, _entries(rdb), enqueue, delivery_batch=100)
    assert _deliveries(pg) == 4
    assert enqueue.calls == []  # no in-app copy was asked for
    assert sorted((c, len(ids)) for c, ids in enqueue.external) == [("email", 2), ("webhook", 2)]


@pytest.mark.parametrize(("priority", "lane"), [("high", "high"), ("normal", "default"),
                                                ("low", "low")])  # fmt: skip
def test_priority_lanes(priority, lane):
    assert lane_of(priority) == lane


def _consumer(app, rdb, pg, name="c1", **overrides) -> tuple[StreamConsumer, Recorder]:
    cfg = Config.from_env(overrides={**app.config["NOTIFIER"].__dict__, **overrides})
    enqueue = Recorder()
    return StreamConsumer(cfg, pg, rdb, name, enqueue), enqueue


def test_consumer_reads_processes_and_acks(app, client, auth, pg, rdb):
    consumer, _ = _consumer(app, rdb, pg)
    assert consumer.acquire(None)
    _post(client, auth, user_id="a")
    _post(client, auth, user_id="b")

    consumer.run(seconds=0.5)

    assert _deliveries(pg) == 2
    assert rdb.xpending(STREAM, GROUP)["pending"] == 0


def test_entries_pending_on_a_dead_consumer_are_claimed(app, client, auth, pg, rdb):
    ensure_group(rdb, STREAM, GROUP)
    _post(client, auth, user_id="a")
    rdb.xreadgroup(GROUP, "dead", {STREAM: ">"}, count=10)  # read, then "died"
    consumer, _ = _consumer(app, rdb, pg, STREAM_CLAIM_IDLE_MS=0)
    consumer.acquire(None)

    consumer.run(seconds=0.5)

    assert _deliveries(pg) == 1
    assert rdb.xpending(STREAM, GROUP)["pending"] == 0


def test_entry_handed_out_too_often_goes_to_dead_letters(app, client, auth, pg, rdb):
    ensure_group(rdb, STREAM, GROUP)
    _post(client, auth, user_id="a")
    rdb.xreadgroup(GROUP, "dead", {STREAM: ">"})
    rdb.xautoclaim(STREAM, GROUP, "dead", 0, "0-0")  # handed out a second time
    consumer, _ = _consumer(app, rdb, pg, STREAM_CLAIM_IDLE_MS=0, STREAM_MAX_DELIVERIES=2)
    consumer.acquire(None)

    consumer.run(seconds=0.5)

    assert _deliveries(pg) == 0
    with pg.connect() as conn:
        assert conn.scalar(text("SELECT count(*) FROM dead_letters")) == 1
    assert rdb.xpending(STREAM, GROUP)["pending"] == 0


def test_a_failing_entry_goes_to_dead_letters_alone_and_the_rest_of_its_read_is_delivered(
    app, client, auth, pg, rdb
):
    ensure_group(rdb, STREAM, GROUP)
    first = _post(client, auth, user_id="a")
    # A well-formed entry whose notification row does not exist (appended by hand, or
    # re-driven after its row was purged): recording its delivery violates the foreign key.
    orphan = str(uuid.uuid4())
    rdb.xadd(STREAM, {"id": orphan, "payload": orjson.dumps({"id": orphan, "recipients": ["b"]})})
    later = [_post(client, auth, user_id=f"c{i}") for i in range(3)]
    consumer, enqueue = _consumer(app, rdb, pg, STREAM_MAX_DELIVERIES=3, STREAM_BLOCK_MS=50)
    consumer.acquire(None)

    consumer.run(seconds=3)

    with pg.connect() as conn:
        recorded = set(conn.scalars(text("SELECT notification_id::text FROM deliveries")))
        dead = conn.execute(text("SELECT notification_id::text, error FROM dead_letters")).all()
    assert recorded == {first, *later}
    assert len(enqueue.ids) == 4
    assert [d.notification_id for d in dead] == [orphan]
    assert "handed out" in dead[0].error  # by the delivery bound
    assert rdb.xpending(STREAM, GROUP)["pending"] == 0


def test_entries_held_for_their_turn_are_not_claimed_by_another_consumer(
    app, client, auth, pg, rdb, monkeypatch
):
    ensure_group(rdb, STREAM, GROUP)
    ids = [_post(client, auth, user_id=f"u{i}") for i in range(16)]
    # One entry per group, each taking 0.25 s: the last ones wait 4 s for their turn,
    # past the 3 s after which another consumer may claim an entry as abandoned.
    monkeypatch.setattr(stream, "RECORD_CHUNK", 1)
    real = stream.process_entries

    def slow(*args, **kwargs):
        time.sleep(0.25)
        return real(*args, **kwargs)

    monkeypatch.setattr(stream, "process_entries", slow)
    holder, held = _consumer(app, rdb, pg, name="holder", STREAM_CLAIM_IDLE_MS=3000)
    holder.acquire(None)
    other, claimed = _consumer(app, rdb, pg, name="other", STREAM_CLAIM_IDLE_MS=3000)
    stop = threading.Event()

    def claim_meanwhile():
        while not stop.wait(0.1):
            other.claim_abandoned()

    claimer = threading.Thread(target=claim_meanwhile)
    claimer.start()
    try:
        holder.read_once(False)
    finally:
        stop.set()
        claimer.join()

    assert claimed.ids == []
    assert sorted(held.ids) == list(range(1, len(ids) + 1))
    assert rdb.xpending(STREAM, GROUP)["pending"] == 0


def test_one_consumer_name_runs_once(app, rdb, pg):
    first, _ = _consumer(app, rdb, pg, name="same")
    second, _ = _consumer(app, rdb, pg, name="same")

    assert first.acquire(None)
    assert not second.acquire(None)
    successor_token = first.hand_over()
    assert not first.renew()  # handed over: the old task stops
    assert second.acquire(successor_token)


def test_a_consumer_whose_lease_passed_to_another_stops_at_its_next_renewal(app, rdb, pg):
    consumer, _ = _consumer(app, rdb, pg, STREAM_LEASE_SECONDS=1.0, STREAM_BLOCK_MS=50)
    assert consumer.acquire(None)
    # As after a lapse: another task holds the name's lease now.
    rdb.set(lease_key("c1"), "someone-else", px=60_000)

    started = time.monotonic()
    consumer.run(seconds=10)

    # Renewals come once a tenth of the lease (0.1 s here) has passed; the first one to
    # find the lease gone stops the run.
    assert time.monotonic() - started < 2
    assert rdb.get(lease_key("c1")) == "someone-else"


def test_trim_never_drops_unacknowledged_entries(rdb):
    ids = [rdb.xadd(STREAM, {"n": str(i)}) for i in range(10)]
    assert trim_stream(rdb, STREAM) == 0  # no group: nothing may go
    ensure_group(rdb, STREAM, GROUP)
    read = rdb.xreadgroup(GROUP, "c", {STREAM: ">"}, count=6)
    read_ids = [eid for _, batch in read for eid, _ in batch]
    rdb.xack(STREAM, GROUP, *read_ids[:2], *read_ids[3:])  # entry 2 stays pending

    trimmed = trim_stream(rdb, STREAM)

    remaining = [eid for eid, _ in rdb.xrange(STREAM)]
    assert trimmed == 2
    assert remaining == ids[2:]  # the pending entry and everything never read remain


def test_trim_with_everything_acked_keeps_unread_entries(rdb):
    ids = [rdb.xadd(STREAM, {"n": str(i)}) for i in range(5)]
    ensure_group(rdb, STREAM, GROUP)
    read = rdb.xreadgroup(GROUP, "c", {STREAM: ">"}, count=3)
    rdb.xack(STREAM, GROUP, *[eid for _, batch in read for eid, _ in batch])

    trim_stream(rdb, STREAM)

    assert [eid for eid, _ in rdb.xrange(STREAM)][-2:] == ids[-2:]
    assert ids[0] not in [eid for eid, _ in rdb.xrange(STREAM)]


def test_payload_round_trips_through_the_stream(client, auth, rdb):
    nid = _post(client, auth, user_id="a", data={"x": [1, 2]})
    payload = orjson.loads(rdb.xrange(STREAM)[0][1]["payload"])
    assert payload["id"] == nid
    assert payload["data"] == {"x": [1, 2]}


def test_two_named_consumers_share_the_stream_and_process_each_entry_once(
    app, client, auth, pg, rdb
):
    ids = [_post(client, auth, user_id=f"u{i}") for i in range(40)]
    first, first_enqueue = _consumer(app, rdb, pg, name="c-a", STREAM_BATCH=5)
    second, second_enqueue = _consumer(app, rdb, pg, name="c-b", STREAM_BATCH=5)
    first.acquire(None)
    second.acquire(None)
    ensure_group(rdb, STREAM, GROUP)

    for _ in range(4):  # alternate reads, as two processes would interleave
        first.read_once(False)
        second.read_once(False)

    assert len(first_enqueue.ids) == len(second_enqueue.ids) == 20
    assert sorted(first_enqueue.ids + second_enqueue.ids) == list(range(1, 41))
    assert _deliveries(pg) == len(ids)
    assert rdb.xpending(STREAM, GROUP)["pending"] == 0


@pytest.mark.parametrize("flag", ["should_stop", "should_terminate"])
def test_consumer_sees_a_warm_or_cold_shutdown_even_with_exit_code_zero(flag):
    from celery.worker import state

    from tasks.stream import _worker_stopping

    assert not _worker_stopping()
    setattr(state, flag, 0)  # EX_OK, what a SIGTERM sets
    try:
        assert _worker_stopping()
    finally:
        setattr(state, flag, None)


def test_consumer_run_returns_when_asked_to_stop(app, rdb, pg):
    consumer, _ = _consumer(app, rdb, pg)
    consumer.acquire(None)
    started = time.monotonic()

    consumer.run(seconds=30, stop=lambda: time.monotonic() - started > 0.3)

    assert time.monotonic() - started < 5


def test_watchdog_starts_a_consumer_only_when_its_lease_has_lapsed(make_app, rdb):
    from tasks.stream import lease_key, watchdog

    flask_app = make_app(STREAM_CONSUMERS="c-1,c-2")
    rdb.set(lease_key("c-1"), "held-by-a-live-task", px=60_000)

    with flask_app.app_context():
        started = watchdog.run()
        again = watchdog.run()

    assert started == ["c-2"]
    assert again == []  # c-2 is reserved for the task just enqueued
    assert rdb.llen("stream") == 1  # one consume_stream message, on the consumer queue


def test_high_priority_arriving_mid_batch_overtakes_the_rest_of_a_big_low_read(
    app, client, auth, pg, rdb
):
    consumer, enqueue = _consumer(app, rdb, pg)
    assert consumer.acquire(None)
    ensure_group(rdb, STREAM, GROUP)
    # Four low fan-outs, each most of a recording group: one read takes all four.
    for i in range(4):
        _post(
            client, auth, user_ids=[f"low{i}-{j}" for j in range(RECORD_CHUNK - 10)], priority="low"
        )
    first_call = enqueue.__call__

    def post_high_on_first_enqueue(*args, **kwargs):
        if not enqueue.calls:
            _post(client, auth, user_id="vip", priority="high")
        first_call(*args, **kwargs)

    consumer.enqueue = post_high_on_first_enqueue
    consumer.read_once(own_pending=False)

    lanes = [lane for lane, _ in enqueue.calls]
    # The high one went out after the first low group, not after all four.
    assert lanes.index("high") < len(lanes) - 2
    assert lanes.count("high") == 1
    assert _deliveries(pg) == 4 * (RECORD_CHUNK - 10) + 1
    assert rdb.xpending(STREAM, GROUP)["pending"] == 0


def test_enqueued_deliveries_land_on_their_lane_with_every_id(app, rdb):
    ids = list(range(1, 501))
    with app.app_context():
        celery_enqueue("high", ids)
        celery_enqueue("default", [7])

    [high] = [json.loads(raw) for raw in rdb.lrange("high", 0, -1)]
    assert high["headers"]["task"] == TASK
    args, _, _ = json.loads(base64.b64decode(high["body"]))
    assert args == [ids]
    # Flower shows the short form, not Celery's repr of 500 ids.
    assert high["headers"]["argsrepr"] == "[[1, ..., 500] (500 ids)]"

    [default] = [json.loads(raw) for raw in rdb.lrange("default", 0, -1)]
    assert json.loads(base64.b64decode(default["body"]))[0] == [[7]]
    assert default["headers"]["argsrepr"] == "[[7]]"
