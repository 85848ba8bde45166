"""Application factory: config, PostgreSQL, Redis, Celery, the ingest writer, blueprints."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from flask import Flask

from app import logs
from app.config import Config


def create_app(overrides: Mapping[str, Any] | None = None) -> Flask:
    """Build the Flask app; `overrides` replace settings read from the environment."""
    cfg = Config.from_env(overrides=overrides)
    cfg.refuse_unsafe()
    logs.configure(cfg.LOG_LEVEL, cfg.LOG_FORMAT)

    app = Flask(__name__)
    app.config["NOTIFIER"] = cfg
    app.config["MAX_CONTENT_LENGTH"] = cfg.MAX_CONTENT_LENGTH
    app.json.sort_keys = False  # type: ignore[attr-defined]

    from app import auth, cli, db, errors, redis_client, worker
    from app.ingest import IngestWriter
    from app.stream import BacklogGauge
    from app.template_store import TemplateStore

    db.init_app(app)
    redis_client.init_app(app)
    errors.init_app(app)
    auth.init_app(app)
    worker.init_app(app)
    cli.init_app(app)

    app.extensions["ingest.writer"] = IngestWriter(
        app.extensions["db.engine"],
        app.extensions["redis"],
        cfg.STREAM_KEY,
        cfg.INGEST_BATCH_MAX,
        timedelta(seconds=cfg.IDEMPOTENCY_TTL_SECONDS),
        max_wait=cfg.RECONCILE_GRACE_SECONDS / 2,
    )
    app.extensions["templates"] = TemplateStore(
        app.extensions["db.engine"], cfg.TEMPLATE_CACHE_SECONDS
    )
    app.extensions["stream.backlog"] = BacklogGauge(
        app.extensions["redis"], cfg.STREAM_KEY, cfg.STREAM_GROUP, cfg.BACKLOG_CHECK_SECONDS
    )

    from app import gateway
    from app.api import dlq, health, inbox, metrics, notifications, templates, tokens, users

    app.register_blueprint(health.bp)
    app.register_blueprint(metrics.bp)
    app.register_blueprint(notifications.bp)
    app.register_blueprint(inbox.bp)
    app.register_blueprint(tokens.bp)
    app.register_blueprint(users.bp)
    app.register_blueprint(dlq.bp)
    app.register_blueprint(templates.bp)
    gateway.init_app(app)
    return app
