"""The gateway under gunicorn: auth close codes, bad frames, several processes, presence."""

from __future__ import annotations

import base64
import json
import time
import uuid

import pytest
import websocket

from app.presence import nodes_for, presence_key
from tests.helpers import wait_until
from tests.platform import API_KEY, Client, notify, token

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gateways(platform):
    """Two gateway servers (two nodes) plus consumer, delivery workers and beat."""
    a, _ = platform.gateway(workers=1)
    b, _ = platform.gateway(workers=1)
    platform.consumer_worker()
    platform.delivery_worker(concurrency=2)
    platform.beat()
    return a, b


def user() -> str:
    return f"user-{uuid.uuid4().hex[:10]}"


def _close_code(port: int, path: str, **kwargs) -> tuple[int, str]:
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=10, **kwargs)
    try:
        opcode, data = ws.recv_data(control_frame=True)
        assert opcode == websocket.ABNF.OPCODE_CLOSE, (opcode, data)
        return int.from_bytes(data[:2], "big"), data[2:].decode()
    finally:
        ws.close()


def _unsigned(user_id: str) -> str:
    def b64(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64({'sub': user_id, 'exp': 4102444800})}."


@pytest.mark.parametrize(
    ("make_query", "code"),
    [
        pytest.param(lambda u: "", 4401, id="missing"),
        pytest.param(lambda u: "?token=not.a.jwt", 4401, id="malformed"),
        pytest.param(lambda u: f"?token={token(u, ttl=-10)}", 4401, id="expired"),
        pytest.param(lambda u: f"?token={_unsigned(u)}", 4401, id="alg-none"),
        pytest.param(
            lambda u: f"?token={token(u, secret='another-secret-of-32-bytes-or-more')}",
            4401,
            id="wrong-secret",
        ),
        pytest.param(lambda u: f"?token={token('someone-else')}", 4403, id="other-user"),
    ],
)
def test_bad_tokens_close_the_socket_with_their_code(gateways, make_query, code):
    u = user()
    got, reason = _close_code(gateways[0], f"/ws/{u}{make_query(u)}")
    assert got == code
    assert reason


def test_token_without_exp_is_rejected(gateways):
    import jwt as pyjwt

    from tests.platform import JWT_SECRET

    u = user()
    tok = pyjwt.encode({"sub": u}, JWT_SECRET, "HS256")
    assert _close_code(gateways[0], f"/ws/{u}?token={tok}")[0] == 4401


def test_bearer_header_and_api_key_are_accepted(gateways):
    u = user()
    by_header = websocket.create_connection(
        f"ws://127.0.0.1:{gateways[0]}/ws/{u}", header=[f"Authorization: Bearer {token(u)}"]
    )
    by_key = websocket.create_connection(
        f"ws://127.0.0.1:{gateways[0]}/ws/{u}", header=[f"x-api-key: {API_KEY}"]
    )
    try:
        for ws in (by_header, by_key):
            ws.send(json.dumps({"type": "ping"}))
            assert json.loads(ws.recv()) == {"type": "pong"}
    finally:
        by_header.close()
        by_key.close()
    assert _close_code(gateways[0], f"/ws/{u}", header=["x-api-key: wrong"])[0] == 4401


def test_malformed_frames_get_error_frames_and_the_socket_stays_up(gateways):
    client = Client(gateways[0], user())
    try:
        client.send("{not json")
        client.send(json.dumps({"type": "dance"}))
        client.send(json.dumps(["ack"]))
        client.send(json.dumps({"type": "ack", "ids": "nope"}))
        client.send(json.dumps({"type": "ack", "ids": ["not-a-uuid"]}))
        errors = client.wait_for(5, kind="error")
        client.send(json.dumps({"type": "ping"}))
        client.wait_for(1, kind="pong")
    finally:
        client.close()
    assert [e["error"] for e in errors] == [
        "invalid_json", "unknown_type", "unknown_type", "invalid_ids", "invalid_ids",
    ]  # fmt: skip


def test_binary_frame_closes_with_1003(gateways):
    client = Client(gateways[0], user())
    try:
        client.ws.send_binary(b"\x00\x01")
        wait_until(lambda: client.closed is not None)
    finally:
        client.close()
    assert client.closed[0] == 1003


def test_oversized_frame_closes_with_1009(gateways):
    client = Client(gateways[0], user())
    try:
        client.send(json.dumps({"type": "ping", "pad": "x" * 70_000}))
        wait_until(lambda: client.closed is not None)
    finally:
        client.close()
    assert client.closed[0] == 1009


def test_sockets_on_two_gateway_processes_both_receive(gateways):
    u = user()
    on_a, on_b = Client(gateways[0], u), Client(gateways[1], u)
    try:
        nid = notify(gateways[0], u)
        assert on_a.wait_for(1)[0]["id"] == nid
        assert on_b.wait_for(1)[0]["id"] == nid
        on_b.send({"type": "read", "ids": [nid]})
        assert on_a.wait_for(1, kind="read")[0]["ids"] == [nid]
    finally:
        on_a.close()
        on_b.close()


def test_each_gateway_receives_only_its_own_users(gateways, rplat):
    u = user()
    client = Client(gateways[0], u)
    try:
        wait_until(lambda: nodes_for(rplat, [u], 4).get(u))
        nodes = nodes_for(rplat, [u], 4)[u]
    finally:
        client.close()
    assert len(nodes) == 1  # only the node holding the socket is routed to


def test_presence_lapses_after_a_gateway_is_sigkilled(platform, rplat):
    port, proc = platform.gateway(workers=1)
    u = user()
    client = Client(port, u)
    wait_until(lambda: nodes_for(rplat, [u], 4).get(u))

    platform.kill(proc)
    client.close()

    # PRESENCE_TTL_SECONDS is 4 here; the production bound is 30.
    wait_until(lambda: not nodes_for(rplat, [u], 4), timeout=10)
    wait_until(lambda: not rplat.exists(presence_key(u)), timeout=10)


def test_disconnect_clears_presence_at_once(gateways, rplat):
    u = user()
    client = Client(gateways[0], u)
    wait_until(lambda: nodes_for(rplat, [u], 4).get(u))
    client.close()
    wait_until(lambda: not nodes_for(rplat, [u], 4), timeout=5)


def test_server_pings_idle_sockets(platform):
    port, _ = platform.gateway(WS_PING_SECONDS="1")
    u = user()
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/ws/{u}?token={token(u)}", timeout=10)
    try:
        opcodes = []
        deadline = time.monotonic() + 8
        while websocket.ABNF.OPCODE_PING not in opcodes and time.monotonic() < deadline:
            opcode, _ = ws.recv_data(control_frame=True)
            opcodes.append(opcode)
        # The client answered with a pong (websocket-client does so itself): still open.
        time.sleep(1.5)
        ws.send(json.dumps({"type": "ping"}))
        while True:
            opcode, data = ws.recv_data(control_frame=True)
            if opcode == websocket.ABNF.OPCODE_TEXT:
                break
    finally:
        ws.close()
    assert websocket.ABNF.OPCODE_PING in opcodes
    assert json.loads(data) == {"type": "pong"}


def test_an_api_key_without_the_read_scope_cannot_open_a_socket(gateways, platform_settings):
    from app import create_app, db

    flask_app = create_app(platform_settings)
    made = flask_app.test_cli_runner().invoke(
        args=["keys", "create", f"sender-{uuid.uuid4().hex[:6]}", "--scopes", "send"]
    )
    flask_app.extensions["ingest.writer"].close()
    db.dispose(flask_app.extensions["db.engine"])

    code, reason = _close_code(
        gateways[0], f"/ws/{user()}", header=[f"x-api-key: {made.stdout.strip()}"]
    )

    assert code == 4403
    assert "read" in reason
