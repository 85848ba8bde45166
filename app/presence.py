"""Presence and routing between gateway processes, in Redis.

Each gateway process (a "node") has an id and one Pub/Sub channel. A user's presence is a
ZSET `notifications:presence:{user}` of node ids scored by their last heartbeat; a node
that dies stops heartbeating, so its entries lapse after PRESENCE_TTL_SECONDS (and the
key itself expires). Delivery looks up the nodes holding a user's sockets and publishes
to those nodes only.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import orjson
import redis

PRESENCE_PREFIX = "notifications:presence:"
NODE_CHANNEL_PREFIX = "notifications:node:"


def presence_key(user_id: str) -> str:
    return PRESENCE_PREFIX + user_id


def node_channel(node_id: str) -> str:
    return NODE_CHANNEL_PREFIX + node_id


# Renew many users' presence in one command, dropping lapsed entries first so that a
# lapsed entry of this node counts as created. Returns the 1-based positions of the users
# whose entry was created rather than renewed.
_MARK_ONLINE = """
local created = {}
for i, key in ipairs(KEYS) do
  redis.call('zremrangebyscore', key, '-inf', ARGV[3])
  if redis.call('zadd', key, ARGV[2], ARGV[1]) == 1 then
    created[#created + 1] = i
  end
  redis.call('pexpire', key, ARGV[4])
end
return created
"""


def mark_online(client: redis.Redis, node_id: str, users: Iterable[str], ttl: float) -> list[str]:
    """Record (or renew) that `node_id` holds sockets for `users`.

    Returns the users whose presence on this node had to be created rather than renewed:
    for a heartbeat, those whose presence had lapsed, so deliveries meanwhile may have
    been left in their offline queue.
    """
    users = list(users)
    if not users:
        return []
    now = time.time()
    created = client.register_script(_MARK_ONLINE)(
        keys=[presence_key(u) for u in users], args=[node_id, now, now - ttl, int(ttl * 1000)]
    )
    return [users[i - 1] for i in created]


def mark_offline(client: redis.Redis, node_id: str, user_id: str) -> None:
    client.zrem(presence_key(user_id), node_id)


# Every user's live nodes in one command: a fan-out batch asks for hundreds of users, and
# one call with many keys costs far less to build and parse than a pipeline of as many.
_NODES_FOR = """
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = redis.call('zrangebyscore', key, ARGV[1], '+inf')
end
return out
"""


def nodes_for(client: redis.Redis, users: list[str], ttl: float) -> dict[str, list[str]]:
    """The live nodes holding sockets of each user; users with none are left out."""
    if not users:
        return {}
    found = client.register_script(_NODES_FOR)(
        keys=[presence_key(u) for u in users], args=[time.time() - ttl]
    )
    return {u: nodes for u, nodes in zip(users, found, strict=True) if nodes}


def publish_event(
    client: redis.Redis,
    user_id: str,
    message: dict,
    ttl: float,
    exclude_socket: str | None = None,
) -> int:
    """Push a control message (e.g. "read") to every socket of the user; returns nodes reached."""
    nodes = nodes_for(client, [user_id], ttl).get(user_id, [])
    envelope = orjson.dumps({"t": "event", "u": user_id, "m": message, "x": exclude_socket})
    reached = 0
    for node_id in nodes:
        reached += client.publish(node_channel(node_id), envelope)
    return reached
