"""The websocket delivery function against real Redis and PostgreSQL (no Celery, no gateway)."""

from __future__ import annotations

import time
import uuid

import orjson
import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from app import db, inbox, presence
from tasks import delivery, retries
from tasks.delivery import deliver_websocket_batch, warm_up
from tasks.stream import process_entries

TTL = 30.0


@pytest.fixture
def node(rdb):
    """A subscribed node channel standing in for a gateway process."""
    node_id = uuid.uuid4().hex
    pubsub = rdb.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(presence.node_channel(node_id))
    yield node_id, pubsub
    pubsub.close()


def _received(pubsub, seconds: float = 0.5) -> list[dict]:
    """Everything published to the node within `seconds` (subscribe confirmations skipped)."""
    out = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        msg = pubsub.get_message(timeout=0.05)
        if msg is not None:
            out.append(orjson.loads(msg["data"]))
    return out


def _record(client, auth, pg, rdb, **fields) -> list[int]:
    """Post a notification and record its deliveries; returns their ids."""
    r = client.post("/notifications", json={"title": "t", "body": "b", **fields}, headers=auth)
    assert r.status_code == 202, r.json
    ids: list[int] = []
    entries = list(rdb.xrange("notifications:stream"))
    process_entries(pg, entries, lambda _, d, *__: ids.extend(d), 100)
    return ids


def _record_batch(client, auth, pg, rdb, batch: list[dict]) -> list[int]:
    """Post notifications as one batch and record their deliveries; returns their ids."""
    r = client.post("/notifications/batch", json={"notifications": batch}, headers=auth)
    assert r.status_code == 202, r.json
    ids: list[int] = []
    process_entries(
        pg, list(rdb.xrange("notifications:stream")), lambda _, d, *__: ids.extend(d), 100
    )
    return ids


def _statuses(pg) -> dict[str, str]:
    with pg.connect() as conn:
        return dict(conn.execute(text("SELECT user_id, status FROM deliveries")).all())


def test_online_users_get_one_publish_per_node_and_become_sent(client, auth, pg, rdb, node):
    node_id, pubsub = node
    presence.mark_online(rdb, node_id, ["a", "b"], TTL)
    ids = _record(client, auth, pg, rdb, user_ids=["a", "b", "c"])

    result = deliver_websocket_batch(pg, rdb, ids, TTL)

    [envelope] = _received(pubsub)
    assert sorted(user for user, _ in envelope["to"]) == ["a", "b"]
    assert (result.sent, result.offline) == (2, 1)
    assert _statuses(pg) == {"a": "sent", "b": "sent", "c": "pending"}


def test_a_copy_sent_by_another_sockets_replay_still_reaches_the_users_node(
    client, auth, pg, rdb, node
):
    # One socket's replay sent and marked the copy before the task ran; the user's other
    # sockets are only reached by the task's publish.
    node_id, pubsub = node
    presence.mark_online(rdb, node_id, ["a"], TTL)
    ids = _record(client, auth, pg, rdb, user_id="a")
    inbox.mark_sent(pg, ids)

    deliver_websocket_batch(pg, rdb, ids, TTL)

    [envelope] = _received(pubsub)
    assert envelope["to"] == [["a", ids[0]]]


def test_acked_copies_are_not_published_again(client, auth, pg, rdb, node):
    node_id, pubsub = node
    presence.mark_online(rdb, node_id, ["a"], TTL)
    ids = _record(client, auth, pg, rdb, user_id="a")
    with pg.begin() as conn:
        [nid] = conn.execute(text("SELECT notification_id FROM deliveries")).scalars()
        assert inbox.ack(conn, "a", [nid]) == [str(nid)]

    result = deliver_websocket_batch(pg, rdb, ids, TTL)

    assert _received(pubsub) == []
    assert (result.sent, result.offline) == (0, 0)


def test_a_node_without_a_subscriber_leaves_the_copy_pending(client, auth, pg, rdb):
    presence.mark_online(rdb, "vanished-node", ["a"], TTL)
    ids = _record(client, auth, pg, rdb, user_id="a")

    result = deliver_websocket_batch(pg, rdb, ids, TTL)

    assert (result.sent, result.offline) == (0, 1)
    assert _statuses(pg) == {"a": "pending"}


def test_heartbeat_reports_users_whose_presence_had_lapsed(rdb):
    assert presence.mark_online(rdb, "n1", ["a", "b"], TTL) == ["a", "b"]
    assert presence.mark_online(rdb, "n1", ["a", "b"], TTL) == []
    rdb.delete(presence.presence_key("b"))
    assert presence.mark_online(rdb, "n1", ["a", "b"], TTL) == ["b"]


def test_a_user_on_two_nodes_reaches_both_and_counts_as_one_sent_copy(client, auth, pg, rdb):
    nodes = [uuid.uuid4().hex, uuid.uuid4().hex]
    subscribers = []
    for node_id in nodes:
        pubsub = rdb.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(presence.node_channel(node_id))
        subscribers.append(pubsub)
        presence.mark_online(rdb, node_id, ["a"], TTL)
    presence.mark_online(rdb, nodes[0], ["b"], TTL)
    ids = _record(client, auth, pg, rdb, user_ids=["a", "b", "c"])

    try:
        result = deliver_websocket_batch(pg, rdb, ids, TTL)
        first, second = (_received(p) for p in subscribers)
    finally:
        for pubsub in subscribers:
            pubsub.close()
    assert [sorted(u for u, _ in e["to"]) for e in first] == [["a", "b"]]
    assert [[u for u, _ in e["to"]] for e in second] == [["a"]]
    assert (result.sent, result.offline) == (2, 1)
    counters = rdb.hgetall("notifications:metrics")
    assert counters["deliveries:websocket:sent"] == "2"
    assert counters["deliveries:websocket:offline"] == "1"


def test_a_users_notifications_in_one_task_are_published_in_seq_order(client, auth, pg, rdb, node):
    node_id, pubsub = node
    presence.mark_online(rdb, node_id, ["a"], TTL)
    # One batch: its ids share a millisecond, so their order is not their acceptance order.
    batch = [{"user_id": "a", "title": str(i), "body": "b"} for i in range(10)]
    ids = _record_batch(client, auth, pg, rdb, batch)

    deliver_websocket_batch(pg, rdb, ids, TTL)

    envelopes = _received(pubsub)
    assert [e["n"]["title"] for e in envelopes] == [str(i) for i in range(10)]
    assert [e["to"][0][1] for e in envelopes] == sorted(ids)


def test_a_task_of_many_notifications_publishes_the_online_ones_and_counts_the_rest(
    client, auth, pg, rdb, node
):
    node_id, pubsub = node
    presence.mark_online(rdb, node_id, ["a"], TTL)
    batch = [
        {"user_id": "a" if i % 2 else "b", "title": str(i), "body": "b"} for i in range(12)
    ]  # more distinct notifications than PRESENCE_FIRST_OVER: presence is looked up first
    ids = _record_batch(client, auth, pg, rdb, batch)

    result = deliver_websocket_batch(pg, rdb, ids, TTL)

    assert [e["n"]["title"] for e in _received(pubsub)] == ["1", "3", "5", "7", "9", "11"]
    assert (result.sent, result.offline) == (6, 6)
    counters = rdb.hgetall("notifications:metrics")
    assert (counters["deliveries:websocket:sent"], counters["deliveries:websocket:offline"]) == (
        "6",
        "6",
    )
    assert set(_statuses_by_title(pg).items()) == {
        (str(i), "sent" if i % 2 else "pending") for i in range(12)
    }


def test_a_task_of_many_notifications_for_offline_users_counts_them_all_offline(
    client, auth, pg, rdb
):
    batch = [{"user_id": f"u{i}", "title": str(i), "body": "b"} for i in range(12)]
    ids = _record_batch(client, auth, pg, rdb, batch)

    result = deliver_websocket_batch(pg, rdb, ids, TTL)

    assert (result.sent, result.offline) == (0, 12)
    counters = rdb.hgetall("notifications:metrics")
    assert counters["deliveries:websocket:offline"] == "12"
    assert "deliveries:websocket:sent" not in counters


def _statuses_by_title(pg) -> dict[str, str]:
    with pg.connect() as conn:
        return dict(
            conn.execute(
                text(
                    "SELECT n.title, d.status FROM deliveries d "
                    "JOIN notifications n ON n.id = d.notification_id"
                )
            ).all()
        )


def test_warm_up_leaves_the_pools_connections_open_for_the_first_tasks(database_url):
    engine = db.make_engine(database_url, pool_size=8)
    try:
        warm_up(engine, 4)

        with db.autocommit(engine) as conn:
            pool = conn.engine.pool
        # All four connected, and back in the pool for the first tasks to take.
        assert pool.checkedin() == 4
        assert pool.checkedout() == 0
    finally:
        db.dispose(engine)


def test_warm_up_gives_up_at_once_while_the_deliveries_table_is_locked(database_url, pg):
    engine = db.make_engine(database_url)
    try:
        with pg.connect() as locker:
            locker.execute(text("LOCK TABLE deliveries IN ACCESS EXCLUSIVE MODE"))
            started = time.monotonic()
            with pytest.raises(OperationalError, match="lock timeout"):
                warm_up(engine, 2)
            assert time.monotonic() - started < 5
            locker.rollback()
        # The connection went back to the pool without the warm-up's lock timeout.
        with db.autocommit(engine) as conn:
            assert conn.scalar(text("SHOW lock_timeout")) == "0"
    finally:
        db.dispose(engine)


def _task(app):
    # This app's own task: a shared task resolves to whichever Celery app was made last, and
    # other tests make apps on other databases.
    return app.extensions["celery"].tasks[delivery.TASK]


def _fail_to_deliver(monkeypatch) -> None:
    def unreachable(*_args, **_kwargs):
        raise OperationalError("SELECT", {}, Exception("server closed the connection"))

    monkeypatch.setattr(delivery, "deliver_websocket_batch", unreachable)


def test_a_failed_websocket_try_is_retried_on_its_own_lane_with_backoff(
    app, client, auth, pg, rdb, monkeypatch
):
    ids = _record(client, auth, pg, rdb, user_id="a", priority="high")
    _fail_to_deliver(monkeypatch)

    _task(app).apply(args=[ids], routing_key="high")

    [(member, due)] = rdb.zrange(retries.RETRY_ZSET, 0, -1, withscores=True)
    assert orjson.loads(member) == {"task": delivery.TASK, "args": [ids, 2]}
    assert due > time.time()  # a countdown, not at once
    [message] = rdb.lrange("high", 0, -1)
    headers = orjson.loads(message)["headers"]
    assert (headers["task"], headers["eta"] is not None) == (delivery.TASK, True)
    assert rdb.llen("default") == 0


def test_the_last_failed_websocket_try_is_dead_lettered_and_stays_in_the_offline_queue(
    app, client, auth, pg, rdb, monkeypatch
):
    [delivery_id] = _record(client, auth, pg, rdb, user_id="a")
    _fail_to_deliver(monkeypatch)
    last = app.config["NOTIFIER"].RETRY_MAX_ATTEMPTS

    _task(app).apply(args=[[delivery_id], last], routing_key="default")

    with pg.connect() as conn:
        dead = conn.execute(text("SELECT source, delivery_id, attempts FROM dead_letters")).all()
    assert [tuple(d) for d in dead] == [("websocket", delivery_id, last)]
    assert _statuses(pg) == {"a": "pending"}
    offline = client.get("/notifications/offline/a", headers=auth).json["notifications"]
    assert len(offline) == 1
    assert rdb.zcard(retries.RETRY_ZSET) == 0
