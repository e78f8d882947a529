"""Where a cache miss goes: machine instructions per fresh RS256 token, counted by valgrind,
for the signature check alone, parsing, the whole verifier, and the check-jwt handler.

    python -m bench.miss_cost [--tokens 500]

Timings on a shared 2-vCPU machine drift by 20% between runs; instruction counts do not.
Each part runs in its own process under `valgrind --tool=lackey` twice, with 200 and with
200 + --tokens fresh tokens, and the difference is divided by --tokens, so start-up and
imports cancel out. Needs valgrind (apt-get install valgrind); takes a few minutes.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import (
    CONTEXT,
    DEFAULT_POLICY,
    check_jwt_message,
    issuer_verifier,
    make_keys,
    mint_many,
)
from spoa.devkit.stack import run_main

BASE_TOKENS = 200
ALG = "RS256"
# What each runs per token: RSAPublicKey.verify on the signing input, parse_compact,
# Verifier.verify (a miss, so both of those), the check-jwt handler (verify and more).
PARTS = ("signature", "parse", "verify", "handler")


def _run_part(part: str, public_pem: str, kid: str, tokens: list[str]) -> None:
    """The child: each token, fresh, through one part."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    from spoa.glue import CheckJwtHandler, PolicyRuntime, Runtime
    from spoa.verifier import key_from_public
    from spoa.verifier.parsing import parse_compact

    public = serialization.load_pem_public_key(public_pem.encode())
    assert isinstance(public, rsa.RSAPublicKey)
    verifier = issuer_verifier([key_from_public(public, kid=kid, alg=ALG)])
    now = time.time()
    if part == "signature":
        pkcs1, sha256 = padding.PKCS1v15(), hashes.SHA256()
        pairs: list[tuple[bytes, bytes]] = []
        for token in tokens:
            head, _, signature_b64 = token.rpartition(".")
            pairs.append((head.encode(), base64.urlsafe_b64decode(signature_b64 + "==")))
        for signing_input, signature in pairs:
            public.verify(signature, signing_input, pkcs1, sha256)
    elif part == "parse":
        for token in tokens:
            parse_compact(token, 8192)
    elif part == "verify":
        for token in tokens:
            assert verifier.verify(token, DEFAULT_POLICY, CONTEXT, now).ok
    else:
        handler = CheckJwtHandler(Runtime(verifier, {"default": PolicyRuntime(DEFAULT_POLICY)}))
        messages = [check_jwt_message(token) for token in tokens]
        for message in messages:
            handler(message)


def _instructions(part: str, data_file: Path, count: int) -> int:
    command = [
        "valgrind",
        "--tool=lackey",
        "--basic-counts=yes",
        sys.executable,
        "-m",
        "bench.miss_cost",
        "--child",
        part,
        str(data_file),
        str(count),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=True)
    found = re.search(r"guest instrs:\s*([\d,]+)", done.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count from valgrind for {part}")
    return int(found.group(1).replace(",", ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        part, data_file, count = args.child
        data = json.loads(Path(data_file).read_text())
        _run_part(part, data["public_pem"], data["kid"], data["tokens"][: int(count)])
        return 0
    if shutil.which("valgrind") is None:
        print("miss_cost: valgrind is missing; apt-get install valgrind", file=sys.stderr)
        return 1
    key = make_keys((ALG,))[ALG]
    tokens = mint_many(key, BASE_TOKENS + args.tokens)
    with tempfile.TemporaryDirectory(prefix="jwtgate-miss-cost-") as directory:
        data_file = Path(directory) / "tokens.json"
        data_file.write_text(
            json.dumps({"public_pem": key.public_pem().decode(), "kid": key.kid, "tokens": tokens})
        )
        jobs = [(part, n) for part in PARTS for n in (BASE_TOKENS, BASE_TOKENS + args.tokens)]
        print(f"counting instructions: {len(jobs)} valgrind runs, two at a time", flush=True)
        with ThreadPoolExecutor(max(1, min(2, os.cpu_count() or 1))) as pool:
            results = pool.map(lambda job: _instructions(job[0], data_file, job[1]), jobs)
            counts = dict(zip(jobs, results, strict=True))
    per_token = {
        part: (counts[(part, BASE_TOKENS + args.tokens)] - counts[(part, BASE_TOKENS)])
        / args.tokens
        for part in PARTS
    }
    handler = per_token["handler"]
    print(f"\nInstructions per fresh {ALG} token ({args.tokens} tokens, valgrind lackey)\n")
    print("| part | instructions | share of the handler |")
    print("|---|---:|---:|")
    rows = [
        ("signature check (cryptography)", per_token["signature"]),
        ("parse_compact (split, base64url, JSON)", per_token["parse"]),
        (
            "the rest of the verifier (claims, keys, cache, verdict)",
            per_token["verify"] - per_token["signature"] - per_token["parse"],
        ),
        ("the glue (arguments, answer variables)", handler - per_token["verify"]),
        ("check-jwt handler, total", handler),
    ]
    for name, value in rows:
        print(f"| {name} | {value / 1000:.1f}k | {value / handler:.0%} |")
    return 0


if __name__ == "__main__":
    run_main(main)
