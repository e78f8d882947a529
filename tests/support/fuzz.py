"""How many examples a hypothesis property runs: the suite's own count, or more when
bench/fuzz.py sets JWTGATE_FUZZ_EXAMPLES for its long runs."""

from __future__ import annotations

import os


def fuzz_examples(default: int) -> int:
    return int(os.environ.get("JWTGATE_FUZZ_EXAMPLES", "0")) or default
