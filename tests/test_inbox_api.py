from __future__ import annotations

import pytest

from app.tokens import verify
from tasks.stream import process_entries

NOTE = {"title": "t", "body": "b"}


@pytest.fixture
def inbox_of(client, auth, pg, rdb):
    """Post `n` notifications to a user and record their deliveries; returns their ids."""

    def make(user_id: str, n: int) -> list[str]:
        ids = []
        for i in range(n):
            r = client.post("/notifications", json={**NOTE, "user_id": user_id, "body": str(i)},
                            headers=auth)  # fmt: skip
            ids.append(r.json["id"])
        process_entries(pg, rdb.xrange("notifications:stream"), lambda *_: None, 100)
        return ids

    return make


def _token(client, auth, user_id: str) -> dict[str, str]:
    r = client.post("/auth/token", json={"user_id": user_id, "ttl_seconds": 60}, headers=auth)
    return {"Authorization": f"Bearer {r.json['token']}"}


def test_offline_queue_lists_unacked_oldest_first_and_ack_clears_them(client, auth, inbox_of):
    ids = inbox_of("amy", 3)

    listed = client.get("/notifications/offline/amy", headers=auth).json["notifications"]
    acked = client.post("/notifications/offline/amy/ack", json={"ids": ids[:2]}, headers=auth)
    left = client.get("/notifications/offline/amy", headers=auth).json["notifications"]

    assert [n["id"] for n in listed] == ids
    assert sorted(acked.json["acked"]) == sorted(ids[:2])
    assert [n["id"] for n in left] == ids[2:]


def test_history_pages_newest_first_with_a_cursor(client, auth, inbox_of):
    ids = inbox_of("bo", 5)

    first = client.get("/users/bo/notifications?limit=2", headers=auth).json
    second = client.get(f"/users/bo/notifications?limit=2&cursor={first['next_cursor']}",
                        headers=auth).json  # fmt: skip

    assert [n["id"] for n in first["notifications"]] == ids[::-1][:2]
    assert [n["id"] for n in second["notifications"]] == ids[::-1][2:4]


def test_read_marks_unread_count_and_unread_only(client, auth, inbox_of):
    ids = inbox_of("cy", 3)
    assert client.get("/users/cy/unread-count", headers=auth).json["unread"] == 3

    r = client.post("/users/cy/notifications/read", json={"ids": [ids[0]]}, headers=auth)

    assert r.json["read"] == [ids[0]]
    assert client.get("/users/cy/unread-count", headers=auth).json["unread"] == 2
    unread = client.get("/users/cy/notifications?unread_only=true", headers=auth).json
    assert {n["id"] for n in unread["notifications"]} == set(ids[1:])
    client.post("/users/cy/notifications/read", json={"all": True}, headers=auth)
    assert client.get("/users/cy/unread-count", headers=auth).json["unread"] == 0


def test_users_own_token_reads_its_inbox_but_not_anothers(client, auth, inbox_of):
    inbox_of("dee", 1)
    inbox_of("eve", 1)
    dee = _token(client, auth, "dee")

    assert client.get("/users/dee/unread-count", headers=dee).json["unread"] == 1
    assert client.get("/users/eve/unread-count", headers=dee).status_code == 403
    assert client.get("/notifications/offline/eve", headers=dee).status_code == 403
    assert client.post("/users/eve/notifications/read", json={"all": True},
                       headers=dee).status_code == 403  # fmt: skip
    assert client.get("/users/eve/unread-count", headers=auth).json["unread"] == 1


def test_users_own_token_cannot_ack_anothers_offline_queue(client, auth, inbox_of):
    [eves] = inbox_of("eve2", 1)
    inbox_of("dee2", 1)
    dee = _token(client, auth, "dee2")

    r = client.post("/notifications/offline/eve2/ack", json={"ids": [eves]}, headers=dee)

    assert r.status_code == 403
    left = client.get("/notifications/offline/eve2", headers=auth).json["notifications"]
    assert [n["id"] for n in left] == [eves]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"},
                                     {"x-api-key": "wrong"}])  # fmt: skip
def test_inbox_without_valid_credentials_is_401(client, headers):
    assert client.get("/users/x/notifications", headers=headers).status_code == 401


@pytest.mark.parametrize("body", [{}, {"ids": []}, {"ids": ["not-a-uuid"]}, {"ids": "x"},
                                  {"all": "yes"}])  # fmt: skip
def test_bad_read_body_is_422_naming_ids(client, auth, body):
    r = client.post("/users/x/notifications/read", json=body, headers=auth)
    assert r.status_code == 422
    assert "ids" in r.json["fields"]


def test_bad_paging_arguments_are_422(client, auth):
    assert client.get("/users/x/notifications?limit=0", headers=auth).status_code == 422
    assert client.get("/users/x/notifications?cursor=abc", headers=auth).status_code == 422


def test_token_endpoint_mints_a_token_for_the_user(app, client, auth):
    r = client.post("/auth/token", json={"user_id": "fay", "ttl_seconds": 120}, headers=auth)

    assert r.status_code == 201
    assert verify(app.config["NOTIFIER"].JWT_SECRET, r.json["token"]) == "fay"


BAD_TOKEN_BODIES = [
    ({"ttl_seconds": 60}, "user_id"),
    ({"user_id": "f", "ttl_seconds": 0}, "ttl_seconds"),
    ({"user_id": "f", "ttl_seconds": "x"}, "ttl_seconds"),
]


@pytest.mark.parametrize(("body", "field"), BAD_TOKEN_BODIES)
def test_token_endpoint_rejects_bad_input(client, auth, body, field):
    r = client.post("/auth/token", json=body, headers=auth)
    assert r.status_code == 422
    assert field in r.json["fields"]


def test_token_endpoint_needs_an_api_key(client):
    assert client.post("/auth/token", json={"user_id": "f"}).status_code == 401
