"""gunicorn settings for the API and WebSocket gateway (`gunicorn -c gunicorn.conf.py wsgi:app`)."""

import os

bind = f"{os.environ.get('BIND_HOST', '0.0.0.0')}:{os.environ.get('PORT', '8000')}"
# gevent: each socket is a greenlet, so one process holds thousands of idle WebSockets.
worker_class = "gevent"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_connections = int(os.environ.get("WORKER_CONNECTIONS", "12000"))
# Long enough for load balancers and benchmark clients that reuse connections.
keepalive = 75
timeout = 60
graceful_timeout = 10
accesslog = os.environ.get("ACCESS_LOG") or None
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()
