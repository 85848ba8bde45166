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

from app.routing import (
    LEFT_TO_SWEEPER,
    RELEASE_HELD,
    RETRY_HELD,
    RETRY_ZSET,
    WORKER_PREFIX,
)
from tasks import circuit, retries
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


def _held_by(rdb, task: str, args: list, worker: str) -> None:
    rdb.hset(RETRY_HELD, retries.member(task, args), worker)


def test_sweeper_reenqueues_only_overdue_lost_tries_and_each_once_per_rearm(rdb):
    sent = Sent()
    retries.schedule(rdb, "t", [1, 2], delay=-10, send=lambda *a: None)
    _held_by(rdb, "t", [1, 2], "a-worker-that-died")  # its heartbeat key never existed
    retries.schedule(rdb, "t", [3, 2], delay=60, send=lambda *a: None)  # not due yet

    assert retries.sweep(rdb, grace=1, rearm=30, send=sent) == 1
    assert sent.calls == [("t", [1, 2], 0)]
    assert retries.sweep(rdb, grace=1, rearm=30, send=sent) == 0  # re-armed, not repeated


def test_sweeper_leaves_an_overdue_try_that_is_only_waiting_in_a_queue(rdb):
    sent = Sent()
    retries.schedule(rdb, "t", [1, 2], delay=-10, send=lambda *a: None)

    assert retries.sweep(rdb, grace=1, rearm=30, send=sent) == 0
    assert sent.calls == []


def test_sweeper_leaves_a_try_held_by_a_live_worker_and_takes_it_once_the_worker_is_gone(rdb):
    sent = Sent()
    retries.schedule(rdb, "t", [1, 2], delay=-10, send=lambda *a: None)
    _held_by(rdb, "t", [1, 2], "w1")
    rdb.set(WORKER_PREFIX + "w1", "1", px=60_000)

    assert retries.sweep(rdb, grace=1, rearm=30, send=sent) == 0
    rdb.delete(WORKER_PREFIX + "w1")  # its heartbeat lapsed
    assert retries.sweep(rdb, grace=1, rearm=30, send=sent) == 1
    assert sent.calls == [("t", [1, 2], 0)]


def test_sweeper_sends_a_member_nobody_holds(rdb):
    sent = Sent()
    # What the reconciler leaves after Redis lost the broker's message with the mirror.
    rdb.zadd(RETRY_ZSET, {retries.member("t", [5, 1]): 0})

    assert retries.sweep(rdb, grace=1, rearm=30, send=sent) == 1
    assert rdb.hget(RETRY_HELD, retries.member("t", [5, 1])) == "queued"


def test_sweeper_reaches_lost_tries_behind_more_than_a_batch_of_waiting_ones(rdb, monkeypatch):
    monkeypatch.setattr(retries, "SWEEP_BATCH", 10)
    for i in range(25):
        retries.schedule(rdb, "t", [i, 1], delay=-100 + i, send=lambda *a: None)
    _held_by(rdb, "t", [24, 1], "gone")
    sent = Sent()

    assert retries.sweep(rdb, grace=1, rearm=30, send=sent) == 1
    assert sent.calls == [("t", [24, 1], 0)]


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
    process_entries(
        pg, list(rdb.xrange("notifications:stream")), lambda _, d, *__: ids.extend(d), 1
    )
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
    hook = "http://127.0.0.1:9/hook"
    assert [args for _, args, _ in sent.calls] == [
        [webhook_delivery, 2, hook],  # retries name their endpoint (for its circuit)
        [webhook_delivery, 2],
    ]
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


def _failing_hook(client, auth, pg, rdb, url: str) -> int:
    r = client.post("/notifications", json={"user_id": f"u-{url[-4:]}", "title": "t", "body": "b",
                                            "channels": ["webhook"], "webhook_url": url},
                    headers=auth)  # fmt: skip
    assert r.status_code == 202
    ids: list[int] = []
    process_entries(
        pg, list(rdb.xrange("notifications:stream")), lambda _, d, *__: ids.extend(d), 1
    )
    rdb.delete("notifications:stream")
    return ids[-1]


def test_a_webhook_that_keeps_failing_opens_its_circuit_and_tries_fail_fast_unsent(
    make_app, client, auth, rdb, pg
):
    url = "http://127.0.0.1:9/down"
    app = make_app(CIRCUIT_FAILURES=2, CIRCUIT_OPEN_SECONDS=30, RETRY_BASE_SECONDS=0.1)
    first, second, third = (_failing_hook(client, auth, pg, rdb, url) for _ in range(3))
    sent = Sent()
    attempts, calls = _attempts(app, rdb, pg, [Outcome.retry("HTTP 503")] * 2, sent)

    assert attempts.run(first, 1).state == "retry"
    second_result = attempts.run(second, 1)  # the second failure in a row opens the circuit
    assert second_result.state == "retry"
    assert second_result.delay >= 29  # its retry waits for the circuit, not 0.1 s
    assert calls == [1, 1]

    held = attempts.run(third, 1)  # the circuit is open: not sent, counted as a try
    assert (held.state, held.next_attempt, held.endpoint) == ("held", 2, url)
    assert 29 <= held.delay <= 61
    assert calls == [1, 1]
    member = retries.member(TASK, [third, 2, url])
    grace = app.config["NOTIFIER"].RETRY_SWEEP_GRACE_SECONDS
    due = rdb.zscore(retries.RETRY_ZSET, member) + grace  # held tries live in the ZSET only
    assert held.delay == pytest.approx(due - time.time(), abs=2)
    with pg.connect() as conn:
        outcome, error, waits = conn.execute(
            text("SELECT outcome, error, extract(epoch FROM next_retry_at - finished_at) "
                 "FROM delivery_attempts WHERE delivery_id = :d"),
            {"d": third},
        ).one()  # fmt: skip
    assert (outcome, "circuit is open" in error) == ("retry", True)
    # PostgreSQL has the hold as the next try's due time, as the reconciler reads it.
    assert float(waits) == pytest.approx(held.delay, abs=1)
    metrics = _metric_samples(client, auth)
    assert metrics["notifier_circuits_opened_total"] == 1
    assert metrics['notifier_deliveries_total{channel="webhook",outcome="held"}'] == 1


def test_a_receiver_that_stays_down_ends_in_dead_letters_without_more_requests(
    make_app, client, auth, rdb, pg
):
    url = "http://127.0.0.1:9/gone"
    app = make_app(CIRCUIT_FAILURES=1, CIRCUIT_OPEN_SECONDS=30, RETRY_MAX_ATTEMPTS=3)
    delivery = _failing_hook(client, auth, pg, rdb, url)
    attempts, calls = _attempts(app, rdb, pg, [Outcome.retry("HTTP 503")], Sent())

    results = [attempts.run(delivery, n, url) for n in (1, 2, 3)]

    assert [r.state for r in results] == ["retry", "held", "failed"]
    assert calls == [1]  # only the try that opened the circuit reached the receiver
    with pg.connect() as conn:
        assert conn.scalar(text("SELECT count(*) FROM dead_letters WHERE delivery_id = :d"),
                           {"d": delivery}) == 1  # fmt: skip


def test_a_success_closes_the_circuit(make_app, client, auth, rdb, pg):
    url = "http://127.0.0.1:9/flaky"
    app = make_app(CIRCUIT_FAILURES=1, CIRCUIT_OPEN_SECONDS=30)
    delivery = _failing_hook(client, auth, pg, rdb, url)
    attempts, _ = _attempts(app, rdb, pg, [Outcome.retry("HTTP 503")], Sent())
    attempts.run(delivery, 1)
    assert attempts.circuits.open_until(url) is not None

    rdb.hset(circuit.key(url), "open_until", str(time.time() - 1))  # the window has passed
    probe, calls = _attempts(app, rdb, pg, [Outcome.success()], Sent())
    assert probe.run(delivery, 2, url).state == "sent"
    assert calls == [2]
    assert probe.circuits.open_until(url) is None
    assert not rdb.exists(circuit.key(url))


def test_sweeper_sends_tries_left_to_it_and_counts_them_apart_from_lost_ones(rdb):
    sent = Sent()
    retries.schedule(rdb, "t", [7, 1], delay=-10, send=sent, max_countdown=-20)  # left to it
    rdb.zadd(RETRY_ZSET, {retries.member("t", [8, 1]): 0})  # lost: nobody knows of it

    assert retries.sweep(rdb, grace=1, rearm=30, send=sent) == 2
    counters = rdb.hgetall("notifications:metrics")
    assert (counters["retries_swept:due"], counters["retries_swept:lost"]) == ("1", "1")


def _failing_send(*_args) -> None:
    raise ConnectionError("broker away")


def test_a_try_whose_publish_fails_is_left_to_the_sweeper(rdb):
    with pytest.raises(ConnectionError):
        retries.schedule(rdb, "t", [9, 1], delay=-10, send=_failing_send)

    assert rdb.hget(RETRY_HELD, retries.member("t", [9, 1])) == "sweeper"
    sent = Sent()
    assert retries.sweep(rdb, grace=1, rearm=30, send=sent) == 1


def test_a_sweep_whose_publish_fails_goes_on_and_tries_again_next_time(rdb):
    rdb.zadd(RETRY_ZSET, {retries.member("t", [1, 1]): 0, retries.member("t", [2, 1]): 1})
    calls: list = []

    def first_fails(task, args, countdown):
        calls.append(args)
        if len(calls) == 1:
            raise ConnectionError("broker away")

    assert retries.sweep(rdb, grace=1, rearm=30, send=first_fails) == 1
    assert rdb.hget(RETRY_HELD, retries.member("t", [1, 1])) == "sweeper"


def test_a_worker_lets_go_only_of_the_tries_it_still_holds(rdb):
    mine, theirs = retries.member("t", [1, 1]), retries.member("t", [2, 1])
    rdb.hset(RETRY_HELD, mapping={mine: "w1", theirs: "w2"})

    for key in (mine, theirs):
        rdb.eval(RELEASE_HELD, 1, RETRY_HELD, key, "w1", LEFT_TO_SWEEPER)

    assert rdb.hget(RETRY_HELD, mine) == "sweeper"
    assert rdb.hget(RETRY_HELD, theirs) == "w2"
