"""Test helpers: signing keys and a minimal compact-JWS signer written on `cryptography`.

Independent cross-checks use PyJWT and joserfc; this signer exists so tests can also build
hostile tokens (odd headers, bad encodings) that a well-behaved library refuses to make.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from spoa.verifier import (
    IssuerRules,
    KeySet,
    MemoryKeyStore,
    Policy,
    RequestContext,
    VerificationKey,
    Verifier,
    hmac_key,
    key_from_public,
)

ISSUER = "https://issuer.example"
AUDIENCE = "api://orders"
NOW = 1_800_000_000.0
CONTEXT = RequestContext(method="GET", path="/orders", host="api.example")
_HASH = {"256": hashes.SHA256(), "384": hashes.SHA384(), "512": hashes.SHA512()}
_EC = {"ES256": (ec.SECP256R1(), 32), "ES384": (ec.SECP384R1(), 48), "ES512": (ec.SECP521R1(), 66)}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class KeyPair:
    alg: str
    kid: str | None
    private: Any  # a cryptography private key, or bytes for HMAC

    def verification_key(
        self, *, kid: str | None = "same", alg: str | None = None
    ) -> VerificationKey:
        chosen_kid = self.kid if kid == "same" else kid
        if isinstance(self.private, bytes):
            return hmac_key(self.private, alg=self.alg, kid=chosen_kid)
        return key_from_public(self.private.public_key(), kid=chosen_kid, alg=alg)

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def public_jwk(self, **extra: Any) -> dict[str, Any]:
        from jwcrypto import jwk

        document = json.loads(jwk.JWK.from_pyca(self.private.public_key()).export_public())
        if self.kid is not None:
            document["kid"] = self.kid
        document.update(extra)
        return document


def make_key(alg: str, *, kid: str | None = None, rsa_bits: int = 2048) -> KeyPair:
    if alg.startswith(("RS", "PS")):
        private: Any = rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
    elif alg in _EC:
        private = ec.generate_private_key(_EC[alg][0])
    elif alg in ("EdDSA", "Ed25519"):
        private = ed25519.Ed25519PrivateKey.generate()
    elif alg == "Ed448":
        private = ed448.Ed448PrivateKey.generate()
    elif alg.startswith("HS"):
        private = os.urandom(int(alg[2:]) // 8)
    else:
        raise ValueError(alg)
    return KeyPair(alg, kid, private)


def sign(alg: str, private: Any, signing_input: bytes) -> bytes:
    if alg.startswith("HS"):
        return hmac.new(private, signing_input, getattr(hashlib, f"sha{alg[2:]}")).digest()
    if alg.startswith("RS"):
        return private.sign(signing_input, padding.PKCS1v15(), _HASH[alg[2:]])
    if alg.startswith("PS"):
        hash_algorithm = _HASH[alg[2:]]
        pss = padding.PSS(padding.MGF1(hash_algorithm), salt_length=hash_algorithm.digest_size)
        return private.sign(signing_input, pss, hash_algorithm)
    if alg in _EC:
        der = private.sign(signing_input, ec.ECDSA(_HASH[alg[2:]]))
        r, s = decode_dss_signature(der)
        size = _EC[alg][1]
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")
    return bytes(private.sign(signing_input))


def mint(
    key: KeyPair,
    claims: dict[str, Any] | None = None,
    *,
    header: dict[str, Any] | None = None,
    alg: str | None = None,
    raw_header: bytes | None = None,
    raw_payload: bytes | None = None,
) -> str:
    """A compact JWS. Default claims make a valid token for ISSUER/AUDIENCE at NOW."""
    chosen_alg = alg or key.alg
    full_header: dict[str, Any] = {"alg": chosen_alg, "typ": "at+jwt"}
    if key.kid is not None:
        full_header["kid"] = key.kid
    full_header.update(header or {})
    full_header = {k: v for k, v in full_header.items() if v is not None}
    payload = default_claims() if claims is None else claims
    header_bytes = raw_header if raw_header is not None else json.dumps(full_header).encode()
    payload_bytes = raw_payload if raw_payload is not None else json.dumps(payload).encode()
    signing_input = f"{b64(header_bytes)}.{b64(payload_bytes)}".encode()
    return f"{signing_input.decode()}.{b64(sign(chosen_alg, key.private, signing_input))}"


def default_claims(**overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "user-42",
        "aud": AUDIENCE,
        "iat": int(NOW) - 60,
        "exp": int(NOW) + 600,
        "scope": "orders:read profile",
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def rules(algorithms: set[str] | frozenset[str], **overrides: Any) -> IssuerRules:
    settings: dict[str, Any] = {
        "name": "main",
        "issuer": ISSUER,
        "algorithms": frozenset(algorithms),
        "audiences": frozenset({AUDIENCE}),
    }
    settings.update(overrides)
    return IssuerRules(**settings)


POLICY = Policy(name="default", issuers=("main",))


def verifier_for(
    keys: list[VerificationKey],
    algorithms: set[str] | frozenset[str],
    *,
    cache_size: int = 100,
    now: float = NOW,
    **rule_overrides: Any,
) -> tuple[Verifier, MemoryKeyStore]:
    store = MemoryKeyStore()
    issuer_rules = rules(algorithms, **rule_overrides)
    store.replace(issuer_rules.name, KeySet(tuple(keys)), now)
    return Verifier([issuer_rules], store, cache_size=cache_size), store
