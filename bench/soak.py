"""Soak: the agent's memory over a long run of mixed traffic must level off.

Drives one `jwtgate run` (the shipped settings, cache 100k) with the SPOP load
generator in rounds: every round sends a hot token and a share of never-seen ES256
tokens (cheap to mint, same cache cost as any other), so the verified-token cache
fills to its bound and then keeps evicting. The agent's RSS is read after each round.
Once the cache is full, RSS must stop growing: the run fails (exit 1) if the last
reading exceeds the first full-cache reading by more than --max-growth percent.

    .venv/bin/python -m bench.soak --minutes 30
    .venv/bin/python -m bench.soak --minutes 2 --cache 5000   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from bench.common import agent_config, make_keys, mint, mint_many, process_tree, write_public_keys
from bench.loadgen import AgentUnderTest, TokenSource, run_load
from spoa.devkit.stack import run_main


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the soak")
    parser.add_argument("--round", type=float, default=20.0, help="seconds per round")
    parser.add_argument("--cache", type=int, default=100_000, help="[cache] max_entries")
    parser.add_argument("--fresh-per-round", type=int, default=20_000, help="new tokens a round")
    parser.add_argument("--max-growth", type=float, default=10.0, help="allowed %% after fill")
    args = parser.parse_args()

    keys = make_keys(("ES256",))
    key = keys["ES256"]
    hot = mint(key, 0)
    deadline = time.monotonic() + args.minutes * 60
    readings: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="jwtgate-soak-") as tmp:
        workdir = Path(tmp)
        config = agent_config(write_public_keys(keys, workdir)).replace(
            "max_entries = 100000", f"max_entries = {args.cache}"
        )
        with AgentUnderTest(workdir, config, cpu=None) as agent:
            offset = 1
            started = time.monotonic()
            while time.monotonic() < deadline:
                fresh = mint_many(key, args.fresh_per_round, start=offset)
                offset += args.fresh_per_round
                source = TokenSource("mix95", hot, fresh)
                result = asyncio.run(
                    run_load(
                        "127.0.0.1",
                        agent.port,
                        source,
                        label="soak",
                        duration=args.round,
                        warmup=0.0,
                        agent_pids=process_tree(agent.process.pid),
                    )
                )
                reading = {
                    "minute": round((time.monotonic() - started) / 60, 2),
                    "verdicts_per_second": round(result.verdicts_per_second),
                    "fresh_tokens_so_far": offset - 1,
                    "rss_mib": round(rss_mib(agent.process.pid), 1),
                }
                readings.append(reading)
                print(json.dumps(reading), flush=True)
    # The cache is full once more fresh tokens than its bound have gone through.
    full = [r for r in readings if r["fresh_tokens_so_far"] >= args.cache]
    if len(full) < 2:
        print(json.dumps({"summary": "too short to fill the cache; raise --minutes"}))
        return 1
    growth = (full[-1]["rss_mib"] - full[0]["rss_mib"]) / full[0]["rss_mib"] * 100
    summary = {
        "rounds": len(readings),
        "rss_mib_when_full": full[0]["rss_mib"],
        "rss_mib_at_end": full[-1]["rss_mib"],
        "growth_percent_after_fill": round(growth, 1),
        "max_growth_percent": args.max_growth,
    }
    print(json.dumps({"summary": summary}))
    return 0 if growth <= args.max_growth else 1


if __name__ == "__main__":
    run_main(main)
