from __future__ import annotations

from sqlalchemy import text

from app.auth import KEY_PREFIX, generate_key, hash_key

NOTE = {"user_id": "u1", "title": "t", "body": "b"}


def test_hash_key_is_sha256_hex():
    assert hash_key("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_generated_keys_are_unique_and_prefixed():
    keys = {generate_key() for _ in range(100)}
    assert len(keys) == 100
    assert all(k.startswith(KEY_PREFIX) and len(k) > 40 for k in keys)


def test_created_key_is_stored_hashed_and_accepted(app, client, pg):
    result = app.test_cli_runner().invoke(args=["keys", "create", "shop"])
    key = result.stdout.strip()

    assert result.exit_code == 0
    with pg.connect() as conn:
        row = conn.execute(text("SELECT name, key_hash, prefix FROM api_keys")).one()
    assert row.name == "shop"
    assert row.key_hash == hash_key(key)
    assert key not in row.key_hash
    assert client.post("/notifications", json=NOTE, headers={"x-api-key": key}).status_code == 202


def test_revoked_key_is_rejected(app, client):
    runner = app.test_cli_runner()
    key = runner.invoke(args=["keys", "create", "shop"]).stdout.strip()
    assert client.post("/notifications", json=NOTE, headers={"x-api-key": key}).status_code == 202

    revoked = runner.invoke(args=["keys", "revoke", "shop"])

    assert revoked.exit_code == 0
    r = client.post("/notifications", json=NOTE, headers={"x-api-key": key})
    assert r.status_code == 401
    assert r.json["fields"]["x-api-key"] == ["Invalid or revoked."]


def test_keys_list_shows_prefix_and_revocation_but_not_the_key(app):
    runner = app.test_cli_runner()
    key = runner.invoke(args=["keys", "create", "shop"]).stdout.strip()
    runner.invoke(args=["keys", "revoke", "shop"])

    listing = runner.invoke(args=["keys", "list"]).output

    assert "shop" in listing
    assert key[:10] in listing
    assert key not in listing
    assert "revoked 20" in listing


def test_duplicate_key_name_and_unknown_revoke_fail_cleanly(app):
    runner = app.test_cli_runner()
    runner.invoke(args=["keys", "create", "shop"])

    assert runner.invoke(args=["keys", "create", "shop"]).exit_code != 0
    assert runner.invoke(args=["keys", "revoke", "nobody"]).exit_code != 0


def test_env_api_key_is_accepted(client):
    r = client.post("/notifications", json=NOTE, headers={"x-api-key": "test-api-key"})
    assert r.status_code == 202


def test_each_created_key_signs_webhooks_with_its_own_secret(app, pg):
    from sqlalchemy.orm import Session

    from tasks.webhook import env_signing_secret, signing_secret

    result = app.test_cli_runner().invoke(args=["keys", "create", "shop"])
    secret = result.stderr.strip().rsplit(" ", 1)[-1]
    cfg = app.config["NOTIFIER"]
    with Session(pg) as session:
        assert signing_secret(session, cfg, "shop") == secret
        assert signing_secret(session, cfg, "env") == env_signing_secret(cfg) != secret
