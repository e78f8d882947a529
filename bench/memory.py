"""RSS with many distinct valid tokens through the Verifier: memory is bounded by the cache.

    .venv/bin/python bench/memory.py --tokens 1000000 --cache 100000

Tokens are HS256 (signing and checking a million ES256 tokens would take many minutes on
one core; the cache holds the same entries whatever the algorithm). Prints one JSON line per
sample and a summary line; `--json-only` prints only the summary. The suite runs a small
version (tests/e2e/test_limits.py) and asserts the cache bound, never RSS timings.
"""

from __future__ import annotations

import argparse
import base64
import gc
import hashlib
import hmac
import json
import os
import time

from spoa.verifier import (
    IssuerRules,
    KeySet,
    MemoryKeyStore,
    Policy,
    Reason,
    RequestContext,
    Verifier,
    hmac_key,
)

ISSUER = "https://issuer.bench"
AUDIENCE = "api://bench"
NOW = 1_800_000_000.0


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def run(tokens: int, cache: int, samples: int, quiet: bool) -> dict[str, object]:
    secret = os.urandom(32)
    store = MemoryKeyStore()
    rules = IssuerRules(
        name="bench",
        issuer=ISSUER,
        algorithms=frozenset({"HS256"}),
        audiences=frozenset({AUDIENCE}),
    )
    store.replace("bench", KeySet((hmac_key(secret, alg="HS256", kid="k1"),)), NOW)
    verifier = Verifier([rules], store, cache_size=cache)
    policy = Policy(name="default", issuers=("bench",))
    context = RequestContext(method="GET", path="/", host="bench")
    header = _b64(json.dumps({"alg": "HS256", "kid": "k1", "typ": "at+jwt"}).encode())
    every = max(1, tokens // samples)
    gc.collect()
    start_rss = rss_bytes()
    peak_rss = start_rss
    max_cache = 0
    started = time.monotonic()
    for index in range(tokens):
        claims = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": f"user-{index}",
            "jti": f"{index:012d}",
            "iat": int(NOW) - 10,
            "exp": int(NOW) + 3600,
            "scope": "read write",
        }
        signing_input = f"{header}.{_b64(json.dumps(claims).encode())}"
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        verdict = verifier.verify(f"{signing_input}.{_b64(mac)}", policy, context, NOW)
        if verdict.reason is not Reason.OK:
            raise SystemExit(f"token {index} rejected: {verdict.reason}")
        size = len(verifier.cache)
        max_cache = max(max_cache, size)
        if size > cache:
            raise SystemExit(f"cache holds {size} entries, bound {cache}")
        if (index + 1) % every == 0:
            rss = rss_bytes()
            peak_rss = max(peak_rss, rss)
            if not quiet:
                sample = {"tokens": index + 1, "cache": size, "rss_mib": round(rss / 2**20, 1)}
                print(json.dumps(sample), flush=True)
    seconds = time.monotonic() - started
    end_rss = rss_bytes()
    return {
        "tokens": tokens,
        "cache_bound": cache,
        "max_cache_entries": max_cache,
        "start_rss_mib": round(start_rss / 2**20, 1),
        "peak_rss_mib": round(max(peak_rss, end_rss) / 2**20, 1),
        "end_rss_mib": round(end_rss / 2**20, 1),
        "bytes_per_cache_entry": round((max(peak_rss, end_rss) - start_rss) / max(1, max_cache)),
        "seconds": round(seconds, 1),
        "tokens_per_second": round(tokens / seconds),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1_000_000, help="distinct valid tokens")
    parser.add_argument("--cache", type=int, default=100_000, help="verified-token cache size")
    parser.add_argument("--samples", type=int, default=20, help="RSS samples to print")
    parser.add_argument("--json-only", action="store_true", help="print only the summary")
    args = parser.parse_args()
    summary = run(args.tokens, args.cache, args.samples, args.json_only)
    print(json.dumps({"summary": summary}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
