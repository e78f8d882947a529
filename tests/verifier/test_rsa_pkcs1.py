"""RS256/384/512 (RSASSA-PKCS1-v1_5) against hand-built encoded messages.

The signature check recovers the encoded message with `cryptography` and compares it with
the one it expects (RFC 8017 8.2.2). These tests sign encoded messages that are valid,
almost valid and forged (wrong padding, a DigestInfo without its NULL, trailing bytes, a
signature not below the modulus) with the raw RSA operation, and hold the answer to
`cryptography`'s own `RSAPublicKey.verify` on every one.
"""

from __future__ import annotations

import hashlib
import random

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from verifier_helpers import KeyPair

from spoa.verifier.algorithms import ALGORITHMS, verify_signature

SIGNING_INPUT = b"eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9"
# RFC 8017 9.2, note 1.
DIGEST_INFO = {
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}
# The same DigestInfo without the NULL parameters (some signers emit it; RFC 8017 asks
# for the NULL form, and OpenSSL's own check refuses the other).
DIGEST_INFO_NO_NULL = {"sha256": bytes.fromhex("302f300b0609608648016503040201040420")}
HASHES = {"sha256": hashes.SHA256(), "sha384": hashes.SHA384(), "sha512": hashes.SHA512()}


def _raw_sign(private: rsa.RSAPrivateKey, encoded: bytes) -> bytes:
    """s = EM^d mod n, whatever EM holds (CRT, for speed)."""
    numbers = private.private_numbers()
    n = numbers.public_numbers.n
    m = int.from_bytes(encoded, "big")
    assert m < n
    s1 = pow(m, numbers.dmp1, numbers.p)
    s2 = pow(m, numbers.dmq1, numbers.q)
    h = (numbers.iqmp * (s1 - s2)) % numbers.p
    return (s2 + h * numbers.q).to_bytes((n.bit_length() + 7) // 8, "big")


def _encoded(size: int, t: bytes, *, head: bytes = b"\x00\x01", fill: int = 0xFF) -> bytes:
    """EMSA-PKCS1-v1_5: head || PS || 0x00 || T, PS filling the rest."""
    return head + bytes([fill]) * (size - len(t) - len(head) - 1) + b"\x00" + t


def _ours(key: rsa.RSAPublicKey, alg: str, signature: bytes) -> bool:
    return verify_signature(ALGORITHMS[alg], key, None, SIGNING_INPUT, signature)


def _theirs(key: rsa.RSAPublicKey, hash_name: str, signature: bytes) -> bool:
    try:
        key.verify(signature, SIGNING_INPUT, padding.PKCS1v15(), HASHES[hash_name])
    except (InvalidSignature, ValueError):
        return False
    return True


@pytest.mark.parametrize("alg", ["RS256", "RS384", "RS512"])
def test_a_well_formed_encoding_verifies(rsa_key: KeyPair, alg: str) -> None:
    hash_name = f"sha{alg[2:]}"
    public = rsa_key.private.public_key()
    size = public.key_size // 8
    digest = hashlib.new(hash_name, SIGNING_INPUT).digest()
    signature = _raw_sign(rsa_key.private, _encoded(size, DIGEST_INFO[hash_name] + digest))
    assert _theirs(public, hash_name, signature)
    assert _ours(public, alg, signature)
    # The library's own signature, for good measure.
    signed = rsa_key.private.sign(SIGNING_INPUT, padding.PKCS1v15(), HASHES[hash_name])
    assert _ours(public, alg, signed)


def _forgeries(size: int) -> dict[str, bytes]:
    """Encoded messages that must not verify for SHA-256 over SIGNING_INPUT."""
    digest = hashlib.sha256(SIGNING_INPUT).digest()
    t = DIGEST_INFO["sha256"] + digest
    short_padding = b"\x00\x01" + b"\xff" * 7 + b"\x00"
    return {
        "digestinfo without NULL": _encoded(size, DIGEST_INFO_NO_NULL["sha256"] + digest),
        "sha384 digestinfo, sha256 digest": _encoded(size, DIGEST_INFO["sha384"] + digest),
        "another message's digest": _encoded(size, DIGEST_INFO["sha256"] + bytes(32)),
        "block type 2": _encoded(size, t, head=b"\x00\x02"),
        "leading byte not zero": _encoded(size, t, head=b"\x01\x01"),
        "padding of 0xfe": _encoded(size, t, fill=0xFE),
        # Bleichenbacher 2006: T first, then garbage where a lax parser stops reading.
        "garbage after the digest": _encoded(11 + len(t), t) + b"\x5a" * (size - 11 - len(t)),
        "padding shorter than 8": short_padding + bytes(size - len(short_padding) - len(t)) + t,
        "no zero separator": b"\x00\x01" + b"\xff" * (size - 2 - len(t)) + t,
        "digest only, no digestinfo": _encoded(size, digest),
    }


@pytest.mark.parametrize("case", sorted(_forgeries(256)))
def test_forged_encodings_are_refused(rsa_key: KeyPair, case: str) -> None:
    public = rsa_key.private.public_key()
    encoded = _forgeries(public.key_size // 8)[case]
    signature = _raw_sign(rsa_key.private, encoded)
    assert not _theirs(public, "sha256", signature)
    assert not _ours(public, "RS256", signature)


def test_a_signature_not_below_the_modulus_is_refused(rsa_key: KeyPair) -> None:
    public = rsa_key.private.public_key()
    n = public.public_numbers().n
    size = public.key_size // 8
    for value in (n, n + 1, 2**2048 - 1):
        signature = value.to_bytes(size, "big")
        assert not _theirs(public, "sha256", signature)
        assert not _ours(public, "RS256", signature)
    # A valid signature plus n is the same residue: still not accepted.
    good = rsa_key.private.sign(SIGNING_INPUT, padding.PKCS1v15(), hashes.SHA256())
    shifted = int.from_bytes(good, "big") + n
    if shifted < 2**2048:
        assert not _ours(public, "RS256", shifted.to_bytes(size, "big"))


def test_wrong_lengths_are_refused(rsa_key: KeyPair) -> None:
    public = rsa_key.private.public_key()
    good = rsa_key.private.sign(SIGNING_INPUT, padding.PKCS1v15(), hashes.SHA256())
    for signature in (good[1:], b"\x00" + good, good[:-1], b"", good + b"\x00"):
        assert not _ours(public, "RS256", signature)


def test_mutated_encodings_answer_as_cryptography_does(rsa_key: KeyPair) -> None:
    """Each byte of a valid encoded message changed in turn (and some at random): the
    check and `cryptography`'s verify agree on every one."""
    public = rsa_key.private.public_key()
    size = public.key_size // 8
    t = DIGEST_INFO["sha256"] + hashlib.sha256(SIGNING_INPUT).digest()
    valid = _encoded(size, t)
    rng = random.Random(7515)
    cases: list[bytes] = []
    for position in range(size):
        mutated = bytearray(valid)
        mutated[position] ^= rng.choice([0x01, 0x80, 0xFF, rng.randrange(1, 256)])
        cases.append(bytes(mutated))
    for _ in range(64):
        mutated = bytearray(valid)
        for _ in range(rng.randrange(2, 6)):
            mutated[rng.randrange(size)] = rng.randrange(256)
        cases.append(bytes(mutated))
    n = public.public_numbers().n
    checked = 0
    for encoded in cases:
        if int.from_bytes(encoded, "big") >= n:
            continue
        signature = _raw_sign(rsa_key.private, encoded)
        ours, theirs = _ours(public, "RS256", signature), _theirs(public, "sha256", signature)
        assert ours == theirs, encoded.hex()
        checked += 1
    assert checked > size // 2
