"""PostgreSQL engine, one session per request, and database creation/migration helpers."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

import orjson
from flask import Flask, current_app, g
from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

ROOT = Path(__file__).resolve().parent.parent


def _json_dumps(value: object) -> str:
    return orjson.dumps(value).decode()


def make_engine(url: str | URL, pool_size: int = 10, **options: Any) -> Engine:
    """An engine whose JSONB columns go through orjson."""
    return create_engine(
        url,
        **options,
        pool_size=pool_size,
        max_overflow=pool_size,
        # No pre-ping: it costs a round trip per checkout on the hot path. A connection
        # broken by a PostgreSQL restart fails once, and that error invalidates the pool.
        pool_recycle=1800,
        json_serializer=_json_dumps,
        json_deserializer=orjson.loads,
    )


# Each engine's sibling whose connections are in autocommit mode from birth (see autocommit).
_AUTOCOMMIT: WeakKeyDictionary[Engine, Engine] = WeakKeyDictionary()
_AUTOCOMMIT_LOCK = threading.Lock()


def autocommit(engine: Engine) -> Connection:
    """A connection on which each statement commits on its own, for the hot paths' lone
    statements (no BEGIN or COMMIT round trips).

    It comes from a second pool on the same database whose connections are autocommit
    from the start: `engine.connect().execution_options(isolation_level=...)` would set
    and reset the mode on every checkout, which costs a task carrying one delivery more
    than a tenth of its CPU.
    """
    sibling = _AUTOCOMMIT.get(engine)
    if sibling is None:
        with _AUTOCOMMIT_LOCK:
            sibling = _AUTOCOMMIT.get(engine)
            if sibling is None:
                # Half the engine's pool size, overflow included: a process's two pools
                # together hold at most 1.5 times what the one pool did, which keeps the
                # platform's processes within PostgreSQL's default 100 connections.
                sibling = make_engine(
                    engine.url,
                    pool_size=max(1, engine.pool.size() // 2),  # type: ignore[attr-defined]
                    isolation_level="AUTOCOMMIT",
                )
                _AUTOCOMMIT[engine] = sibling
    return sibling.connect()


def dispose(engine: Engine) -> None:
    """Close the pooled connections of `engine` and of its autocommit sibling (after a fork,
    or before dropping the database)."""
    engine.dispose()
    sibling = _AUTOCOMMIT.get(engine)
    if sibling is not None:
        sibling.dispose()


def init_app(app: Flask) -> None:
    _make_psycopg_cooperative()
    engine = make_engine(app.config["NOTIFIER"].DATABASE_URL)
    app.extensions["db.engine"] = engine
    app.extensions["db.sessionmaker"] = sessionmaker(engine, expire_on_commit=False)
    app.teardown_appcontext(_close_session)


def engine() -> Engine:
    return current_app.extensions["db.engine"]


def get_session() -> Session:
    """The session of the current request (or task), opened on first use."""
    if "db_session" not in g:
        g.db_session = current_app.extensions["db.sessionmaker"]()
    return g.db_session


def _close_session(_exc: BaseException | None) -> None:
    session = g.pop("db_session", None)
    if session is not None:
        session.close()


def _make_psycopg_cooperative() -> None:
    # Under gevent, a psycopg2 query would block every greenlet in the process.
    try:
        from gevent import monkey
    except ImportError:  # pragma: no cover - gevent is a dependency
        return
    if monkey.is_module_patched("socket"):
        from psycogreen.gevent import patch_psycopg

        patch_psycopg()


def create_database_if_missing(url: str) -> bool:
    """Create the database named in `url` when it does not exist; True if it was created."""
    target = make_url(url)
    admin = create_engine(target.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            exists = conn.scalar(
                text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": target.database}
            )
            if not exists:
                conn.execute(text(f'CREATE DATABASE "{target.database}"'))
            return not exists
    finally:
        admin.dispose()


def upgrade(url: str) -> None:
    """Create the database if needed and apply every Alembic migration."""
    from alembic import command
    from alembic.config import Config as AlembicConfig

    create_database_if_missing(url)
    cfg = AlembicConfig(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.attributes["database_url"] = url
    command.upgrade(cfg, "head")
