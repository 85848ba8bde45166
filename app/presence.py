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


def mark_online(client: redis.Redis, node_id: str, users: Iterable[str], ttl: float) -> list[str]:
    """Record (or renew) that `node_id` holds sockets for `users`.

    Returns the users whose presence on this node had to be created rather than renewed:
    for a heartbeat, those whose presence had lapsed, so deliveries meanwhile may have
    been left in their offline queue.
    """
    now = time.time()
    users = list(users)
    pipe = client.pipeline(transaction=False)
    for user_id in users:
        key = presence_key(user_id)
        # Drop lapsed entries first, so a lapsed entry of this node counts as created.
        pipe.zremrangebyscore(key, "-inf", now - ttl)
        pipe.zadd(key, {node_id: now})
        pipe.pexpire(key, int(ttl * 1000))
    results = pipe.execute()
    return [u for u, added in zip(users, results[1::3], strict=True) if added]


def mark_offline(client: redis.Redis, node_id: str, user_id: str) -> None:
    client.zrem(presence_key(user_id), node_id)


def nodes_for(client: redis.Redis, users: list[str], ttl: float) -> dict[str, list[str]]:
    """The live nodes holding sockets of each user; users with none are left out."""
    if not users:
        return {}
    floor = time.time() - ttl
    pipe = client.pipeline(transaction=False)
    for user_id in users:
        pipe.zrangebyscore(presence_key(user_id), floor, "+inf")
    return {u: nodes for u, nodes in zip(users, pipe.execute(), strict=True) if nodes}


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
