"""Celery wired to the Flask app: every task runs inside an app context."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery import Celery, Task
from celery.signals import (
    beat_init,
    setup_logging,
    task_postrun,
    task_received,
    worker_process_init,
    worker_ready,
)
from flask import Flask

from app import broker, heap, logs, routing

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

    def _heartbeat() -> None:
        # The retry sweeper takes the tries this process holds as lost once the key lapses.
        client = app.extensions["redis"]
        key = routing.WORKER_PREFIX + routing.WORKER_ID
        while True:
            try:
                client.set(key, "1", px=int(cfg.WORKER_HEARTBEAT_SECONDS * 3000))
            except Exception:
                log.warning("worker heartbeat failed", exc_info=True)
            time.sleep(cfg.WORKER_HEARTBEAT_SECONDS)

    def _start_heartbeat(**_: Any) -> None:
        threading.Thread(target=_heartbeat, name="worker-heartbeat", daemon=True).start()

    worker_ready.connect(_start_heartbeat, weak=False, dispatch_uid="notifier-worker-heartbeat")

    def _received(request: Any = None, **_: Any) -> None:
        # A try this worker took (maybe to hold until its countdown ends) is not lost while
        # this process lives: the sweeper must not send it again.
        if request is None or not routing.is_mirrored(request.name, list(request.args or ())):
            return
        try:
            app.extensions["redis"].hset(
                routing.RETRY_HELD,
                routing.retry_member(request.name, list(request.args)),
                routing.WORKER_ID,
            )
        except Exception:
            # Left "queued": the sweeper leaves it alone unless Redis lost it, which the
            # reconciler repairs.
            log.warning("could not record that this worker holds a try", exc_info=True)

    task_received.connect(_received, weak=False, dispatch_uid="notifier-retry-held")

    def _released(task: Any = None, args: Any = None, **_: Any) -> None:
        # A try that ran to its end called done(), which dropped the entry; one that failed
        # (PostgreSQL away mid-try) or found the try running elsewhere did not, and a live
        # holder would keep the sweeper off it for good.
        name = getattr(task, "name", "")
        if not routing.is_mirrored(name, list(args or ())):
            return
        try:
            app.extensions["redis"].eval(
                routing.RELEASE_HELD, 1, routing.RETRY_HELD,
                routing.retry_member(name, list(args)), routing.WORKER_ID,
                routing.LEFT_TO_SWEEPER,
            )  # fmt: skip
        except Exception:
            log.warning("could not hand a try back to the sweeper", exc_info=True)

    task_postrun.connect(_released, weak=False, dispatch_uid="notifier-retry-released")
    # A prefork child or beat: set up, so its set-up objects are frozen.
    for signal in (worker_process_init, beat_init):
        signal.connect(_freeze, weak=False, dispatch_uid=f"notifier-freeze-{signal.name}")

    broker.install()
    celery_app = Celery(app.name, task_cls=FlaskTask)
    celery_app.config_from_object("celeryconfig")
    celery_app.conf.broker_url = cfg.broker_url
    celery_app.conf.beat_schedule = {
        "stream-scheduled-notifications": {
            "task": "tasks.outbox.stream_scheduled",
            "schedule": cfg.OUTBOX_SWEEP_SECONDS,
        },
        "reconcile-with-postgres": {
            "task": "tasks.reconcile.reconcile",
            "schedule": cfg.RECONCILE_SECONDS,
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
        "tasks.reconcile",
    )
    celery_app.set_default()
    app.extensions["celery"] = celery_app
    return celery_app


def _freeze(**_: Any) -> None:
    heap.freeze_startup_objects()
