"""The notifications Redis Stream: what an entry holds, appending, and the backlog reading."""

from __future__ import annotations

import threading
import time
from typing import Any

import orjson
import redis


def entry_fields(notification: dict[str, Any], restreamed: bool = False) -> dict[str, str]:
    """The stream entry for a notification row: its id, priority and the full payload.

    `restreamed` marks an entry the reconciler streams again after the first was lost: the
    consumer then enqueues the notification's pending deliveries again too.
    """
    payload = {
        key: (value.isoformat() if hasattr(value, "isoformat") else value)
        for key, value in notification.items()
        if key not in {"streamed_at", "status"}
    }
    payload["id"] = str(notification["id"])
    fields = {
        "id": payload["id"],
        "priority": str(notification["priority"]),
        # Lets the consumer size its work (and put high priority first) before decoding.
        "recipients": str(len(notification.get("recipients") or ())),
        "payload": orjson.dumps(payload).decode(),
    }
    if restreamed:
        fields["restreamed"] = "1"
    return fields


def decode_entry(fields: dict[str, str]) -> dict[str, Any]:
    return orjson.loads(fields["payload"])


def backlog(client: redis.Redis, stream: str, group: str) -> int:
    """Entries not yet processed by `group`: never delivered to it plus delivered but un-acked.

    Before the group exists every entry in the stream counts.
    """
    try:
        groups = client.xinfo_groups(stream)
    except redis.ResponseError:  # no such key: nothing waiting
        return 0
    for info in groups:
        if info["name"] == group:
            lag = info.get("lag")
            if lag is None:  # Redis cannot tell after some deletions; assume the worst
                lag = client.xlen(stream)
            return int(lag) + int(info["pending"])
    return int(client.xlen(stream))


class BacklogGauge:
    """A per-process backlog reading, refreshed at most every `max_age` seconds."""

    def __init__(self, client: redis.Redis, stream: str, group: str, max_age: float) -> None:
        self._client = client
        self._stream = stream
        self._group = group
        self._max_age = max_age
        self._value = 0
        self._read_at = float("-inf")
        self._lock = threading.Lock()

    def current(self) -> int:
        now = time.monotonic()
        if now - self._read_at >= self._max_age:
            with self._lock:
                if now - self._read_at >= self._max_age:
                    self._value = backlog(self._client, self._stream, self._group)
                    self._read_at = now
        return self._value
