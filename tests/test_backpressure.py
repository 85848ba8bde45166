from __future__ import annotations

import pytest

from app.stream import backlog
from tests.helpers import count_rows

NOTE = {"user_id": "u1", "title": "t", "body": "b"}
STREAM = "notifications:stream"
GROUP = "notifier_group"


@pytest.fixture
def small(make_app):
    return make_app(STREAM_BACKLOG_LIMIT=3, RETRY_AFTER_SECONDS=7).test_client()


def _consume(rdb, count: int, ack: bool = True) -> None:
    entries = rdb.xreadgroup(GROUP, "test-consumer", {STREAM: ">"}, count=count)
    ids = [entry_id for _, batch in entries for entry_id, _ in batch]
    if ack and ids:
        rdb.xack(STREAM, GROUP, *ids)


def test_backlog_counts_unread_and_pending_entries(rdb):
    assert backlog(rdb, STREAM, GROUP) == 0
    for i in range(5):
        rdb.xadd(STREAM, {"id": str(i)})
    assert backlog(rdb, STREAM, GROUP) == 5  # no group yet: the whole stream waits
    rdb.xgroup_create(STREAM, GROUP, id="0")
    _consume(rdb, 2, ack=False)
    assert backlog(rdb, STREAM, GROUP) == 5  # read but not acked still waits
    rdb.xack(STREAM, GROUP, *[e for e, _ in rdb.xrange(STREAM, count=2)])
    assert backlog(rdb, STREAM, GROUP) == 3


def test_full_backlog_answers_503_with_retry_after_and_records_nothing(small, auth, pg, rdb):
    rdb.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    for _ in range(3):
        assert small.post("/notifications", json=NOTE, headers=auth).status_code == 202

    r = small.post("/notifications", json=NOTE, headers=auth)

    assert r.status_code == 503
    assert r.json["error"] == "backlog_full"
    assert r.headers["Retry-After"] == "7"
    assert count_rows(pg, "notifications") == 3
    assert rdb.xlen(STREAM) == 3


def test_backpressure_releases_once_the_consumer_catches_up(small, auth, pg, rdb):
    rdb.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    for _ in range(3):
        small.post("/notifications", json=NOTE, headers=auth)
    assert small.post("/notifications", json=NOTE, headers=auth).status_code == 503

    _consume(rdb, 2)

    assert small.post("/notifications", json=NOTE, headers=auth).status_code == 202
    assert count_rows(pg, "notifications") == 4
