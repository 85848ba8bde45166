from __future__ import annotations

import pytest

from tests.helpers import count_rows

NOTE = {"user_id": "u1", "title": "t", "body": "b"}
JSON = {"content-type": "application/json"}


def _assert_nothing_recorded(pg, rdb):
    assert count_rows(pg, "notifications") == 0
    assert count_rows(pg, "idempotency_keys") == 0
    assert not rdb.exists("notifications:stream")


INVALID_BODIES = [
    pytest.param({**NOTE, "title": 5}, "title", id="wrong-type-title"),
    pytest.param({**NOTE, "user_id": ["u1"]}, "user_id", id="wrong-type-user-id"),
    pytest.param({**NOTE, "priority": "urgent"}, "priority", id="unknown-priority"),
    pytest.param({**NOTE, "channels": ["websocket", "pigeon"]}, "channels", id="unknown-channel"),
    pytest.param({**NOTE, "channels": []}, "channels", id="no-channels"),
    pytest.param({"user_ids": [], "title": "t", "body": "b"}, "user_ids", id="empty-recipients"),
    pytest.param({"title": "t", "body": "b"}, "user_ids", id="no-recipients"),
    pytest.param({**NOTE, "user_ids": ["u2"]}, "user_ids", id="both-recipient-forms"),
    pytest.param(
        {"user_ids": [f"u{i}" for i in range(10_001)], "title": "t", "body": "b"},
        "user_ids",
        id="too-many-recipients",
    ),
    pytest.param({"user_id": "", "title": "t", "body": "b"}, "user_id", id="empty-user-id"),
    pytest.param({"user_id": "u1", "body": "b"}, "title", id="missing-title"),
    pytest.param({**NOTE, "template": "x"}, "template", id="template-and-title"),
    pytest.param({**NOTE, "data": [1, 2]}, "data", id="data-not-object"),
    pytest.param({**NOTE, "data": {"blob": "x" * 17_000}}, "data", id="data-over-16k"),
    pytest.param({**NOTE, "title": "a\x00b"}, "title", id="nul-in-title"),
    pytest.param({**NOTE, "data": {"k": "a\x00b"}}, "data", id="nul-in-data"),
    pytest.param({**NOTE, "lang": "not a tag!"}, "lang", id="bad-lang"),
    pytest.param({**NOTE, "send_at": "tomorrow"}, "send_at", id="bad-send-at"),
    pytest.param(
        {**NOTE, "send_at": "2030-01-02T00:00:00Z", "expires_at": "2030-01-01T00:00:00Z"},
        "expires_at",
        id="expires-before-send",
    ),
    pytest.param({**NOTE, "colour": "red"}, "colour", id="unknown-field"),
    pytest.param([NOTE], "_schema", id="array-body"),
    pytest.param("hello", "_schema", id="string-body"),
]


@pytest.mark.parametrize(("body", "field"), INVALID_BODIES)
def test_invalid_body_is_422_naming_the_field_and_records_nothing(
    client, auth, pg, rdb, body, field
):
    r = client.post("/notifications", json=body, headers=auth)

    assert r.status_code == 422
    assert r.json["error"] == "validation_error"
    assert field in r.json["fields"]
    _assert_nothing_recorded(pg, rdb)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (7, "Not a valid string."),
        ("", "Length must be between 1 and 255."),
        ("x" * 256, "Length must be between 1 and 255."),
        ("a\x00b", "Must not contain NUL characters."),
        (None, "Field may not be null."),
    ],
    ids=["number", "empty", "too-long", "nul", "null"],
)
def test_a_bad_recipient_among_thousands_is_named_by_its_position(
    client, auth, pg, rdb, bad, message
):
    user_ids = [f"u{i}" for i in range(5_000)]
    user_ids[4_321] = bad

    r = client.post("/notifications", json={"user_ids": user_ids, "title": "t", "body": "b"},
                    headers=auth)  # fmt: skip

    assert r.status_code == 422
    assert r.json["fields"]["user_ids"] == {"4321": [message]}
    _assert_nothing_recorded(pg, rdb)


def test_malformed_json_is_400_and_records_nothing(client, auth, pg, rdb):
    r = client.post("/notifications", data='{"user_id": "u1",', headers={**auth, **JSON})

    assert r.status_code == 400
    assert r.json["error"] == "invalid_json"
    assert "body" in r.json["fields"]
    _assert_nothing_recorded(pg, rdb)


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_non_json_content_type_is_415(client, auth, pg, rdb, content_type):
    headers = dict(auth)
    if content_type:
        headers["content-type"] = content_type
    r = client.post("/notifications", data='{"user_id": "u1"}', headers=headers)

    assert r.status_code == 415
    assert "Content-Type" in r.json["fields"]
    _assert_nothing_recorded(pg, rdb)


def test_oversized_body_is_413(client, auth, pg, rdb):
    huge = '{"user_id": "u1", "title": "t", "body": "' + "x" * (3 * 1024 * 1024) + '"}'
    r = client.post("/notifications", data=huge, headers={**auth, **JSON})

    assert r.status_code == 413
    assert r.json["error"] == "payload_too_large"
    _assert_nothing_recorded(pg, rdb)


@pytest.mark.parametrize("headers", [{}, {"x-api-key": "wrong"}, {"x-api-key": ""}])
def test_missing_or_wrong_api_key_is_401(client, pg, rdb, headers):
    r = client.post("/notifications", json=NOTE, headers=headers)

    assert r.status_code == 401
    assert "x-api-key" in r.json["fields"]
    _assert_nothing_recorded(pg, rdb)


def test_bad_idempotency_key_is_422(client, auth, pg, rdb):
    r = client.post("/notifications", json=NOTE, headers={**auth, "Idempotency-Key": "k" * 256})

    assert r.status_code == 422
    assert "Idempotency-Key" in r.json["fields"]
    _assert_nothing_recorded(pg, rdb)


def test_unknown_route_and_method_answer_json(client, auth):
    assert client.get("/nope", headers=auth).json["error"] == "not_found"
    r = client.put("/notifications", json=NOTE, headers=auth)
    assert r.status_code == 405
    assert r.json["error"] == "method_not_allowed"
