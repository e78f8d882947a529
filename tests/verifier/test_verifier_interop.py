"""Tokens minted by independent libraries (PyJWT, joserfc) verify for every algorithm."""

from __future__ import annotations

from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from joserfc import jwk as joserfc_jwk
from joserfc import jwt as joserfc_jwt
from verifier_helpers import CONTEXT, NOW, POLICY, KeyPair, default_claims, verifier_for

from spoa.verifier import Reason

PYJWT_ALGS = [
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
    "ES256", "ES384", "ES512", "EdDSA", "HS256", "HS384", "HS512",
]  # fmt: skip
JOSERFC_ALGS = [*PYJWT_ALGS, "Ed25519", "Ed448"]


def _pem(key: KeyPair) -> bytes:
    return bytes(
        key.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _check(token: str, key: KeyPair, alg: str) -> None:
    verifier, _store = verifier_for([key.verification_key()], {alg})
    verdict = verifier.verify(token, POLICY, CONTEXT, NOW)
    assert verdict.reason is Reason.OK, (alg, verdict)
    assert verdict.ok
    assert verdict.status == 200
    assert verdict.claims["sub"] == "user-42"
    assert verdict.alg == alg
    assert verdict.kid == key.kid
    # Tampering with the payload must break every algorithm.
    head, _payload, signature = token.split(".")
    other = pyjwt.utils.base64url_encode(b'{"iss":"https://issuer.example","sub":"admin"}')
    forged = f"{head}.{other.decode()}.{signature}"
    assert verifier.verify(forged, POLICY, CONTEXT, NOW).reason is Reason.BAD_SIGNATURE


@pytest.mark.parametrize("alg", PYJWT_ALGS)
def test_pyjwt_tokens_verify(alg: str, all_keys: dict[str, KeyPair]) -> None:
    key = all_keys[alg]
    signing_key: Any = key.private if isinstance(key.private, bytes) else _pem(key)
    token = pyjwt.encode(
        default_claims(),
        signing_key,
        algorithm=alg,
        headers={"kid": key.kid, "typ": "at+jwt"},
    )
    _check(token, key, alg)


@pytest.mark.filterwarnings("ignore:EdDSA is deprecated")
@pytest.mark.parametrize("alg", JOSERFC_ALGS)
def test_joserfc_tokens_verify(alg: str, all_keys: dict[str, KeyPair]) -> None:
    key = all_keys[alg]
    if isinstance(key.private, bytes):
        signing_key: Any = joserfc_jwk.OctKey.import_key(key.private)
    else:
        key_type = "RSA" if alg[:2] in ("RS", "PS") else "EC" if alg.startswith("ES") else "OKP"
        signing_key = joserfc_jwk.import_key(_pem(key), key_type)
    header = {"alg": alg, "kid": key.kid, "typ": "at+jwt"}
    token = joserfc_jwt.encode(header, default_claims(), signing_key, algorithms=[alg])
    _check(token, key, alg)


def test_ed448_signed_as_eddsa_by_pyjwt_verifies() -> None:
    from verifier_helpers import make_key

    key = make_key("Ed448", kid="ed448-eddsa")
    token = pyjwt.encode(default_claims(), _pem(key), algorithm="EdDSA", headers={"kid": key.kid})
    verifier, _ = verifier_for([key.verification_key()], {"EdDSA"})
    assert verifier.verify(token, POLICY, CONTEXT, NOW).reason is Reason.OK
