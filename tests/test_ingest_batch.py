"""POST /notifications/batch: several notifications in one request, all or none."""

from __future__ import annotations

import uuid

import orjson
from sqlalchemy import select

from app.schemas import BATCH_MAX
from models import Notification, Priority
from tests.helpers import count_rows


def _stream(rdb, key="notifications:stream"):
    return rdb.xrange(key) if rdb.exists(key) else []


def _note(i: int, **extra) -> dict:
    return {"user_id": f"u{i}", "title": f"t{i}", "body": f"b{i}", **extra}


def test_a_batch_records_and_streams_each_notification_in_order(client, auth, pg, rdb):
    batch = [
        _note(0),
        _note(1, priority="high"),
        {"user_ids": ["a", "b"], "title": "t", "body": "b"},
    ]

    r = client.post("/notifications/batch", json={"notifications": batch}, headers=auth)

    assert r.status_code == 202, r.json
    answers = r.json["notifications"]
    assert [(a["status"], a["recipients"]) for a in answers] == [
        ("queued", 1),
        ("queued", 1),
        ("queued", 2),
    ]
    ids = [uuid.UUID(a["id"]) for a in answers]
    with pg.connect() as conn:
        rows = {
            r.id: r
            for r in conn.execute(
                select(Notification.id, Notification.recipients, Notification.priority)
            )
        }
    assert set(rows) == set(ids)
    assert rows[ids[1]].priority == Priority.HIGH
    assert rows[ids[2]].recipients == ["a", "b"]
    streamed = [fields["id"] for _, fields in _stream(rdb)]
    assert streamed == [str(i) for i in ids]
    payload = orjson.loads(_stream(rdb)[0][1]["payload"])
    assert (payload["title"], payload["recipients"]) == ("t0", ["u0"])


def test_one_invalid_notification_fails_the_batch_naming_it_and_records_nothing(
    client, auth, pg, rdb
):
    batch = [_note(0), {"user_id": "u1", "title": "no body"}, _note(2, priority="urgent")]

    r = client.post("/notifications/batch", json={"notifications": batch}, headers=auth)

    assert r.status_code == 422
    errors = r.json["fields"]["notifications"]
    assert set(errors) == {"1", "2"}
    assert "body" in errors["1"]
    assert "priority" in errors["2"]
    assert count_rows(pg, "notifications") == 0
    assert _stream(rdb) == []


def test_a_notification_failing_past_the_schema_is_named_by_its_position(client, auth, pg):
    batch = [_note(0), _note(1, expires_at="2001-01-01T00:00:00Z")]

    r = client.post("/notifications/batch", json={"notifications": batch}, headers=auth)

    assert r.status_code == 422
    assert r.json["fields"] == {"notifications": {"1": {"expires_at": ["Must be in the future."]}}}
    assert count_rows(pg, "notifications") == 0


def test_an_empty_missing_or_oversized_batch_is_422(client, auth, pg):
    for body in (
        {"notifications": []},
        {},
        {"notifications": [_note(i) for i in range(BATCH_MAX + 1)]},
        {"notifications": "not a list"},
    ):
        r = client.post("/notifications/batch", json=body, headers=auth)
        assert r.status_code == 422, body
        assert "notifications" in r.json["fields"]
    assert count_rows(pg, "notifications") == 0


def test_a_batch_replayed_with_its_idempotency_key_creates_nothing_more(client, auth, pg):
    body = {"notifications": [_note(0), _note(1)]}
    headers = {**auth, "Idempotency-Key": "batch-1"}

    first = client.post("/notifications/batch", json=body, headers=headers)
    again = client.post("/notifications/batch", json=body, headers=headers)
    other = client.post("/notifications/batch", json={"notifications": [_note(2)]}, headers=headers)

    assert first.status_code == again.status_code == 202
    assert again.json == first.json
    assert again.headers["Idempotent-Replayed"] == "true"
    assert other.status_code == 422
    assert "Idempotency-Key" in other.json["fields"]
    assert count_rows(pg, "notifications") == 2


def test_a_batch_needs_an_api_key(client, pg):
    r = client.post("/notifications/batch", json={"notifications": [_note(0)]})

    assert r.status_code == 401
