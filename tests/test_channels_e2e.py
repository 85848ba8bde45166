"""Webhook and email channels, retries, the sweeper and dead letters through real processes:
gunicorn, the stream consumer, a channels worker, beat, a local HTTP receiver and a local
SMTP server (aiosmtpd). Retry settings are scaled down in conftest.platform_settings."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import text

from tests.helpers import free_port, wait_until
from tests.platform import Client, get, notify, post, put
from tests.receivers import Inbox, Receiver

pytestmark = pytest.mark.slow

SECRET = "platform-webhook-secret"  # WEBHOOK_SIGNING_SECRET in platform_settings
MAX_ATTEMPTS = 4


@pytest.fixture(scope="module")
def smtp():
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=free_port())
    controller.start()
    yield controller.port, inbox
    controller.stop()


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.server.shutdown()


@pytest.fixture(scope="module")
def running(platform, smtp):
    port, _ = platform.gateway(workers=1)
    platform.consumer_worker()
    platform.delivery_worker(concurrency=2)
    channels = [platform.channels_worker(SMTP_URL=f"smtp://127.0.0.1:{smtp[0]}")]
    platform.beat()
    return port, channels


def user() -> str:
    return f"user-{uuid.uuid4().hex[:10]}"


def attempts(pg, nid: str) -> list[tuple[int, str | None]]:
    with pg.connect() as conn:
        return [
            (a, o)
            for a, o in conn.execute(
                text(
                    "SELECT a.attempt, a.outcome::text FROM delivery_attempts a "
                    "JOIN deliveries d ON d.id = a.delivery_id "
                    "WHERE d.notification_id = :n ORDER BY a.attempt"
                ),
                {"n": nid},
            )
        ]


def scheduled_delays(pg, nid: str) -> list[float]:
    with pg.connect() as conn:
        return list(
            conn.execute(
                text(
                    "SELECT extract(epoch FROM a.next_retry_at - a.finished_at)::float "
                    "FROM delivery_attempts a JOIN deliveries d ON d.id = a.delivery_id "
                    "WHERE d.notification_id = :n AND a.next_retry_at IS NOT NULL "
                    "ORDER BY a.attempt"
                ),
                {"n": nid},
            ).scalars()
        )


def state(port: int, nid: str, channel: str = "webhook") -> str:
    _, body = get(port, f"/notifications/{nid}")
    return next(d["state"] for d in body["deliveries"] if d["channel"] == channel)


def hook(port: int, url: str, **fields) -> str:
    return notify(port, user(), channels=["webhook"], webhook_url=url, **fields)


def test_webhook_failing_twice_is_delivered_on_the_third_try_with_growing_gaps(
    running, receiver, pgplat
):
    port, _ = running
    url = receiver.script("flaky", (500, {}, 0), (502, {}, 0))
    nid = hook(port, url, title="Hi")

    wait_until(lambda: state(port, nid) == "sent")
    calls = receiver.of("flaky")
    assert len(calls) == 3
    assert attempts(pgplat, nid) == [(1, "retry"), (2, "retry"), (3, "success")]
    # RETRY_BASE_SECONDS is 0.3 with no jitter here: 0.3 s, then 0.6 s. Queueing on a busy
    # machine can only add to a gap, so each is bounded below by its backoff.
    assert calls[1]["at"] - calls[0]["at"] >= 0.3
    assert calls[2]["at"] - calls[1]["at"] >= 0.6
    assert scheduled_delays(pgplat, nid) == pytest.approx([0.3, 0.6], abs=0.05)
    body = calls[2]["body"]
    assert json.loads(body)["id"] == nid
    assert json.loads(body)["title"] == "Hi"
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    for c in calls:  # every try is signed, and carries the same idempotency key
        assert (
            c["headers"]["X-Signature"]
            == "sha256=" + hmac.new(SECRET.encode(), c["body"], hashlib.sha256).hexdigest()
        )
    assert calls[2]["headers"]["X-Signature"] == expected
    assert len({c["headers"]["Idempotency-Key"] for c in calls}) == 1


def test_always_failing_webhook_is_dead_lettered_after_the_last_try_and_redrive_delivers(
    running, receiver, pgplat
):
    port, _ = running
    url = receiver.script("down", *[(503, {}, 0)] * MAX_ATTEMPTS)
    nid = hook(port, url)

    wait_until(lambda: state(port, nid) == "failed")
    assert len(receiver.of("down")) == MAX_ATTEMPTS
    assert [o for _, o in attempts(pgplat, nid)] == ["retry"] * (MAX_ATTEMPTS - 1) + ["failed"]
    _, listing = get(port, "/dlq?channel=webhook")
    [letter] = [d for d in listing["dead_letters"] if d["notification_id"] == nid]
    assert letter["attempts"] == MAX_ATTEMPTS
    assert "503" in letter["error"]
    _, full = get(port, f"/dlq/{letter['id']}")
    assert [h["attempt"] for h in full["history"]] == list(range(1, MAX_ATTEMPTS + 1))

    # The receiver is back (its script is used up): redrive starts a fresh series.
    status, body = post(port, f"/dlq/{letter['id']}/redrive", {})
    assert (status, body["redriven"]) == (200, True)
    wait_until(lambda: state(port, nid) == "sent")
    assert len(receiver.of("down")) == MAX_ATTEMPTS + 1
    assert attempts(pgplat, nid)[-1] == (MAX_ATTEMPTS + 1, "success")
    _, again = get(port, f"/dlq/{letter['id']}")
    assert again["redriven_at"] is not None
    assert post(port, f"/dlq/{letter['id']}/redrive", {})[0] == 409


def test_a_400_goes_straight_to_dead_letters(running, receiver, pgplat):
    port, _ = running
    nid = hook(port, receiver.script("bad", (400, {}, 0)))
    wait_until(lambda: state(port, nid) == "failed")
    assert attempts(pgplat, nid) == [(1, "failed")]
    _, listing = get(port, "/dlq?channel=webhook")
    assert any(d["notification_id"] == nid for d in listing["dead_letters"])


def test_retry_after_is_honoured(running, receiver):
    port, _ = running
    nid = hook(port, receiver.script("busy", (429, {"Retry-After": "2"}, 0)))
    wait_until(lambda: state(port, nid) == "sent")
    first, second = receiver.of("busy")
    assert second["at"] - first["at"] >= 2.0  # not RETRY_BASE_SECONDS (0.3)


def test_retry_lost_with_a_sigkilled_worker_is_run_once_by_the_sweeper(
    running, receiver, platform, smtp, pgplat
):
    port, channels = running
    # The first try fails and asks for 3 s: its countdown message sits in the worker, which
    # dies with it; the broker would hand it out again only after the visibility timeout.
    nid = hook(port, receiver.script("sweep", (503, {"Retry-After": "3"}, 0)))
    wait_until(lambda: attempts(pgplat, nid) == [(1, "retry")])
    platform.kill(channels.pop())
    channels.append(platform.channels_worker(SMTP_URL=f"smtp://127.0.0.1:{smtp[0]}"))

    wait_until(lambda: state(port, nid) == "sent", timeout=30)
    time.sleep(2)  # a second copy, if any, would land now
    assert len(receiver.of("sweep")) == 2
    assert attempts(pgplat, nid) == [(1, "retry"), (2, "success")]


def test_worker_killed_in_the_middle_of_a_try_loses_nothing(
    running, receiver, platform, smtp, pgplat
):
    port, channels = running
    # Answers after 3 s (WEBHOOK_TIMEOUT_SECONDS is 4): the worker dies before it does.
    nid = hook(port, receiver.script("slow", (200, {}, 3.0)))
    wait_until(lambda: len(receiver.of("slow")) == 1)
    platform.kill(channels.pop())  # while the receiver is still answering
    channels.append(platform.channels_worker(SMTP_URL=f"smtp://127.0.0.1:{smtp[0]}"))

    # After ATTEMPT_LEASE_SECONDS the unfinished try is taken as lost and the next one runs.
    wait_until(lambda: state(port, nid) == "sent", timeout=30)
    assert attempts(pgplat, nid) == [(1, "lost"), (2, "success")]


def test_email_arrives_with_subject_plain_and_html_bodies(running, smtp):
    port, _ = running
    _, inbox = smtp
    u = user()
    assert put(port, f"/users/{u}", {"email": f"{u}@example.test"})[0] == 201
    subject = f"Invoice {uuid.uuid4().hex[:6]}"
    nid = notify(port, u, title=subject, body="Your invoice <#1> is ready.", channels=["email"])

    wait_until(lambda: [m for m in inbox.messages if m["Subject"] == subject])
    [msg] = [m for m in inbox.messages if m["Subject"] == subject]
    assert msg["To"] == f"{u}@example.test"
    assert msg["X-Notification-Id"] == nid
    assert msg.get_body(("plain",)).get_content().strip() == "Your invoice <#1> is ready."
    assert "Your invoice &lt;#1&gt; is ready." in msg.get_body(("html",)).get_content()
    wait_until(lambda: state(port, nid, "email") == "sent")


def test_a_user_without_an_address_is_skipped_with_a_reason(running):
    port, _ = running
    nid = notify(port, user(), channels=["email"])
    wait_until(lambda: state(port, nid, "email") == "skipped")
    _, body = get(port, f"/notifications/{nid}")
    assert "no email address" in body["deliveries"][0]["last_error"]


def test_escalation_emails_only_the_unacked_notification(running, smtp):
    port, _ = running
    _, inbox = smtp
    u = user()
    put(port, f"/users/{u}", {"email": f"{u}@example.test"})
    tag = uuid.uuid4().hex[:6]
    seen = notify(port, u, title=f"seen {tag}", fallback_after_seconds=2)
    unseen = notify(port, u, title=f"unseen {tag}", fallback_after_seconds=2)
    client = Client(port, u)
    try:
        frames = client.wait_for(2)
        assert {f["id"] for f in frames} == {seen, unseen}
        client.send({"type": "ack", "ids": [seen]})
        wait_until(lambda: [m for m in inbox.messages if m["Subject"] == f"unseen {tag}"])
    finally:
        client.close()
    time.sleep(1.5)  # escalation runs every 0.5 s here: the acked one had its chances
    subjects = [m["Subject"] for m in inbox.messages if tag in str(m["Subject"])]
    assert subjects == [f"unseen {tag}"]
