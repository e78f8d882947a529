"""The benchmark's native jwt_verify baseline makes the checks it says it makes.

Regression: its expiry check subtracted `date` from the token's `exp` and required a
positive rest, and HAProxy 2.6's `sub` saturates a negative `exp` to the largest integer:
a token with `exp: -1` passed.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench.common import AUDIENCE, ISSUER, claims_for, make_keys, write_public_keys
from bench.e2e import bench_config, run_haproxy
from spoa.devkit.keys import SigningKey
from spoa.devkit.stack import free_port, wait_for_port
from spoa.devkit.tokens import forge_signature, mint_token


def _status(url: str, token: str) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # loopback only
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


def _token(key: SigningKey, **changes: object) -> str:
    claims = {**claims_for(1), "exp": time.time() + 600, **changes}
    return mint_token(key, claims)


def test_the_native_baseline_accepts_a_valid_token_and_refuses_the_others(
    tmp_path: Path,
) -> None:
    key = make_keys(("RS256",))["RS256"]
    port = free_port()
    env = dict(
        os.environ,
        BENCH_LISTEN=f"127.0.0.1:{port}",
        BENCH_ALG="RS256",
        BENCH_PUBKEY=str(write_public_keys({"RS256": key}, tmp_path).path("RS256")),
        BENCH_ISSUER=ISSUER,
        BENCH_AUDIENCE=AUDIENCE,
    )
    config = bench_config("native-jwt.cfg", tmp_path)
    with run_haproxy(config, env, tmp_path, "haproxy-native") as haproxy:
        wait_for_port(port, timeout=10, process=haproxy)
        url = f"http://127.0.0.1:{port}/api/orders"
        assert _status(url, _token(key)) == 200
        refused = {
            "expired": _token(key, exp=time.time() - 60),
            "negative exp": _token(key, exp=-1),
            "zero exp": _token(key, exp=0),
            "other issuer": _token(key, iss="https://elsewhere.test/"),
            "other audience": _token(key, aud="https://elsewhere.test"),
            "bad signature": forge_signature(_token(key)),
        }
        statuses = {name: _status(url, token) for name, token in refused.items()}
        assert statuses == dict.fromkeys(refused, 401)
