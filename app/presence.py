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
from typing import Any

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


# Publish a batch of deliveries to their users' live nodes in one command: one message per
# notification variant and node, carrying that node's [user, seq] pairs. Looking the nodes
# up and publishing in the same script saves the delivery task a round trip per batch, and
# the outcome counters ride along for the same reason. They count publishes: a task whose
# `sent` mark then fails is retried, and its retry is counted again.
# KEYS: the users' presence keys, then the counters hash.
# ARGV: lapsed-before score, channel prefix, sent and offline counter fields, offline rows
# left out by the caller, the number of variants V, V variant JSON objects, then
# (user position, '[user,seq]', variant) per row.
# Returns the positions of the rows that reached at least one subscriber.
_ROUTE = """
local since, prefix = ARGV[1], ARGV[2]
local first_row = 7 + tonumber(ARGV[6])
local nodes_of = {}
for i = 1, #KEYS - 1 do
  nodes_of[i] = redis.call('zrangebyscore', KEYS[i], since, '+inf')
end
local groups, order = {}, {}
for r = first_row, #ARGV, 3 do
  local variant = ARGV[r + 2]
  for _, node in ipairs(nodes_of[tonumber(ARGV[r])]) do
    local name = variant .. ' ' .. node
    local group = groups[name]
    if not group then
      group = {variant = 6 + tonumber(variant), node = node, to = {}, rows = {}}
      groups[name] = group
      order[#order + 1] = group
    end
    group.to[#group.to + 1] = ARGV[r + 1]
    group.rows[#group.rows + 1] = (r - first_row) / 3 + 1
  end
end
local reached, out = {}, {}
for _, group in ipairs(order) do
  local envelope = '{"t":"deliver","n":' .. ARGV[group.variant] .. ',"to":['
    .. table.concat(group.to, ',') .. ']}'
  if redis.call('publish', prefix .. group.node, envelope) > 0 then
    for _, row in ipairs(group.rows) do
      if not reached[row] then
        reached[row] = true
        out[#out + 1] = row
      end
    end
  end
end
local offline = (#ARGV - first_row + 1) / 3 - #out + tonumber(ARGV[5])
if #out > 0 then redis.call('hincrby', KEYS[#KEYS], ARGV[3], #out) end
if offline > 0 then redis.call('hincrby', KEYS[#KEYS], ARGV[4], offline) end
return out
"""


def route(
    client: redis.Redis,
    variants: list[bytes],
    rows: list[tuple[str, int, int]],
    ttl: float,
    counters: tuple[str, str, str],
    also_offline: int = 0,
) -> list[int]:
    """Publish each (user, seq, variant) row to the live nodes holding the user's sockets.

    `variants` are the notifications' JSON (one per notification and language); rows of
    one variant for one node share a message. `counters` is the counters hash and its
    sent and offline fields; `also_offline` counts rows the caller already found offline.
    Returns the indexes of the rows that reached a subscriber; the others' users are
    offline, or their node vanished since its last heartbeat.
    """
    if not rows and not also_offline:
        return []
    users: dict[str, int] = {}
    args: list[Any] = []
    for user_id, seq, variant in rows:
        position = users.setdefault(user_id, len(users) + 1)
        args += (position, orjson.dumps([user_id, seq]), variant + 1)
    key, sent_field, offline_field = counters
    reached = client.register_script(_ROUTE)(
        keys=[*(presence_key(u) for u in users), key],
        args=[time.time() - ttl, NODE_CHANNEL_PREFIX, sent_field, offline_field, also_offline,
              len(variants), *variants, *args],
    )  # fmt: skip
    return [i - 1 for i in reached]
