"""Minting compact JWS tokens for development, plus hostile samples for the demo and the tests.

Signing goes through `cryptography` directly (see `SigningKey.sign`), so these tokens are an
independent check on the verifier rather than a mirror of it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from spoa.devkit.errors import KeyMaterialError
from spoa.devkit.keys import SigningKey, b64url_decode, b64url_encode, generate_signing_key

DEFAULT_LIFETIME = 300.0


def _segment(document: Mapping[str, Any]) -> str:
    return b64url_encode(json.dumps(document, separators=(",", ":")).encode("utf-8"))


def _header_for(
    alg: str, kid: str | None, typ: str | None, extra: Mapping[str, Any] | None
) -> dict[str, Any]:
    header: dict[str, Any] = {"alg": alg}
    if typ is not None:
        header["typ"] = typ
    if kid is not None:
        header["kid"] = kid
    header.update(extra or {})
    return header


def _with_times(
    claims: Mapping[str, Any], now: float | None, lifetime: float | None
) -> dict[str, Any]:
    issued_at = int(time.time() if now is None else now)
    payload = dict(claims)
    payload.setdefault("iat", issued_at)
    if lifetime is not None:
        payload.setdefault("exp", issued_at + int(lifetime))
    return payload


def sign_compact(key: SigningKey, header: Mapping[str, Any], payload: Mapping[str, Any]) -> str:
    """Sign exactly this header and payload (no defaults added)."""
    signing_input = f"{_segment(header)}.{_segment(payload)}"
    return f"{signing_input}.{b64url_encode(key.sign(signing_input.encode('ascii')))}"


def mint_token(
    key: SigningKey,
    claims: Mapping[str, Any],
    *,
    now: float | None = None,
    lifetime: float | None = DEFAULT_LIFETIME,
    header: Mapping[str, Any] | None = None,
    typ: str | None = "at+jwt",
) -> str:
    """A compact JWS signed with `key`; `iat` and `exp` are added unless `claims` has them.

    `header` entries override the defaults (`alg`, `typ`, `kid`), which is how tests build
    tokens with a misleading header.
    """
    return sign_compact(
        key, _header_for(key.alg, key.kid, typ, header), _with_times(claims, now, lifetime)
    )


def decode_unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and payload of a compact JWS, without any check (for tests and the demo)."""
    header_segment, payload_segment, _ = token.split(".")
    header = json.loads(b64url_decode(header_segment))
    payload = json.loads(b64url_decode(payload_segment))
    if not isinstance(header, dict) or not isinstance(payload, dict):
        raise ValueError("header and payload must be JSON objects")
    return header, payload


# ---------------------------------------------------------------- attack samples
# Each builder below makes a token a correct verifier must reject. They exist for the demo's
# hostile traffic and for the attack regression tests; nothing else should call them.


def forge_signature(token: str) -> str:
    """ATTACK SAMPLE: same header and claims, signature with its lowest bit flipped.

    Flipping the last bit keeps the length and encoding valid (and an RSA value below the
    modulus), so only the cryptographic check can catch it.
    """
    header_segment, payload_segment, signature_segment = token.split(".")
    signature = bytearray(b64url_decode(signature_segment))
    if not signature:
        raise KeyMaterialError("the token has no signature to forge")
    signature[-1] ^= 0x01
    return f"{header_segment}.{payload_segment}.{b64url_encode(bytes(signature))}"


def alg_none_token(
    claims: Mapping[str, Any],
    *,
    spelling: str = "none",
    now: float | None = None,
    lifetime: float | None = DEFAULT_LIFETIME,
    typ: str | None = "at+jwt",
) -> str:
    """ATTACK SAMPLE: an unsecured JWS (`alg: none`, empty signature, RFC 7519 section 6).

    `spelling` allows case variants ("None", "NONE") that some libraries once accepted.
    """
    header = _header_for(spelling, None, typ, None)
    return f"{_segment(header)}.{_segment(_with_times(claims, now, lifetime))}."


def expired_token(
    key: SigningKey,
    claims: Mapping[str, Any],
    now: float,
    *,
    expired_for: float = 60.0,
    lifetime: float = DEFAULT_LIFETIME,
    typ: str | None = "at+jwt",
) -> str:
    """ATTACK SAMPLE: correctly signed, but `exp` lies `expired_for` seconds before `now`."""
    expires_at = int(now - expired_for)
    times = {"iat": expires_at - int(lifetime), "exp": expires_at}
    return mint_token(key, {**claims, **times}, now=now, typ=typ)


def resign_with_hmac_using_public_key(
    key: SigningKey,
    claims: Mapping[str, Any],
    *,
    hmac_alg: str = "HS256",
    now: float | None = None,
    lifetime: float | None = DEFAULT_LIFETIME,
    typ: str | None = "at+jwt",
) -> str:
    """ATTACK SAMPLE: RS/ES -> HS confusion (CVE-2015-9235 and kin).

    The attacker knows the public key, so it HMACs the token with the public PEM bytes as the
    secret and sets `alg` to HS256 while keeping the real `kid`. A verifier that takes `alg`
    from the token and feeds the published key to HMAC accepts it.
    """
    if key.is_symmetric:
        raise KeyMaterialError("the confusion attack needs an asymmetric key")
    hmac_key = SigningKey(key.kid, hmac_alg, key.public_pem())
    return mint_token(hmac_key, claims, now=now, lifetime=lifetime, typ=typ)


def embedded_jwk_token(
    claims: Mapping[str, Any],
    *,
    alg: str = "ES256",
    now: float | None = None,
    lifetime: float | None = DEFAULT_LIFETIME,
    typ: str | None = "at+jwt",
) -> str:
    """ATTACK SAMPLE: signed by a key the attacker made, whose public JWK rides in the header.

    A verifier that trusts the header's `jwk` (CVE-2018-0114) accepts it.
    """
    attacker = generate_signing_key(alg)
    header = {"jwk": attacker.public_jwk()}
    return mint_token(attacker, claims, now=now, lifetime=lifetime, header=header, typ=typ)


def psychic_signature_token(
    key: SigningKey,
    claims: Mapping[str, Any],
    *,
    now: float | None = None,
    lifetime: float | None = DEFAULT_LIFETIME,
    typ: str | None = "at+jwt",
) -> str:
    """ATTACK SAMPLE: an ECDSA token whose signature is r = s = 0 (CVE-2022-21449)."""
    if not isinstance(key.private_key, ec.EllipticCurvePrivateKey):
        raise KeyMaterialError("psychic signatures need an ES* key")
    size = (key.private_key.curve.key_size + 7) // 8
    header = _header_for(key.alg, key.kid, typ, None)
    signing_input = f"{_segment(header)}.{_segment(_with_times(claims, now, lifetime))}"
    return f"{signing_input}.{b64url_encode(bytes(2 * size))}"
