"""The retry path's plain functions: backoff, Retry-After, signatures, the ZSET sweeper, and
one try's bookkeeping against real PostgreSQL and Redis (a local sender, no Celery)."""

from __future__ import annotations

import hashlib
import hmac
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from sqlalchemy import text

from tasks import retries
from tasks.channels import TASK, Attempts
from tasks.outcome import Outcome
from tasks.stream import process_entries
from tasks.webhook import parse_retry_after, sign


def test_backoff_doubles_from_the_base_and_stops_at_the_cap():
    delays = [retries.backoff(n, base=2, cap=20, jitter=0) for n in range(1, 6)]
    assert delays == [2, 4, 8, 16, 20]


@pytest.mark.parametrize("r", [0.0, 0.5, 0.999])
def test_jitter_stays_within_its_share(r):
    delay = retries.backoff(3, base=1, cap=100, jitter=0.2, rng=lambda: r)
    assert 4 * 0.8 <= delay <= 4 * 1.2


def test_retry_after_in_seconds_or_as_a_date():
    assert parse_retry_after("7") == 7.0
    now = time.time()
    when = format_datetime(datetime.fromtimestamp(now + 30, UTC), usegmt=True)
    assert 28 <= parse_retry_after(when, now=now) <= 31
    assert parse_retry_after("soon") is None


def test_signature_is_hmac_sha256_of_the_body():
    body = b'{"id":"x"}'
    expected = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert sign("s3cret", body) == f"sha256={expected}"


class Sent:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list, float]] = []

    def __call__(self, task: str, args: list, countdown: float) -> None:
        self.calls.append((task, args, countdown))


def test_sweeper_reenqueues_only_overdue_tries_and_each_once_per_rearm(rdb):
    sent = Sent()
    retries.schedule(rdb, "t", [1, 2], delay=-10, send=lambda *a: None)  # message lost
    retries.schedule(rdb, "t", [3, 2], delay=60, send=lambda *a: None)  # not due yet

    assert retries.sweep(rdb, grace=1, rearm=30, send=sent) == 1
    assert sent.calls == [("t", [1, 2], 0)]
    assert retries.sweep(rdb, grace=1, rearm=30, send=sent) == 0  # re-armed, not repeated


def test_a_finished_try_is_not_brought_back_by_a_concurrent_sweep(rdb):
    retries.schedule(rdb, "t", [1, 1], delay=-10, send=lambda *a: None)
    retries.done(rdb, "t", [1, 1])
    sent = Sent()
    retries.sweep(rdb, grace=1, rearm=30, send=sent)
    assert sent.calls == []
    assert rdb.zcard(retries.RETRY_ZSET) == 0


@pytest.fixture
def webhook_delivery(client, auth, pg, rdb):
    r = client.post(
        "/notifications",
        json={"user_id": "u", "title": "t", "body": "b", "channels": ["webhook"],
              "webhook_url": "http://127.0.0.1:9/hook"},
        headers=auth,
    )  # fmt: skip
    assert r.status_code == 202
    ids: list[int] = []
    process_entries(pg, list(rdb.xrange("notifications:stream")), lambda _, d, __: ids.extend(d), 1)
    return ids[0]


def _attempts(app, rdb, pg, outcomes: list[Outcome], sent: Sent) -> tuple[Attempts, list]:
    calls: list = []

    def sender(job, cfg):
        calls.append(job.attempt)
        return outcomes.pop(0)

    return Attempts(app.config["NOTIFIER"], pg, rdb, sender=sender, send=sent), calls


def test_a_replayed_try_sends_nothing_twice(app, rdb, pg, webhook_delivery):
    sent = Sent()
    attempts, calls = _attempts(app, rdb, pg, [Outcome.retry("HTTP 500")], sent)

    assert attempts.run(webhook_delivery, 1).state == "retry"
    assert attempts.run(webhook_delivery, 1).state == "done"  # the broker handed it out again

    assert calls == [1]
    # The follow-up is scheduled again by the replay (a harmless second copy of try 2).
    assert [args for _, args, _ in sent.calls] == [[webhook_delivery, 2], [webhook_delivery, 2]]
    assert rdb.zscore(retries.RETRY_ZSET, retries.member(TASK, [webhook_delivery, 1])) is None
    assert rdb.zscore(retries.RETRY_ZSET, retries.member(TASK, [webhook_delivery, 2])) is not None


def test_a_try_still_running_elsewhere_is_left_alone(app, rdb, pg, webhook_delivery):
    with pg.begin() as conn:
        conn.execute(
            text("INSERT INTO delivery_attempts (delivery_id, channel, attempt, started_at) "
                 "VALUES (:d, 'webhook', 1, now())"),
            {"d": webhook_delivery},
        )  # fmt: skip
    attempts, calls = _attempts(app, rdb, pg, [], Sent())
    assert attempts.run(webhook_delivery, 1).state == "running"
    assert calls == []


def test_a_try_whose_worker_died_is_recorded_lost_and_the_next_one_scheduled(
    app, rdb, pg, webhook_delivery
):
    lease = app.config["NOTIFIER"].ATTEMPT_LEASE_SECONDS
    with pg.begin() as conn:
        conn.execute(
            text("INSERT INTO delivery_attempts (delivery_id, channel, attempt, started_at) "
                 "VALUES (:d, 'webhook', 1, :t)"),
            {"d": webhook_delivery, "t": datetime.now(UTC) - timedelta(seconds=lease + 1)},
        )  # fmt: skip
    sent = Sent()
    attempts, calls = _attempts(app, rdb, pg, [], sent)
    result = attempts.run(webhook_delivery, 1)
    assert (result.state, result.next_attempt) == ("lost", 2)
    assert calls == []  # try 1 is never sent again
    assert [args for _, args, _ in sent.calls] == [[webhook_delivery, 2]]


def test_permanent_failure_is_dead_lettered_with_its_history(app, client, auth, rdb, pg,
                                                             webhook_delivery):  # fmt: skip
    attempts, _ = _attempts(app, rdb, pg, [Outcome.permanent("HTTP 410: gone")], Sent())
    assert attempts.run(webhook_delivery, 1).state == "failed"

    listing = client.get("/dlq?channel=webhook", headers=auth).json["dead_letters"]
    [letter] = listing
    assert (letter["delivery_id"], letter["attempts"]) == (webhook_delivery, 1)
    full = client.get(f"/dlq/{letter['id']}", headers=auth).json
    assert full["history"][0]["outcome"] == "failed"
    assert full["history"][0]["error"] == "HTTP 410: gone"
    assert client.get("/dlq?channel=email", headers=auth).json["dead_letters"] == []


def _metric_samples(client, auth) -> dict[str, float]:
    text_out = client.get("/metrics").get_data(as_text=True)
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text_out.splitlines()
        if line and not line.startswith("#")
    }


def test_tries_retries_and_dead_letters_are_counted_in_the_metrics(
    app, client, auth, rdb, pg, webhook_delivery
):
    attempts, _ = _attempts(
        app, rdb, pg, [Outcome.retry("HTTP 503"), Outcome.permanent("HTTP 410: gone")], Sent()
    )
    assert attempts.run(webhook_delivery, 1).state == "retry"
    assert attempts.run(webhook_delivery, 2).state == "failed"
    assert attempts.run(webhook_delivery, 2).state == "done"  # a replay is not counted again

    m = _metric_samples(client, auth)
    assert m['notifier_deliveries_total{channel="webhook",outcome="retry"}'] == 1
    assert m['notifier_deliveries_total{channel="webhook",outcome="failed"}'] == 1
    assert m['notifier_retries_scheduled_total{channel="webhook"}'] == 1
    assert m['notifier_dead_letters_total{source="webhook"}'] == 1
    assert m["notifier_notifications_accepted_total"] == 1
