from __future__ import annotations

import time

import jwt
import pytest

from app.tokens import InvalidToken, verify
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


def _nested(levels: int) -> bytes:
    """A body whose `data` nests objects `levels` deep, written out (no encoder recurses)."""
    data = b'{"a":' * (levels - 1) + b"{}" + b"}" * (levels - 1)
    return b'{"user_id": "u1", "title": "t", "body": "b", "data": ' + data + b"}"


@pytest.mark.parametrize(
    "path",
    ["/users/a%00b", "/templates/%00", "/notifications/offline/%00", "/notifications/%00",
     "/users/a%01b", "/notifications/offline/u?limit=1%00", "/dlq?x%00=1"],
)  # fmt: skip
def test_control_characters_in_paths_and_queries_are_400_naming_where(client, auth, path):
    r = client.get(path, headers=auth)

    assert r.status_code == 400
    assert r.json["error"] == "bad_request"
    assert r.json["fields"]


@pytest.mark.parametrize(
    "path",
    ["/notifications/offline/u?limit=%C2%B2", "/notifications/offline/u?limit=%D9%A3",
     "/dlq/%C2%B2", "/dlq?limit=%C2%B2", "/templates?limit=%C2%B2"],
)  # fmt: skip
def test_non_ascii_digits_are_a_4xx(client, auth, path):
    r = client.get(path, headers=auth)

    assert 400 <= r.status_code < 500
    assert "error" in r.json


@pytest.mark.parametrize("levels", [33, 200, 252, 253, 254])
def test_data_nested_past_the_limit_is_422_and_never_reaches_the_writer(
    client, auth, pg, rdb, levels
):
    r = client.post("/notifications", data=_nested(levels), headers={**auth, **JSON})

    assert r.status_code == 422
    assert "data" in r.json["fields"]
    _assert_nothing_recorded(pg, rdb)


def test_a_body_nested_deeper_than_the_parser_takes_is_400(client, auth, pg, rdb):
    r = client.post("/notifications", data=_nested(5000), headers={**auth, **JSON})

    assert r.status_code == 400
    assert r.json["error"] == "invalid_json"
    _assert_nothing_recorded(pg, rdb)


def test_data_nested_up_to_the_limit_is_accepted(client, auth):
    r = client.post("/notifications", data=_nested(32), headers={**auth, **JSON})

    assert r.status_code == 202


@pytest.mark.parametrize("user_id", ["", "   ", "\t"])
def test_blank_user_ids_are_422(client, auth, pg, rdb, user_id):
    r = client.post("/notifications", json={**NOTE, "user_id": user_id}, headers=auth)

    assert r.status_code == 422
    assert "user_id" in r.json["fields"]
    _assert_nothing_recorded(pg, rdb)


def test_a_blank_user_id_in_the_path_is_422(client, auth):
    r = client.put("/users/%20%20", json={"locale": "en"}, headers=auth)

    assert r.status_code == 422
    assert "user_id" in r.json["fields"]


@pytest.mark.parametrize("lang", ["root", "und", "en@calendar=gregorian", "x-klingon", "zz"])
def test_odd_locale_tags_are_accepted_or_refused_never_a_5xx(client, auth, lang):
    r = client.post("/notifications", json={**NOTE, "lang": lang}, headers=auth)

    assert r.status_code in (202, 422)


@pytest.mark.parametrize(
    "fields",
    [{"send_at": "0001-01-01T00:00:00Z"}, {"send_at": "9999-12-31T23:59:59Z"},
     {"expires_at": "9999-12-31T23:59:59Z"}, {"expires_at": "0001-01-01T00:00:00Z"},
     {"fallback_after_seconds": 10**30}, {"fallback_after_seconds": -1}],
)  # fmt: skip
def test_extreme_dates_and_numbers_are_accepted_or_refused_never_a_5xx(client, auth, fields):
    r = client.post("/notifications", json={**NOTE, **fields}, headers=auth)

    assert r.status_code in (202, 422)


def test_a_huge_number_in_data_is_a_4xx(client, auth, pg, rdb):
    body = b'{"user_id": "u1", "title": "t", "body": "b", "data": {"x": ' + b"9" * 400 + b"}}"

    r = client.post("/notifications", data=body, headers={**auth, **JSON})

    assert 400 <= r.status_code < 500
    _assert_nothing_recorded(pg, rdb)


@pytest.mark.parametrize("sub", ["a\x00b", "a\nb", "   "])
def test_a_token_whose_sub_is_blank_or_holds_a_control_character_is_refused(sub):
    token = jwt.encode({"sub": sub, "exp": int(time.time()) + 60}, "s" * 32, "HS256")

    with pytest.raises(InvalidToken):
        verify("s" * 32, token)
