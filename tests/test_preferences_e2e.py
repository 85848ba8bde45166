"""Templates, languages and preferences through real processes: gunicorn, the stream
consumer, delivery and channels workers, beat, a local webhook receiver and SMTP server."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from aiosmtpd.controller import Controller

from tests.helpers import free_port, wait_until
from tests.platform import Client, get, post, put
from tests.receivers import Inbox, Receiver

pytestmark = pytest.mark.slow

TEMPLATE = {
    "locales": {
        "en": {"title": "Order {{ order }} shipped", "body": "Hi {{ name }}.",
               "email_subject": "Order {{ order }}", "email_html": "<p>Hi {{ name }}</p>"},
        "de": {"title": "Bestellung {{ order }} versandt", "body": "Hallo {{ name }}.",
               "email_subject": "Bestellung {{ order }}", "email_html": "<p>Hallo {{ name }}</p>"},
        "pt-BR": {"title": "Pedido {{ order }} enviado", "body": "Oi {{ name }}."},
    },
    "default_locale": "en",
}  # fmt: skip


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
    workers = {
        "consumer": platform.consumer_worker(),
        "delivery": platform.delivery_worker(concurrency=2),
        "channels": platform.channels_worker(SMTP_URL=f"smtp://127.0.0.1:{smtp[0]}"),
        "beat": platform.beat(),
    }
    status, _ = put(port, "/templates/order_shipped", TEMPLATE)
    assert status in (200, 201)
    return port, workers


def user(prefix: str = "p") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_sockets_receive_the_rendering_in_each_users_language(running):
    port, _ = running
    users = {user(): "pt-BR", user(): "de-CH", user(): "fr"}
    for u, locale in users.items():
        assert put(port, f"/users/{u}", {"locale": locale})[0] in (200, 201)
    clients = {u: Client(port, u) for u in users}
    try:
        status, body = post(port, "/notifications", {
            "user_ids": list(users), "template": "order_shipped",
            "params": {"order": 7, "name": "Kim"}})  # fmt: skip
        assert status == 202, body
        got = {u: c.wait_for(1)[0] for u, c in clients.items()}
    finally:
        for c in clients.values():
            c.close()
    assert [(got[u]["title"], got[u]["lang"]) for u in users] == [
        ("Pedido 7 enviado", "pt-BR"),
        ("Bestellung 7 versandt", "de"),
        ("Order 7 shipped", "en"),
    ]


def test_templated_email_arrives_in_the_users_language_with_parameters_escaped(running, smtp):
    port, _ = running
    _, inbox = smtp
    u = user()
    put(port, f"/users/{u}", {"email": f"{u}@example.com", "locale": "de"})
    status, body = post(port, "/notifications", {
        "user_id": u, "template": "order_shipped", "channels": ["email"],
        "params": {"order": 9, "name": "<b>Eve</b>"}})  # fmt: skip
    assert status == 202, body
    msg = wait_until(lambda: next((m for m in inbox.messages if m["To"] == f"{u}@example.com"),
                                  None))  # fmt: skip
    assert msg["Subject"] == "Bestellung 9"
    assert msg.get_body(("plain",)).get_content().strip() == "Hallo <b>Eve</b>."
    assert msg.get_body(("html",)).get_content().strip() == "<p>Hallo &lt;b&gt;Eve&lt;/b&gt;</p>"


def test_quiet_hours_hold_a_webhook_until_the_window_ends_but_not_a_critical_one(running, receiver):
    port, _ = running
    u = user()
    tz = ZoneInfo("Asia/Kolkata")  # UTC+05:30: the window is in the user's local time
    now_local = datetime.now(tz)
    end_local = (now_local + timedelta(seconds=5)).replace(microsecond=0)
    start_local = now_local - timedelta(minutes=1)
    put(port, f"/users/{u}", {
        "webhook_url": receiver.url(u), "timezone": "Asia/Kolkata",
        "quiet_hours": {"start": start_local.strftime("%H:%M:%S"),
                        "end": end_local.strftime("%H:%M:%S")}})  # fmt: skip
    normal = {"user_id": u, "title": "normal", "body": "b", "channels": ["webhook"]}
    assert post(port, "/notifications", normal)[0] == 202
    urgent = {**normal, "title": "urgent", "priority": "high", "category": "security"}
    assert post(port, "/notifications", urgent)[0] == 202

    wait_until(lambda: len(receiver.of(u)) >= 2, timeout=40)
    arrivals = {c["body"].decode().split('"title":"')[1].split('"')[0]: c["wall"]
                for c in receiver.of(u)}  # fmt: skip
    window_end = end_local.astimezone(UTC).timestamp()
    assert arrivals["urgent"] < window_end
    assert arrivals["normal"] >= window_end - 0.05


def test_a_scheduled_notification_survives_a_restart_of_every_worker(running, platform):
    port, workers = running
    u = user()
    client = Client(port, u)
    try:
        send_at = datetime.now(UTC) + timedelta(seconds=6)
        status, body = post(port, "/notifications", {"user_id": u, "title": "later", "body": "b",
                                                     "send_at": send_at.isoformat()})  # fmt: skip
        assert (status, body["status"]) == (202, "scheduled")
        for name in ("consumer", "delivery", "beat"):
            platform.kill(workers[name])
        time.sleep(1)
        workers["consumer"] = platform.consumer_worker()
        workers["delivery"] = platform.delivery_worker(concurrency=2)
        workers["beat"] = platform.beat()

        [frame] = client.wait_for(1, timeout=40)
        received = time.time()
    finally:
        client.close()
    assert frame["title"] == "later"
    assert received >= send_at.timestamp()
    assert get(port, f"/notifications/{body['id']}")[1]["status"] in ("delivering", "delivered")
