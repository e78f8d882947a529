"""Long fuzzing runs of the SPOP connection and the token verifier.

    .venv/bin/python bench/fuzz.py --minutes 10

Runs the suite's hypothesis properties (tests/protocol/test_fuzz_connection.py, the C
decoder's, replay scanner's and set-var encoder's differential tests in
tests/protocol/test_speedups.py and test_memo.py, tests/verifier/test_fuzz_tokens.py, the JSON
parser's reference test in tests/verifier/test_parsing.py and the glue's any-signed-claims
property) in rounds with
many examples and fresh seeds until the time is up. A failure stops the run with
hypothesis's minimised example printed: save it under tests/protocol/crashers/ (raw bytes,
*.bin) or tests/verifier/crashers/ (*.txt) so the suite replays it for ever, or add it to
the glue's tests as an explicit case.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from spoa.devkit.stack import run_main

ROOT = Path(__file__).resolve().parents[1]
TARGETS = [
    "tests/protocol/test_fuzz_connection.py",
    "tests/protocol/test_memo.py",
    "tests/protocol/test_speedups.py",
    "tests/verifier/test_fuzz_tokens.py",
    "tests/verifier/test_parsing.py",
    "tests/test_glue.py::test_any_signed_claims_get_a_verdict",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="total running time")
    parser.add_argument("--examples", type=int, default=5000, help="examples per property")
    args = parser.parse_args()
    deadline = time.monotonic() + args.minutes * 60
    rounds = 0
    while time.monotonic() < deadline:
        seed = random.randrange(2**32)
        env = dict(os.environ, JWTGATE_FUZZ_EXAMPLES=str(args.examples))
        command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
        command += [f"--hypothesis-seed={seed}", "-o", "timeout=0", *TARGETS]
        result = subprocess.run(command, cwd=ROOT, env=env, check=False)
        rounds += 1
        print(f"round {rounds} seed {seed}: exit {result.returncode}", flush=True)
        if result.returncode != 0:
            return result.returncode
    print(f"{rounds} rounds, {args.examples} examples per property, no failure")
    return 0


if __name__ == "__main__":
    # Run by its path, so it sees the installed `spoa`, not the `bench` package. A `kill`
    # of this process alone then also stops the pytest it runs.
    run_main(main)
