"""kombu's Redis transport for the Celery broker, with one command client per channel.

kombu's Redis channel builds a new `redis.Redis` for every message it publishes, every
delivery it books as unacked and every ack (`Channel.conn_or_acquire`), all on the
channel's one connection pool. Building one runs redis-py's table of response callbacks,
about 0.15 ms of CPU on the benchmark box, and a delivery task costs three of them: its
publish, its booking and its ack. Here a channel builds it once and reuses it. Each
command still takes a connection from that pool and gives it back, so the worker's
threads can share the client: none of kombu's callers closes it or pins a connection
to it. Everything else is kombu's own transport.

`install()` makes `redis://` and `rediss://` broker URLs resolve to it; the URL keeps its
scheme, so Flower and `as_uri()` still see a Redis broker.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import redis
from kombu import transport
from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    _command_client: redis.Redis | None = None

    @contextlib.contextmanager
    def conn_or_acquire(self, client: redis.Redis | None = None) -> Iterator[redis.Redis]:
        if client is not None:
            yield client
            return
        # Two threads may both build one the first time; either is as good, one is kept.
        if self._command_client is None:
            self._command_client = self._create_client()
        yield self._command_client


class Transport(kombu_redis.Transport):
    Channel = Channel


def install() -> None:
    """Resolve the Redis URL schemes to this transport in this process.

    Called before the Celery app makes its first connection: kombu caches a scheme's
    transport class once it has resolved it.
    """
    for scheme in ("redis", "rediss"):
        transport.TRANSPORT_ALIASES[scheme] = f"{__name__}:Transport"
