"""The process's Redis client."""

from __future__ import annotations

import redis
from flask import Flask, current_app

# Every blocking Redis call in the platform blocks for less than this.
SOCKET_TIMEOUT_SECONDS = 5.0


# A burst of sockets connecting at once must wait for a connection, not fail: a blocking
# pool queues callers (cooperatively under gevent) where the default pool raises.
POOL_SIZE = 64
POOL_WAIT_SECONDS = 10.0


def make_redis(url: str) -> redis.Redis:
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=POOL_SIZE,
        timeout=POOL_WAIT_SECONDS,
        socket_timeout=SOCKET_TIMEOUT_SECONDS,
        socket_connect_timeout=2.0,
        health_check_interval=30,
        decode_responses=True,
    )
    return redis.Redis(connection_pool=pool)


def init_app(app: Flask) -> None:
    app.extensions["redis"] = make_redis(app.config["NOTIFIER"].REDIS_URL)


def client() -> redis.Redis:
    return current_app.extensions["redis"]
