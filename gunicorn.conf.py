"""gunicorn settings for the API and WebSocket gateway (`gunicorn -c gunicorn.conf.py wsgi:app`)."""

import gc
import os
import shutil
import tempfile

# Loopback unless told otherwise: a development platform is not on the network by accident.
bind = f"{os.environ.get('BIND_HOST', '127.0.0.1')}:{os.environ.get('PORT', '8000')}"
# gevent: each socket is a greenlet, so one process holds thousands of idle WebSockets.
worker_class = "gevent"
# Two processes, or half the cores where there are more: `make run` puts the stream
# consumer, the delivery workers, PostgreSQL and Redis on the same machine. On the 2-core
# benchmark box one process and two measured alike for latency at 500/s, but one process
# capped 10-recipient POSTs at 1,866 deliveries/s where two sustained 1,972/s
# (docs/BENCHMARKS.md).
workers = int(os.environ.get("WEB_CONCURRENCY") or max(2, (os.cpu_count() or 2) // 2))
worker_connections = int(os.environ.get("WORKER_CONNECTIONS", "12000"))
# Long enough for load balancers and benchmark clients that reuse connections.
keepalive = 75
timeout = 60
graceful_timeout = 10
accesslog = os.environ.get("ACCESS_LOG") or None
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()

# prometheus_client's multiprocess mode: every worker writes its metrics to files in one
# directory, which /metrics in any worker sums. It must be set before a worker imports
# prometheus_client; a fresh directory per server start keeps dead runs out of the sums.
_OWN_METRICS_DIR = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if _OWN_METRICS_DIR:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="notifier-metrics-")

if os.environ.get("LOG_FORMAT", "text") == "json":
    logconfig_dict = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "app.logs.JsonFormatter"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": "INFO", "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {
                "level": loglevel.upper(),
                "handlers": ["stderr"],
                "propagate": False,
            },
            "gunicorn.access": {"level": "INFO", "handlers": ["stderr"], "propagate": False},
        },
    }


def on_starting(server):
    path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    if not _OWN_METRICS_DIR and os.path.isdir(path):
        for name in os.listdir(path):
            os.remove(os.path.join(path, name))
    os.makedirs(path, exist_ok=True)


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    if _OWN_METRICS_DIR:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)


# A gateway process holds thousands of long-lived sockets (a few hundred objects each).
# With CPython's default thresholds a connect storm of 5,000 sockets set off 9-10 full
# collections per process, the longest 0.5 s with every socket stalled, 3.5 s of CPU in
# all; with these, none, and 1 s in all (docs/BENCHMARKS.md). Short-lived garbage still
# goes in the young generations.
GC_THRESHOLDS = (10_000, 20, 100)


def post_fork(server, worker):
    gc.set_threshold(*GC_THRESHOLDS)


def post_worker_init(worker):
    # The app is loaded: its objects live as long as the process (app/heap.py).
    from app import heap

    heap.freeze_startup_objects()
