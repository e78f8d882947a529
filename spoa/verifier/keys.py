"""Verification keys and key sets: loading PEM, JWK and JWKS (via jwcrypto) and HMAC secrets.

A key is tied to what it may verify: its type and curve (and its JWK `alg`, when given) must
fit the token's alg, so an RSA public key can never act as an HMAC secret. HMAC keys only
come from explicitly configured secrets, never from a JWKS.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from jwcrypto import jwk as jwcrypto_jwk

from spoa.verifier.algorithms import (
    ALGORITHMS,
    HMAC_ALGORITHMS,
    KeyKind,
    KeyMaterial,
    KeySlot,
    material_kind,
    same_signature,
)
from spoa.verifier.edwards import edwards_key_problem
from spoa.verifier.errors import KeyLoadError, TokenRejected
from spoa.verifier.parsing import parse_json_object
from spoa.verifier.reasons import Reason

MIN_RSA_BITS = 2048
# A token without kid may be tried against this many keys at most; beyond that it must name
# its key, so one forged token cannot cost a hundred signature checks.
MAX_KIDLESS_CANDIDATES = 4
_OTHER_KID = object()  # stands for every kid a key set does not hold
DEFAULT_MAX_KEYS = 100
_EC_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


# What a cached verdict depends on in a key: its material (as `key_id`), the `kid` it is
# found by, and the alg it is pinned to. A key set that changes any of them is new.
KeyIdentity = tuple[str, str | None, str | None]


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """One public key or HMAC secret. `key_id` is a stable identity of the material (RFC
    7638 thumbprint)."""

    key_id: str
    kid: str | None
    kind: KeyKind
    material: KeyMaterial = field(repr=False)
    curve: str | None = None
    alg: str | None = None  # pinned by the JWK or the configuration

    def __post_init__(self) -> None:
        # A key that could never verify anything is a loading bug: say so at load time.
        if material_kind(self.material) is not self.kind:
            raise KeyLoadError(f"key material does not fit key type {self.kind}")

    @property
    def identity(self) -> KeyIdentity:
        return (self.key_id, self.kid, self.alg)

    @property
    def slot(self) -> KeySlot:
        return (self.kind, self.curve)

    def fits(self, alg: str) -> bool:
        algorithm = ALGORITHMS.get(alg)
        if algorithm is None or algorithm.kind is not self.kind:
            return False
        if algorithm.curves and self.curve not in algorithm.curves:
            return False
        return self.alg is None or same_signature(self.alg, alg)


@dataclass(frozen=True, slots=True)
class KeyLoadReport:
    """What a JWKS load kept and why it dropped the rest (no key material here)."""

    kept: int
    skipped: tuple[str, ...]  # one short reason per skipped key, for logs


@dataclass(frozen=True, slots=True)
class KeySet:
    keys: tuple[VerificationKey, ...]
    _by_kid: Mapping[str, tuple[VerificationKey, ...]] = field(init=False, repr=False)
    _unnamed: tuple[VerificationKey, ...] = field(init=False, repr=False)
    identities: frozenset[KeyIdentity] = field(init=False, repr=False)
    # candidates() answers by (kid class, alg): bounded by kids x algorithms, since a kid
    # this set does not hold is looked up as one, whatever the token says, and only an
    # alg some key fits (so one of ALGORITHMS) gets an answer to keep.
    _chosen: dict[tuple[object, str], tuple[VerificationKey, ...]] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        by_kid: dict[str, list[VerificationKey]] = {}
        for key in self.keys:
            if key.kid is not None:
                by_kid.setdefault(key.kid, []).append(key)
        object.__setattr__(self, "_by_kid", {kid: tuple(ks) for kid, ks in by_kid.items()})
        object.__setattr__(self, "_unnamed", tuple(k for k in self.keys if k.kid is None))
        object.__setattr__(self, "identities", frozenset(k.identity for k in self.keys))
        object.__setattr__(self, "_chosen", {})

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(self._by_kid)

    def candidates(self, kid: str | None, alg: str) -> tuple[VerificationKey, ...]:
        """Keys that may verify a token with this kid and alg.

        A token kid selects keys with that kid plus keys configured without one; a token
        without kid may try the keys that fit, when there are few of them.
        Raises UNKNOWN_KID or UNSUPPORTED_ALG.
        """
        slot: object = kid if kid is None or kid in self._by_kid else _OTHER_KID
        chosen = self._chosen.get((slot, alg))
        if chosen is not None:
            return chosen
        if kid is None:
            named: tuple[VerificationKey, ...] = self.keys
        else:
            named = self._by_kid.get(kid, ()) + self._unnamed
        if not named:
            raise TokenRejected("no key with this kid", reason=Reason.UNKNOWN_KID)
        fitting = tuple(key for key in named if key.fits(alg))
        if not fitting:
            raise TokenRejected("no key for this alg", reason=Reason.UNSUPPORTED_ALG)
        # Keys without a kid serve any kid a token names: the bound holds for them too,
        # or any made-up kid would cost a signature check per such key.
        guessed = fitting if kid is None else tuple(k for k in fitting if k.kid is None)
        if len(guessed) > MAX_KIDLESS_CANDIDATES:
            fitting = tuple(k for k in fitting if k.kid is not None)
            if kid is None or not fitting:
                raise TokenRejected("token must name its key", reason=Reason.UNKNOWN_KID)
        self._chosen[slot, alg] = fitting
        return fitting

    def merged(self, other: KeySet) -> KeySet:
        return KeySet(self.keys + other.keys)


def serving(
    keys: tuple[VerificationKey, ...], shared_slots: frozenset[KeySlot]
) -> tuple[VerificationKey, ...]:
    """The keys that serve an issuer whose algorithms share `shared_slots` (see
    `shared_key_slots`): a key of such a type only when it names its alg, or it would
    verify every one of them."""
    if not shared_slots:
        return keys
    return tuple(key for key in keys if key.alg is not None or key.slot not in shared_slots)


def _check_pinned_alg(alg: str | None, kind: KeyKind) -> None:
    if alg is None:
        return
    algorithm = ALGORITHMS.get(alg)
    if algorithm is None:
        raise KeyLoadError(f"unsupported algorithm {alg!r}")
    if algorithm.kind is not kind:
        raise KeyLoadError(f"algorithm {alg} does not fit a {kind} key")


def key_from_public(
    public_key: object, *, kid: str | None = None, alg: str | None = None
) -> VerificationKey:
    """Wrap a `cryptography` public key, enforcing minimum sizes and supported curves."""
    curve: str | None
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise KeyLoadError(f"RSA key has {public_key.key_size} bits, minimum is {MIN_RSA_BITS}")
        kind, curve = KeyKind.RSA, None
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        curve = _EC_CURVES.get(public_key.curve.name)
        if curve is None:
            raise KeyLoadError(f"unsupported EC curve {public_key.curve.name}")
        kind = KeyKind.EC
    elif isinstance(public_key, Ed25519PublicKey | Ed448PublicKey):
        curve = "Ed25519" if isinstance(public_key, Ed25519PublicKey) else "Ed448"
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        problem = edwards_key_problem(curve, raw)
        if problem is not None:
            raise KeyLoadError(f"{curve} public key {problem}")
        kind = KeyKind.OKP
    else:
        raise KeyLoadError("unsupported public key type")
    _check_pinned_alg(alg, kind)
    if alg is not None and curve is not None:
        algorithm = ALGORITHMS[alg]
        if algorithm.curves and curve not in algorithm.curves:
            raise KeyLoadError(f"algorithm {alg} does not fit curve {curve}")
    thumbprint = jwcrypto_jwk.JWK.from_pyca(public_key).thumbprint()
    return VerificationKey(
        key_id=str(thumbprint), kid=kid, kind=kind, material=public_key, curve=curve, alg=alg
    )


def load_pem(data: bytes, *, kid: str | None = None, alg: str | None = None) -> VerificationKey:
    """A PEM public key (SubjectPublicKeyInfo) or certificate; private keys are refused."""
    if b"PRIVATE KEY" in data:
        raise KeyLoadError("PEM holds a private key; configure the public key only")
    try:
        if b"BEGIN CERTIFICATE" in data:
            public_key: object = x509.load_pem_x509_certificate(data).public_key()
        else:
            public_key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise KeyLoadError("not a PEM public key or certificate") from exc
    return key_from_public(public_key, kid=kid, alg=alg)


def hmac_key(secret: bytes, *, alg: str, kid: str | None = None) -> VerificationKey:
    """An explicitly configured HMAC secret, at least as long as the hash (RFC 7518 §3.2)."""
    if alg not in HMAC_ALGORITHMS:
        raise KeyLoadError(f"{alg} is not an HMAC algorithm")
    minimum = int(alg[2:]) // 8
    if len(secret) < minimum:
        raise KeyLoadError(f"{alg} secret must be at least {minimum} bytes")
    # An identity that changes with the secret without exposing it.
    identity = hashlib.sha256(b"jwtgate hmac key id\x00" + secret).hexdigest()
    return VerificationKey(
        key_id=f"hmac:{identity}", kid=kid, kind=KeyKind.OCT, material=secret, alg=alg
    )


# RFC 7518 sections 6.2.2, 6.3.2 and RFC 8037 section 2: the members of private keys.
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth"})


def load_jwk(jwk: Mapping[str, Any]) -> VerificationKey:
    """One public JWK (RSA, EC or OKP). `oct` keys are refused: secrets are configured apart."""
    kty = jwk.get("kty")
    if kty == "oct":
        raise KeyLoadError("symmetric JWKs are not accepted; configure HMAC secrets explicitly")
    if kty not in ("RSA", "EC", "OKP"):
        raise KeyLoadError(f"unsupported kty {kty!r}")
    if jwk.get("use", "sig") != "sig":
        raise KeyLoadError("key is not for signatures")
    key_ops = jwk.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        raise KeyLoadError("key_ops does not allow verify")
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise KeyLoadError("kid is not a string")
    alg = jwk.get("alg")
    if alg is not None and not isinstance(alg, str):
        raise KeyLoadError("alg is not a string")
    if not _PRIVATE_MEMBERS.isdisjoint(jwk):
        # A published private key lets anyone sign: such a key must not be trusted.
        raise KeyLoadError("JWK holds private key material; publish the public key only")
    public_members = {"kty", "crv", "x", "y", "n", "e"}
    try:
        parsed = jwcrypto_jwk.JWK(**{k: v for k, v in jwk.items() if k in public_members})
        public_key = parsed.get_op_key("verify")
    except Exception as exc:  # jwcrypto raises many types for bad key data
        raise KeyLoadError(f"invalid {kty} JWK") from exc
    return key_from_public(public_key, kid=kid, alg=alg)


def _jwks_containers(max_keys: int) -> int:
    """The arrays and objects a key set of `max_keys` keys may hold: each key is an object,
    with an array or two (x5c, key_ops) at most."""
    return 4 * max_keys + 16


def load_jwks(
    data: bytes | str | Mapping[str, Any], *, max_keys: int = DEFAULT_MAX_KEYS
) -> tuple[KeySet, KeyLoadReport]:
    """A JWKS document. Unusable keys (enc, weak, unknown types) are skipped and reported."""
    if isinstance(data, Mapping):
        document: Mapping[str, Any] = data
    else:
        raw = data.encode("utf-8") if isinstance(data, str) else data
        try:
            document = parse_json_object(raw, "JWKS", max_containers=_jwks_containers(max_keys))
        except TokenRejected as exc:  # its message says what is wrong, never the content
            raise KeyLoadError(str(exc)) from exc
    entries = document.get("keys")
    if not isinstance(entries, list):
        raise KeyLoadError("JWKS has no keys array")
    if len(entries) > max_keys:
        raise KeyLoadError(f"JWKS has {len(entries)} keys, limit is {max_keys}")
    kept: list[VerificationKey] = []
    skipped: list[str] = []
    for entry in entries:
        if not isinstance(entry, dict):
            skipped.append("entry is not an object")
            continue
        try:
            kept.append(load_jwk(entry))
        except KeyLoadError as exc:
            skipped.append(str(exc))
    return KeySet(tuple(kept)), KeyLoadReport(kept=len(kept), skipped=tuple(skipped))


def load_key_file_bytes(
    data: bytes,
    *,
    kid: str | None = None,
    alg: str | None = None,
    max_keys: int = DEFAULT_MAX_KEYS,
) -> KeySet:
    """A file's bytes holding a PEM key, a JWK or a JWKS (told apart by content); a JWKS
    of more than `max_keys` keys is refused, as a fetched one is."""
    stripped = data.lstrip()
    if stripped.startswith(b"-----BEGIN"):
        return KeySet((load_pem(data, kid=kid, alg=alg),))
    try:
        document = parse_json_object(data, "key file", max_containers=_jwks_containers(max_keys))
    except TokenRejected as exc:
        raise KeyLoadError("key file is neither PEM nor a JSON object") from exc
    if "keys" in document:
        entries = document["keys"]
        if isinstance(entries, list) and any(
            isinstance(entry, dict) and (not _PRIVATE_MEMBERS.isdisjoint(entry) or "k" in entry)
            for entry in entries
        ):
            # The operator wrote this file: a private key (or a symmetric secret, `k`) in it
            # is a mistake to fix, and a secret on disk, not a key to skip as a published
            # set's unusable ones are. HMAC secrets have their own settings.
            raise KeyLoadError(
                "JWKS holds private key material or a secret; configure the public keys only"
            )
        key_set, report = load_jwks(document, max_keys=max_keys)
        if not key_set.keys:
            why = "; ".join(dict.fromkeys(report.skipped)) or "its keys array is empty"
            raise KeyLoadError(f"no usable key in its JWKS ({why})")
        if alg is None:
            return key_set
        # One kid cannot name several keys, and a set may hold keys of several types.
        return KeySet(tuple(_alg_filled_in(key, alg) for key in key_set.keys))
    return KeySet((_as_configured(load_jwk(document), kid, alg),))


def _alg_filled_in(key: VerificationKey, alg: str) -> VerificationKey:
    """A JWKS file's key pinned to its configured `alg`, when it names none and `alg`
    fits it; otherwise the key as it is."""
    if key.alg is not None:
        return key
    pinned = replace(key, alg=alg)
    return pinned if pinned.fits(alg) else key


def _as_configured(key: VerificationKey, kid: str | None, alg: str | None) -> VerificationKey:
    """A JWK file's key with the `kid` and `alg` configured for the file: each fills in
    what the key leaves out and must agree with what it says."""
    if alg is not None:
        filled = _alg_filled_in(key, alg)
        if filled.alg is None:
            raise KeyLoadError(f"algorithm {alg} does not fit its {key.kind} key")
        if not same_signature(filled.alg, alg):
            raise KeyLoadError(f"its key names alg {key.alg}, not the {alg} configured for it")
        key = filled
    if kid is not None:
        if key.kid is None:
            key = replace(key, kid=kid)
        elif key.kid != kid:
            raise KeyLoadError("its key names another kid than the one configured for it")
    return key
