"""End to end through real processes: gunicorn gateway, stream consumer, delivery workers, beat."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from app.presence import nodes_for, presence_key
from tests.helpers import wait_until
from tests.platform import Client, get, notify, post, token

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def running(platform):
    """A gateway, a stream consumer, two delivery processes and beat; yields the port."""
    port, _ = platform.gateway(workers=1)
    platform.consumer_worker()
    platform.delivery_worker(concurrency=2)
    platform.beat()
    return port


def user() -> str:
    return f"user-{uuid.uuid4().hex[:10]}"


def test_online_user_receives_the_notification_live(running):
    u = user()
    client = Client(running, u)
    try:
        nid = notify(running, u, title="Hello", body="World", data={"k": 1}, category="greetings",
                     lang="en", priority="high")  # fmt: skip
        [frame] = client.wait_for(1)
    finally:
        client.close()
    assert frame["id"] == nid
    assert (frame["title"], frame["body"], frame["data"]) == ("Hello", "World", {"k": 1})
    assert (frame["priority"], frame["category"], frame["lang"]) == ("high", "greetings", "en")
    assert isinstance(frame["seq"], int)
    assert frame["created_at"]


def test_a_batch_reaches_each_of_its_online_users_with_their_own_notification(running):
    users = [user(), user()]
    clients = [Client(running, u) for u in users]
    try:
        status, body = post(running, "/notifications/batch", {"notifications": [
            {"user_id": u, "title": f"for {u}", "body": "b"} for u in users
        ]})  # fmt: skip
        assert status == 202, body
        frames = [c.wait_for(1) for c in clients]
    finally:
        for c in clients:
            c.close()
    ids = [n["id"] for n in body["notifications"]]
    assert [[(f["id"], f["title"]) for f in got] for got in frames] == [
        [(nid, f"for {u}")] for nid, u in zip(ids, users, strict=True)
    ]


def test_offline_user_finds_notifications_waiting_oldest_first(running):
    u = user()
    ids = [notify(running, u, body=str(i)) for i in range(3)]
    wait_until(lambda: len(get(running, f"/notifications/offline/{u}")[1]["notifications"]) == 3)

    client = Client(running, u)
    try:
        frames = client.wait_for(3)
    finally:
        client.close()

    assert [f["id"] for f in frames] == ids
    assert [f["seq"] for f in frames] == sorted(f["seq"] for f in frames)


def test_ack_over_the_socket_empties_the_offline_queue(running):
    u = user()
    nid = notify(running, u)
    client = Client(running, u)
    try:
        client.wait_for(1)
        client.send({"type": "ack", "ids": [nid]})
        wait_until(lambda: get(running, f"/notifications/offline/{u}")[1]["notifications"] == [])
    finally:
        client.close()

    again = Client(running, u)
    try:
        again.send({"type": "ping"})
        again.wait_for(1, kind="pong")
        assert again.notifications() == []
    finally:
        again.close()


def test_client_connecting_during_a_burst_gets_every_notification_exactly_once(running):
    u = user()
    total = 1000
    posted: list[str] = []
    client_box: list[Client] = []

    def connect_midway() -> None:
        wait_until(lambda: len(posted) >= total // 3, timeout=60)
        client_box.append(Client(running, u))

    connector = threading.Thread(target=connect_midway)
    connector.start()
    with ThreadPoolExecutor(max_workers=8) as pool:
        for nid in pool.map(lambda i: notify(running, u, body=f"n{i}"), range(total)):
            posted.append(nid)
    connector.join()
    client = client_box[0]
    try:
        client.wait_for(total, timeout=90)
        # A repeat would come from a delivery task or a replay still running when the
        # last new one arrived: give those time to land before counting.
        time.sleep(2)
        frames = client.notifications()
        assert not client.closed
    finally:
        client.close()

    ids = [f["id"] for f in frames]
    assert len(ids) == total
    assert set(ids) == set(posted)


def test_every_socket_of_a_user_receives_it_and_read_marks_are_pushed(running):
    u = user()
    first, second = Client(running, u), Client(running, u)
    try:
        nid = notify(running, u)
        first.wait_for(1)
        second.wait_for(1)
        first.send({"type": "read", "ids": [nid]})
        [read] = second.wait_for(1, kind="read")
        assert read["ids"] == [nid]
        assert first.of_type("read") == []
    finally:
        first.close()
        second.close()
    status, body = get(running, f"/users/{u}/unread-count")
    assert (status, body["unread"]) == (200, 0)


def test_http_read_is_pushed_to_open_sockets(running):
    u = user()
    client = Client(running, u)
    try:
        nid = notify(running, u)
        client.wait_for(1)
        status, body = post(running, f"/users/{u}/notifications/read", {"all": True})
        assert (status, body["read"]) == (200, [nid])
        assert client.wait_for(1, kind="read")[0]["ids"] == [nid]
    finally:
        client.close()


def test_user_token_reads_only_its_own_inbox(running):
    alice, bob = user(), user()
    notify(running, alice)
    notify(running, bob)
    own = {"Authorization": f"Bearer {token(alice)}"}

    wait_until(lambda: get(running, f"/users/{alice}/unread-count", own)[1]["unread"] == 1)
    for path in (f"/users/{bob}/notifications", f"/users/{bob}/unread-count",
                 f"/notifications/offline/{bob}"):  # fmt: skip
        status, body = get(running, path, own)
        assert status == 403, path
        assert body["error"] == "forbidden"
    assert post(running, f"/users/{bob}/notifications/read", {"all": True},
                {"x-api-key": "", **own})[0] == 403  # fmt: skip
    assert get(running, f"/users/{bob}/notifications", {})[0] == 401


def test_a_socket_whose_presence_lapsed_gets_what_was_queued_meanwhile(running, rplat):
    # Delivery sees the user offline and leaves the notification pending; the gateway's next
    # heartbeat finds the presence gone, restores it and replays the queue to the socket.
    u = user()
    client = Client(running, u)
    try:
        wait_until(lambda: nodes_for(rplat, [u], 4).get(u))
        rplat.delete(presence_key(u))
        nid = notify(running, u)
        [frame] = client.wait_for(1)
    finally:
        client.close()
    assert frame["id"] == nid


def test_gateway_resubscribes_when_its_pubsub_connection_drops(running, rplat):
    u = user()
    client = Client(running, u)
    try:
        wait_until(lambda: nodes_for(rplat, [u], 4).get(u))
        db = rplat.connection_pool.connection_kwargs["db"]
        # Only this platform's subscribers: other test workers use other DB numbers.
        for c in rplat.client_list(_type="pubsub"):
            if int(c["db"]) == db:
                rplat.client_kill_filter(_id=c["id"])
        nid = notify(running, u)
        client.wait_for(1)
        second = notify(running, u)
        assert [f["id"] for f in client.wait_for(2)] == [nid, second]
    finally:
        client.close()
