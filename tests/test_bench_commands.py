"""Every bench command starts the way its docs say to run it.

Regression: bench/fuzz.py, documented as `.venv/bin/python bench/fuzz.py`, imported the
`bench` package, which a script run by path cannot see, and failed before it parsed its
arguments.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

COMMANDS = [
    ["bench/fuzz.py"],
    ["bench/memory.py"],
    ["-m", "bench.run"],
    ["-m", "bench.loadgen"],
    ["-m", "bench.soak"],
    ["-m", "bench.miss_cost"],
    ["-m", "bench.profile_agent"],
    ["-m", "bench.e2e"],  # regression: read its first argument as seconds, --help too
]


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_the_bench_command_starts(command: list[str]) -> None:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, *command, "--help"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
