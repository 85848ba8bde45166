from __future__ import annotations

import pytest

NOTE = {"user_id": "u1", "title": "t", "body": "b"}


def _key(app, name: str, scopes: str) -> dict[str, str]:
    result = app.test_cli_runner().invoke(args=["keys", "create", name, "--scopes", scopes])
    assert result.exit_code == 0, result.output
    return {"x-api-key": result.stdout.strip()}


# (method, path, body, scope it needs)
ENDPOINTS = [
    ("POST", "/notifications", NOTE, "send"),
    ("POST", "/notifications/batch", {"notifications": [NOTE]}, "send"),
    ("GET", "/notifications/01a1a1a1-0000-7000-8000-000000000000", None, "read"),
    ("GET", "/notifications/offline/u1", None, "read"),
    ("GET", "/users/u1/notifications", None, "read"),
    ("GET", "/users/u1/unread-count", None, "read"),
    ("GET", "/users/u1", None, "read"),
    ("PUT", "/users/u1", {"locale": "en"}, "admin"),
    ("PUT", "/templates/t1", {"locales": {"en": {"title": "t", "body": "b"}}}, "admin"),
    ("GET", "/templates", None, "admin"),
    ("GET", "/dlq", None, "admin"),
    ("POST", "/dlq/1/redrive", None, "admin"),
    ("POST", "/auth/token", {"user_id": "u1"}, "admin"),
]


@pytest.mark.parametrize(("method", "path", "body", "scope"), ENDPOINTS)
def test_a_key_without_the_scope_gets_403_naming_it(app, client, method, path, body, scope):
    others = ",".join(s for s in ("send", "read", "admin") if s != scope)
    headers = _key(app, f"no-{scope}", others)

    r = client.open(path, method=method, json=body, headers=headers)

    assert r.status_code == 403
    assert r.json["error"] == "forbidden"
    assert scope in r.json["message"]
    assert "scope" in r.json["fields"]


@pytest.mark.parametrize(("method", "path", "body", "scope"), ENDPOINTS)
def test_a_key_with_only_the_scope_gets_past_the_check(app, client, method, path, body, scope):
    headers = _key(app, f"only-{scope}", scope)

    r = client.open(path, method=method, json=body, headers=headers)

    assert r.status_code != 403
    assert r.status_code < 500


def test_a_send_only_key_cannot_read_what_it_sent(app, client):
    headers = _key(app, "sender", "send")
    nid = client.post("/notifications", json=NOTE, headers=headers).json["id"]

    assert client.get(f"/notifications/{nid}", headers=headers).status_code == 403


def test_keys_list_shows_each_keys_scopes(app):
    _key(app, "reader", "read")

    listing = app.test_cli_runner().invoke(args=["keys", "list"]).stdout

    assert "reader" in listing
    assert "\tread\t" in listing


def test_an_unknown_scope_is_refused_by_the_cli(app):
    result = app.test_cli_runner().invoke(args=["keys", "create", "x", "--scopes", "root"])

    assert result.exit_code != 0
    assert "root" in result.output
