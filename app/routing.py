"""Names shared by the API, the gateway and the workers: task names and the retry mirror's keys.

A leaf module: it imports nothing of the platform's, so `app/` and `tasks/` can both use it.
"""

from __future__ import annotations

import os
import secrets
import socket
from typing import Any

import orjson

WEBSOCKET_TASK = "tasks.delivery.deliver_websocket"
CHANNEL_TASK = "tasks.channels.deliver"

# Every scheduled try: member = task name and arguments, score = when it is due.
RETRY_ZSET = "notifications:retries"
# Who holds a mirrored try's broker message: QUEUED once published, then the id of the
# worker process that received it; LEFT_TO_SWEEPER when no message was published (a delay
# too long for a countdown, a try held back by an open circuit). No entry: nobody knows
# of the try (the reconciler put its member back after Redis lost it).
RETRY_HELD = "notifications:retries:held"
QUEUED = "queued"
LEFT_TO_SWEEPER = "sweeper"
# A worker process's heartbeat key: WORKER_PREFIX + its id, alive while the key is.
WORKER_PREFIX = "notifications:worker:"
# This process's id as a holder of tries: a restarted worker keeps its node name, so the
# pid and a random part tell it from the one that died.
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


# A worker lets go of a try it held: if it still holds it when the task has ended (the task
# failed, or found the try running elsewhere), the sweeper takes it over when it is due.
RELEASE_HELD = """
if redis.call('hget', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('hset', KEYS[1], ARGV[1], ARGV[3])
end
return 0
"""


def retry_member(task: str, args: list[Any]) -> str:
    """A try's member in RETRY_ZSET (and key in RETRY_HELD)."""
    return orjson.dumps({"task": task, "args": args}).decode()


def is_mirrored(task: str, args: list[Any]) -> bool:
    """Whether a task message is a try with a member in RETRY_ZSET: every external-channel
    try, and the retries of websocket deliveries (their first try is not mirrored)."""
    if task == CHANNEL_TASK:
        return True
    return task == WEBSOCKET_TASK and len(args) >= 2 and isinstance(args[1], int) and args[1] > 1
