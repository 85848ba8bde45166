"""`make bench`: every benchmark of the platform, each on a platform it starts itself, then
the report: a table of figures beside their targets in docs/BENCHMARKS.md (between the
`bench:begin`/`bench:end` marks) and a plot of the POST-to-socket latency distribution
(docs/latency.png).

    python scripts/bench.py                    # everything (about 12 minutes here)
    python scripts/bench.py latency priority   # some delivery scenarios, no ingest
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import bench_delivery  # noqa: E402
import bench_ingest  # noqa: E402

DOCS = ROOT / "docs" / "BENCHMARKS.md"
PLOT = ROOT / "docs" / "latency.png"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def ingest_rows() -> list[dict[str, Any]]:
    args = argparse.Namespace(duration="20s", vus=None, modes="single,batch")
    with bench_delivery.Platform(api_only=True):
        results = bench_ingest.run_modes(
            args, f"http://127.0.0.1:{bench_delivery.PORT}", bench_delivery.API_KEY
        )
    rows = []
    for r in results:
        unit, target = bench_ingest.TARGETS[r["mode"]]
        value = r["requests_per_s"] if unit == "requests/s" else r["recipients_per_s"]
        what = "single-recipient POSTs" if r["mode"] == "single" else "10,000-recipient POSTs"
        rows.append({
            "name": "ingest",
            "scenario": f"ingest, {what}, 20 s closed loop",
            "figure": f"{r['requests_per_s']:,.0f} req/s, {r['recipients_per_s']:,.0f} "
                      f"recipients/s; p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms",
            "target": f">= {target:,} {unit}",
            "met": value >= target and r["accepted_ratio"] == 1,
        })  # fmt: skip
    return rows


def plot_latency(samples_csv: Path, out: Path) -> str | None:
    """Histogram and CDF of the latency scenario's samples; None when there are none."""
    if not samples_csv.exists():
        return None
    with samples_csv.open() as f:
        values = [float(row["metric_value"]) for row in csv.DictReader(f)
                  if row["metric_name"] == "post_to_socket_ms"]  # fmt: skip
    if not values:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values.sort()
    n = len(values)
    p50, p99 = values[n // 2], values[min(n - 1, int(n * 0.99))]
    fig, (hist, cdf) = plt.subplots(1, 2, figsize=(11, 4))
    hist.hist(values, bins=100, color="#3b6ea5")
    hist.set(xlabel="POST-to-socket latency (ms)", ylabel="notifications",
             title=f"500 notifications/s, {n:,} samples")  # fmt: skip
    for x, label in ((p50, "p50"), (p99, "p99")):
        hist.axvline(x, color="#c0392b", linestyle="--", linewidth=1)
        hist.text(x, hist.get_ylim()[1] * 0.9, f" {label} {x:.0f} ms", color="#c0392b")
    cdf.plot(values, [i / n for i in range(1, n + 1)], color="#3b6ea5")
    cdf.set(xscale="log", xlabel="latency (ms, log scale)", ylabel="share received",
            title="cumulative")  # fmt: skip
    cdf.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out.name


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return (f"{os.cpu_count()} vCPU ({cpu}), {mem_kb / 1024 / 1024:.0f} GiB, "
            f"Python {platform.python_version()}; platform, PostgreSQL, Redis and k6 "
            f"on the same machine")  # fmt: skip


def report(rows: list[dict[str, Any]], plot: str | None) -> str:
    lines = [
        f"Last `make bench`: {date.today()}, on {machine()}.",
        "",
        "| benchmark | scenario | figure | target | result |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        verdict = "met" if r["met"] else "**missed**"
        lines.append(f"| {r['name']} | {r['scenario']} | {r['figure']} | {r['target']} | "
                     f"{verdict} |")  # fmt: skip
    if plot:
        lines += ["", f"![POST-to-socket latency at 500 notifications/s]({plot})"]
    return "\n".join(lines)


def write(section: str) -> None:
    text = DOCS.read_text()
    block = f"{BEGIN}\n{section}\n{END}"
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        intro = "## Report (`make bench`)\n\n"
        marker = "## Ingest"
        text = text.replace(marker, f"{intro}{block}\n\n{marker}", 1)
    DOCS.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)  # fmt: skip
    known = ", ".join(bench_delivery.SCENARIOS)
    parser.add_argument("scenarios", nargs="*", help=f"delivery scenarios: {known}")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    if not args.scenarios:
        print("== ingest", flush=True)
        rows += ingest_rows()
    bench_delivery.LATENCY_CSV.unlink(missing_ok=True)
    for name in args.scenarios or list(bench_delivery.SCENARIOS):
        print(f"== {name}", flush=True)
        rows += [{"name": name, **row} for row in bench_delivery.run_scenario(name)]
    plot = plot_latency(bench_delivery.LATENCY_CSV, PLOT)
    section = report(rows, plot)
    print(section)
    write(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
