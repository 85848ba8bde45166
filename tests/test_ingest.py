from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime

import orjson
import pytest
from sqlalchemy import select, text

from models import Delivery, DeliveryStatus, Notification
from tests.helpers import count_rows

NOTE = {"user_id": "u1", "title": "Order shipped", "body": "Your order #42 is on its way."}


def _stream(rdb, key="notifications:stream"):
    return rdb.xrange(key) if rdb.exists(key) else []


def test_accepted_notification_is_recorded_and_streamed(client, auth, pg, rdb):
    r = client.post("/notifications", json=NOTE, headers=auth)

    assert r.status_code == 202
    assert r.json["status"] == "queued"
    assert r.json["recipients"] == 1
    nid = uuid.UUID(r.json["id"])
    with pg.connect() as conn:
        row = conn.execute(select(Notification.__table__).where(Notification.id == nid)).one()
    assert row.recipients == ["u1"]
    assert (row.title, row.body, str(row.priority), row.channels) == (
        "Order shipped",
        "Your order #42 is on its way.",
        "normal",
        ["websocket"],
    )
    entries = _stream(rdb)
    assert len(entries) == 1
    fields = entries[0][1]
    assert fields["id"] == str(nid)
    payload = orjson.loads(fields["payload"])
    assert payload["recipients"] == ["u1"]
    assert payload["title"] == "Order shipped"


def test_user_ids_batch_is_one_row_with_deduplicated_recipients(client, auth, pg, rdb):
    users = [f"user-{i}" for i in range(9_998)]
    r = client.post(
        "/notifications",
        json={"user_ids": [*users, "user-1", "user-2"], "title": "t", "body": "b"},
        headers=auth,
    )

    assert r.status_code == 202
    assert r.json["recipients"] == 9_998
    with pg.connect() as conn:
        recipients = conn.scalar(select(Notification.recipients))
    assert recipients == users
    assert len(_stream(rdb)) == 1


def test_all_optional_fields_and_template_are_stored(client, auth, pg, rdb):
    template = {
        "locales": {"en": {"title": "Order {{ order }} shipped", "body": "On its way."},
                    "pt-BR": {"title": "Pedido {{ order }} enviado", "body": "A caminho."}},
        "default_locale": "en",
    }  # fmt: skip
    assert client.put("/templates/order_shipped", json=template, headers=auth).status_code == 201
    body = {
        "user_id": "u9",
        "template": "order_shipped",
        "params": {"order": 42},
        "data": {"order_id": 42, "url": "/orders/42"},
        "priority": "high",
        "lang": "pt-BR",
        "category": "orders",
        "channels": ["websocket", "email"],
        "send_at": "2030-01-01T10:00:00+02:00",
        "expires_at": "2030-01-02T10:00:00Z",
    }
    r = client.post("/notifications", json=body, headers=auth)

    assert r.status_code == 202
    assert r.json["status"] == "scheduled"
    with pg.connect() as conn:
        row = conn.execute(select(Notification.__table__)).one()
    assert row.template == "order_shipped"
    assert row.renditions["locales"]["pt-BR"]["title"] == "Pedido 42 enviado"
    assert (row.title, row.body) == ("Order 42 shipped", "On its way.")  # the default locale
    assert row.streamed_at is None
    assert _stream(rdb) == []  # the scheduler streams it on 2030-01-01
    assert row.params == {"order": 42}
    assert row.data == {"order_id": 42, "url": "/orders/42"}
    assert str(row.priority) == "high"
    assert row.lang == "pt-BR"
    assert row.category == "orders"
    assert row.channels == ["websocket", "email"]
    assert row.send_at == datetime(2030, 1, 1, 8, 0, tzinfo=UTC)
    assert row.expires_at == datetime(2030, 1, 2, 10, 0, tzinfo=UTC)


def test_get_notification_shows_status_and_per_recipient_state(client, auth, pg):
    r = client.post(
        "/notifications", json={"user_ids": ["a", "b"], "title": "t", "body": "b"}, headers=auth
    )
    nid = uuid.UUID(r.json["id"])
    with pg.begin() as conn:
        conn.execute(
            Delivery.__table__.insert().values(
                notification_id=nid, user_id="b", channel="websocket", status=DeliveryStatus.SENT
            )
        )

    got = client.get(f"/notifications/{nid}", headers=auth)

    assert got.status_code == 200
    assert got.json["id"] == str(nid)
    assert got.json["status"] == "delivering"
    assert got.json["recipients"] == 2
    states = {d["user_id"]: d["state"] for d in got.json["deliveries"]}
    assert states == {"a": "queued", "b": "sent"}
    assert got.json["delivery_summary"] == {"queued": 1, "sent": 1}


def test_get_notification_pages_recipients(client, auth):
    users = [f"u{i}" for i in range(5)]
    nid = client.post(
        "/notifications", json={"user_ids": users, "title": "t", "body": "b"}, headers=auth
    ).json["id"]

    first = client.get(f"/notifications/{nid}?limit=2", headers=auth).json
    second = client.get(f"/notifications/{nid}?limit=2&offset={first['next_offset']}", headers=auth)

    assert [d["user_id"] for d in first["deliveries"]] == ["u0", "u1"]
    assert [d["user_id"] for d in second.json["deliveries"]] == ["u2", "u3"]


@pytest.mark.parametrize("nid", ["not-a-uuid", "0190c2a4-7d0e-7000-8000-000000000000"])
def test_get_unknown_notification_is_404(client, auth, nid):
    r = client.get(f"/notifications/{nid}", headers=auth)

    assert r.status_code == 404
    assert r.json["error"] == "not_found"


def test_get_notification_needs_an_api_key(client, auth):
    nid = client.post("/notifications", json=NOTE, headers=auth).json["id"]

    assert client.get(f"/notifications/{nid}").status_code == 401


def test_concurrent_posts_are_all_recorded_and_streamed(client, auth, pg, rdb):
    results: list[int] = []

    def post(i: int) -> None:
        r = client.post("/notifications", json={**NOTE, "user_id": f"c{i}"}, headers=auth)
        results.append(r.status_code)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(60)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert results == [202] * 60
    assert count_rows(pg, "notifications") == 60
    assert len(_stream(rdb)) == 60


def test_ingest_writes_nothing_back_after_streaming(client, auth, pg):
    client.post("/notifications", json=NOTE, headers=auth)
    time.sleep(0.3)  # the old writer marked rows streamed once idle for 50 ms

    with pg.connect() as conn:
        row = conn.execute(text("SELECT streamed_at, ctid::text AS ctid FROM notifications")).one()
    # The first tuple of a truncated table: an UPDATE would have written a second version.
    assert row.ctid == "(0,1)"
    assert row.streamed_at is None
