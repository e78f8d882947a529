"""RFC 8032 checks on EdDSA public keys: canonical, on the curve, not of small order."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed448, ed25519

from spoa.verifier.edwards import edwards_key_problem

_P25519 = 2**255 - 19
_P448 = 2**448 - 2**224 - 1
SMALL = "small order"
NON_CANONICAL = "not a canonical encoding"

# The eight torsion points of edwards25519 by their y (x's sign in the top bit): the
# neutral element, the point of order 2, the two of order 4 (y = 0) and the four of order 8.
_ORDER_8_Y = (
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
)


def _ed25519(y: int, x_odd: bool = False) -> bytes:
    return (y | (x_odd << 255)).to_bytes(32, "little")


def _raw(private: ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


@pytest.mark.parametrize(
    "y", [1, _P25519 - 1, 0, *(int.from_bytes(bytes.fromhex(h), "little") for h in _ORDER_8_Y)]
)
def test_every_ed25519_torsion_point_is_refused(y: int) -> None:
    # x = 0 (y = +-1) has no odd twin; the others are refused with either sign.
    assert SMALL in (edwards_key_problem("Ed25519", _ed25519(y)) or "")
    if y not in (1, _P25519 - 1):
        assert SMALL in (edwards_key_problem("Ed25519", _ed25519(y, x_odd=True)) or "")


@pytest.mark.parametrize("y", [_P25519, _P25519 + 1, 2**255 - 1])
def test_ed25519_y_at_or_above_p_is_refused(y: int) -> None:
    assert NON_CANONICAL in (edwards_key_problem("Ed25519", _ed25519(y)) or "")


def test_ed25519_x_zero_with_its_sign_bit_set_is_refused() -> None:
    assert NON_CANONICAL in (edwards_key_problem("Ed25519", _ed25519(1, x_odd=True)) or "")


def test_ed25519_y_off_the_curve_is_refused() -> None:
    # y = 2: (y^2 - 1) / (d y^2 + 1) is not a square mod p.
    assert edwards_key_problem("Ed25519", _ed25519(2)) == "is not a point on the curve"


@pytest.mark.parametrize("y", [0, 1, _P448 - 1])
def test_every_ed448_torsion_point_is_refused(y: int) -> None:
    assert SMALL in (edwards_key_problem("Ed448", y.to_bytes(57, "little")) or "")


@pytest.mark.parametrize(
    "encoded",
    [_P448.to_bytes(57, "little"), bytes(56) + b"\x01", (2**448 - 1).to_bytes(57, "little")],
)
def test_ed448_non_canonical_encodings_are_refused(encoded: bytes) -> None:
    assert NON_CANONICAL in (edwards_key_problem("Ed448", encoded) or "")


def test_real_keys_pass() -> None:
    for _ in range(50):
        assert edwards_key_problem("Ed25519", _raw(ed25519.Ed25519PrivateKey.generate())) is None
        assert edwards_key_problem("Ed448", _raw(ed448.Ed448PrivateKey.generate())) is None


def test_wrong_length_is_refused() -> None:
    assert edwards_key_problem("Ed25519", bytes(31)) == "is not 32 bytes long"
    assert edwards_key_problem("Ed448", bytes(56)) == "is not 57 bytes long"
