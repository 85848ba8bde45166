"""The autocommit connections of the hot paths (app.db.autocommit), on real PostgreSQL."""

from __future__ import annotations

from sqlalchemy import text

from app import db


def test_a_statement_on_an_autocommit_connection_is_committed_without_commit(database_url):
    engine = db.make_engine(database_url)
    try:
        with db.autocommit(engine) as conn:
            conn.execute(text("INSERT INTO users (id) VALUES ('autocommit-probe')"))
            # Visible to another connection while this one is still open: no transaction.
            with engine.connect() as other:
                assert (
                    other.scalar(text("SELECT count(*) FROM users WHERE id = 'autocommit-probe'"))
                    == 1
                )
    finally:
        db.dispose(engine)


def test_autocommit_leaves_the_engines_own_connections_transactional(database_url):
    engine = db.make_engine(database_url)
    try:
        with db.autocommit(engine):
            pass
        with engine.connect() as conn:
            conn.execute(text("INSERT INTO users (id) VALUES ('rolled-back')"))
            conn.rollback()
            assert conn.scalar(text("SELECT count(*) FROM users WHERE id = 'rolled-back'")) == 0
    finally:
        db.dispose(engine)


def test_one_autocommit_pool_per_engine_at_half_its_size(database_url):
    engine = db.make_engine(database_url, pool_size=8)
    try:
        with db.autocommit(engine) as first, db.autocommit(engine) as second:
            assert first.engine is second.engine
            assert first.engine is not engine
            assert first.engine.pool.size() == 4
    finally:
        db.dispose(engine)
