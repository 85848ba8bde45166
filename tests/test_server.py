"""The API under the real gunicorn + gevent server that `make run` uses."""

from __future__ import annotations

import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import text

from tests.helpers import count_rows, wait_until

pytestmark = pytest.mark.slow


def _request(port: int, method: str, path: str, body: object = None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    payload = json.dumps(body) if body is not None else None
    conn.request(
        method, path, body=payload, headers={"content-type": "application/json", **(headers or {})}
    )
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data) if data else None


def test_gunicorn_gevent_server_records_concurrent_posts(live_server, auth, pg, rdb):
    port = live_server()
    note = {"title": "t", "body": "b"}

    with ThreadPoolExecutor(max_workers=32) as pool:
        statuses = list(
            pool.map(
                lambda i: _request(
                    port, "POST", "/notifications", {**note, "user_id": f"u{i}"}, auth
                )[0],
                range(300),
            )
        )

    assert statuses == [202] * 300
    assert count_rows(pg, "notifications") == 300
    assert rdb.xlen("notifications:stream") == 300


def test_gunicorn_server_answers_health_and_readiness(live_server):
    port = live_server()

    assert _request(port, "GET", "/healthz") == (200, {"status": "ok"})
    status, body = _request(port, "GET", "/readyz")
    assert status == 200
    assert body["checks"] == {"postgres": "ok", "redis": "ok"}


def test_gunicorn_server_answers_bad_input_without_a_500(live_server, auth, pg):
    port = live_server()

    status, body = _request(port, "POST", "/notifications", {"user_id": 5}, auth)

    assert status == 422
    assert "user_id" in body["fields"]
    assert count_rows(pg, "notifications") == 0


def test_a_request_waiting_on_postgresql_does_not_hold_up_the_rest_of_its_process(
    live_server, auth, pg
):
    # One gevent process: were psycopg2 not cooperative, the POST's blocked INSERT would
    # stop every other request in it.
    port = live_server(workers=1)
    with pg.connect() as locker:
        locker.execute(text("LOCK TABLE notifications IN ACCESS EXCLUSIVE MODE"))
        with ThreadPoolExecutor(max_workers=1) as pool:
            blocked = pool.submit(
                _request, port, "POST", "/notifications",
                {"user_id": "u1", "title": "t", "body": "b"}, auth,
            )  # fmt: skip
            wait_until(lambda: _lock_waiters(pg) > 0, timeout=10)

            started = time.monotonic()
            assert _request(port, "GET", "/healthz") == (200, {"status": "ok"})
            assert time.monotonic() - started < 2
            assert not blocked.done()

            locker.rollback()  # the lock goes, the INSERT goes through
            assert blocked.result(timeout=30)[0] == 202


def _lock_waiters(pg) -> int:
    with pg.connect() as conn:
        return conn.scalar(
            text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
        )
