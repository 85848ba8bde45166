from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text

from tasks.outbox import stream_unstreamed
from tests.helpers import count_rows, wait_until

NOTE = {"user_id": "u1", "title": "t", "body": "b"}
STREAM = "notifications:stream"
ROOT = Path(__file__).resolve().parent.parent


def _unstreamed(pg) -> int:
    with pg.connect() as conn:
        return conn.scalar(text("SELECT count(*) FROM notifications WHERE streamed_at IS NULL"))


def _break_xadd(rdb) -> None:
    # A string where the stream should be: every XADD now fails with WRONGTYPE.
    rdb.set(STREAM, "not a stream")


def test_failed_xadd_still_answers_202_and_keeps_the_row_for_the_sweeper(client, auth, pg, rdb):
    _break_xadd(rdb)

    r = client.post("/notifications", json=NOTE, headers=auth)

    assert r.status_code == 202
    assert count_rows(pg, "notifications") == 1
    assert _unstreamed(pg) == 1
    assert rdb.type(STREAM) == "string"


def test_sweeper_streams_what_a_failed_xadd_left_behind(app, client, auth, pg, rdb):
    _break_xadd(rdb)
    ids = [client.post("/notifications", json=NOTE, headers=auth).json["id"] for _ in range(3)]
    rdb.delete(STREAM)

    streamed = stream_unstreamed(pg, rdb, STREAM, grace_seconds=0, limit=1000)

    assert streamed == 3
    assert [fields["id"] for _, fields in rdb.xrange(STREAM)] == ids
    assert _unstreamed(pg) == 0
    assert stream_unstreamed(pg, rdb, STREAM, grace_seconds=0, limit=1000) == 0


def test_sweeper_leaves_rows_younger_than_the_grace_period(client, auth, pg, rdb):
    _break_xadd(rdb)
    client.post("/notifications", json=NOTE, headers=auth)
    rdb.delete(STREAM)

    assert stream_unstreamed(pg, rdb, STREAM, grace_seconds=60, limit=1000) == 0
    assert _unstreamed(pg) == 1


def test_redis_down_at_ingest_loses_nothing(make_app, auth, pg, rdb):
    # Nothing listens on port 1: Redis is "down" for this app, PostgreSQL is not.
    down = make_app(REDIS_URL="redis://127.0.0.1:1/0").test_client()

    r = down.post("/notifications", json=NOTE, headers=auth)

    assert r.status_code == 202
    assert _unstreamed(pg) == 1
    assert stream_unstreamed(pg, rdb, STREAM, grace_seconds=0, limit=1000) == 1
    assert rdb.xrange(STREAM)[0][1]["id"] == r.json["id"]


def test_postgres_down_is_503_and_nothing_is_streamed(make_app, auth, rdb):
    broken = make_app(DATABASE_URL="postgresql+psycopg2://postgres@127.0.0.1:1/none").test_client()

    r = broken.post("/notifications", json=NOTE, headers={"x-api-key": auth["x-api-key"]})

    assert r.status_code == 503
    assert r.json["error"] == "unavailable"
    assert "Retry-After" in r.headers
    assert not rdb.exists(STREAM)


@pytest.mark.slow
def test_beat_and_a_real_worker_stream_a_notification_whose_xadd_failed(
    client, auth, pg, rdb, database_url, redis_url
):
    _break_xadd(rdb)
    nid = client.post("/notifications", json=NOTE, headers=auth).json["id"]
    rdb.delete(STREAM)
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "OUTBOX_SWEEP_SECONDS": "0.5",
        "OUTBOX_GRACE_SECONDS": "0",
    }
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "wsgi.celery_app", "worker", "-B",
         "-s", f"/tmp/notifier-beat-{uuid.uuid4().hex}", "-Q", "default", "-c", "1",
         "--without-gossip", "--without-mingle", "-l", "WARNING"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(lambda: rdb.exists(STREAM) and rdb.xlen(STREAM) >= 1, timeout=60)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)

    assert rdb.xrange(STREAM)[0][1]["id"] == nid
    assert _unstreamed(pg) == 0
