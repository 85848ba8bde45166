"""Celery wired to the Flask app: every task runs inside an app context."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task
from celery.signals import beat_init, setup_logging, worker_process_init, worker_ready
from flask import Flask

from app import broker, heap, logs

log = logging.getLogger(__name__)


def init_app(app: Flask) -> Celery:
    cfg = app.config["NOTIFIER"]

    class FlaskTask(Task):
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app.app_context():
                return self.run(*args, **kwargs)

    def _setup_logging(loglevel: Any = None, **_: Any) -> None:
        # Connected, this replaces Celery's own root-logger setup: the same format as the API,
        # Celery's `-l` for everything else, LOG_LEVEL for the platform's loggers.
        logs.configure(cfg.LOG_LEVEL, cfg.LOG_FORMAT, root_level=loglevel or "INFO")

    setup_logging.connect(_setup_logging, weak=False, dispatch_uid="notifier-logging")

    def _worker_ready(**_: Any) -> None:
        # The platform's workers run their tasks in this process (threads and solo pools).
        from tasks import delivery

        try:
            delivery.warm_up(app.extensions["db.engine"])
        except Exception:
            log.warning("could not warm up the database connections", exc_info=True)
        heap.freeze_startup_objects()

    worker_ready.connect(_worker_ready, weak=False, dispatch_uid="notifier-worker-ready")
    # A prefork child or beat: set up, so its set-up objects are frozen.
    for signal in (worker_process_init, beat_init):
        signal.connect(_freeze, weak=False, dispatch_uid=f"notifier-freeze-{signal.name}")

    broker.install()
    celery_app = Celery(app.name, task_cls=FlaskTask)
    celery_app.config_from_object("celeryconfig")
    celery_app.conf.broker_url = cfg.broker_url
    celery_app.conf.beat_schedule = {
        "stream-unstreamed-notifications": {
            "task": "tasks.outbox.sweep_unstreamed",
            "schedule": cfg.OUTBOX_SWEEP_SECONDS,
        },
        "stream-consumer-watchdog": {
            "task": "tasks.stream.watchdog",
            "schedule": cfg.STREAM_WATCHDOG_SECONDS,
        },
        "trim-stream": {
            "task": "tasks.stream.trim",
            "schedule": cfg.STREAM_TRIM_SECONDS,
        },
        "sweep-retries": {
            "task": "tasks.retries.sweep",
            "schedule": cfg.RETRY_SWEEP_SECONDS,
        },
        "escalate-unacked": {
            "task": "tasks.escalation.escalate",
            "schedule": cfg.ESCALATION_SWEEP_SECONDS,
        },
        "purge-expired-idempotency-keys": {
            "task": "tasks.outbox.purge_idempotency_keys",
            "schedule": 3600.0,
        },
    }
    celery_app.conf.imports = (
        "tasks.outbox",
        "tasks.stream",
        "tasks.delivery",
        "tasks.channels",
        "tasks.retries",
        "tasks.escalation",
    )
    celery_app.set_default()
    app.extensions["celery"] = celery_app
    return celery_app


def _freeze(**_: Any) -> None:
    heap.freeze_startup_objects()
