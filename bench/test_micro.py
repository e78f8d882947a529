"""Micro-benchmarks: the SPOP codec, the verifier per algorithm (cache miss and hit), the
check-jwt glue, and jwtgate's verify path against PyJWT, joserfc and plain jwcrypto.

Run with `.venv/bin/pytest bench/ --benchmark-enable` (scripts/bench does it). Every
benchmark also asserts its result, so a broken path fails instead of timing garbage.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jwt as pyjwt
import pytest
from joserfc import jwt as joserfc_jwt
from joserfc.jwk import KeySet as JoseKeySet
from jwcrypto import jwk as jwcrypto_jwk
from jwcrypto import jwt as jwcrypto_jwt

from bench.common import (
    ALGORITHMS,
    AUDIENCE,
    CONTEXT,
    DEFAULT_POLICY,
    ISSUER,
    build_verifier,
    check_jwt_message,
    haproxy_hello,
    make_keys,
    mint,
    notify_frame,
)
from spoa.devkit.keys import SigningKey
from spoa.glue import CheckJwtHandler, PolicyRuntime, Runtime, verdict_actions
from spoa.protocol import AgentConnection, NotifyReceived, decode_messages, encode_actions
from spoa.verifier import Verifier
from spoa.verifier.cache import token_digest

pytestmark = pytest.mark.benchmark(min_rounds=50, max_time=0.5, warmup=True)

Keys = dict[str, SigningKey]


@pytest.fixture(scope="module")
def keys() -> Keys:
    return make_keys()


@pytest.fixture(scope="module")
def tokens(keys: Keys) -> dict[str, str]:
    return {alg: mint(key, 1) for alg, key in keys.items()}


@pytest.fixture
def verifier(keys: Keys) -> Verifier:
    return build_verifier(keys)


# --- SPOP ------------------------------------------------------------------------------------


def test_spop_decode_notify(benchmark: Any, tokens: dict[str, str]) -> None:
    frame = notify_frame(1, 1, tokens["RS256"])
    # Body after the 4-byte length, type, 4 flag bytes and the two one-byte ids.
    payload_start, end = 4 + 1 + 4 + 2, len(frame)
    messages = benchmark(decode_messages, frame, payload_start, end, 256)
    assert messages[0].name == "check-jwt"
    assert messages[0].get("authorization") == f"Bearer {tokens['RS256']}"


def test_spop_encode_ack(benchmark: Any, verifier: Verifier, tokens: dict[str, str]) -> None:
    now = time.time()
    verdict = verifier.verify(tokens["RS256"], DEFAULT_POLICY, CONTEXT, now)
    assert verdict.ok
    actions = verdict_actions(verdict, PolicyRuntime(DEFAULT_POLICY), tokens["RS256"], now)
    encoded = benchmark(encode_actions, actions)
    assert len(encoded) > 100


def test_spop_connection_notify_to_ack(
    benchmark: Any, verifier: Verifier, tokens: dict[str, str]
) -> None:
    """What the server does per request around the handler: bytes in, event, ACK bytes out."""
    now = time.time()
    verdict = verifier.verify(tokens["RS256"], DEFAULT_POLICY, CONTEXT, now)
    actions = verdict_actions(verdict, PolicyRuntime(DEFAULT_POLICY), tokens["RS256"], now)
    connection = AgentConnection(now=now)
    connection.receive_data(haproxy_hello(), now)
    connection.data_to_send()
    frame = notify_frame(7, 9, tokens["RS256"])

    def one_round_trip() -> bytes:
        (event,) = connection.receive_data(frame, now)
        assert isinstance(event, NotifyReceived)
        connection.send_ack(event.stream_id, event.frame_id, actions)
        return connection.data_to_send()

    ack = benchmark(one_round_trip)
    assert ack[4] == 103  # ACK


def test_glue_check_jwt_cache_hit(
    benchmark: Any, verifier: Verifier, tokens: dict[str, str]
) -> None:
    """The whole per-request work of a worker on a hit, minus the socket and metrics."""
    handler = CheckJwtHandler(Runtime(verifier, {"default": PolicyRuntime(DEFAULT_POLICY)}))
    message = check_jwt_message(tokens["RS256"])
    handler(message)
    actions = benchmark(handler, message)
    assert not callable(getattr(actions, "__await__", None))
    # SET-VAR txn.valid = true, however the glue chose to hold its actions.
    assert b"\x01\x03\x02\x05valid\x11" in encode_actions(actions)  # type: ignore[arg-type]


# --- the verifier, per algorithm ---------------------------------------------------------------


@pytest.mark.parametrize("alg", ALGORITHMS)
def test_verify_cache_miss(
    benchmark: Any, alg: str, verifier: Verifier, tokens: dict[str, str]
) -> None:
    token = tokens[alg]
    now = time.time()

    def forget() -> None:
        verifier.cache.discard(token_digest(token))

    verdict = benchmark.pedantic(
        verifier.verify,
        args=(token, DEFAULT_POLICY, CONTEXT, now),
        setup=forget,
        rounds=200,
        warmup_rounds=5,
    )
    assert verdict.ok
    assert not verdict.cache_hit


@pytest.mark.parametrize("alg", ALGORITHMS)
def test_verify_cache_hit(
    benchmark: Any, alg: str, verifier: Verifier, tokens: dict[str, str]
) -> None:
    token = tokens[alg]
    now = time.time()
    assert verifier.verify(token, DEFAULT_POLICY, CONTEXT, now).ok
    verdict = benchmark(verifier.verify, token, DEFAULT_POLICY, CONTEXT, now)
    assert verdict.ok
    assert verdict.cache_hit


# --- against other libraries: same token, same key, same claim checks -------------------------


def _pyjwt(key: SigningKey, alg: str) -> Callable[[str], dict[str, Any]]:
    public = key.public().public_key

    def verify(token: str) -> dict[str, Any]:
        claims: dict[str, Any] = pyjwt.decode(
            token,
            public,
            algorithms=[alg],
            audience=AUDIENCE,
            issuer=ISSUER,
            leeway=30,
            options={"require": ["exp", "iss", "sub"]},
        )
        return claims

    return verify


def _joserfc(key: SigningKey, alg: str) -> Callable[[str], dict[str, Any]]:
    key_set = JoseKeySet.import_key_set({"keys": [key.public_jwk()]})
    registry = joserfc_jwt.JWTClaimsRegistry(
        leeway=30,
        iss={"essential": True, "value": ISSUER},
        aud={"essential": True, "value": AUDIENCE},
        sub={"essential": True},
        exp={"essential": True},
    )

    def verify(token: str) -> dict[str, Any]:
        decoded = joserfc_jwt.decode(token, key_set, algorithms=[alg])
        registry.validate(decoded.claims)
        return dict(decoded.claims)

    return verify


def _jwcrypto(key: SigningKey, alg: str) -> Callable[[str], dict[str, Any]]:
    public = jwcrypto_jwk.JWK(**key.public_jwk())

    def verify(token: str) -> dict[str, Any]:
        checked = jwcrypto_jwt.JWT(
            algs=[alg],
            check_claims={"iss": ISSUER, "aud": AUDIENCE, "exp": None, "sub": None},
            expected_type="JWS",
        )
        checked.leeway = 30
        checked.deserialize(token, public)
        return _loads(checked.claims)

    return verify


def _loads(text: str) -> dict[str, Any]:
    import json

    loaded: dict[str, Any] = json.loads(text)
    return loaded


def _jwtgate_miss(verifier: Verifier) -> Callable[[str], dict[str, Any]]:
    def verify(token: str) -> dict[str, Any]:
        verifier.cache.discard(token_digest(token))  # a dict pop: every call is a full verification
        verdict = verifier.verify(token, DEFAULT_POLICY, CONTEXT, time.time())
        assert verdict.ok
        return dict(verdict.claims)

    return verify


LIBRARIES = {
    "jwtgate": lambda key, alg, verifier: _jwtgate_miss(verifier),
    "pyjwt": lambda key, alg, verifier: _pyjwt(key, alg),
    "joserfc": lambda key, alg, verifier: _joserfc(key, alg),
    "jwcrypto": lambda key, alg, verifier: _jwcrypto(key, alg),
}


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
@pytest.mark.parametrize("library", list(LIBRARIES))
def test_compare_verify(
    benchmark: Any, library: str, alg: str, keys: Keys, verifier: Verifier, tokens: dict[str, str]
) -> None:
    benchmark.group = f"compare-{alg}"
    verify = LIBRARIES[library](keys[alg], alg, verifier)
    claims = benchmark(verify, tokens[alg])
    assert claims["sub"] == "user-00000001"
    assert claims["aud"] == AUDIENCE
