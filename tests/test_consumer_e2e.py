"""Stream consumers as real Celery processes: SIGKILL recovery and priority lanes."""

from __future__ import annotations

import uuid

import pytest
import redis
from sqlalchemy import text

from app import create_app, db
from tasks.stream import watchdog
from tests.helpers import wait_until
from tests.platform import Client, notify, post

pytestmark = pytest.mark.slow

STREAM, GROUP = "notifications:stream", "notifier_group"


@pytest.fixture(autouse=True)
def _fresh_processes(platform, platform_settings):
    # Each test starts its own processes and names its own consumers.
    platform.stop_all()
    client = redis.Redis.from_url(platform_settings["REDIS_URL"])
    client.flushdb()
    client.close()


def start_consumer(platform_settings, name: str) -> None:
    """What beat's watchdog does, for one consumer name (run here so the test picks the name)."""
    flask_app = create_app({**platform_settings, "STREAM_CONSUMERS": name})
    with flask_app.app_context():
        watchdog.run()
    db.dispose(flask_app.extensions["db.engine"])


def _pending_of(client: redis.Redis, consumer: str) -> int:
    try:
        info = client.xpending(STREAM, GROUP)
    except redis.ResponseError:
        return 0
    return next((int(c["pending"]) for c in info["consumers"] if c["name"] == consumer), 0)


def test_sigkilled_consumers_pending_entries_are_claimed_and_delivered_by_another(
    platform, platform_settings, rplat, pgplat
):
    port, _ = platform.gateway()
    platform.delivery_worker(concurrency=1)
    doomed = platform.consumer_worker()
    start_consumer(platform_settings, "consumer-a")
    u = f"user-{uuid.uuid4().hex[:8]}"

    # Hold the deliveries table so consumer-a reads the entries and then blocks on them.
    blocker = pgplat.connect()
    tx = blocker.begin()
    blocker.execute(text("LOCK TABLE deliveries IN ACCESS EXCLUSIVE MODE"))
    ids = [notify(port, u, body=str(i)) for i in range(5)]
    wait_until(lambda: _pending_of(rplat, "consumer-a") == 5, timeout=30)

    platform.kill(doomed)
    tx.rollback()
    blocker.close()

    platform.consumer_worker()
    start_consumer(platform_settings, "consumer-b")
    client = Client(port, u)
    try:
        frames = client.wait_for(5, timeout=60)
    finally:
        client.close()
    assert sorted(f["id"] for f in frames) == sorted(ids)
    wait_until(lambda: _pending_of(rplat, "consumer-a") == 0, timeout=10)
    with pgplat.connect() as conn:
        assert (
            conn.scalar(text("SELECT count(*) FROM deliveries WHERE user_id = :u"), {"u": u}) == 5
        )


def test_high_priority_overtakes_a_low_priority_backlog(platform, platform_settings, rplat):
    settings = {"DELIVERY_BATCH": "10"}
    port, _ = platform.gateway(**settings)
    platform.consumer_worker(**settings)
    start_consumer(platform_settings, "consumer-c")
    u = f"user-{uuid.uuid4().hex[:8]}"
    client = Client(port, u)
    try:
        # No delivery worker yet: the low lane fills with 60 tasks of 10 deliveries each.
        for _ in range(6):
            status, _ = post(port, "/notifications", {
                "user_ids": [u] + [f"{u}-other-{i}" for i in range(99)],
                "title": "low", "body": "b", "priority": "low",
            })  # fmt: skip
            assert status == 202
        wait_until(lambda: rplat.llen("low") >= 50, timeout=30)
        high = notify(port, u, title="high", priority="high")
        wait_until(lambda: rplat.llen("high") >= 1, timeout=30)

        platform.delivery_worker(concurrency=1, **settings)
        frames = client.wait_for(7, timeout=60)
    finally:
        client.close()
    order = [f["id"] for f in frames]
    # The user's 6 low notifications sit in 6 of the 60 low tasks; the high one is taken first.
    assert order.index(high) <= 1, [f["title"] for f in frames]
