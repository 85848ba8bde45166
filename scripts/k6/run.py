"""Run the k6 load tests and report their figures.

    python scripts/k6/run.py                      # all four, on a platform started here
    python scripts/k6/run.py reconnect-chaos --base-url http://127.0.0.1:8000   # `make run`
    python scripts/k6/run.py --smoke              # a few users for a few seconds each
    python scripts/k6/run.py --docs               # also write the table in docs/BENCHMARKS.md

Without --base-url it starts the platform the way the benchmarks do (scripts/bench_delivery.py:
the `make run` processes, Flower left out, on the `notifier_bench` database and Redis DB 1),
with retries and circuit windows shortened (FAST_RETRIES below) so the retry storm settles
within the run. For retry-storm it starts the failing webhook receiver (receiver.py).
Exits non-zero when any script's thresholds fail.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from receiver import Receiver  # noqa: E402

K6 = str(Path(sys.executable).parent / "k6")
# Retries and circuit windows shortened so a storm settles within the run.
FAST_RETRIES = {
    "RETRY_BASE_SECONDS": "0.5",
    "RETRY_MAX_ATTEMPTS": "4",
    "CIRCUIT_OPEN_SECONDS": "5",
    "CIRCUIT_MAX_OPEN_SECONDS": "20",
}
SCRIPTS = ["websocket-storm", "notification-fanout", "reconnect-chaos", "retry-storm"]

FULL: dict[str, dict[str, Any]] = {
    "websocket-storm": {"USERS": 500, "RAMP_S": 10, "HOLD_S": 30},
    "notification-fanout": {"USERS": 500, "CONNECT_S": 10, "WAIT_S": 10},
    "reconnect-chaos": {"USERS": 50, "NOTIFICATIONS": 1000, "CHAOS_S": 30},
    "retry-storm": {"STORM_POSTS": 50, "RECIPIENTS": 100, "PROBE_RATE": 50, "PROBE_S": 30},
}
# Seconds long, and bounds loose enough for a busy 2-core CI machine: these prove the
# scripts still run and the platform still passes their checks, not its speed.
SMOKE: dict[str, dict[str, Any]] = {
    "websocket-storm": {"USERS": 20, "RAMP_S": 1, "HOLD_S": 4, "PING_MS": 500,
                        "PONG_P95_MS": 2000, "PONG_P99_MS": 3000},
    "notification-fanout": {"USERS": 20, "CONNECT_S": 2, "WAIT_S": 6, "RECEIPT_P99_MS": 5000},
    "reconnect-chaos": {"USERS": 5, "NOTIFICATIONS": 40, "CHAOS_S": 6, "SETTLE_S": 3,
                        "MAX_UP_S": 1, "MAX_DOWN_S": 0.5},
    "retry-storm": {"STORM_POSTS": 4, "RECIPIENTS": 5, "STORM_VUS": 2, "PROBE_RATE": 5,
                    "PROBE_S": 4, "SETTLE_S": 40, "INGEST_P95_MS": 3000,
                    "INGEST_P99_MS": 5000},
}  # fmt: skip

# What each script's summary line shows: (metric, stat, label).
FIGURES: dict[str, list[tuple[str, str, str]]] = {
    "websocket-storm": [
        ("ws_connect_success", "value", "connect success rate"),
        ("pongs_received", "count", "pongs"),
        ("pong_latency_ms", "p(95)", "pong p95 ms"),
        ("pong_latency_ms", "p(99)", "pong p99 ms"),
    ],
    "notification-fanout": [
        ("fanout_received", "count", "received"),
        ("fanout_receipt_ms", "p(50)", "receipt p50 ms"),
        ("fanout_receipt_ms", "p(99)", "receipt p99 ms"),
        ("fanout_receipt_ms", "max", "last ms"),
    ],
    "reconnect-chaos": [
        ("notifications_posted", "count", "posted"),
        ("connects", "count", "connects"),
        ("notifications_lost", "count", "lost"),
        ("duplicates_in_one_connection", "count", "duplicates in a connection"),
    ],
    "retry-storm": [
        ("storm_deliveries", "count", "storm deliveries"),
        ("storm_delivered", "count", "delivered"),
        ("storm_dead_lettered", "count", "dead-lettered"),
        ("storm_unfinished", "count", "unfinished"),
        ("http_req_duration{scenario:probe}", "p(95)", "probe ingest p95 ms"),
        ("http_req_duration{scenario:probe}", "p(99)", "probe ingest p99 ms"),
    ],
}


def run_script(
    name: str, base_url: str, api_key: str, params: dict[str, Any], quiet: bool = True
) -> tuple[bool, dict[str, Any], str]:
    """Run one script; returns (thresholds passed, the summary export, k6's output)."""
    receiver = Receiver().start() if name == "retry-storm" else None
    try:
        env = {"BASE_URL": base_url, "API_KEY": api_key, **params}
        if receiver is not None:
            env.setdefault("RECEIVER_URL", receiver.url)
        with tempfile.TemporaryDirectory() as tmp:
            summary = Path(tmp) / "summary.json"
            cmd = [K6, "run", "--no-usage-report", "--summary-export", str(summary)]
            if quiet:
                cmd.append("--quiet")
            for key, value in env.items():
                cmd += ["-e", f"{key}={value}"]
            cmd.append(str(HERE / f"{name}.js"))
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            data = json.loads(summary.read_text()) if summary.exists() else {"metrics": {}}
    finally:
        if receiver is not None:
            data_answers = dict(receiver.answers)
            receiver.stop()
    if receiver is not None:
        data["receiver_answers"] = data_answers
    return proc.returncode == 0, data, proc.stdout + proc.stderr


def figures(name: str, summary: dict[str, Any]) -> list[tuple[str, float]]:
    out = []
    for metric, stat, label in FIGURES[name]:
        values = summary["metrics"].get(metric, {})
        out.append((label, float(values.get(stat, values.get("rate", 0.0)))))
    return out


def _fmt(value: float) -> str:
    return f"{value:.3f}" if 0 < value < 1 else f"{value:,.0f}"


def docs_table(rows: list[dict[str, Any]], params: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| date | script | settings | figures | thresholds |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        settings = ", ".join(f"{k}={v}" for k, v in params[row["name"]].items())
        figs = "; ".join(f"{label} {_fmt(v)}" for label, v in row["figures"])
        verdict = "passed" if row["passed"] else "**failed**"
        lines.append(f"| {date.today()} | `{row['name']}.js` | {settings} | {figs} | {verdict} |")
    return "\n".join(lines)


def write_docs(table: str) -> None:
    path = ROOT / "docs" / "BENCHMARKS.md"
    text = path.read_text()
    begin, end = "<!-- k6:begin -->", "<!-- k6:end -->"
    block = f"{begin}\n{table}\n{end}"
    if begin in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + f"\n\n## k6 load tests (issue 5)\n\n{block}\n"
    path.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)  # fmt: skip
    parser.add_argument("names", nargs="*", help=f"any of {', '.join(SCRIPTS)} (default all)")
    parser.add_argument("--base-url", help="drive a running platform instead of starting one")
    parser.add_argument("--api-key", default="dev-api-key", help="with --base-url")
    parser.add_argument("--smoke", action="store_true", help="a few users, a few seconds")
    parser.add_argument("--docs", action="store_true", help="write the table to the docs")
    args = parser.parse_args()
    unknown = set(args.names) - set(SCRIPTS)
    if unknown:
        parser.error(f"unknown scripts: {', '.join(sorted(unknown))}")
    params = SMOKE if args.smoke else FULL
    names = args.names or SCRIPTS

    rows = []
    if args.base_url:
        rows = [_run(n, args.base_url, args.api_key, params[n]) for n in names]
    else:
        import bench_delivery

        for n in names:
            with bench_delivery.Platform(**FAST_RETRIES):
                rows.append(
                    _run(n, f"http://127.0.0.1:{bench_delivery.PORT}", bench_delivery.API_KEY,
                         params[n])
                )  # fmt: skip
    where = (
        f"Machine: {platform.machine()}, {_cpus()} CPUs, Python {platform.python_version()}; "
        "the platform, PostgreSQL, Redis and k6 on it."
    )
    table = docs_table(rows, params)
    print(f"\n{where}\n{table}")
    if args.docs:
        write_docs(f"{where}\n\n{table}")
    return 0 if all(r["passed"] for r in rows) else 1


def _run(name: str, base_url: str, api_key: str, params: dict[str, Any]) -> dict[str, Any]:
    print(f"== {name}", flush=True)
    passed, summary, output = run_script(name, base_url, api_key, params)
    figs = figures(name, summary)
    print("  " + "; ".join(f"{label} {_fmt(v)}" for label, v in figs))
    if "receiver_answers" in summary:
        print(f"  receiver answered: {summary['receiver_answers']}")
    print(f"  thresholds: {'passed' if passed else 'FAILED'}", flush=True)
    if not passed:
        print(output[-4000:])
    return {"name": name, "passed": passed, "figures": figs}


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    sys.exit(main())
