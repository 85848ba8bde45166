"""Liveness and readiness against PostgreSQL and Redis reached through proxies this test
stops: readiness follows the stores, liveness does not."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import make_url

from tests.tcp_proxy import TcpProxy


@pytest.fixture
def proxied(make_app, database_url, redis_url):
    """An app whose PostgreSQL and Redis connections go through stoppable proxies."""
    pg_url = make_url(database_url)
    pg_proxy = TcpProxy(pg_url.host, pg_url.port or 5432).start()
    redis_host, redis_rest = redis_url.removeprefix("redis://").split(":", 1)
    redis_port, redis_db = redis_rest.split("/", 1)
    redis_proxy = TcpProxy(redis_host, int(redis_port)).start()
    app = make_app(
        DATABASE_URL=pg_url.set(port=pg_proxy.port).render_as_string(hide_password=False),
        REDIS_URL=f"redis://127.0.0.1:{redis_proxy.port}/{redis_db}",
    )
    yield app.test_client(), pg_proxy, redis_proxy
    pg_proxy.stop()
    redis_proxy.stop()


def test_ready_when_both_stores_answer(proxied):
    client, _, _ = proxied
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.json == {"status": "ready", "checks": {"postgres": "ok", "redis": "ok"}}


def test_not_ready_while_postgres_is_down_and_ready_again_after(proxied):
    client, pg_proxy, _ = proxied
    assert client.get("/readyz").status_code == 200  # a pooled connection now exists

    pg_proxy.stop()
    r = client.get("/readyz")
    assert r.status_code == 503
    assert r.json["checks"]["postgres"].startswith("error")
    assert r.json["checks"]["redis"] == "ok"
    assert client.get("/healthz").status_code == 200

    pg_proxy.start()
    assert client.get("/readyz").status_code == 200


def test_not_ready_while_redis_is_down_and_ready_again_after(proxied):
    client, _, redis_proxy = proxied
    assert client.get("/readyz").status_code == 200

    redis_proxy.stop()
    r = client.get("/readyz")
    assert r.status_code == 503
    assert r.json["checks"]["redis"].startswith("error")
    assert r.json["checks"]["postgres"] == "ok"
    assert client.get("/healthz").status_code == 200

    redis_proxy.start()
    assert client.get("/readyz").status_code == 200
