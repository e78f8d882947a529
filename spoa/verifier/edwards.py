"""The checks RFC 8032 asks of an EdDSA public key, which OpenSSL leaves undone at load.

OpenSSL takes any 32 (57) bytes as an Ed25519 (Ed448) public key. A point of small order
verifies a signature with S = 0 for any message, so one such key in a JWKS would let
anyone sign (RFC 8725 §3.4: validate cryptographic inputs). A key is refused unless its
encoding decodes (RFC 8032 §5.1.3, §5.2.3) to a point outside the small torsion subgroup.
Only key loading runs this: the arithmetic is a few modular exponentiations.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class _Curve:
    name: str
    size: int  # encoded bytes
    p: int
    d: int  # of the Edwards equation a*x^2 + y^2 = 1 + d*x^2*y^2
    a: int


_P25519 = 2**255 - 19
_P448 = 2**448 - 2**224 - 1
_ED25519 = _Curve("Ed25519", 32, _P25519, -121665 * pow(121666, -1, _P25519) % _P25519, -1)
_ED448 = _Curve("Ed448", 57, _P448, -39081 % _P448, 1)
_CURVES = {curve.name: curve for curve in (_ED25519, _ED448)}
# Curve25519, the Montgomery curve birationally equivalent to edwards25519 (RFC 7748 §4.1).
_A25519 = 486662


def edwards_key_problem(curve_name: str, encoded: bytes) -> str | None:
    """Why `encoded` is no usable `curve_name` public key, or None when it is one."""
    curve = _CURVES[curve_name]
    if len(encoded) != curve.size:
        return f"is not {curve.size} bytes long"
    number = int.from_bytes(encoded, "little")
    x_is_odd = number >> (8 * curve.size - 1)
    y = number & ((1 << (8 * curve.size - 1)) - 1)
    p = curve.p
    # Also refuses Ed448's stray bits 0-6 of the last byte: they make y at least 2^448 > p.
    if y >= p:
        return "is not a canonical encoding"
    # x^2 = (y^2 - 1) / (d*y^2 - a); both curves' d makes the denominator non-zero.
    y2 = y * y % p
    x2 = (y2 - 1) * pow(curve.d * y2 - curve.a, -1, p) % p
    if x2 and pow(x2, (p - 1) // 2, p) != 1:
        return "is not a point on the curve"
    if x2 == 0 and x_is_odd:
        return "is not a canonical encoding"
    if _small_order(curve, y):
        return "is a point of small order (it would verify forged signatures)"
    return None


def _small_order(curve: _Curve, y: int) -> bool:
    """Whether the point with this y lies in the torsion subgroup (order 8 or 4)."""
    p = curve.p
    if curve is _ED448:
        # Its torsion points: (0, 1), (0, -1) and (+-1, 0).
        return y in (0, 1, p - 1)
    if y == 1:  # the neutral element
        return True
    # On Curve25519, u = (1 + y) / (1 - y). Doubling needs only u; the doubling of a point
    # of order 2 (u = 0) is the neutral element. Order divides 8 when one of three
    # doublings reaches it. x's sign does not matter: -P has the order of P.
    u = (1 + y) * pow(1 - y, -1, p) % p
    for _ in range(3):
        denominator = 4 * u * (u * u + _A25519 * u + 1) % p
        if denominator == 0:
            return True
        u = (u * u - 1) ** 2 * pow(denominator, -1, p) % p
    return False
