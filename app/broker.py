"""Celery's Redis broker transport, with one command client per channel.

kombu's Redis channel builds a new `redis.Redis` for every message it publishes, every
delivery it books as unacked and every ack (`Channel.conn_or_acquire`), all on the
channel's one connection pool. Building one runs redis-py's table of response callbacks,
about 0.15 ms of CPU on the benchmark box, and a delivery task costs three of them: its
publish, its booking and its ack. Here a channel builds it once and reuses it; the
connections still come from, and go back to, the same pool, and a `redis.Redis` is safe
to share between the worker's threads. Everything else is kombu's own transport.

Selected with `broker_transport` in celeryconfig.py; the broker URL stays `redis://`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import redis
from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    _command_client: redis.Redis | None = None

    @contextlib.contextmanager
    def conn_or_acquire(self, client: redis.Redis | None = None) -> Iterator[redis.Redis]:
        if client is not None:
            yield client
            return
        if self._command_client is None:
            self._command_client = self._create_client()
        yield self._command_client


class Transport(kombu_redis.Transport):
    Channel = Channel
