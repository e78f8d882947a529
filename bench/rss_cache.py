"""RSS of a Verifier whose cache holds N distinct valid tokens (issue 6: at most 150 MB
for 100k). Tokens are RS256 like the shipped config's, minted before the first reading.

    python -m bench.rss_cache [N]
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import CONTEXT, DEFAULT_POLICY, build_verifier, make_keys, mint_many


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure_rss(count: int = 100_000) -> dict[str, Any]:
    keys = make_keys(("RS256",))
    tokens = mint_many(keys["RS256"], count)
    verifier = build_verifier(keys, cache_size=count)
    gc.collect()
    before = rss_mb()
    token_mb = sum(len(t) for t in tokens) / 2**20
    now = time.time()
    for token in tokens:
        if not verifier.verify(token, DEFAULT_POLICY, CONTEXT, now).ok:
            raise RuntimeError("a bench token was rejected")
    gc.collect()
    after = rss_mb()
    return {
        "tokens": len(verifier.cache),
        "before_mb": before,
        "after_mb": after,
        "token_text_mb": token_mb,  # the token strings themselves, held by both sides
    }


if __name__ == "__main__":
    print(measure_rss(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000))
