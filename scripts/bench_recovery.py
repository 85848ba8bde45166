"""Durability figures: recovery after an empty Redis restart, and the reconciler's own cost.

    python scripts/bench_recovery.py recovery [--runs 3]  # Redis answering -> all delivered
    python scripts/bench_recovery.py cost [--seconds 60]  # reconciler CPU/min, idle and 500/s

Everything runs on this machine: the `make run` processes (Flower left out) with production
defaults for the reconciler, on a redis-server of this script's own (a free port, nothing on
disk, SIGKILLed and started again empty) and a database named for this run, dropped after.

recovery: 100 users hold a socket; with the consumer stopped (SIGSTOP), 2,000 single-
recipient notifications (half to the connected users, half to offline ones) and one
5,000-recipient notification are accepted and wait in the stream. Redis is then killed and
started empty, the consumer resumed, and the clock runs until every notification has all
its deliveries in PostgreSQL and every connected user has received all of theirs.

cost: the platform's beat runs the reconciler every hour only; this script calls it itself
every RECONCILE_SECONDS (5 s) for the measured time, and reads its CPU: this process's own
(process time) plus its PostgreSQL backend's (from /proc/PID/stat). Once with the platform
idle, once while notifications are posted at 500/s (50 per batch POST, 10 a second).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import redis
import websocket
from bench_delivery import BIN, PG_ADMIN, ROOT
from sqlalchemy import create_engine, text

from app.config import Config
from app.db import upgrade
from tasks import reconcile

API_KEY = "bench-recovery-key"
JWT_SECRET = "bench-recovery-secret-of-at-least-32-bytes"
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="notifier-recovery-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(self.port),
             "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        client = redis.Redis(port=self.port)
        for _ in range(100):
            with contextlib.suppress(redis.RedisError):
                if client.ping():
                    return
            time.sleep(0.05)
        raise SystemExit("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None


class Platform:
    """The `make run` processes but Flower, on this run's own database and redis-server."""

    def __init__(self, **settings: str) -> None:
        self.db_name = f"notifier_bench_recovery_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.db_url = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{self.db_name}"
        self.redis = Redis()
        self.port = free_port()
        self.logs = Path(tempfile.mkdtemp(prefix="notifier-recovery-"))
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.settings = settings

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ, "DATABASE_URL": self.db_url,
            "REDIS_URL": f"redis://127.0.0.1:{self.redis.port}/0", "API_KEY": API_KEY,
            "JWT_SECRET": JWT_SECRET, "PORT": str(self.port), "BIND_HOST": "127.0.0.1",
            "STREAM_BACKLOG_LIMIT": "10000000", "LOG_LEVEL": "WARNING", **self.settings,
        }  # fmt: skip

    def _start(self, name: str, *args: str) -> None:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115
        self.procs[name] = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]], cwd=ROOT, env=self.env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def __enter__(self) -> Platform:
        upgrade(self.db_url)  # creates the database
        self.redis.start()
        celery = ("celery", "-A", "wsgi.celery_app")
        quiet = ("--without-gossip", "--without-mingle", "-l", "WARNING")
        self._start("web", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app")
        self._start("consumer", *celery, "worker", "-Q", "stream", "-P", "solo",
                    "-n", "consumer@%h", *quiet)  # fmt: skip
        self._start("worker", *celery, "worker", "-Q", "high,default,low", "-P", "threads",
                    "-c", "4", "-n", "worker@%h", *quiet)  # fmt: skip
        self._start("channels", *celery, "worker", "-Q", "channels", "-P", "threads",
                    "-c", "16", "-n", "channels@%h", *quiet)  # fmt: skip
        self._start("beat", *celery, "beat", "-s", str(self.logs / "beat"), "-l", "WARNING")
        r = redis.Redis(port=self.redis.port)
        deadline = time.monotonic() + 60
        while not r.keys("notifications:consumer-lease:*"):
            if time.monotonic() > deadline:
                raise SystemExit(f"platform did not start; logs in {self.logs}")
            time.sleep(0.2)
        time.sleep(2)
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGCONT)
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        self.redis.kill()
        admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            # Only the database this run created.
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)'))
        admin.dispose()

    def signal(self, name: str, sig: int) -> None:
        os.killpg(self.procs[name].pid, sig)

    def post(self, path: str, body: Any) -> Any:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", data=json.dumps(body).encode(),
            headers={"content-type": "application/json", "x-api-key": API_KEY},
        )  # fmt: skip
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.status == 202
            return json.loads(resp.read())


def _token(user: str) -> str:
    import jwt

    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + 3600}, JWT_SECRET, "HS256")


class Socket:
    """One connected user, acking nothing, collecting the ids it is sent."""

    def __init__(self, port: int, user: str) -> None:
        self.ws = websocket.create_connection(
            f"ws://127.0.0.1:{port}/ws/{user}?token={_token(user)}", timeout=5
        )
        self.ids: set[str] = set()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                frame = json.loads(self.ws.recv())
            except websocket.WebSocketTimeoutException:
                continue
            except Exception:
                return
            if frame.get("type") == "notification":
                self.ids.add(frame["id"])


def recovery_run() -> dict[str, Any]:
    with Platform() as p:
        online = [f"on-{i}" for i in range(100)]
        sockets = {u: Socket(p.port, u) for u in online}
        time.sleep(1)
        p.signal("consumer", signal.SIGSTOP)
        wanted: dict[str, set[str]] = {u: set() for u in online}
        expected: dict[str, int] = {}
        for i in range(0, 2000, 50):
            items = []
            for j in range(i, i + 50):
                user = online[j % 100] if j % 2 == 0 else f"off-{j}"
                items.append({"user_id": user, "title": "t", "body": "b"})
            answer = p.post("/notifications/batch", {"notifications": items})
            for item, n in zip(items, answer["notifications"], strict=True):
                expected[n["id"]] = 1
                if item["user_id"] in wanted:
                    wanted[item["user_id"]].add(n["id"])
        fan = p.post("/notifications", {"user_ids": [*online[:10], *(f"fan-{k}" for k in
                                                                      range(4990))],
                                         "title": "t", "body": "b"})  # fmt: skip
        expected[fan["id"]] = 5000
        for u in online[:10]:
            wanted[u].add(fan["id"])

        p.redis.kill()
        p.redis.start()
        answering = time.monotonic()
        p.signal("consumer", signal.SIGCONT)
        engine = create_engine(p.db_url)
        recorded_at = delivered_at = None
        deadline = answering + 300
        while time.monotonic() < deadline and (recorded_at is None or delivered_at is None):
            if recorded_at is None:
                with engine.connect() as conn:
                    counts = dict(
                        conn.execute(
                            text("SELECT notification_id::text, count(*) FROM deliveries "
                                 "GROUP BY 1")
                        ).all()
                    )  # fmt: skip
                if all(counts.get(n, 0) >= c for n, c in expected.items()):
                    recorded_at = time.monotonic()
            if delivered_at is None and all(wanted[u] <= sockets[u].ids for u in online):
                delivered_at = time.monotonic()
            time.sleep(0.2)
        engine.dispose()
        return {
            "recorded_s": None if recorded_at is None else round(recorded_at - answering, 1),
            "delivered_live_s": None
            if delivered_at is None
            else round(delivered_at - answering, 1),
            "notifications": len(expected),
            "deliveries": sum(expected.values()),
        }


def _backend_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def cost_run(seconds: float, rate: int) -> dict[str, Any]:
    with Platform(RECONCILE_SECONDS="3600") as p:
        cfg = Config.from_env(p.env)
        every = Config().RECONCILE_SECONDS  # the default interval, not the platform's hour
        engine = create_engine(p.db_url, pool_size=1, max_overflow=0)
        client = redis.Redis.from_url(p.env["REDIS_URL"], decode_responses=True)
        stop = threading.Event()

        def load() -> None:
            per_post = 50
            n = 0
            start = time.monotonic()
            while not stop.is_set():
                items = [{"user_id": f"u{(n + k) % 5000}", "title": "t", "body": "b"}
                         for k in range(per_post)]  # fmt: skip
                p.post("/notifications/batch", {"notifications": items})
                n += per_post
                ahead = start + n / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)

        loader = threading.Thread(target=load, daemon=True) if rate else None
        if loader:
            loader.start()
        time.sleep(cfg.RECONCILE_GRACE_SECONDS + 5)  # a full window behind the load
        with engine.connect() as conn:
            backend = conn.scalar(text("SELECT pg_backend_pid()"))
        reconcile.reconcile_all(engine, client, cfg)  # the first run sets its marks
        own0, pg0, runs = time.process_time(), _backend_ticks(backend), 0
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            reconcile.reconcile_all(engine, client, cfg)
            runs += 1
            time.sleep(max(0.0, started + runs * every - time.monotonic()))
        elapsed = time.monotonic() - started
        own = time.process_time() - own0
        pg = (_backend_ticks(backend) - pg0) / TICKS
        stop.set()
        engine.dispose()
        per_minute = 60 / elapsed
        return {
            "rate": rate,
            "runs": runs,
            "reconciler_cpu_s_per_min": round(own * per_minute, 3),
            "postgres_cpu_s_per_min": round(pg * per_minute, 3),
        }


def main() -> int:
    # A SIGTERM (`timeout`, Ctrl-C's cousin) unwinds through Platform.__exit__: no orphans.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["recovery", "cost"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    if args.what == "recovery":
        runs = [recovery_run() for _ in range(args.runs)]
        for r in runs:
            print(json.dumps(r))
        done = [r["recorded_s"] for r in runs if r["recorded_s"] is not None]
        live = [r["delivered_live_s"] for r in runs if r["delivered_live_s"] is not None]
        print(json.dumps({"median_recorded_s": statistics.median(done) if done else None,
                          "median_delivered_live_s": statistics.median(live) if live else None,
                          "runs": len(runs)}))  # fmt: skip
    else:
        for rate in (0, 500):
            print(json.dumps(cost_run(args.seconds, rate)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
