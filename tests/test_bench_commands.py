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


def _start(command: list[str]) -> subprocess.CompletedProcess[str]:
    """The command as the docs give it: from the checkout, without PYTHONPATH."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, *command],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_the_bench_command_starts(command: list[str]) -> None:
    done = _start([*command, "--help"])
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--scenario", "no such scenario"], "names: no auth, native jwt_verify RS256"),
        # wrk takes whole seconds only: 2.5 would fail every scenario, and exit 0.
        (["--seconds", "2.5"], "not a whole number of seconds"),
        (["--seconds", "0"], "must be at least 1"),
    ],
)
def test_e2e_refuses_arguments_it_cannot_run(args: list[str], said: str) -> None:
    done = _start(["-m", "bench.e2e", *args])
    assert done.returncode == 2
    assert said in done.stderr
