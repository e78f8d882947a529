"""A bench command stopped by `kill` or `timeout` stops what it started.

Regression: `timeout` sent SIGTERM to the load generator, which died at once; the agent
it had started, in a session of its own, ran on with its temporary directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.common import process_tree

ROOT = Path(__file__).resolve().parents[1]


def _agent_of(loadgen: subprocess.Popen[str], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in process_tree(loadgen.pid)[1:]:
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"run" in command and b"spoa" in command:
                return pid
        assert loadgen.poll() is None, loadgen.communicate()
        time.sleep(0.05)
    raise AssertionError("the load generator started no agent")


def _gone(pid: int) -> bool:
    try:
        # A zombie has been stopped; only its parent's wait is missing.
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def _start(*args: str) -> subprocess.Popen[str]:
    """A Python command of the checkout in a session of its own (killable as a group)."""
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def test_sigterm_to_the_load_generator_stops_its_agent() -> None:
    loadgen = _start("-m", "bench.loadgen", "--spawn", "--mix", "hits", "--duration", "120")
    agent = None
    workdir = None
    try:
        agent = _agent_of(loadgen, timeout=30)
        workdir = next(
            Path(arg).parent
            for arg in Path(f"/proc/{agent}/cmdline").read_text().split("\0")
            if arg.endswith(".toml")
        )
        loadgen.send_signal(signal.SIGTERM)
        _, stderr = loadgen.communicate(timeout=30)
        assert loadgen.returncode == 130
        assert "Traceback" not in stderr
        assert "interrupted" in stderr
        assert _gone(agent)
        assert not workdir.exists()
    finally:  # whatever failed above, leave nothing behind
        if loadgen.poll() is None:
            os.killpg(loadgen.pid, signal.SIGKILL)
            loadgen.wait()
        if agent is not None and not _gone(agent):
            os.kill(agent, signal.SIGKILL)
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


MINTING = """
from bench.common import make_keys, mint_many
from spoa.devkit.stack import run_main
key = make_keys(("RS256",))["RS256"]
print("minting", flush=True)
run_main(lambda: len(mint_many(key, 1_000_000)) and 0)
"""


def test_sigterm_while_minting_stops_the_workers_at_once() -> None:
    """Regression: the minting pool waited for all its work when interrupted, so a killed
    bench command ran on for minutes with its workers (and a second kill was ignored)."""
    command = _start("-c", MINTING)
    workers: list[int] = []
    try:
        assert command.stdout is not None
        assert command.stdout.readline() == "minting\n"
        deadline = time.monotonic() + 30
        while len(workers) < 2 and time.monotonic() < deadline:
            workers = process_tree(command.pid)[1:]
            time.sleep(0.05)
        assert len(workers) >= 2, "no minting workers"
        command.send_signal(signal.SIGTERM)
        _, stderr = command.communicate(timeout=15)
        assert command.returncode == 130
        assert "Traceback" not in stderr
        assert all(_gone(pid) for pid in workers)
    finally:
        if command.poll() is None:
            os.killpg(command.pid, signal.SIGKILL)
            command.wait()
        for pid in workers:
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
