from __future__ import annotations

import threading

from sqlalchemy import text

from tests.helpers import count_rows

NOTE = {"user_id": "u1", "title": "t", "body": "b"}


def test_same_key_and_body_replays_the_first_answer_and_creates_nothing(client, auth, pg, rdb):
    headers = {**auth, "Idempotency-Key": "order-42-shipped"}
    first = client.post("/notifications", json=NOTE, headers=headers)
    again = client.post("/notifications", json=dict(reversed(NOTE.items())), headers=headers)

    assert first.status_code == again.status_code == 202
    assert again.json == first.json
    assert again.headers["Idempotent-Replayed"] == "true"
    assert count_rows(pg, "notifications") == 1
    assert rdb.xlen("notifications:stream") == 1


def test_same_key_with_another_body_is_a_conflict_naming_the_key(client, auth, pg):
    headers = {**auth, "Idempotency-Key": "k1"}
    first = client.post("/notifications", json=NOTE, headers=headers)
    other = client.post("/notifications", json={**NOTE, "body": "changed"}, headers=headers)

    assert other.status_code == 422
    assert other.json["error"] == "idempotency_conflict"
    assert first.json["id"] in other.json["fields"]["Idempotency-Key"][0]
    assert count_rows(pg, "notifications") == 1


def test_key_older_than_24h_is_forgotten(client, auth, pg):
    headers = {**auth, "Idempotency-Key": "k1"}
    first = client.post("/notifications", json=NOTE, headers=headers)
    with pg.begin() as conn:
        conn.execute(text("UPDATE idempotency_keys SET created_at = now() - interval '25 hours'"))

    later = client.post("/notifications", json=NOTE, headers=headers)

    assert later.status_code == 202
    assert later.json["id"] != first.json["id"]
    assert "Idempotent-Replayed" not in later.headers
    assert count_rows(pg, "notifications") == 2


def test_keys_are_scoped_per_api_key(client, auth, app, pg):
    other_key = app.test_cli_runner().invoke(args=["keys", "create", "billing"]).stdout.strip()
    first = client.post("/notifications", json=NOTE, headers={**auth, "Idempotency-Key": "k"})
    second = client.post(
        "/notifications", json=NOTE, headers={"x-api-key": other_key, "Idempotency-Key": "k"}
    )

    assert second.status_code == 202
    assert second.json["id"] != first.json["id"]
    assert count_rows(pg, "notifications") == 2


def test_concurrent_requests_with_one_key_create_one_notification(client, auth, pg):
    answers: list[tuple[int, str]] = []

    def post() -> None:
        r = client.post("/notifications", json=NOTE, headers={**auth, "Idempotency-Key": "race"})
        answers.append((r.status_code, r.json["id"]))

    threads = [threading.Thread(target=post) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert {status for status, _ in answers} == {202}
    assert len({nid for _, nid in answers}) == 1
    assert count_rows(pg, "notifications") == 1


def test_expired_keys_are_purged(app, client, auth, pg):
    from tasks.outbox import purge_expired_idempotency_keys

    client.post("/notifications", json=NOTE, headers={**auth, "Idempotency-Key": "old"})
    client.post("/notifications", json=NOTE, headers={**auth, "Idempotency-Key": "new"})
    with pg.begin() as conn:
        conn.execute(
            text(
                "UPDATE idempotency_keys SET created_at = now() - interval '25 hours' "
                "WHERE key = 'old'"
            )
        )

    assert purge_expired_idempotency_keys(pg, 24 * 3600) == 1
    with pg.connect() as conn:
        assert conn.scalar(text("SELECT array_agg(key) FROM idempotency_keys")) == ["new"]
