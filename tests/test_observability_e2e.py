"""Metrics and logs of real processes: /metrics follows notifications through the platform,
and with LOG_FORMAT=json every process logs JSON lines that carry the notification id."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import uuid

import pytest

from tests.helpers import free_port, wait_until
from tests.platform import Client, notify

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def running(platform):
    logs = {"LOG_FORMAT": "json", "LOG_LEVEL": "DEBUG"}
    port, _ = platform.gateway(workers=2, **logs)
    platform.consumer_worker(**logs)
    platform.delivery_worker(concurrency=2, **logs)
    platform.beat(**logs)
    return port


def scrape(port: int) -> dict[str, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("Content-Type", "").startswith("text/plain")
        body = resp.read().decode()
    finally:
        conn.close()
    samples: dict[str, float] = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def total(samples: dict[str, float], prefix: str) -> float:
    """Sum over every label set (e.g. the open sockets of each gateway process)."""
    return sum(v for k, v in samples.items() if k == prefix or k.startswith(prefix + "{"))


def test_metrics_follow_notifications_through_the_platform(running):
    before = scrape(running)
    online, offline = f"m-{uuid.uuid4().hex[:8]}", f"m-{uuid.uuid4().hex[:8]}"
    client = Client(running, online)
    try:
        wait_until(lambda: total(scrape(running), "notifier_open_sockets") >= 1)
        notify(running, online)
        notify(running, offline)
        client.wait_for(1)

        def delivered() -> dict[str, float] | None:
            m = scrape(running)
            sent = 'notifier_deliveries_total{channel="websocket",outcome="sent"}'
            left = 'notifier_deliveries_total{channel="websocket",outcome="offline"}'
            ok = (
                m.get(sent, 0) >= before.get(sent, 0) + 1
                and m.get(left, 0) >= before.get(left, 0) + 1
            )
            return m if ok else None

        after = wait_until(delivered)
    finally:
        client.close()

    accepted = "notifier_notifications_accepted_total"
    assert after[accepted] == before.get(accepted, 0) + 2
    latency = "notifier_delivery_latency_seconds_count"
    assert after[latency] >= before.get(latency, 0) + 1
    assert "notifier_stream_length" in after
    assert "notifier_stream_lag" in after
    assert "notifier_stream_pending" in after
    assert 'notifier_queue_length{queue="high"}' in after
    wait_until(lambda: total(scrape(running), "notifier_open_sockets") == 0)


def _json_lines(platform) -> list[dict]:
    lines = []
    for path in platform.log_dir.glob("*.log"):
        for raw in path.read_text(errors="replace").splitlines():
            if raw.startswith("{"):
                lines.append(json.loads(raw))  # a line that starts as JSON must be JSON
    return lines


def test_json_logs_carry_the_notification_id_from_ingest_to_the_socket(running, platform):
    u = f"log-{uuid.uuid4().hex[:8]}"
    client = Client(running, u)
    try:
        nid = notify(running, u)
        client.wait_for(1)
    finally:
        client.close()

    wanted = {"app.ingest", "tasks.stream", "tasks.delivery", "app.gateway"}

    def steps() -> set[str]:
        return {line["logger"] for line in _json_lines(platform)
                if line.get("notification_id") == nid}  # fmt: skip

    with contextlib.suppress(AssertionError):
        wait_until(lambda: wanted <= steps(), timeout=15)
    assert wanted <= steps()
    every = _json_lines(platform)
    assert {"ts", "level", "logger", "message"} <= set(every[0])


def test_flower_sits_behind_basic_auth_and_lists_the_workers(running, platform):
    port = free_port()
    platform.celery("flower", "--address=127.0.0.1", f"--port={port}", "--basic-auth=ops:s3cret")
    credentials = base64.b64encode(b"ops:s3cret").decode()

    def fetch(path: str, auth: bool) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request("GET", path, headers={"Authorization": f"Basic {credentials}"} if auth
                         else {})  # fmt: skip
            resp = conn.getresponse()
            return resp.status, resp.read()
        except OSError:
            return 0, b""
        finally:
            conn.close()

    wait_until(lambda: fetch("/api/workers", auth=False)[0] == 401, timeout=30)

    def workers() -> set[str]:
        code, body = fetch("/api/workers?refresh=1", auth=True)
        return {name.split("-")[0] for name in json.loads(body)} if code == 200 else set()

    # The delivery worker answers Flower's inspect calls. (The consumer runs one long task in
    # a solo pool, so it answers only between its runs.)
    assert "worker" in wait_until(workers, timeout=30)
