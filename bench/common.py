"""Shared pieces of the benchmarks: keys, tokens shaped like real access tokens, the
`check-jwt` NOTIFY as HAProxy sends it, and a Verifier configured like the shipped
haproxy/jwtgate.toml."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from spoa.devkit.keys import SigningKey, generate_signing_key, load_signing_key_pem
from spoa.devkit.tokens import mint_token
from spoa.protocol import FrameType, Message, build_frame, encode_kv_list, encode_messages
from spoa.verifier import (
    IssuerRules,
    MemoryKeyStore,
    Policy,
    RequestContext,
    Verifier,
    hmac_key,
    key_from_public,
)
from spoa.verifier.keys import KeySet, VerificationKey

ISSUER = "https://id.bench.jwtgate.test/"
AUDIENCE = "https://api.bench.jwtgate.test"
ISSUER_NAME = "corp"
ALGORITHMS = ("RS256", "PS256", "ES256", "EdDSA", "HS256")
# What haproxy/spoe-jwt.conf sends for a request to the protected frontend.
REQUEST_PATH = "/api/orders"
REQUEST_HOST = "127.0.0.1:8080"
TOKEN_LIFETIME = 3600.0
CACHE_SIZE = 100_000  # haproxy/jwtgate.toml [cache] max_entries
CONTEXT = RequestContext(method="GET", path=REQUEST_PATH, host=REQUEST_HOST)
DEFAULT_POLICY = Policy(name="default", issuers=(ISSUER_NAME,))


def claims_for(index: int) -> dict[str, object]:
    """An access token's claims, about the size real identity providers issue."""
    return {
        "iss": ISSUER,
        "sub": f"user-{index:08d}",
        "aud": AUDIENCE,
        "scope": "openid profile orders:read orders:write",
        "client_id": "bench-client",
        "jti": f"bench-{index:010d}",
        "email": f"user{index}@example.com",
    }


def make_keys(algorithms: Sequence[str] = ALGORITHMS) -> dict[str, SigningKey]:
    return {alg: generate_signing_key(alg, kid=f"bench-{alg.lower()}") for alg in algorithms}


def mint(key: SigningKey, index: int, now: float | None = None) -> str:
    return mint_token(key, claims_for(index), now=now, lifetime=TOKEN_LIFETIME)


def _mint_range(pem: bytes, alg: str, kid: str, start: int, stop: int, now: float) -> list[str]:
    key = load_signing_key_pem(pem, alg, kid)
    return [mint(key, index, now) for index in range(start, stop)]


def _worker_signals() -> None:
    # A minting worker inherits the parent's interrupt handlers; it should just stop.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C


def mint_many(key: SigningKey, count: int, *, start: int = 0, processes: int = 2) -> list[str]:
    """`count` distinct tokens. RSA signing costs about 1 ms each, so it is spread over
    processes; done before any timing starts. An interruption stops the workers at once
    (a pool that waited for its work kept a killed bench running for minutes)."""
    now = time.time()
    if count < 2000 or processes < 2:
        return [mint(key, index, now) for index in range(start, start + count)]
    pem = key.private_pem()
    step = -(-count // processes)
    bounds = [
        (start + i * step, min(start + count, start + (i + 1) * step)) for i in range(processes)
    ]
    # multiprocessing's Pool, not concurrent.futures': leaving its block terminates it.
    with multiprocessing.Pool(processes, initializer=_worker_signals) as pool:
        parts = pool.starmap(
            _mint_range, [(pem, key.alg, key.kid, lo, hi, now) for lo, hi in bounds]
        )
    return [token for part in parts for token in part]


def build_verifier(
    keys: dict[str, SigningKey], *, cache_size: int = CACHE_SIZE, now: float | None = None
) -> Verifier:
    """A Verifier with the shipped issuer rules (audience, leeway, required sub, typ)."""
    verification_keys = []
    for alg, key in keys.items():
        if key.is_symmetric:
            assert isinstance(key.private_key, bytes)
            verification_keys.append(hmac_key(key.private_key, alg=alg, kid=key.kid))
        else:
            verification_keys.append(key_from_public(key.public().public_key, kid=key.kid, alg=alg))
    return issuer_verifier(verification_keys, cache_size=cache_size, now=now)


def issuer_verifier(
    verification_keys: Sequence[VerificationKey],
    *,
    cache_size: int = CACHE_SIZE,
    now: float | None = None,
) -> Verifier:
    """The shipped issuer rules over these keys; each key's `alg` is allowed."""
    store = MemoryKeyStore()
    store.replace(
        ISSUER_NAME, KeySet(tuple(verification_keys)), time.time() if now is None else now
    )
    rules = IssuerRules(
        name=ISSUER_NAME,
        issuer=ISSUER,
        algorithms=frozenset(key.alg for key in verification_keys if key.alg is not None),
        audiences=frozenset({AUDIENCE}),
        leeway=30.0,
        required_claims=("sub",),
        allowed_types=frozenset({"at+jwt"}),
    )
    return Verifier([rules], store, cache_size=cache_size)


# --- the wire, as HAProxy 2.6 writes it ----------------------------------------------------


def check_jwt_message(token: str) -> Message:
    """The `check-jwt` message of haproxy/spoe-jwt.conf; unset variables arrive as NULL."""
    return Message(
        "check-jwt",
        (
            ("authorization", f"Bearer {token}"),
            ("token", None),
            ("method", "GET"),
            ("path", REQUEST_PATH),
            ("host", REQUEST_HOST),
            ("policy", None),
        ),
    )


def notify_frame(stream_id: int, frame_id: int, token: str) -> bytes:
    return build_frame(
        FrameType.NOTIFY, stream_id, frame_id, encode_messages([check_jwt_message(token)])
    )


def haproxy_hello(max_frame_size: int = 16380) -> bytes:
    payload = encode_kv_list(
        (
            ("supported-versions", "2.0"),
            ("max-frame-size", max_frame_size),
            ("capabilities", "pipelining"),
            ("engine-id", "bench-engine"),
        )
    )
    return build_frame(FrameType.HAPROXY_HELLO, 0, 0, payload)


# --- files an agent or HAProxy reads ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyFiles:
    """Public PEM files, one per algorithm, and the kid each token carries."""

    directory: Path
    paths: dict[str, Path]

    def path(self, alg: str) -> Path:
        return self.paths[alg]


def write_public_keys(keys: dict[str, SigningKey], directory: Path) -> KeyFiles:
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for alg, key in keys.items():
        if key.is_symmetric:
            continue
        path = directory / f"{alg.lower()}.pub.pem"
        path.write_bytes(key.public_pem())
        paths[alg] = path
    return KeyFiles(directory, paths)


def agent_config(key_files: KeyFiles) -> str:
    """haproxy/jwtgate.toml's settings with the bench keys as the key source (same hot path;
    a JWKS URL only changes how keys arrive)."""
    keys = ", ".join(
        f'{{ file = "{path}", kid = "bench-{alg.lower()}" }}'
        for alg, path in key_files.paths.items()
    )
    algorithms = ", ".join(f'"{alg}"' for alg in key_files.paths)
    return f"""
[log]
level = "info"
format = "json"

[cache]
max_entries = {CACHE_SIZE}

[[issuers]]
name = "{ISSUER_NAME}"
issuer = "{ISSUER}"
audiences = ["{AUDIENCE}"]
algorithms = [{algorithms}]
keys = [{keys}]
leeway = "30s"
required_claims = ["sub"]
typ = ["at+jwt"]

[policies.default]
issuers = ["{ISSUER_NAME}"]
"""


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))


# --- CPU accounting from /proc ------------------------------------------------------------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (jwtgate's supervisor forks its workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, ()))
    return found


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of these processes, in seconds (0 for ones already gone)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / _CLOCK_TICKS
