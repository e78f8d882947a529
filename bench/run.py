"""Runs every benchmark and writes bench/results/<timestamp>.{json,md} and PNG plots.

python -m bench.run [--short]      (scripts/bench does the set-up first)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import e2e, loadgen
from spoa.devkit.stack import run_main

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results"


def log(text: str) -> None:
    print(text, flush=True)


def run_micro(short: bool, json_path: Path) -> list[dict[str, Any]]:
    argv = [
        sys.executable,
        "-m",
        "pytest",
        str(BENCH_DIR / "test_micro.py"),
        "-q",
        "-p",
        "no:cacheprovider",
        "--benchmark-enable",
        f"--benchmark-json={json_path}",
        "--benchmark-columns=min,median,ops",
    ]
    if short:
        argv += ["--benchmark-max-time=0.1", "-k", "spop or glue or RS256 or ES256"]
    completed = subprocess.run(argv, cwd=BENCH_DIR.parent, check=False, timeout=600)
    if completed.returncode != 0:
        log("  some micro-benchmarks failed (see above)")
    if not json_path.exists():
        return []
    data = json.loads(json_path.read_text())
    return [
        {"name": b["name"], "median_us": b["stats"]["median"] * 1e6, "ops": b["stats"]["ops"]}
        for b in data["benchmarks"]
    ]


def memory_in_fresh_process(count: int) -> dict[str, Any]:
    """bench/memory.py in its own interpreter: this process already holds the micro-benchmark
    and load-generator state, which would be counted as cache memory."""
    result = subprocess.run(
        [
            *(sys.executable, "-m", "bench.memory", "--samples", "1", "--json-only"),
            *("--tokens", str(count), "--cache", str(count)),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
        cwd=Path(__file__).resolve().parent.parent,
    )
    summary: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])["summary"]
    return summary


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b and not math.isnan(a) and not math.isnan(b) else "-"


def _rounds_table(rounds: list[dict[str, float]]) -> list[str]:
    """Each round's rps, the ratios of the targets, and their medians across rounds."""
    if not rounds:
        return []
    names = list(rounds[0])
    ratios = [
        (label, top.name, bottom.name)
        for label, top, bottom in e2e.ROUND_RATIOS
        if top.name in names and bottom.name in names
    ]
    lines = [
        "",
        "## Interleaved rounds: each target against its baseline, back to back",
        "",
        "The scenarios run back to back in each round, in this order; quote the median ratio.",
        "",
        "| round | "
        + " | ".join(f"{name} rps" for name in names)
        + " | "
        + " | ".join(label for label, _, _ in ratios)
        + " |",
        "|---|" + "---:|" * (len(names) + len(ratios)),
    ]
    for index, row in enumerate(rounds, 1):
        cells = [f"{row[name]:.0f}" for name in names]
        cells += [_ratio(row[top], row[bottom]) for _, top, bottom in ratios]
        lines.append(f"| {index} | " + " | ".join(cells) + " |")
    medians = [
        statistics.median(r[top] / r[bottom] for r in rounds if r[bottom])
        if any(r[bottom] for r in rounds)
        else float("nan")
        for _, top, bottom in ratios
    ]
    lines.append(
        "| median | "
        + " | " * (len(names) - 1)
        + " | "
        + " | ".join(f"{m:.2f}×" for m in medians)
        + " |"
    )
    return lines


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# jwtgate benchmark, {report['timestamp']}", "", report["how"], ""]
    e2e_rows = report["e2e"]

    def baseline(kind: str, alg: str | None = None) -> float:
        for row in e2e_rows:
            scenario = row["scenario"]
            if scenario["kind"] == kind and alg in (None, scenario["alg"]):
                return float(row["saturated"]["rps"])
        return math.nan

    noauth, minimal = baseline("noauth"), baseline("ackmin")
    native = {alg: baseline("native", alg) for alg in ("RS256", "ES256")}
    lines += [
        "## End to end through HAProxy 2.6 (wrk -t1 -c32, HAProxy nbthread 1 on its own core)",
        "",
        "| scenario | rps | p50 ms | p99 ms | HAProxy µs/req | agent µs/req | wrk µs/req "
        "| vs no-auth "
        "| vs native, same alg | vs minimal ACK agent | paced rps | paced p50 ms "
        "| paced p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in e2e_rows:
        s, p = row["saturated"], row["paced"]
        if row.get("error"):
            lines.append(f"| {row['scenario']['name']} | failed: {row['error'][:80]} |")
            continue
        rps = f"≥ {s['rps']:.0f}" if s.get("tokens_ran_out") else f"{s['rps']:.0f}"
        lines.append(
            f"| {row['scenario']['name']} | {rps} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} "
            f"| {s['haproxy_cpu_us']:.1f} | {s['agent_cpu_us']:.1f} "
            f"| {s['wrk_cpu_us']:.1f} | {_ratio(s['rps'], noauth)} "
            f"| {_ratio(s['rps'], native.get(row['scenario']['alg'], math.nan))} "
            f"| {_ratio(s['rps'], minimal)} "
            f"| {p['rps']:.0f} | {p['p50_ms']:.2f} "
            f"| {p['p99_ms']:.2f} |"
        )
    lines += _rounds_table(report.get("rounds") or [])
    lines += [
        "",
        "## The agent alone (bench/loadgen.py: 8 connections × 16 pipelined NOTIFYs)",
        "",
        "| alg, mix | verdicts/s | p50 ms | p99 ms | p99.9 ms | agent µs CPU/verdict | rejected |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["loadgen"]:
        lines.append(
            f"| {r['label']} | {r['verdicts_per_second']:.0f} | {r['p50_ms']:.2f} "
            f"| {r['p99_ms']:.2f} | {r['p999_ms']:.2f} | {r['agent_cpu_us_per_verdict']:.1f} "
            f"| {r['rejected']} |"
        )
    rss = report["rss"]
    lines += [
        "",
        f"## Memory: {rss['max_cache_entries']} cached tokens: RSS {rss['start_rss_mib']:.1f} MiB"
        f" → {rss['peak_rss_mib']:.1f} MiB ({rss['bytes_per_cache_entry']} bytes per entry)",
        "",
        "## Micro-benchmarks (median µs)",
        "",
        "| benchmark | median µs | ops/s |",
        "|---|---:|---:|",
    ]
    for m in report["micro"]:
        lines.append(f"| {m['name']} | {m['median_us']:.2f} | {m['ops']:.0f} |")
    return "\n".join(lines) + "\n"


def plots(report: dict[str, Any], stem: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("  matplotlib missing: no plots")
        return []
    rows = [r for r in report["e2e"] if not r.get("error")]
    written = []
    fig, ax = plt.subplots(figsize=(10, 5))
    names = [r["scenario"]["name"] for r in rows]
    ax.barh(names, [r["saturated"]["rps"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("requests/s through HAProxy (higher is better)")
    fig.tight_layout()
    fig.savefig(f"{stem}-throughput.png")
    written.append(f"{stem.name}-throughput.png")
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for ax, kind in zip(axes, ("saturated", "paced"), strict=True):
        for r in rows:
            cdf = r[kind]["cdf"]
            if cdf:
                ax.plot([ms for _, ms in cdf], [pct for pct, _ in cdf], label=r["scenario"]["name"])
        ax.set_xscale("log")
        ax.set_xlabel("latency ms (log)")
        ax.set_title("saturated (wrk -c32)" if kind == "saturated" else "paced at half rate")
    axes[0].set_ylabel("percentile")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{stem}-latency-cdf.png")
    written.append(f"{stem.name}-latency-cdf.png")
    plt.close(fig)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run the jwtgate benchmarks")
    parser.add_argument("--short", action="store_true", help="a quick pass, under 2 minutes")
    args = parser.parse_args(argv)
    started = time.monotonic()
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    stem = RESULTS / stamp
    seconds = 2.0 if args.short else 10.0
    report: dict[str, Any] = {
        "timestamp": stamp,
        "short": args.short,
        "machine": {
            "cpus": len(__import__("os").sched_getaffinity(0)),
            "python": sys.version,
            "platform": platform.platform(),
        },
        "how": (
            "HAProxy 2.6 `nbthread 1` pinned to CPU 0, `wrk -t1 -c32 --latency` pinned to "
            "CPU 1, agents unpinned; shipped haproxy/ files for every jwtgate scenario with "
            "`http-request return` as backend; RS256 2048-bit and ES256 P-256 keys, the same "
            f"key and token for native and jwtgate; {seconds:g} s per run. Paced runs: wrk "
            "offering about half the saturated rate, each connection pausing a random time "
            f"(exponential, mean {e2e.PACED_DELAY_MS} ms) between requests; the rate they "
            "achieved is shown. "
            "CPU per request from /proc utime+stime deltas (wrk's from its rusage). The "
            "no-auth and native configs lack the shipped front-end rules, so they do less per "
            "request than jwtgate's. "
            "A rate marked ≥ ran out of unique tokens before the end."
        ),
    }
    log("== micro-benchmarks (pytest-benchmark)")
    report["micro"] = run_micro(args.short, Path(f"{stem}-micro.json"))
    log("== agent alone (load generator)")
    suites = (
        [("RS256", "hits"), ("RS256", "mix95")]
        if args.short
        else [(alg, mix) for alg in ("RS256", "ES256", "EdDSA") for mix in loadgen.MIXES]
    )
    report["loadgen"] = [
        asdict(r) for r in loadgen.run_suites(suites, duration=seconds / 2 if args.short else 5.0)
    ]
    log("== memory: RSS with 100k cached tokens")
    count = 10_000 if args.short else 100_000
    report["rss"] = memory_in_fresh_process(count)
    log(f"   {report['rss']}")
    log("== end to end through HAProxy")
    scenarios = (
        e2e.SCENARIOS
        if not args.short
        else tuple(
            s
            for s in e2e.SCENARIOS
            if s.workers == 1 and s.agents == 1 and s.alg == "RS256" and not s.pool
        )
    )
    report["e2e"] = [
        e2e.as_dict(r) for r in e2e.run_all(seconds, log, scenarios, 6000.0 if args.short else None)
    ]
    rounds = 2 if args.short else 3
    round_scenarios = e2e.HEADLINE if args.short else e2e.ROUNDS_FULL
    log(f"== the targets against their baselines again, in {rounds} interleaved rounds")
    report["rounds"] = e2e.run_rounds(seconds / 2, rounds, log, round_scenarios)
    report["plots"] = plots(report, stem)
    report["elapsed_seconds"] = time.monotonic() - started
    Path(f"{stem}.json").write_text(json.dumps(report, indent=2, default=str))
    table = markdown(report)
    Path(f"{stem}.md").write_text(table)
    log(table)
    log(f"wrote {stem}.json, {stem}.md and plots in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    run_main(main)
