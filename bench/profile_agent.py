"""Profile a `jwtgate run` agent under the load generator with py-spy, and print the
functions that take the most agent CPU (self and inclusive), per token mix.

    python -m bench.profile_agent [--seconds 6] [--mix hits --mix unique]

Needs py-spy (`pip install py-spy`, the bench extras) and ptrace rights over the agent.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import (
    agent_config,
    make_keys,
    mint,
    mint_many,
    process_tree,
    write_public_keys,
)
from bench.loadgen import AgentUnderTest, TokenSource, format_result, run_load
from spoa.devkit.stack import run_main


def _short(frame: str) -> str:
    """`func (path/to/file.py:12)` -> `func (file.py)`: lines merged per function."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.split(':')[0].rsplit('/', 1)[-1]})" if where else name


def summarize(
    collapsed: str, top: int = 15
) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """(self, inclusive) shares of samples per function from py-spy's raw format."""
    self_counts: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [_short(frame) for frame in stack.split(";")]
        total += count
        self_counts[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    share = lambda c: [(name, n / total) for name, n in c.most_common(top)]  # noqa: E731
    return share(self_counts), share(inclusive)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--mix", action="append", choices=["hits", "unique"])
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    keys = make_keys(("RS256",))
    with tempfile.TemporaryDirectory(prefix="jwtgate-profile-") as tmp:
        workdir = Path(tmp)
        files = write_public_keys(keys, workdir)
        with AgentUnderTest(workdir, agent_config(files)) as agent:
            for mix in args.mix or ["hits", "unique"]:
                fresh = (
                    mint_many(keys["RS256"], 4000 * int(args.seconds + 2))
                    if mix == "unique"
                    else []
                )
                source = TokenSource(mix, mint(keys["RS256"], 0), fresh)
                output = workdir / f"{mix}.txt"
                spy = subprocess.Popen(
                    [py_spy, "record", "--pid", str(agent.process.pid), "--duration",
                     str(int(args.seconds)), "--rate", "250", "--format", "raw",
                     "--output", str(output), "--nonblocking"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                try:
                    result = asyncio.run(
                        run_load(
                            "127.0.0.1",
                            agent.port,
                            source,
                            label=f"RS256 {mix}",
                            duration=args.seconds + 1,
                            warmup=0.5,
                            agent_pids=process_tree(agent.process.pid),
                        )
                    )
                finally:
                    spy.wait(timeout=args.seconds + 30)
                print(f"== {format_result(result)}")
                if not output.exists():
                    print("   py-spy wrote nothing (ptrace not permitted?)")
                    continue
                self_top, inclusive_top = summarize(output.read_text())
                print("   self time:")
                for name, fraction in self_top:
                    print(f"     {fraction:6.1%}  {name}")
                print("   inclusive:")
                for name, fraction in inclusive_top:
                    print(f"     {fraction:6.1%}  {name}")
    return 0


if __name__ == "__main__":
    run_main(main)
