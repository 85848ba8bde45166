"""Real platform processes for end-to-end tests: gunicorn gateways, Celery workers, beat.

Each test worker gets its own PostgreSQL database and Redis DB for these, separate from
the ones the in-process tests truncate and flush between tests.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
import websocket

from tests.helpers import free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "platform-test-key"
JWT_SECRET = "platform-test-secret-of-at-least-32-bytes"


class Platform:
    """Starts and stops the platform's processes with one set of settings."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def _spawn(self, name: str, args: list[str], **env: str) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            args,
            cwd=ROOT,
            env={**os.environ, **self.env, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so a kill takes its children
        )
        log.close()
        self.procs.append(proc)
        return proc

    def gateway(self, workers: int = 1, **env: str) -> tuple[int, subprocess.Popen[bytes]]:
        """A gunicorn server as `make run` starts it; returns (port, process)."""
        port = free_port()
        proc = self._spawn(
            "web",
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
            PORT=str(port), BIND_HOST="127.0.0.1", WEB_CONCURRENCY=str(workers), **env,
        )  # fmt: skip

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"gunicorn exited with {proc.returncode}")
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            try:
                conn.request("GET", "/healthz")
                return conn.getresponse().status == 200
            except OSError:
                return False
            finally:
                conn.close()

        wait_until(up, timeout=30, interval=0.1)
        return port, proc

    def celery(self, *args: str, **env: str) -> subprocess.Popen[bytes]:
        return self._spawn(
            "celery", [sys.executable, "-m", "celery", "-A", "wsgi.celery_app", *args], **env
        )

    def consumer_worker(self, **env: str) -> subprocess.Popen[bytes]:
        name = f"consumer-{uuid.uuid4().hex[:6]}@%h"
        return self.celery("worker", "-Q", "stream", "-P", "solo", "-n", name,
                           "--without-gossip", "--without-mingle", "-l", "INFO", **env)  # fmt: skip

    def delivery_worker(self, concurrency: int = 2, **env: str) -> subprocess.Popen[bytes]:
        return self.celery("worker", "-Q", "high,default,low", "-P", "threads",
                           "-c", str(concurrency), "-n", f"worker-{uuid.uuid4().hex[:6]}@%h",
                           "--without-gossip", "--without-mingle", "-l", "INFO", **env)  # fmt: skip

    def channels_worker(self, concurrency: int = 4, **env: str) -> subprocess.Popen[bytes]:
        return self.celery("worker", "-Q", "channels", "-P", "threads",
                           "-c", str(concurrency), "-n", f"channels-{uuid.uuid4().hex[:6]}@%h",
                           "--without-gossip", "--without-mingle", "-l", "INFO", **env)  # fmt: skip

    def beat(self, **env: str) -> subprocess.Popen[bytes]:
        schedule = self.log_dir / f"beat-{uuid.uuid4().hex[:6]}"
        return self.celery("beat", "-s", str(schedule), "-l", "INFO", **env)

    @staticmethod
    def kill(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        proc.wait(timeout=30)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()


def token(user_id: str, ttl: int = 600, secret: str = JWT_SECRET, **claims: Any) -> str:
    now = int(time.time())
    return jwt.encode({"sub": user_id, "iat": now, "exp": now + ttl, **claims}, secret, "HS256")


def post(port: int, path: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, body=json.dumps(body),
                     headers={"content-type": "application/json", "x-api-key": API_KEY,
                              **(headers or {})})  # fmt: skip
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, json.loads(data) if data else None
    finally:
        conn.close()


def put(port: int, path: str, body: Any) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("PUT", path, body=json.dumps(body),
                     headers={"content-type": "application/json",
                              "x-api-key": API_KEY})  # fmt: skip
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, json.loads(data) if data else None
    finally:
        conn.close()


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(
            "GET", path, headers=headers if headers is not None else {"x-api-key": API_KEY}
        )
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, json.loads(data) if data else None
    finally:
        conn.close()


def notify(port: int, user_id: str, **fields: Any) -> str:
    status, body = post(port, "/notifications",
                        {"user_id": user_id, "title": "t", "body": "b", **fields})  # fmt: skip
    assert status == 202, body
    return body["id"]


class Client:
    """A WebSocket client that collects every frame it receives in a background thread."""

    def __init__(self, port: int, user_id: str, tok: str | None = None, **kwargs: Any) -> None:
        tok = tok if tok is not None else token(user_id)
        self.ws = websocket.create_connection(
            f"ws://127.0.0.1:{port}/ws/{user_id}?token={tok}", timeout=10, **kwargs
        )
        self.frames: list[dict[str, Any]] = []
        self.closed: tuple[int | None, str] | None = None
        self._closing = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                opcode, data = self.ws.recv_data(control_frame=False)
            except websocket.WebSocketTimeoutException:
                # A quiet socket is not a lost one: the timeout only bounds the handshake.
                if self._closing:
                    return
                continue
            except Exception:
                self.closed = self.closed or (None, "connection lost")
                return
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                code = int.from_bytes(data[:2], "big") if len(data) >= 2 else None
                self.closed = (code, data[2:].decode(errors="replace"))
                return
            if opcode == websocket.ABNF.OPCODE_TEXT:
                with self._lock:
                    self.frames.append(json.loads(data))

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        with self._lock:
            return [f for f in self.frames if f.get("type") == kind]

    def notifications(self) -> list[dict[str, Any]]:
        return self.of_type("notification")

    def wait_for(self, count: int, kind: str = "notification", timeout: float = 30) -> list[dict]:
        wait_until(lambda: len(self.of_type(kind)) >= count, timeout=timeout)
        return self.of_type(kind)

    def send(self, message: Any) -> None:
        self.ws.send(json.dumps(message) if not isinstance(message, (str, bytes)) else message)

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(Exception):
            self.ws.close()
        self._thread.join(timeout=5)
