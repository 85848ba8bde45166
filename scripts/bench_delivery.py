"""Delivery benchmarks: starts its own platform (a `notifier_bench` database and Redis DB 1),
drives it with the k6 scripts and prints the figures next to their targets.

    make bench-delivery                       # every scenario
    python scripts/bench_delivery.py latency fanout --json var/bench.json

Scenarios: latency (POST-to-socket at 500/s), throughput (2,000/s sustained, single
recipients and 10-recipient batches), idle (10,000 idle sockets on one gateway process),
fanout (one notification to 10,000 connected users), priority (high-priority latency
behind 20,000 queued low-priority deliveries).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.db import upgrade  # noqa: E402

BIN = Path(sys.executable).parent
PG_ADMIN = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
BENCH_DB = "postgresql+psycopg2://postgres@127.0.0.1:5432/notifier_bench"
BENCH_REDIS = "redis://127.0.0.1:6379/1"
PORT = 8100
API_KEY = "bench-api-key"
# The delivery worker's pool, as in the Procfile; BENCH_WORKER_POOL="-c 2" tries prefork.
WORKER_POOL = os.environ.get("BENCH_WORKER_POOL", "-P threads -c 4").split()


class Platform:
    """The processes `make run` starts (Flower left out), on the bench database."""

    def __init__(
        self, web_workers: int | None = None, api_only: bool = False, **settings: str
    ) -> None:
        self.api_only = api_only
        self.env = {
            **os.environ,
            "DATABASE_URL": BENCH_DB,
            "REDIS_URL": BENCH_REDIS,
            "API_KEY": API_KEY,
            "PORT": str(PORT),
            "BIND_HOST": "127.0.0.1",
            "STREAM_WATCHDOG_SECONDS": "1",
            "STREAM_BACKLOG_LIMIT": "10000000",
            "LOG_LEVEL": "WARNING",
            # The retry storm's failing receiver listens on loopback.
            "WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
            **settings,
        }
        if web_workers is not None:
            self.env["WEB_CONCURRENCY"] = str(web_workers)
        # Otherwise gunicorn.conf.py's default (or the caller's WEB_CONCURRENCY), as `make run`.
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs = Path(tempfile.mkdtemp(prefix="notifier-bench-"))

    def _start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]], cwd=ROOT, env=self.env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.procs.append(proc)
        return proc

    def __enter__(self) -> Platform:
        engine = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text("DROP DATABASE IF EXISTS notifier_bench WITH (FORCE)"))
        engine.dispose()
        upgrade(BENCH_DB)
        r = redis.Redis.from_url(BENCH_REDIS)
        r.flushdb()
        self.web = self._start("web", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app")
        if self.api_only:
            self._wait_ready(r, consumer=False)
            return self
        self._start("consumer", "celery", "-A", "wsgi.celery_app", "worker", "-Q", "stream",
                    "-P", "solo", "-n", "consumer@%h", "--without-gossip", "--without-mingle",
                    "-l", "WARNING")  # fmt: skip
        self._start("worker", "celery", "-A", "wsgi.celery_app", "worker", "-Q",
                    "high,default,low", *WORKER_POOL, "-n", "worker@%h", "--without-gossip",
                    "--without-mingle", "-l", "WARNING")  # fmt: skip
        self._start("channels", "celery", "-A", "wsgi.celery_app", "worker", "-Q", "channels",
                    "-P", "threads", "-c", "16", "-n", "channels@%h", "--without-gossip",
                    "--without-mingle", "-l", "WARNING")  # fmt: skip
        self._start("beat", "celery", "-A", "wsgi.celery_app", "beat", "-s",
                    str(self.logs / "beat-schedule"), "-l", "WARNING")  # fmt: skip
        self._wait_ready(r, consumer=True)
        return self

    def _wait_ready(self, r: redis.Redis, consumer: bool) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{PORT}/readyz", timeout=2).read()
                if not consumer or r.keys("notifications:consumer-lease:*"):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            self.__exit__()  # no orphans left to consume the next run's stream
            raise SystemExit(f"platform did not start; logs in {self.logs}")
        r.close()
        time.sleep(2)

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    def web_worker_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.web.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# The latency scenario's every sample, for the report's plot (scripts/bench.py).
LATENCY_CSV = ROOT / "var" / "latency-samples.csv"


def k6(script: str, csv: Path | None = None, **env: Any) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / "summary.json"
        cmd = [str(BIN / "k6"), "run", "--quiet", "--summary-export", str(summary)]
        if csv is not None:
            csv.parent.mkdir(parents=True, exist_ok=True)
            cmd += ["--out", f"csv={csv}"]
        for key, value in {"BASE_URL": f"http://127.0.0.1:{PORT}", "API_KEY": API_KEY,
                           **env}.items():  # fmt: skip
            cmd += ["-e", f"{key}={value}"]
        cmd.append(str(ROOT / "scripts" / "k6" / script))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if not summary.exists():
            raise SystemExit(f"k6 failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        data = json.loads(summary.read_text())
        data["passed"] = proc.returncode == 0
        return data


def metric(summary: dict[str, Any], name: str, stat: str) -> float:
    return float(summary["metrics"].get(name, {}).get(stat, 0.0))


class BacklogSampler:
    """Samples the stream's unprocessed entries and the delivery queues once a second."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        r = redis.Redis.from_url(BENCH_REDIS, decode_responses=True)
        from app.stream import backlog

        while not self._stop.wait(1.0):
            queued = sum(r.llen(q) for q in ("high", "default", "low"))
            self.samples.append(backlog(r, "notifications:stream", "notifier_group") + queued)

    def __enter__(self) -> BacklogSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def scenario_latency() -> list[dict[str, Any]]:
    with Platform():
        s = k6("delivery.js", csv=LATENCY_CSV, RATE=500, DURATION="30s", USERS=200)
    return [{
        "scenario": "POST-to-socket latency at 500 notifications/s (200 sockets)",
        "figure": f"p50 {metric(s, 'post_to_socket_ms', 'p(50)'):.0f} ms, "
                  f"p99 {metric(s, 'post_to_socket_ms', 'p(99)'):.0f} ms",
        "target": "p50 < 10 ms, p99 < 50 ms",
        "met": metric(s, "notifications_received", "count")
        >= metric(s, "notifications_posted", "count") > 0
        and metric(s, "post_to_socket_ms", "p(50)") < 10
        and metric(s, "post_to_socket_ms", "p(99)") < 50,
        "detail": {"posted": metric(s, "notifications_posted", "count"),
                   "received": metric(s, "notifications_received", "count"),
                   "http_p50_ms": metric(s, "http_req_duration", "p(50)")},
    }]  # fmt: skip


def scenario_throughput() -> list[dict[str, Any]]:
    results = []
    # (recipients per notification, notifications per POST, POST/s): single notifications,
    # 10-recipient notifications, and single-recipient notifications sent 20 per batch POST.
    for per_post, batch, rate in ((1, 1, 2000), (10, 1, 200), (1, 20, 100)):
        with Platform(), BacklogSampler() as sampler:
            s = k6("delivery.js", RATE=rate, DURATION="30s", USERS=500,
                   RECIPIENTS_PER_POST=per_post, BATCH=batch, DRAIN_S=15)  # fmt: skip
        received = metric(s, "notifications_received", "count")
        posted = metric(s, "notifications_posted", "count")
        window = 30 + 15
        tail = sampler.samples[-5:] or [0]
        results.append({
            "scenario": f"sustained delivery to online users, {per_post} recipient(s) per "
                        + (f"notification, {batch} notifications per POST (batch endpoint) "
                           if batch > 1 else "POST ")
                        + f"at {rate} POST/s offered",
            "figure": f"{posted / 30:.0f}/s accepted, {received / 30:.0f}/s delivered "
                      f"({received:.0f} of {posted:.0f}); "
                      f"backlog max {max(sampler.samples or [0])}, end {tail[-1]}",
            "target": ">= 2,000 notifications/s delivered, no growing backlog",
            "met": received >= 2000 * 30 * 0.98 and received >= posted * 0.999 and tail[-1] == 0,
            "detail": {"p50_ms": metric(s, "post_to_socket_ms", "p(50)"),
                       "p99_ms": metric(s, "post_to_socket_ms", "p(99)"),
                       "window_s": window},
        })  # fmt: skip
    return results


def scenario_idle() -> list[dict[str, Any]]:
    users = 10_000
    with Platform(web_workers=1) as platform:
        [worker] = platform.web_worker_pids()
        before = rss_kb(worker)
        holder = threading.Thread(
            target=lambda: holder_result.append(
                k6("notification-fanout.js", USERS=users, SEND=0, CONNECT_S=25, WAIT_S=15)
            )
        )
        holder_result: list[dict[str, Any]] = []
        holder.start()
        time.sleep(25 + 8)
        during = rss_kb(worker)
        holder.join()
    s = holder_result[0]
    connected = metric(s, "sockets_connected", "count")
    per_socket = (during - before) * 1024 / max(connected, 1)
    return [{
        "scenario": f"{users:,} idle sockets on one gateway process",
        "figure": f"{connected:.0f} connected; RSS {before / 1024:.0f} MiB -> "
                  f"{during / 1024:.0f} MiB, {per_socket / 1024:.1f} KiB per socket",
        "target": "10,000 sockets at <= 50 KB each",
        "met": connected >= users and per_socket <= 50_000,
    }]  # fmt: skip


def sent_within() -> dict[float, float]:
    """The gateway's own delivery_latency histogram: frames written to sockets within each
    bucket's bound of acceptance, summed over the gateway processes."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{PORT}/metrics", timeout=10).read().decode()
    buckets: dict[float, float] = {}
    for line in body.splitlines():
        if line.startswith("notifier_delivery_latency_seconds_bucket{"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            if bound != "+Inf":
                buckets[float(bound)] = buckets.get(float(bound), 0.0) + float(line.split()[-1])
    return buckets


def scenario_fanout() -> list[dict[str, Any]]:
    users = 10_000
    with Platform():
        s = k6("notification-fanout.js", USERS=users, CONNECT_S=30, WAIT_S=15)
        written = sent_within()
    received = metric(s, "fanout_received", "count")
    worst = metric(s, "fanout_receipt_ms", "max")
    # The platform's side apart from the load client's: k6 reads the 10,000 frames on the
    # same two cores, and on this box that takes it longer than the gateway's writing them.
    all_by = min((b for b, n in written.items() if n >= users), default=float("inf"))
    return [{
        "scenario": f"one notification to {users:,} connected users",
        "figure": f"{received:.0f} received; p50 {metric(s, 'fanout_receipt_ms', 'p(50)'):.0f} ms, "
                  f"last {worst:.0f} ms after the POST; the gateway wrote "
                  f"{written.get(1.0, 0) / users:.0%} of the frames within 1 s of acceptance "
                  f"and all within {all_by:g} s",
        "target": "all received within 1 s",
        "met": received >= users and worst < 1000,
    }]  # fmt: skip


def scenario_priority() -> list[dict[str, Any]]:
    with Platform():
        s = k6("delivery.js", RATE=20, DURATION="20s", USERS=200, LOW_BACKLOG=20000,
               WARMUP_S=8, DRAIN_S=20)  # fmt: skip
    p99 = metric(s, "post_to_socket_ms", "p(99)")
    posted, received = (
        metric(s, "notifications_posted", "count"),
        metric(s, "notifications_received", "count"),
    )
    return [{
        "scenario": "high priority (20/s) behind 20,000 queued low-priority deliveries",
        "figure": f"{received:.0f} of {posted:.0f} high received; "
                  f"high p50 {metric(s, 'post_to_socket_ms', 'p(50)'):.0f} ms, p99 {p99:.0f} ms; "
                  f"low p50 {metric(s, 'low_post_to_socket_ms', 'p(50)'):.0f} ms; "
                  f"backlog accepted in {metric(s, 'backlog_post_ms', 'max'):.0f} ms, "
                  "1 s before the first high",
        "target": "high p99 < 250 ms",
        "met": posted > 0 and received >= posted and p99 < 250,
    }]  # fmt: skip


class FailingReceiver:
    """A local webhook receiver that answers every POST with 500 and counts them."""

    def __init__(self) -> None:
        counter = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                counter.hits += 1
                self.send_response(500)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.hits = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"


def _post_storm(url: str, deliveries: int, per_post: int = 100) -> None:
    for i in range(deliveries // per_post):
        body = json.dumps({"user_ids": [f"storm-{i}-{j}" for j in range(per_post)],
                           "title": "storm", "body": "b", "channels": ["webhook"],
                           "webhook_url": url}).encode()  # fmt: skip
        req = urllib.request.Request(
            f"http://127.0.0.1:{PORT}/notifications", data=body, method="POST",
            headers={"content-type": "application/json", "x-api-key": API_KEY},
        )  # fmt: skip
        urllib.request.urlopen(req, timeout=30).read()


def scenario_retry_storm() -> list[dict[str, Any]]:
    # The default platform, whose per-URL circuit breaker holds a failing receiver's tries,
    # and the same with the breaker off, where every try of the storm is made.
    return [_retry_storm("circuit breaker on (default)", {}),
            _retry_storm("circuit breaker off", {"CIRCUIT_FAILURES": "1000000"})]  # fmt: skip


def _retry_storm(variant: str, settings: dict[str, str]) -> dict[str, Any]:
    receiver = FailingReceiver()
    # Tries at 0, 1, 3, 7, 15 and 31 s: the storm lasts through the measured window.
    with Platform(RETRY_BASE_SECONDS="1", RETRY_MAX_ATTEMPTS="6", **settings):
        k6("delivery.js", RATE=100, DURATION="5s", USERS=200, WARMUP_S=3, DRAIN_S=2)
        calm = k6("delivery.js", RATE=100, DURATION="20s", USERS=200)
        _post_storm(receiver.url, 5000)
        storm = k6("delivery.js", RATE=100, DURATION="20s", USERS=200)
        hits = receiver.hits
    receiver.server.shutdown()
    p99_calm = metric(calm, "post_to_socket_ms", "p(99)")
    p99_storm = metric(storm, "post_to_socket_ms", "p(99)")
    ratio = p99_storm / p99_calm if p99_calm else float("inf")
    return {
        "scenario": "online delivery at 100/s, without and then during a retry storm "
                    f"(5,000 webhook deliveries to a receiver answering 500), {variant}",
        "figure": f"p99 {p99_calm:.0f} ms calm, {p99_storm:.0f} ms in the storm "
                  f"({ratio:.2f}x); p50 {metric(calm, 'post_to_socket_ms', 'p(50)'):.0f} / "
                  f"{metric(storm, 'post_to_socket_ms', 'p(50)'):.0f} ms; "
                  f"{hits:,} failing webhook tries answered meanwhile",
        "target": "p99 in the storm < 3x calm",
        "met": ratio < 3
        and metric(storm, "notifications_received", "count")
        >= metric(storm, "notifications_posted", "count") > 0,
    }  # fmt: skip


SCENARIOS = {
    "latency": scenario_latency,
    "throughput": scenario_throughput,
    "idle": scenario_idle,
    "fanout": scenario_fanout,
    "priority": scenario_priority,
    "retry-storm": scenario_retry_storm,
}


def _cpu_times() -> list[int]:
    # user nice system idle iowait irq softirq steal (jiffies, all CPUs)
    return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]


def run_scenario(name: str) -> list[dict[str, Any]]:
    """One scenario's rows, each figure followed by the CPU time the hypervisor took
    meanwhile: on a shared virtual machine the same code measures slower when it is high."""
    before = _cpu_times()
    rows = SCENARIOS[name]()
    spent = [b - a for a, b in zip(before, _cpu_times(), strict=True)]
    steal = 100 * spent[7] / max(sum(spent), 1)
    return [{**row, "figure": f"{row['figure']} (CPU steal {steal:.0f}%)"} for row in rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)  # fmt: skip
    parser.add_argument("scenarios", nargs="*", help=f"any of {', '.join(SCENARIOS)} (default all)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args()
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    results = []
    for name in args.scenarios or list(SCENARIOS):
        print(f"== {name}", flush=True)
        for row in run_scenario(name):
            results.append({"name": name, **row})
            print(f"  {row['scenario']}\n    {row['figure']}\n    target: {row['target']} -> "
                  f"{'met' if row['met'] else 'MISSED'}", flush=True)  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
