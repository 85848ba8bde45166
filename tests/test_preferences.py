"""User preferences: mutes, quiet hours across time zones and DST, scheduled and expiring
notifications; the rules as plain functions, then through the consumer and one try's
bookkeeping against real PostgreSQL and Redis (a local sender, no Celery)."""

from __future__ import annotations

import time as clock
from datetime import UTC, datetime, time, timedelta

import pytest
from sqlalchemy import text

from app.preferences import deferral, is_muted, overrides, quiet_until
from tasks import retries
from tasks.channels import TASK, Attempts
from tasks.outbox import stream_due
from tasks.outcome import Outcome
from tasks.stream import process_entries


def at(iso: str) -> datetime:
    return datetime.fromisoformat(iso)


NIGHT = (time(22, 0), time(7, 0))


def test_quiet_hours_are_read_in_the_users_time_zone():
    instant = at("2026-11-21T14:00:00+00:00")  # 23:00 in Tokyo, 14:00 in Lisbon
    assert quiet_until(instant, "Asia/Tokyo", *NIGHT) == at("2026-11-21T22:00:00+00:00")
    assert quiet_until(instant, "Europe/Lisbon", *NIGHT) is None
    assert quiet_until(instant, None, time(13, 0), time(15, 30)) == at("2026-11-21T15:30:00+00:00")


def test_quiet_hours_end_at_local_time_across_the_spring_dst_change():
    # New York, night of 7-8 March 2026: clocks go from 02:00 EST to 03:00 EDT.
    before_change = at("2026-03-08T05:00:00+00:00")  # 00:00 EST
    assert quiet_until(before_change, "America/New_York", *NIGHT) == at("2026-03-08T11:00:00+00:00")
    # The night before, still on EST: 07:00 local is 12:00 UTC.
    assert quiet_until(at("2026-03-07T05:00:00+00:00"), "America/New_York", *NIGHT) == at(
        "2026-03-07T12:00:00+00:00"
    )
    # A window ending at 02:30, a time that does not exist that night, ends at 03:30 EDT.
    assert quiet_until(
        at("2026-03-08T06:30:00+00:00"), "America/New_York", time(0, 0), time(2, 30)
    ) == at("2026-03-08T07:30:00+00:00")


def test_quiet_hours_end_at_local_time_across_the_autumn_dst_change():
    # 1 November 2026: 02:00 EDT becomes 01:00 EST; the window ends at 07:00 EST = 12:00 UTC.
    assert quiet_until(at("2026-11-01T03:00:00+00:00"), "America/New_York", *NIGHT) == at(
        "2026-11-01T12:00:00+00:00"
    )
    assert quiet_until(at("2026-11-01T12:00:00+00:00"), "America/New_York", *NIGHT) is None


def test_only_email_and_webhook_wait_and_an_override_never_does():
    now = at("2026-11-21T23:30:00+00:00")
    assert deferral(now, "email", "UTC", *NIGHT) == at("2026-11-22T07:00:00+00:00")
    assert deferral(now, "webhook", "UTC", *NIGHT) is not None
    assert deferral(now, "websocket", "UTC", *NIGHT) is None
    assert deferral(now, "email", "UTC", *NIGHT, override=True) is None


def test_only_high_priority_in_a_critical_category_overrides_preferences():
    assert overrides("security", "high", {"security"})
    assert not overrides("security", "normal", {"security"})
    assert not overrides("marketing", "high", {"security"})
    assert not overrides(None, "high", {"security"})


def test_mutes_apply_per_category_and_channel_and_critical_high_priority_overrides():
    muted = {"marketing": ["email"], "security": ["email"]}
    assert is_muted(muted, "marketing", "email", "normal", {"security"})
    assert not is_muted(muted, "marketing", "webhook", "normal", {"security"})
    assert not is_muted(muted, "orders", "email", "normal", {"security"})
    assert not is_muted(muted, None, "email", "normal", {"security"})
    assert not is_muted(muted, "security", "email", "high", {"security"})
    assert is_muted(muted, "security", "email", "normal", {"security"})
    assert is_muted(muted, "marketing", "email", "high", {"security"})


def test_preferences_are_stored_shown_and_cleared(client, auth):
    body = {"locale": "pt_br", "timezone": "America/Sao_Paulo",
            "muted": {"marketing": ["email", "webhook", "email"], "news": []},
            "quiet_hours": {"start": "22:00", "end": "07:30"}}  # fmt: skip
    r = client.put("/users/ana", json=body, headers=auth)
    assert r.status_code == 201, r.json
    shown = client.get("/users/ana", headers=auth).json
    assert shown["locale"] == "pt-BR"
    assert shown["timezone"] == "America/Sao_Paulo"
    assert shown["muted"] == {"marketing": ["email", "webhook"]}
    assert shown["quiet_hours"] == {"start": "22:00:00", "end": "07:30:00"}

    client.put("/users/ana", json={"quiet_hours": None, "muted": None}, headers=auth)
    shown = client.get("/users/ana", headers=auth).json
    assert (shown["quiet_hours"], shown["muted"], shown["locale"]) == (None, {}, "pt-BR")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"timezone": "Mars/Olympus_Mons"}, "timezone"),
        ({"locale": "xx-YY"}, "locale"),
        ({"muted": {"marketing": ["sms"]}}, "muted"),
        ({"muted": ["email"]}, "muted"),
        ({"quiet_hours": {"start": "22:00", "end": "22:00"}}, "quiet_hours"),
        ({"quiet_hours": {"start": "25:00", "end": "07:00"}}, "quiet_hours"),
        ({"quiet_hours": {"start": "22:00"}}, "quiet_hours"),
    ],
)
def test_bad_preferences_get_a_422_naming_the_field(client, auth, body, field):
    r = client.put("/users/ana", json=body, headers=auth)
    assert r.status_code == 422, r.json
    assert field in r.json["fields"]


def _deliveries(pg) -> dict[tuple[str, str], tuple[str, str | None]]:
    with pg.connect() as conn:
        rows = conn.execute(text("SELECT user_id, channel, status, last_error FROM deliveries"))
        return {(r.user_id, r.channel): (r.status, r.last_error) for r in rows}


def test_muted_channels_are_recorded_skipped_and_never_sent(client, auth, pg, rdb):
    client.put("/users/ana", json={"email": "ana@example.com",
                                   "muted": {"marketing": ["email", "websocket"]}},
               headers=auth)  # fmt: skip
    client.put("/users/bo", json={"email": "bo@example.com"}, headers=auth)
    sale = {"user_ids": ["ana", "bo"], "title": "Sale", "body": "50% off",
            "category": "marketing", "channels": ["websocket", "email"]}  # fmt: skip
    client.post("/notifications", json=sale, headers=auth)
    enqueued: list[tuple[str, list[int], str]] = []
    process_entries(pg, rdb.xrange("notifications:stream"),
                    lambda lane, ids, ch: enqueued.append((lane, ids, ch)), 100)  # fmt: skip

    states = _deliveries(pg)
    assert states[("ana", "email")][0] == "skipped"
    assert "muted" in states[("ana", "email")][1]
    assert states[("ana", "websocket")][0] == "skipped"
    assert states[("bo", "email")] == ("pending", None)
    assert sum(len(ids) for _, ids, _ in enqueued) == 2  # bo's two copies only
    assert client.get("/notifications/offline/ana", headers=auth).json["notifications"] == []
    assert client.get("/users/ana/unread-count", headers=auth).json["unread"] == 0


def test_high_priority_in_a_critical_category_reaches_muted_users(client, auth, pg, rdb):
    client.put("/users/ana", json={"email": "a@example.com", "muted": {"security": ["email"]}},
               headers=auth)  # fmt: skip
    client.post("/notifications", json={"user_id": "ana", "title": "New login", "body": "b",
                                        "category": "security", "priority": "high",
                                        "channels": ["email"]}, headers=auth)  # fmt: skip
    process_entries(pg, rdb.xrange("notifications:stream"), lambda *_: None, 100,
                    critical={"security"})  # fmt: skip
    assert _deliveries(pg)[("ana", "email")] == ("pending", None)


class Sent:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list, float]] = []

    def __call__(self, task: str, args: list, countdown: float) -> None:
        self.calls.append((task, args, countdown))


def _webhook_delivery(client, auth, pg, rdb, **fields) -> int:
    body = {"user_id": "ana", "title": "t", "body": "b", "channels": ["webhook"],
            "webhook_url": "http://127.0.0.1:9/hook", **fields}  # fmt: skip
    r = client.post("/notifications", json=body, headers=auth)
    assert r.status_code == 202, r.json
    ids: list[int] = []
    process_entries(pg, list(rdb.xrange("notifications:stream")),
                    lambda _, d, *__: ids.extend(d), 1)  # fmt: skip
    rdb.delete("notifications:stream")
    return ids[-1]


def _quiet_now(client, auth, minutes: int = 120) -> None:
    """Give ana quiet hours from a minute ago to `minutes` from now (UTC)."""
    now = datetime.now(UTC)
    start = (now - timedelta(minutes=1)).time().replace(microsecond=0)
    end = (now + timedelta(minutes=minutes)).time().replace(second=0, microsecond=0)
    r = client.put("/users/ana", json={"timezone": "UTC",
                                       "quiet_hours": {"start": start.isoformat(),
                                                       "end": end.isoformat()}},
                   headers=auth)  # fmt: skip
    assert r.status_code in (200, 201), r.json


def _attempts(app, pg, rdb, sent):
    calls: list[int] = []

    def sender(job, cfg):
        calls.append(job.attempt)
        return Outcome.success()

    return Attempts(app.config["NOTIFIER"], pg, rdb, sender=sender, send=sent), calls


def test_quiet_hours_defer_a_webhook_to_the_end_of_the_window_without_using_a_try(
    app, client, auth, pg, rdb
):
    _quiet_now(client, auth, minutes=30)
    delivery = _webhook_delivery(client, auth, pg, rdb)
    sent = Sent()
    attempts, calls = _attempts(app, pg, rdb, sent)

    result = attempts.run(delivery, 1)

    assert result.state == "deferred"
    assert calls == []
    assert 25 * 60 < result.delay <= 31 * 60
    assert [(args, round(countdown)) for _, args, countdown in sent.calls] == [
        ([delivery, 1], round(result.delay))
    ]
    member = retries.member(TASK, [delivery, 1])
    assert rdb.zscore(retries.RETRY_ZSET, member) == pytest.approx(
        clock.time() + result.delay, abs=5
    )
    with pg.connect() as conn:
        assert conn.scalar(text("SELECT count(*) FROM delivery_attempts")) == 0
        assert conn.scalar(text("SELECT deferred_until FROM deliveries")) is not None
    status = client.get(f"/notifications/{_only_notification(pg)}", headers=auth).json
    assert status["deliveries"][0]["deferred_until"] is not None


def test_a_deferral_longer_than_the_countdown_cap_is_left_to_the_sweeper(
    make_app, client, auth, pg, rdb
):
    _quiet_now(client, auth, minutes=120)
    delivery = _webhook_delivery(client, auth, pg, rdb)
    app = make_app(RETRY_MAX_DELAY_SECONDS=600, RETRY_SWEEP_GRACE_SECONDS=15)
    sent = Sent()
    attempts, _ = _attempts(app, pg, rdb, sent)

    result = attempts.run(delivery, 1)

    assert result.state == "deferred"
    assert sent.calls == []  # no Celery countdown past the broker's visibility timeout
    score = rdb.zscore(retries.RETRY_ZSET, retries.member(TASK, [delivery, 1]))
    assert score == pytest.approx(clock.time() + result.delay - 15, abs=5)


@pytest.mark.parametrize(
    ("category", "state", "sends"), [("security", "sent", [1]), ("marketing", "deferred", [])]
)
def test_only_high_priority_in_a_critical_category_is_sent_inside_quiet_hours(
    app, client, auth, pg, rdb, category, state, sends
):
    _quiet_now(client, auth)
    delivery = _webhook_delivery(client, auth, pg, rdb, priority="high", category=category)
    attempts, calls = _attempts(app, pg, rdb, Sent())
    assert attempts.run(delivery, 1).state == state
    assert calls == sends


def test_a_channel_muted_after_the_delivery_was_recorded_is_skipped_when_tried(
    app, client, auth, pg, rdb
):
    delivery = _webhook_delivery(client, auth, pg, rdb, category="marketing")
    client.put("/users/ana", json={"muted": {"marketing": ["webhook"]}}, headers=auth)
    attempts, calls = _attempts(app, pg, rdb, Sent())
    assert attempts.run(delivery, 1).state == "skipped"
    assert calls == []
    assert _deliveries(pg)[("ana", "webhook")][0] == "skipped"


def _only_notification(pg) -> str:
    with pg.connect() as conn:
        return str(conn.scalar(text("SELECT id FROM notifications")))


def test_a_try_after_expires_at_is_dropped_as_expired(app, client, auth, pg, rdb):
    soon = datetime.now(UTC) + timedelta(seconds=0.5)
    delivery = _webhook_delivery(client, auth, pg, rdb, expires_at=soon.isoformat())
    clock.sleep(0.7)
    attempts, calls = _attempts(app, pg, rdb, Sent())

    assert attempts.run(delivery, 1).state == "expired"
    assert calls == []
    status = client.get(f"/notifications/{_only_notification(pg)}", headers=auth).json
    assert status["status"] == "expired"
    assert status["deliveries"][0]["state"] == "expired"
    assert client.get("/dlq", headers=auth).json["dead_letters"] == []


def test_an_unacked_in_app_copy_is_not_offered_after_it_expires(client, auth, pg, rdb):
    soon = datetime.now(UTC) + timedelta(seconds=0.5)
    client.post("/notifications", json={"user_id": "bo", "title": "t", "body": "b",
                                        "expires_at": soon.isoformat()}, headers=auth)  # fmt: skip
    process_entries(pg, rdb.xrange("notifications:stream"), lambda *_: None, 100)
    assert len(client.get("/notifications/offline/bo", headers=auth).json["notifications"]) == 1
    clock.sleep(0.7)
    assert client.get("/notifications/offline/bo", headers=auth).json["notifications"] == []
    status = client.get(f"/notifications/{_only_notification(pg)}", headers=auth).json
    assert status["status"] == "expired"


def test_a_scheduled_notification_is_streamed_only_once_due(client, auth, pg, rdb):
    due = datetime.now(UTC) + timedelta(seconds=1)
    r = client.post("/notifications", json={"user_id": "bo", "title": "t", "body": "b",
                                            "send_at": due.isoformat()}, headers=auth)  # fmt: skip
    assert r.json["status"] == "scheduled"
    assert client.get(f"/notifications/{r.json['id']}", headers=auth).json["status"] == "scheduled"
    assert stream_due(pg, rdb, "notifications:stream", 100) == 0
    assert not rdb.exists("notifications:stream")

    clock.sleep(1.2)
    assert stream_due(pg, rdb, "notifications:stream", 100) == 1
    [(_, fields)] = rdb.xrange("notifications:stream")
    assert fields["id"] == r.json["id"]
