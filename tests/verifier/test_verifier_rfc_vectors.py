"""RFC 7515 Appendix A and RFC 7520 §4 example signatures, checked by the verifier."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from jwcrypto.common import base64url_decode

from spoa.verifier import (
    IssuerRules,
    KeySet,
    MemoryKeyStore,
    Policy,
    Reason,
    RequestContext,
    VerificationKey,
    Verifier,
    hmac_key,
    load_jwk,
)
from spoa.verifier.algorithms import ALGORITHMS, verify_signature
from spoa.verifier.parsing import b64url_decode

VECTORS: dict[str, Any] = json.loads((Path(__file__).parent / "rfc_vectors.json").read_text())
RFC7515_EXP = 1300819380  # "exp" of the RFC 7515 example payload (March 2011)
BEFORE_EXP = RFC7515_EXP - 100.0


def _key(jwk: dict[str, Any], alg: str) -> VerificationKey:
    if jwk["kty"] == "oct":
        return hmac_key(base64url_decode(jwk["k"]), alg=alg, kid=jwk.get("kid"))
    return load_jwk(jwk)


def _joe_verifier(alg: str, key: VerificationKey) -> Verifier:
    store = MemoryKeyStore()
    store.replace("joe", KeySet((key,)), BEFORE_EXP)
    rules = IssuerRules(name="joe", issuer="joe", algorithms=frozenset({alg}))
    return Verifier([rules], store)


JOE = Policy(name="rfc", issuers=("joe",))


@pytest.mark.parametrize("section", ["A.1", "A.2", "A.3"])
def test_rfc7515_examples_verify(section: str) -> None:
    vector = VECTORS["rfc7515"][section]
    verifier = _joe_verifier(vector["alg"], _key(vector["key"], vector["alg"]))
    verdict = verifier.verify(vector["token"], JOE, RequestContext(), BEFORE_EXP)
    assert verdict.reason is Reason.OK, verdict
    assert verdict.claims["http://example.com/is_root"] is True
    assert verdict.expires_at == RFC7515_EXP
    # The same token one leeway past its 2011 expiry is refused.
    later = verifier.verify(vector["token"], JOE, RequestContext(), RFC7515_EXP + 31.0)
    assert later.reason is Reason.EXPIRED


@pytest.mark.parametrize("section", ["A.1", "A.2", "A.3"])
def test_rfc7515_examples_with_one_flipped_signature_bit_fail(section: str) -> None:
    vector = VECTORS["rfc7515"][section]
    head, payload, signature = vector["token"].split(".")
    raw = bytearray(b64url_decode(signature.encode()))
    raw[len(raw) // 2] ^= 0x01
    from verifier_helpers import b64

    forged = f"{head}.{payload}.{b64(bytes(raw))}"
    verifier = _joe_verifier(vector["alg"], _key(vector["key"], vector["alg"]))
    assert verifier.verify(forged, JOE, RequestContext(), BEFORE_EXP).reason is Reason.BAD_SIGNATURE


def test_rfc7515_a4_es512_signature_verifies_but_payload_is_not_a_jwt() -> None:
    vector = VECTORS["rfc7515"]["A.4"]
    head, payload, signature = vector["token"].split(".")
    key = load_jwk(vector["key"])
    assert verify_signature(
        ALGORITHMS["ES512"],
        key.material,
        key.curve,
        f"{head}.{payload}".encode(),
        b64url_decode(signature.encode()),
    )
    verdict = _joe_verifier("ES512", key).verify(vector["token"], JOE, RequestContext(), BEFORE_EXP)
    assert verdict.reason is Reason.MALFORMED  # "Payload" is not a JSON object


def test_rfc7515_a5_unsecured_token_is_refused() -> None:
    vector = VECTORS["rfc7515"]["A.5"]
    key = _key(VECTORS["rfc7515"]["A.1"]["key"], "HS256")
    verdict = _joe_verifier("HS256", key).verify(vector["token"], JOE, RequestContext(), BEFORE_EXP)
    assert verdict.reason is Reason.UNSUPPORTED_ALG
    assert not verdict.ok


@pytest.mark.parametrize(
    ("section", "alg"), [("4.1", "RS256"), ("4.2", "PS384"), ("4.3", "ES512"), ("4.4", "HS256")]
)
def test_rfc7520_signatures_verify(section: str, alg: str) -> None:
    vector = VECTORS["rfc7520"][section]
    head, payload, signature = vector["token"].split(".")
    header = json.loads(b64url_decode(head.encode()))
    assert header["alg"] == alg
    key = _key(vector["key"], alg)
    signing_input = f"{head}.{payload}".encode()
    raw_signature = b64url_decode(signature.encode())
    assert verify_signature(ALGORITHMS[alg], key.material, key.curve, signing_input, raw_signature)
    assert not verify_signature(
        ALGORITHMS[alg], key.material, key.curve, signing_input + b"x", raw_signature
    )
