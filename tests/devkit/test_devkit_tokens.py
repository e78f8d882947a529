"""Minted tokens verify with independent libraries (PyJWT, jwcrypto); attack samples do not."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from jwcrypto import jwk, jws

from spoa.devkit.errors import KeyMaterialError
from spoa.devkit.keys import GENERATION_NAMES, SigningKey, b64url_decode, generate_signing_key
from spoa.devkit.tokens import (
    alg_none_token,
    decode_unverified,
    embedded_jwk_token,
    expired_token,
    forge_signature,
    mint_token,
    psychic_signature_token,
    resign_with_hmac_using_public_key,
)

NOW = 1_800_000_000.0
CLAIMS = {"sub": "alice", "aud": "orders", "iss": "https://issuer.test", "scope": "read"}
# The fixed NOW lies in the future of some machines and the past of others: check times by hand.
PYJWT_NO_TIME = {"verify_exp": False, "verify_iat": False, "verify_nbf": False}


@pytest.fixture(scope="module")
def keys_by_name() -> dict[str, SigningKey]:
    return {name: generate_signing_key(name) for name in GENERATION_NAMES}


def _pyjwt_key(key: SigningKey) -> Any:
    return key.private_key if key.is_symmetric else key.public_pem()


def _pyjwt_decode(token: str, key: SigningKey) -> dict[str, Any]:
    decoded: dict[str, Any] = jwt.decode(
        token, _pyjwt_key(key), algorithms=[key.alg], audience="orders", options=PYJWT_NO_TIME
    )
    return decoded


@pytest.mark.parametrize("name", GENERATION_NAMES)
def test_minted_tokens_verify_with_pyjwt(keys_by_name: dict[str, SigningKey], name: str) -> None:
    key = keys_by_name[name]
    token = mint_token(key, CLAIMS, now=NOW)
    claims = _pyjwt_decode(token, key)
    assert claims == {**CLAIMS, "iat": int(NOW), "exp": int(NOW) + 300}
    header = jwt.get_unverified_header(token)
    assert header == {"alg": key.alg, "typ": "at+jwt", "kid": key.kid}


@pytest.mark.parametrize("name", [n for n in GENERATION_NAMES if not n.startswith("HS")])
def test_minted_tokens_verify_with_jwcrypto_from_the_public_jwk(
    keys_by_name: dict[str, SigningKey], name: str
) -> None:
    key = keys_by_name[name]
    token = mint_token(key, CLAIMS, now=NOW)
    verifier = jws.JWS()
    verifier.deserialize(token)
    verifier.verify(jwk.JWK(**key.public_jwk()), alg=key.alg)
    assert json.loads(verifier.payload)["sub"] == "alice"


@pytest.mark.parametrize(("alg", "size"), [("ES256", 32), ("ES384", 48), ("ES512", 66)])
def test_ecdsa_signatures_are_raw_r_and_s(alg: str, size: int) -> None:
    token = mint_token(generate_signing_key(alg), CLAIMS, now=NOW)
    assert len(b64url_decode(token.rsplit(".", 1)[1])) == 2 * size


@pytest.mark.parametrize("alg", ["PS256", "PS384", "PS512"])
def test_pss_salt_is_the_hash_length(keys_by_name: dict[str, SigningKey], alg: str) -> None:
    key = keys_by_name[alg]
    token = mint_token(key, CLAIMS, now=NOW)
    signing_input, _, signature = token.rpartition(".")
    digest = {"PS256": hashes.SHA256(), "PS384": hashes.SHA384(), "PS512": hashes.SHA512()}[alg]
    public_key = key.public().public_key
    assert isinstance(public_key, rsa.RSAPublicKey)

    def verify(salt_length: int) -> None:
        pss = padding.PSS(mgf=padding.MGF1(digest), salt_length=salt_length)
        public_key.verify(b64url_decode(signature), signing_input.encode(), pss, digest)

    verify(digest.digest_size)
    with pytest.raises(InvalidSignature):
        verify(digest.digest_size - 1)


def test_lifetime_none_means_no_exp_and_given_times_win() -> None:
    key = generate_signing_key("HS256")
    _, payload = decode_unverified(mint_token(key, {"sub": "a"}, now=NOW, lifetime=None))
    assert payload == {"sub": "a", "iat": int(NOW)}
    _, payload = decode_unverified(mint_token(key, {"iat": 5, "exp": 7}, now=NOW))
    assert payload == {"iat": 5, "exp": 7}


def test_header_overrides_and_typ() -> None:
    key = generate_signing_key("HS256")
    header, _ = decode_unverified(mint_token(key, {}, now=NOW, typ=None, header={"kid": "other"}))
    assert header == {"alg": "HS256", "kid": "other"}


# ---------------------------------------------------------------- attack samples


@pytest.mark.parametrize("name", GENERATION_NAMES)
def test_forged_signature_keeps_the_structure_but_fails(
    keys_by_name: dict[str, SigningKey], name: str
) -> None:
    key = keys_by_name[name]
    token = mint_token(key, CLAIMS, now=NOW)
    forged = forge_signature(token)
    assert forged != token
    assert forged.rsplit(".", 1)[0] == token.rsplit(".", 1)[0]
    assert len(b64url_decode(forged.rsplit(".", 1)[1])) == len(b64url_decode(token.split(".")[2]))
    with pytest.raises(jwt.InvalidSignatureError):
        _pyjwt_decode(forged, key)


def test_forge_signature_needs_a_signature() -> None:
    with pytest.raises(KeyMaterialError):
        forge_signature(alg_none_token(CLAIMS))


@pytest.mark.parametrize("spelling", ["none", "None", "NONE"])
def test_alg_none_token_is_unsigned_and_refused(
    keys_by_name: dict[str, SigningKey], spelling: str
) -> None:
    token = alg_none_token(CLAIMS, spelling=spelling, now=NOW)
    assert token.endswith(".")
    header, payload = decode_unverified(token)
    assert header["alg"] == spelling
    assert payload["sub"] == "alice"
    with pytest.raises(jwt.InvalidTokenError):
        _pyjwt_decode(token, keys_by_name["RS256"])


def test_expired_token_is_signed_but_expired(keys_by_name: dict[str, SigningKey]) -> None:
    key = keys_by_name["ES256"]
    token = expired_token(key, CLAIMS, now=NOW, expired_for=60)
    claims = _pyjwt_decode(token, key)
    assert claims["exp"] == int(NOW) - 60
    assert claims["iat"] == int(NOW) - 360
    # PyJWT reads the real clock, so this one is expired relative to it.
    expired_now = expired_token(key, CLAIMS, now=time.time(), expired_for=60)
    with pytest.raises(jwt.ExpiredSignatureError):
        jwt.decode(expired_now, key.public_pem(), algorithms=["ES256"], audience="orders")


def test_hmac_confusion_sample_is_keyed_with_the_public_pem(
    keys_by_name: dict[str, SigningKey],
) -> None:
    key = keys_by_name["RS256"]
    token = resign_with_hmac_using_public_key(key, CLAIMS, now=NOW)
    header, _ = decode_unverified(token)
    assert header["alg"] == "HS256"
    assert header["kid"] == key.kid
    signing_input, _, signature = token.rpartition(".")
    expected = hmac.new(key.public_pem(), signing_input.encode(), hashlib.sha256).digest()
    assert b64url_decode(signature) == expected  # a naive verifier would accept it
    with pytest.raises(jwt.InvalidTokenError):
        _pyjwt_decode(token, key)
    with pytest.raises(KeyMaterialError):
        resign_with_hmac_using_public_key(keys_by_name["HS256"], CLAIMS)


def test_embedded_jwk_sample_verifies_only_with_the_attacker_key(
    keys_by_name: dict[str, SigningKey],
) -> None:
    token = embedded_jwk_token(CLAIMS, now=NOW)
    header, _ = decode_unverified(token)
    attacker = jwk.JWK(**header["jwk"])
    verifier = jws.JWS()
    verifier.deserialize(token)
    verifier.verify(attacker, alg="ES256")
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(
            token,
            keys_by_name["ES256"].public_pem(),
            algorithms=["ES256"],
            audience="orders",
            options=PYJWT_NO_TIME,
        )


def test_psychic_signature_is_all_zeros_and_refused(keys_by_name: dict[str, SigningKey]) -> None:
    key = keys_by_name["ES384"]
    token = psychic_signature_token(key, CLAIMS, now=NOW)
    assert b64url_decode(token.rsplit(".", 1)[1]) == bytes(96)
    with pytest.raises(jwt.InvalidSignatureError):
        _pyjwt_decode(token, key)
    with pytest.raises(KeyMaterialError):
        psychic_signature_token(keys_by_name["RS256"], CLAIMS)
