"""PUT /users/{id} and the dead-letter API: answers and bad input."""

from __future__ import annotations

import pytest


def test_put_user_creates_then_updates_and_null_clears(client, auth):
    r = client.put("/users/ann", json={"email": "ann@example.test"}, headers=auth)
    assert (r.status_code, r.json["email"], r.json["webhook_url"]) == (
        201,
        "ann@example.test",
        None,
    )
    r = client.put("/users/ann", json={"webhook_url": "https://hooks.example.test/x"}, headers=auth)
    assert (r.status_code, r.json["email"]) == (200, "ann@example.test")  # kept
    r = client.put("/users/ann", json={"email": None}, headers=auth)
    assert (r.json["email"], r.json["webhook_url"]) == (None, "https://hooks.example.test/x")
    assert client.get("/users/ann", headers=auth).json["user_id"] == "ann"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"email": "not-an-address"}, "email"),
        ({"webhook_url": "ftp://example.test/x"}, "webhook_url"),
        ({"webhook_url": 12}, "webhook_url"),
        ({"phone": "+1"}, "phone"),
    ],
)
def test_put_user_rejects_bad_fields_by_name(client, auth, body, field):
    r = client.put("/users/ann", json=body, headers=auth)
    assert r.status_code == 422
    assert field in r.json["fields"]


def test_put_user_needs_an_api_key(client):
    assert client.put("/users/ann", json={}).status_code == 401


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"webhook_url": "javascript:alert(1)"}, "webhook_url"),
        ({"fallback_after_seconds": 0}, "fallback_after_seconds"),
        ({"fallback_after_seconds": "5"}, "fallback_after_seconds"),
        ({"fallback_after_seconds": 5, "channels": ["email"]}, "fallback_after_seconds"),
    ],
)
def test_notification_channel_fields_are_validated(client, auth, extra, field):
    body = {"user_id": "u", "title": "t", "body": "b", **extra}
    r = client.post("/notifications", json=body, headers=auth)
    assert r.status_code == 422
    assert field in r.json["fields"]


@pytest.mark.parametrize(
    ("query", "field"),
    [("channel=sms", "channel"), ("limit=0", "limit"), ("since=yesterday", "since"),
     ("before=x", "before")],
)  # fmt: skip
def test_dlq_listing_rejects_bad_filters_by_name(client, auth, query, field):
    r = client.get(f"/dlq?{query}", headers=auth)
    assert r.status_code == 422
    assert field in r.json["fields"]


def test_unknown_dead_letters_are_404(client, auth):
    assert client.get("/dlq/12345", headers=auth).status_code == 404
    assert client.get("/dlq/abc", headers=auth).status_code == 404
    assert client.post("/dlq/12345/redrive", headers=auth).status_code == 404


def test_bulk_redrive_validates_its_filter(client, auth):
    r = client.post("/dlq/redrive", json={"channel": "pigeon"}, headers=auth)
    assert r.status_code == 422
    assert "channel" in r.json["fields"]
    r = client.post("/dlq/redrive", json=[1, 2], headers=auth)
    assert r.status_code == 400
    assert client.post("/dlq/redrive", json={}, headers=auth).json == {
        "redriven": [],
        "skipped": [],
    }


def test_dlq_needs_an_api_key(client):
    assert client.get("/dlq").status_code == 401
