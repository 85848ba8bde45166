"""Celery settings (lower-case names). Broker URL and beat intervals come from app.config.Config."""

from kombu import Queue

task_serializer = "json"
accept_content = ["json"]
result_backend = None
task_ignore_result = True
timezone = "UTC"
enable_utc = True

# A task is acknowledged after it ran, and given back if its worker dies mid-task.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
broker_connection_retry_on_startup = True
# Countdowns stay far below this; anything longer belongs to the retry ZSET sweeper.
# queue_order_strategy "priority": a worker drains its queues in the order given to -Q
# (high, default, low), so a high-priority delivery never waits behind a low backlog.
# max_connections: a channel's pool, above the channels worker's 16 threads (kombu's default
# of 10 raises rather than waits when more threads ack at once).
broker_transport_options = {
    "visibility_timeout": 3600,
    "queue_order_strategy": "priority",
    "max_connections": 32,
}

task_default_queue = "default"
# "channels" (webhook, email) has its own worker: a slow or failing receiver ties up only
# those threads, never the ones pushing to sockets.
task_queues = (Queue("default"), Queue("high"), Queue("low"), Queue("stream"), Queue("channels"))
task_routes = {
    "tasks.stream.consume_stream": {"queue": "stream"},
    "tasks.stream.watchdog": {"queue": "high"},
    "tasks.stream.trim": {"queue": "default"},
    "tasks.outbox.*": {"queue": "default"},
    "tasks.delivery.*": {"queue": "default"},
    "tasks.channels.*": {"queue": "channels"},
    "tasks.retries.*": {"queue": "high"},
    "tasks.reconcile.*": {"queue": "high"},
    "tasks.escalation.*": {"queue": "high"},
}
