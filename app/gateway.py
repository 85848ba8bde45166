"""The WebSocket gateway: `ws://HOST:PORT/ws/{user_id}`.

One Hub per gateway process holds the process's sockets by user, one Redis Pub/Sub
connection on the process's own node channel, and a heartbeat greenlet that keeps the
presence of its users alive. On connect a socket is registered and its presence written
first, then the user's un-acked notifications are replayed oldest first, then live ones
follow; ids already sent on this socket are never sent again.

All writes to a socket happen in its handler greenlet: the Pub/Sub listener only appends
to the socket's outbox and wakes it.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import uuid
from datetime import datetime
from typing import Any

import orjson
import redis
from flask import Blueprint, current_app, request
from flask_sock import Sock
from simple_websocket import ConnectionClosed
from wsproto.events import Ping

from app import db, inbox, metrics, presence
from app.auth import authenticate_api_key, bearer_token
from app.redis_client import make_redis
from app.tokens import InvalidToken, verify

log = logging.getLogger(__name__)

bp = Blueprint("gateway", __name__)
sock = Sock()

CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_UNSUPPORTED = 1003
REPLAY_PAGE = 500
SENT_IDS_KEPT = 20_000  # per socket, enough to dedupe any replay/live overlap
ACK_IDS_MAX = 1000
ACK_FLUSH_SECONDS = 0.05
# Outbox markers: the handler greenlet, the only writer of its socket, acts on them.
PING: dict[str, Any] = {"type": "__ping__"}
CLOSE_NO_PONG: dict[str, Any] = {"type": "__close_no_pong__"}
# Replay the user's un-acked notifications again: live messages may have been missed.
RESYNC: dict[str, Any] = {"type": "__resync__"}
CLOSE_TOO_BIG = 1009
HARD_FRAME_FACTOR = 16
# Users per heartbeat call and sockets per ping round between yields: the heartbeat and
# pinger share the process's one thread with live sends, so they never hold it for long.
SLICE = 500


class Live:
    """A notification frame from Pub/Sub, serialised once per envelope and user."""

    __slots__ = ("created", "high", "id", "text")

    def __init__(self, nid: str, text: str, created: float, high: bool = False) -> None:
        self.id = nid
        self.text = text
        self.created = created
        self.high = high


class Socket:
    """One client connection: its outbox and what it has been sent."""

    __slots__ = ("counted", "id", "outbox", "sent", "sent_order", "urgent", "user_id", "ws")

    def __init__(self, ws: Any, user_id: str) -> None:
        self.id = uuid.uuid4().hex
        self.ws = ws
        self.user_id = user_id
        self.outbox: collections.deque[dict[str, Any] | Live] = collections.deque()
        # High-priority notifications go out before whatever low ones are still queued.
        self.urgent: collections.deque[Live] = collections.deque()
        self.sent: set[str] = set()
        self.sent_order: collections.deque[str] = collections.deque()
        self.counted = False

    def push(self, message: dict[str, Any] | Live) -> None:
        """Queue a message for this socket and wake its handler (any greenlet may call it)."""
        if isinstance(message, Live) and message.high:
            self.urgent.append(message)
        else:
            self.outbox.append(message)
        self.ws.event.set()

    def next_message(self) -> dict[str, Any] | Live | None:
        """The next queued message, high-priority live ones first; None when none waits."""
        if self.urgent:
            return self.urgent.popleft()
        return self.outbox.popleft() if self.outbox else None

    def send(self, message: dict[str, Any]) -> bool:
        """Write one message; False when it is a notification this socket already had."""
        if message is PING:
            self.ws.sock.send(self.ws.ws.send(Ping()))
            return True
        if message is CLOSE_NO_PONG:
            self.ws.close(reason=1008, message="no pong to the last ping")
            return True
        if message.get("type") == "notification" and not self._first(message["id"]):
            return False
        self.ws.send(orjson.dumps(message).decode())
        return True

    def _first(self, nid: str) -> bool:
        """Remember that `nid` was sent; False when it had been already."""
        if nid in self.sent:
            return False
        self.sent.add(nid)
        self.sent_order.append(nid)
        if len(self.sent_order) > SENT_IDS_KEPT:
            self.sent.discard(self.sent_order.popleft())
        return True

    def send_live(self, message: dict[str, Any] | Live) -> None:
        """Write a message that came through Pub/Sub, timing notifications from acceptance."""
        if not isinstance(message, Live):
            self.send(message)
            return
        if not self._first(message.id):
            return
        self.ws.send(message.text)
        metrics.delivery_latency.observe(max(0.0, time.time() - message.created))
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "sent to socket",
                extra={"notification_id": message.id, "user_id": self.user_id},
            )


class Hub:
    """The process's sockets, its Pub/Sub listener and its presence heartbeat."""

    def __init__(
        self,
        redis_url: str,
        presence_ttl: float,
        heartbeat: float,
        engine: Any = None,
        ping_every: float = 25.0,
    ) -> None:
        self.node_id = uuid.uuid4().hex
        self._ping_every = ping_every
        self._engine = engine
        self._acks: list[tuple[str, uuid.UUID]] = []
        self._acks_waiting = threading.Event()
        self._redis_url = redis_url
        self._presence_ttl = presence_ttl
        self._heartbeat = heartbeat
        self._sockets: dict[str, set[Socket]] = collections.defaultdict(set)
        self._pid = 0
        self._lock = threading.Lock()
        self.redis: redis.Redis | None = None

    def start(self) -> None:
        """Start the listener and heartbeat once per process (gunicorn forks after import)."""
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            self.node_id = uuid.uuid4().hex
            self.redis = make_redis(self._redis_url)
            self._sockets.clear()
            ready = threading.Event()
            threading.Thread(target=self._listen, args=(ready,), daemon=True).start()
            threading.Thread(target=self._beat, daemon=True).start()
            threading.Thread(target=self._flush_acks, daemon=True).start()
            threading.Thread(target=self._ping, daemon=True).start()
            ready.wait(10)
            self._pid = os.getpid()

    def add(self, s: Socket) -> None:
        self._sockets[s.user_id].add(s)
        assert self.redis is not None
        presence.mark_online(self.redis, self.node_id, [s.user_id], self._presence_ttl)

    def remove(self, s: Socket) -> None:
        users = self._sockets.get(s.user_id)
        if users is None or s not in users:
            return
        users.discard(s)
        if s.counted:
            metrics.open_sockets.dec()
        if not users:
            del self._sockets[s.user_id]
            try:
                assert self.redis is not None
                presence.mark_offline(self.redis, self.node_id, s.user_id)
            except redis.RedisError:
                log.warning("could not clear presence of %s; it lapses by TTL", s.user_id)

    @staticmethod
    def ready(s: Socket) -> None:
        """Count a socket as open once its connect-time replay is sent: a client that load
        tests a fan-out waits for this count, and must not post while replays still run."""
        s.counted = True
        metrics.open_sockets.inc()

    def resync(self, users: list[str] | None = None) -> None:
        """Have sockets replay their un-acked notifications (all sockets when `users` is None)."""
        for user_id in list(self._sockets) if users is None else users:
            for s in tuple(self._sockets.get(user_id, ())):
                s.push(RESYNC)

    def _listen(self, ready: threading.Event) -> None:
        channel = presence.node_channel(self.node_id)
        subscribed_before = False
        while True:
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[union-attr]
                pubsub.subscribe(channel)
                ready.set()
                if subscribed_before:
                    # Publishes while unsubscribed reached no one and were left pending.
                    self.resync()
                subscribed_before = True
                while True:
                    msg = pubsub.get_message(timeout=1.0)
                    if msg is not None:
                        self._dispatch(orjson.loads(msg["data"]))
            except Exception:
                log.exception("pub/sub listener failed; resubscribing")
                time.sleep(0.5)

    def _dispatch(self, envelope: dict[str, Any]) -> None:
        if envelope["t"] == "deliver":
            base = envelope["n"]
            # Serialise once; each user's frame only adds its own seq in front.
            tail = orjson.dumps(base).decode()[1:]
            created = datetime.fromisoformat(base["created_at"]).timestamp()
            high = base.get("priority") == "high"
            for user_id, seq in envelope["to"]:
                sockets = self._sockets.get(user_id)
                if sockets:
                    frame = Live(base["id"], f'{{"seq":{int(seq)},{tail}', created, high)
                    for s in tuple(sockets):
                        s.push(frame)
        elif envelope["t"] == "event":
            for s in tuple(self._sockets.get(envelope["u"], ())):
                if s.id != envelope.get("x"):
                    s.push(envelope["m"])

    def ack(self, user_id: str, ids: list[uuid.UUID]) -> None:
        """Buffer a socket's acks; the flusher writes them with everyone else's."""
        self._acks.extend((user_id, nid) for nid in ids)
        self._acks_waiting.set()

    def _flush_acks(self) -> None:
        while True:
            self._acks_waiting.wait()
            time.sleep(ACK_FLUSH_SECONDS)  # let a burst of acks gather
            self._acks_waiting.clear()
            batch, self._acks = self._acks, []
            try:
                inbox.ack_many(self._engine, batch)
            except Exception:
                # Un-acked copies are offered again on the next connect; nothing is lost.
                log.exception("could not write %d acks", len(batch))

    def _ping(self) -> None:
        """Ping every socket each interval; close the ones that did not answer the last ping."""
        while True:
            time.sleep(self._ping_every)
            for n, sockets in enumerate(list(self._sockets.values()), 1):
                for s in tuple(sockets):
                    if not s.ws.pong_received:
                        s.push(CLOSE_NO_PONG)
                    else:
                        s.ws.pong_received = False
                        s.push(PING)
                if n % SLICE == 0:
                    time.sleep(0)  # let live sends through between slices of pings

    def _beat(self) -> None:
        while True:
            time.sleep(self._heartbeat)
            try:
                users = list(self._sockets)
                lapsed = []
                for i in range(0, len(users), SLICE):
                    lapsed += presence.mark_online(
                        self.redis,  # type: ignore[arg-type]
                        self.node_id,
                        users[i : i + SLICE],
                        self._presence_ttl,
                    )
                    time.sleep(0)  # one slice at a time: live sends go on meanwhile
                if lapsed:
                    # Delivery saw these users offline meanwhile and left their queue pending.
                    log.warning("presence of %d users had lapsed; replaying", len(lapsed))
                    self.resync(lapsed)
            except Exception:
                log.exception("presence heartbeat failed")


def init_app(app: Any) -> None:
    cfg = app.config["NOTIFIER"]
    app.config["SOCK_SERVER_OPTIONS"] = {
        # Pings come from the Hub's one pinger, not from a timer and selector per socket.
        "ping_interval": None,
        # A hard stop far above the limit: frames between the two are read whole and then
        # refused with a clean 1009, which a client sees reliably (closing while a frame is
        # still arriving can reset the connection before the close frame is read).
        "max_message_size": HARD_FRAME_FACTOR * cfg.WS_MAX_MESSAGE_BYTES,
    }
    app.extensions["gateway.hub"] = Hub(
        cfg.REDIS_URL,
        cfg.PRESENCE_TTL_SECONDS,
        cfg.PRESENCE_HEARTBEAT_SECONDS,
        app.extensions["db.engine"],
        cfg.WS_PING_SECONDS,
    )
    sock.init_app(app)
    app.register_blueprint(bp)


def _authorize(user_id: str) -> tuple[int, str] | None:
    """None when the request may open a socket for `user_id`, else (close code, reason)."""
    if request.headers.get("x-api-key"):
        caller = authenticate_api_key()
        if caller is None:
            return CLOSE_UNAUTHORIZED, "invalid API key"
        if "read" not in caller.scopes:
            return CLOSE_FORBIDDEN, "this API key lacks the 'read' scope"
        return None
    token = request.args.get("token") or bearer_token()
    try:
        sub = verify(current_app.config["NOTIFIER"].JWT_SECRET, token)
    except InvalidToken as exc:
        return CLOSE_UNAUTHORIZED, f"invalid token: {exc}"[:120]
    if sub != user_id:
        return CLOSE_FORBIDDEN, "token is for another user"
    return None


@sock.route("/ws/<user_id>", bp=bp)
def websocket(ws: Any, user_id: str) -> None:
    denied = _authorize(user_id)
    if denied is not None:
        ws.close(reason=denied[0], message=denied[1])
        return
    hub: Hub = current_app.extensions["gateway.hub"]
    hub.start()
    s = Socket(ws, user_id)
    try:
        hub.add(s)
        _replay(s)
        hub.ready(s)
        _serve(s, hub)
    except ConnectionClosed:
        pass
    finally:
        hub.remove(s)


def _replay(s: Socket) -> None:
    """Send every un-acked notification of the user, oldest first, page by page."""
    engine = current_app.extensions["db.engine"]
    after = 0
    while True:
        with db.autocommit(engine) as conn:
            rows = inbox.unacked(conn, s.user_id, after_seq=after, limit=REPLAY_PAGE)
        inbox.mark_sent(engine, [r.id for r in rows if str(r.status) == "pending"])
        for row in rows:
            if s.send(inbox.message(row)) and log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "replayed to socket",
                    extra={"notification_id": str(row.notification_id), "user_id": s.user_id},
                )
        if len(rows) < REPLAY_PAGE:
            return
        after = rows[-1].id


def _serve(s: Socket, hub: Hub) -> None:
    """Alternate between sending queued messages and handling client frames until closed."""
    ws = s.ws
    while True:
        while (message := s.next_message()) is not None:
            if message is RESYNC:
                _replay(s)
            else:
                s.send_live(message)
            if ws.input_buffer:
                break  # the client's acks and pings are answered between frames too
            if s.outbox or s.urgent:
                # One frame per turn. A write that does not block never yields under
                # gevent, so a burst queued for hundreds of sockets had each handler send
                # its whole queue at once, and the API's requests and the ingest writer
                # waited behind many sockets' queues at each of their round trips.
                time.sleep(0)
        if ws.input_buffer:
            if not _handle_frame(s, hub, ws.input_buffer.pop(0)):
                return
            continue
        if not ws.connected:
            return
        ws.event.wait()
        ws.event.clear()


def _error(s: Socket, code: str, text: str) -> None:
    s.send({"type": "error", "error": code, "message": text})


def _handle_frame(s: Socket, hub: Hub, frame: str | bytes) -> bool:
    """Act on one client frame; False when the socket was closed because of it."""
    if isinstance(frame, bytes):
        s.ws.close(reason=CLOSE_UNSUPPORTED, message="binary frames are not supported")
        return False
    limit = current_app.config["NOTIFIER"].WS_MAX_MESSAGE_BYTES
    if len(frame) > limit:
        s.ws.close(reason=CLOSE_TOO_BIG, message=f"frames are limited to {limit} bytes")
        return False
    try:
        msg = orjson.loads(frame)
    except orjson.JSONDecodeError:
        _error(s, "invalid_json", "frames must be JSON objects")
        return True
    kind = msg.get("type") if isinstance(msg, dict) else None
    if kind == "ping":
        s.send({"type": "pong"})
    elif kind in ("ack", "read"):
        ids = _parse_ids(msg.get("ids"))
        if ids is None:
            _error(
                s, "invalid_ids", f"'ids' must be a list of at most {ACK_IDS_MAX} notification ids"
            )
            return True
        if kind == "ack":
            hub.ack(s.user_id, ids)
            return True
        with current_app.extensions["db.engine"].begin() as conn:
            changed = inbox.mark_read(conn, s.user_id, ids)
        if changed:
            _push_read(hub, s, changed)
    else:
        _error(s, "unknown_type", "known frame types: ack, read, ping")
    return True


def _push_read(hub: Hub, origin: Socket, ids: list[str]) -> None:
    cfg = current_app.config["NOTIFIER"]
    try:
        presence.publish_event(
            hub.redis,  # type: ignore[arg-type]
            origin.user_id,
            {"type": "read", "ids": ids},
            cfg.PRESENCE_TTL_SECONDS,
            exclude_socket=origin.id,
        )
    except redis.RedisError:
        log.warning("could not push read marks for %s", origin.user_id)


def _parse_ids(raw: Any) -> list[uuid.UUID] | None:
    if not isinstance(raw, list) or len(raw) > ACK_IDS_MAX:
        return None
    try:
        return [uuid.UUID(x) for x in raw]
    except (ValueError, TypeError, AttributeError):
        return None
