"""Safe by default: loopback binds, no development secrets in production, a token on /metrics."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.config import UnsafeConfig

ROOT = Path(__file__).resolve().parent.parent
SECRETS = {
    "API_KEY": "a-real-key-from-the-vault",
    "JWT_SECRET": "a-real-secret-of-more-than-32-bytes-long",
    "FLOWER_BASIC_AUTH": "ops:a-real-password",
}


def test_production_refuses_to_start_with_every_development_default_named(make_app):
    with pytest.raises(UnsafeConfig) as refused:
        make_app(NOTIFIER_ENV="production", API_KEY="dev-api-key",
                 JWT_SECRET="dev-jwt-secret-change-me-in-production",
                 FLOWER_BASIC_AUTH="admin:admin")  # fmt: skip

    assert "API_KEY" in str(refused.value)
    assert "JWT_SECRET" in str(refused.value)
    assert "FLOWER_BASIC_AUTH" in str(refused.value)


@pytest.mark.parametrize("left", sorted(SECRETS))
def test_production_names_the_one_default_left(make_app, left):
    settings = {**SECRETS, left: {"API_KEY": "dev-api-key",
                                  "JWT_SECRET": "dev-jwt-secret-change-me-in-production",
                                  "FLOWER_BASIC_AUTH": "admin:admin"}[left]}  # fmt: skip
    with pytest.raises(UnsafeConfig, match=left):
        make_app(NOTIFIER_ENV="production", **settings)


def test_production_with_real_secrets_starts(make_app):
    assert make_app(NOTIFIER_ENV="production", **SECRETS).config["NOTIFIER"].NOTIFIER_ENV == (
        "production"
    )


def test_development_starts_with_the_defaults(make_app):
    make_app(JWT_SECRET="dev-jwt-secret-change-me-in-production", FLOWER_BASIC_AUTH="admin:admin")


def test_metrics_need_the_bearer_token_when_one_is_set(make_app):
    client = make_app(METRICS_TOKEN="scrape-me").test_client()

    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics").json["error"] == "unauthorized"
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer scrape-me"}).status_code == 200


def test_metrics_stay_open_without_a_token(client):
    assert client.get("/metrics").status_code == 200


def test_gunicorn_binds_loopback_unless_told_otherwise(monkeypatch):
    monkeypatch.delenv("BIND_HOST", raising=False)
    monkeypatch.setenv("PORT", "8123")

    # Only the bind line: the whole file sets up the metrics directory of a server.
    [line] = [x for x in (ROOT / "gunicorn.conf.py").read_text().splitlines()
              if x.startswith("bind =")]  # fmt: skip
    conf: dict = {}
    exec(line, {"os": os}, conf)

    assert conf["bind"] == "127.0.0.1:8123"


def test_flower_binds_loopback_in_the_procfile():
    [flower] = [line for line in (ROOT / "Procfile").read_text().splitlines()
                if line.startswith("flower:")]  # fmt: skip
    assert "--address=${FLOWER_ADDRESS:-127.0.0.1}" in flower
