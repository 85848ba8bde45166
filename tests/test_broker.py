"""The broker transport (app/broker.py) and the consumer's publishes through it, on real Redis."""

from __future__ import annotations

import base64
import json

from app.broker import Channel
from tasks.delivery import TASK
from tasks.stream import celery_enqueue


def _queued(rdb, queue: str) -> list[dict]:
    return [json.loads(raw) for raw in rdb.lrange(queue, 0, -1)]


def test_a_broker_channel_reuses_one_command_client(app):
    celery_app = app.extensions["celery"]
    with celery_app.connection_for_write() as conn:
        channel = conn.default_channel
        assert isinstance(channel, Channel)
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second
            assert first.ping()
        with conn.channel() as other, other.conn_or_acquire() as third:
            assert third is not first


def test_enqueued_deliveries_land_on_their_lane_with_every_id(app, rdb):
    ids = list(range(1, 501))
    with app.app_context():
        celery_enqueue("high", ids)
        celery_enqueue("default", [7])

    [high] = _queued(rdb, "high")
    assert high["headers"]["task"] == TASK
    args, _, _ = json.loads(base64.b64decode(high["body"]))
    assert args == [ids]
    # Flower shows the short form, not a repr of 500 ids.
    assert high["headers"]["argsrepr"] == "([1, ..., 500] (500 ids),)"

    [default] = _queued(rdb, "default")
    assert json.loads(base64.b64decode(default["body"]))[0] == [[7]]
    assert default["headers"]["argsrepr"] == "([7],)"
