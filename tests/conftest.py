"""Fixtures: a real PostgreSQL database and Redis DB number per test worker, cleaned per test."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from app import create_app, db
from app.db import upgrade
from models import Base

PG_ADMIN_URL = os.environ.get(
    "TEST_PG_ADMIN_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
)
REDIS_BASE_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379")
API_KEY = "test-api-key"
LOOPBACK = "127.0.0.0/8,::1/128"


def _worker_index(worker_id: str) -> int:
    return 0 if worker_id == "master" else int(worker_id.removeprefix("gw")) + 1


@pytest.fixture(scope="session")
def database_url(worker_id: str) -> Iterator[str]:
    """A fresh database for this test worker, migrated with Alembic."""
    yield from _fresh_database(f"notifier_test_{worker_id}")


def _fresh_database(name: str) -> Iterator[str]:
    """Create database `name` anew, migrate it, yield its URL, drop it afterwards."""
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    upgrade(url)
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def redis_url(worker_id: str) -> str:
    """A Redis DB number of our own (2 and up, even), so flushing it touches nothing else."""
    return f"{REDIS_BASE_URL}/{2 + 2 * _worker_index(worker_id)}"


@pytest.fixture(scope="session")
def base_settings(database_url: str, redis_url: str) -> dict[str, Any]:
    return {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "API_KEY": API_KEY,
        "API_KEY_CACHE_SECONDS": 0.0,
        "BACKLOG_CHECK_SECONDS": 0.0,
        # The tests' webhook receivers listen on loopback.
        "WEBHOOK_ALLOWED_NETWORKS": LOOPBACK,
    }


@pytest.fixture(scope="session")
def app(base_settings: dict[str, Any]) -> Iterator[Flask]:
    """The app with the test database and Redis DB."""
    flask_app = create_app(base_settings)
    yield flask_app
    flask_app.extensions["ingest.writer"].close()
    db.dispose(flask_app.extensions["db.engine"])


@pytest.fixture
def make_app(base_settings: dict[str, Any]) -> Iterator[Callable[..., Flask]]:
    """Build an app with extra settings; disposed after the test."""
    made: list[Flask] = []

    def factory(**overrides: Any) -> Flask:
        flask_app = create_app({**base_settings, **overrides})
        made.append(flask_app)
        return flask_app

    yield factory
    for flask_app in made:
        flask_app.extensions["ingest.writer"].close()
        db.dispose(flask_app.extensions["db.engine"])


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """A test client sending requests to `app`."""
    return app.test_client()


@pytest.fixture
def auth() -> dict[str, str]:
    """Headers carrying the test API key."""
    return {"x-api-key": API_KEY}


@pytest.fixture
def rdb(redis_url: str) -> Iterator[redis.Redis]:
    """A client on this worker's Redis DB."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def pg(database_url: str) -> Iterator[Any]:
    """A SQLAlchemy engine on this worker's database."""
    engine = create_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture(autouse=True)
def _clean_state(database_url: str, redis_url: str) -> None:
    engine = create_engine(database_url)
    tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    engine.dispose()
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    client.close()


@pytest.fixture
def live_server(database_url: str, redis_url: str, tmp_path: Path) -> Iterator[Callable[..., int]]:
    """Start gunicorn as `make run` does, on this worker's database; returns its port."""
    from tests.platform import Platform

    servers = Platform(
        {"DATABASE_URL": database_url, "REDIS_URL": redis_url, "API_KEY": API_KEY,
         "LOG_LEVEL": "WARNING"},
        tmp_path,
    )  # fmt: skip
    yield lambda workers=1, **settings: servers.gateway(workers, **settings)[0]
    servers.stop_all()


@pytest.fixture(scope="session")
def platform_settings(
    worker_id: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """Settings of a database and Redis DB used only by real platform processes."""
    from tests.platform import API_KEY as PLATFORM_KEY
    from tests.platform import JWT_SECRET

    databases = _fresh_database(f"notifier_test_{worker_id}_platform")
    url = next(databases)
    redis_db = f"{REDIS_BASE_URL}/{3 + 2 * _worker_index(worker_id)}"
    flusher = redis.Redis.from_url(redis_db)
    flusher.flushdb()
    flusher.close()
    yield {
        "DATABASE_URL": url,
        "REDIS_URL": redis_db,
        "API_KEY": PLATFORM_KEY,
        "JWT_SECRET": JWT_SECRET,
        "LOG_LEVEL": "INFO",
        "STREAM_CLAIM_IDLE_MS": "3000",
        "STREAM_CLAIM_EVERY_SECONDS": "1",
        "STREAM_LEASE_SECONDS": "5",
        "STREAM_WATCHDOG_SECONDS": "1",
        "STREAM_RUN_SECONDS": "20",
        "PRESENCE_TTL_SECONDS": "4",
        "RETRY_BASE_SECONDS": "0.3",
        "RETRY_JITTER": "0",
        "RETRY_MAX_ATTEMPTS": "4",
        "RETRY_SWEEP_SECONDS": "0.5",
        "RETRY_SWEEP_GRACE_SECONDS": "1",
        "ATTEMPT_LEASE_SECONDS": "6",
        "WEBHOOK_TIMEOUT_SECONDS": "4",
        # Each test's receiver path fails on purpose; the circuit has tests of its own.
        "CIRCUIT_FAILURES": "1000",
        "WEBHOOK_SIGNING_SECRET": "platform-webhook-secret",
        "ESCALATION_SWEEP_SECONDS": "0.5",
        "PRESENCE_HEARTBEAT_SECONDS": "1",
        "OUTBOX_SWEEP_SECONDS": "1",
        "WEBHOOK_ALLOWED_NETWORKS": LOOPBACK,
        "STREAM_BACKLOG_LIMIT": "1000000",
    }
    next(databases, None)  # drops it


@pytest.fixture
def rplat(platform_settings: dict[str, str]) -> Iterator[redis.Redis]:
    """A client of the Redis DB the platform processes use."""
    client = redis.Redis.from_url(platform_settings["REDIS_URL"], decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def pgplat(platform_settings: dict[str, str]) -> Iterator[Any]:
    """A SQLAlchemy engine on the database the platform processes use."""
    engine = create_engine(platform_settings["DATABASE_URL"])
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def platform(platform_settings: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    """A Platform whose processes are stopped at the end of the module; state is reset first."""
    from tests.platform import Platform

    client = redis.Redis.from_url(platform_settings["REDIS_URL"])
    client.flushdb()
    client.close()
    engine = create_engine(platform_settings["DATABASE_URL"])
    tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    engine.dispose()
    p = Platform(platform_settings, tmp_path_factory.mktemp("platform-logs"))
    yield p
    p.stop_all()
