"""Compact JWS parsing (RFC 7515 §7.1), strict and bounded.

The size limit is checked before any decoding; base64url must be canonical and unpadded;
header and payload must be JSON objects without duplicate member names.
"""

from __future__ import annotations

import binascii
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

from spoa.verifier.errors import TokenRejected
from spoa.verifier.reasons import Reason
from spoa.verifier.speedups import optional_speedup

# Header parameters we understand; a `crit` naming anything else is refused (RFC 7515 §4.1.11).
UNDERSTOOD_CRITICAL: frozenset[str] = frozenset()

_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_STANDARD_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
# One translation does both jobs: base64url to standard base64, and every other byte
# (`+`, `/`, `=`, whitespace, ...) to `*`, which a2b_base64's strict mode refuses.
_TO_STANDARD = bytes(
    _STANDARD_ALPHABET[_B64_ALPHABET.index(byte)] if byte in _B64_ALPHABET else ord("*")
    for byte in range(256)
)
# A character's 6-bit value (0 outside the alphabet: strict decoding refuses those anyway).
_SEXTET = bytes(_B64_ALPHABET.index(byte) if byte in _B64_ALPHABET else 0 for byte in range(256))
# By length mod 4: the low bits the last character carries that decoding drops, which
# must be zero (otherwise two encodings map to one value), and the padding to add.
_TAIL_MASK = (0, 0, 0x0F, 0x03)
_PADDING = (b"", b"", b"==", b"=")


class ParsedToken(NamedTuple):
    header: Mapping[str, Any]  # read-only: shared by the tokens that carry the same header
    payload: dict[str, Any]
    signing_input: bytes
    signature: bytes
    alg: str
    kid: str | None


class _Header(NamedTuple):
    fields: Mapping[str, Any]
    alg: str
    kid: str | None


# The tokens of one issuer key carry the same header segment, so its checked parse is
# kept: a pure function of those bytes. Only headers that passed every check get here;
# bounded, and emptied when full.
_HEADERS: dict[bytes, _Header] = {}
_HEADERS_MAX = 256
# Real headers take a hundred bytes or so; a forged one may take the whole token, and 256
# such parses took 65 MiB. Longer ones are parsed each time, never kept.
_HEADER_KEPT_MAX_BYTES = 1024


def _reject(message: str) -> TokenRejected:
    return TokenRejected(message, reason=Reason.MALFORMED)


def b64url_decode_python(segment: bytes) -> bytes:
    """Decode unpadded base64url, refusing padding, whitespace, `+`, `/` and non-canonical
    tails. The reference for `_b64url.c`, which `b64url_decode` is when it was built."""
    remainder = len(segment) % 4
    if remainder == 1:
        raise _reject("segment has an impossible base64url length")
    if remainder and _SEXTET[segment[-1]] & _TAIL_MASK[remainder]:
        raise _reject("segment is not canonical base64url")
    try:
        return binascii.a2b_base64(
            segment.translate(_TO_STANDARD) + _PADDING[remainder], strict_mode=True
        )
    except (binascii.Error, ValueError) as exc:
        raise _reject("segment is not base64url") from exc


_decode_c: Callable[[bytes], bytes] | None = optional_speedup("spoa.verifier._b64url", "decode")
SPEEDUPS = _decode_c is not None


def b64url_decode(segment: bytes) -> bytes:
    """Decode unpadded base64url, refusing padding, whitespace, `+`, `/` and non-canonical
    tails: in C when it was built (a payload and a signature per cache miss took 2.5-4.5 µs
    in binascii), else `b64url_decode_python`."""
    if _decode_c is None:
        return b64url_decode_python(segment)
    try:
        return _decode_c(segment)
    except ValueError as exc:
        raise _reject(str(exc)) from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)  # in C; a repeated name leaves fewer members than pairs
    if len(result) != len(pairs):
        raise _reject("duplicate JSON member name")
    return result


def _no_constants(_name: str) -> Any:
    raise _reject("non-standard JSON constant")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in _INFINITIES:  # 1e400: no IEEE double holds it (I-JSON, RFC 7493 2.2)
        raise _reject("number out of range")
    return value


_INFINITIES = (math.inf, -math.inf)

# An integer no IEEE double holds (from 2**1024, so 309 digits or more) is refused as 1e400
# is: Python keeps it exact, where other parsers of the forwarded claims give Infinity or
# an error. Only a text with such a run of digits is walked. The run is found in linear
# time, with no regular expression: every digit becomes "1", every other byte a space,
# and a substring search looks for 309 ones (a regex tried a match at each digit, up to
# 70 us for a 5 KB payload of numbered names, and once quadratically).
_DIGITS_AS_ONES = bytes(0x31 if 0x30 <= byte <= 0x39 else 0x20 for byte in range(256))
_HUGE_INTEGER_DIGITS = 309
_LONG_DIGIT_RUN = b"1" * _HUGE_INTEGER_DIGITS


def _has_long_digit_run(raw: bytes) -> bool:
    return len(raw) >= _HUGE_INTEGER_DIGITS and _LONG_DIGIT_RUN in raw.translate(_DIGITS_AS_ONES)


def _leaves(value: Any) -> Iterator[Any]:
    """Every member name and every value that is no array or object, in no set order. A
    walk with its own stack, as `_nested_deeper_than`."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            yield from item
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        else:
            yield item


def _overflows_a_double(item: Any) -> bool:
    if type(item) is not int:
        return False
    try:
        float(item)
    except OverflowError:
        return True
    return False


def _has_huge_integer(value: Any) -> bool:
    """Whether any integer in the parsed value overflows a double."""
    return any(_overflows_a_double(item) for item in _leaves(value))


# One decoder for every call: json.loads with hooks builds a new one each time.
_DECODER = json.JSONDecoder(
    object_pairs_hook=_no_duplicates, parse_constant=_no_constants, parse_float=_finite_float
)
# Its C scanner, called directly for text that starts with `{`: decode() would only add
# the whitespace skips and the end check done below.
_SCAN: Callable[[str, int], tuple[Any, int]] = _DECODER.scan_once  # type: ignore[attr-defined]

# A JSON escape of a UTF-16 surrogate. Escaped pairs decode to one character; a lone one
# decodes to a string that is not Unicode text (RFC 8259 §8.2, I-JSON §2.1).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _is_lone_surrogate_text(item: Any) -> bool:
    if not isinstance(item, str):
        return False
    try:
        item.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _has_lone_surrogate(value: Any) -> bool:
    """Whether any member name or string in the parsed value is not Unicode text."""
    return any(_is_lone_surrogate_text(item) for item in _leaves(value))


# Deeper nesting is refused as malformed. No token, key set or discovery document comes
# near it, and the answer must not depend on how much of Python's recursion budget is
# left: the C scanner recurses once per level (the walks below keep their own stacks).
MAX_JSON_DEPTH = 128
# More `[` and `{` than this (counted in the raw text, strings included) is refused before
# any walk: the checks below walk the parsed value in Python, and a forged 8 KB token of
# thousands of empty arrays cost 20 times an ordinary one. Real tokens hold a few dozen;
# key sets pass their own bound, from their key limit.
MAX_JSON_CONTAINERS = 256


def _nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether arrays and objects nest more than `limit` levels (the top one is level 1).
    A walk with its own stack: it must not recurse at the depths it refuses."""
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        container, depth = pending.pop()
        if depth > limit:
            return True
        items = container.values() if isinstance(container, dict) else container
        pending.extend((item, depth + 1) for item in items if isinstance(item, dict | list))
    return False


def parse_json_object(
    raw: bytes, what: str, max_containers: int = MAX_JSON_CONTAINERS
) -> dict[str, Any]:
    """Parse a JSON object strictly: UTF-8, no duplicates, no NaN/Infinity, no number a
    double cannot hold, at most MAX_JSON_DEPTH levels and `max_containers` `[` and `{`, and
    no lone surrogate escapes (every string and number must be one another parser reads
    alike)."""
    containers = raw.count(b"[") + raw.count(b"{")
    if containers > max_containers:
        raise _reject(f"{what} holds more than {max_containers} arrays and objects")
    try:
        text = raw.decode("utf-8")
        if text[:1] == "{":
            try:
                value, end = _SCAN(text, 0)
            except StopIteration as exc:  # the scanner's "no value here"
                raise _reject(f"{what} is not valid JSON") from exc
            if end != len(text):
                value = _DECODER.decode(text)  # trailing whitespace, or an error to raise
        else:
            value = _DECODER.decode(text)
        # Nesting cannot be deeper than the count of opening brackets: only texts with
        # more of them than the limit are walked.
        if (
            containers > MAX_JSON_DEPTH
            and isinstance(value, dict | list)
            and _nested_deeper_than(value, MAX_JSON_DEPTH)
        ):
            raise _reject(f"{what} is nested more than {MAX_JSON_DEPTH} levels deep")
        # Only texts holding a surrogate escape are walked: the common case costs one scan.
        if _SURROGATE_ESCAPE.search(raw) is not None and _has_lone_surrogate(value):
            raise _reject(f"{what} holds a lone surrogate escape")
        if _has_long_digit_run(raw) and _has_huge_integer(value):
            raise _reject(f"{what} holds a number out of range")
    except TokenRejected:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _reject(f"{what} is not valid JSON") from exc
    if not isinstance(value, dict):
        raise _reject(f"{what} is not a JSON object")
    return value


def parse_compact(token: str | bytes, max_bytes: int) -> ParsedToken:
    """Split, decode and sanity-check a compact JWS; verifies nothing cryptographic."""
    if len(token) > max_bytes:
        raise TokenRejected("token exceeds the size limit", reason=Reason.TOKEN_TOO_LARGE)
    if isinstance(token, str):
        try:
            raw = token.encode("ascii")
        except UnicodeEncodeError as exc:
            raise _reject("token is not ASCII") from exc
    else:
        raw = token
    if not raw:
        raise TokenRejected("empty token", reason=Reason.MISSING_TOKEN)
    parts = raw.split(b".")
    if len(parts) == 5:
        raise _reject("JWE tokens are not accepted")
    if len(parts) != 3:
        raise _reject("token is not a compact JWS")
    header_b64, payload_b64, signature_b64 = parts
    header = _HEADERS.get(header_b64)
    if header is None:
        header = _parse_header(header_b64)
        if len(header_b64) <= _HEADER_KEPT_MAX_BYTES:
            if len(_HEADERS) >= _HEADERS_MAX:
                _HEADERS.clear()
            _HEADERS[header_b64] = header
    payload = parse_json_object(b64url_decode(payload_b64), "payload")
    signature = b64url_decode(signature_b64)
    if not signature:
        raise _reject("empty signature")
    return ParsedToken(
        header.fields,
        payload,
        header_b64 + b"." + payload_b64,
        signature,
        header.alg,
        header.kid,
    )


def _parse_header(segment: bytes) -> _Header:
    """Decode and check a JOSE header segment."""
    header = parse_json_object(b64url_decode(segment), "header")
    alg = header.get("alg")
    if not isinstance(alg, str) or not alg:
        raise _reject("header has no alg")
    if alg.lower() == "none":
        raise TokenRejected("unsecured tokens are not accepted", reason=Reason.UNSUPPORTED_ALG)
    kid = header.get("kid")
    if "kid" in header and not isinstance(kid, str):
        raise _reject("kid is not a string")
    for name in ("typ", "cty"):  # media types: strings (RFC 7515 4.1.9, 4.1.10)
        if name in header and not isinstance(header[name], str):
            raise _reject(f"{name} is not a string")
    cty = header.get("cty")
    if isinstance(cty, str) and cty.lower() in ("jwt", "application/jwt"):
        # RFC 7519 7.2: the payload is then another JWT to process in turn. jwtgate checks
        # one layer, so it refuses rather than read the outer payload as the claims.
        raise _reject("nested JWTs (cty JWT) are not supported")
    if "b64" in header and header["b64"] is not True:
        # RFC 7797 unencoded payloads are not supported; refuse rather than misread them.
        # true asks for the usual base64url payload: nothing to refuse (RFC 7797 3).
        raise _reject("b64 header parameter other than true is not supported")
    if "crit" in header:
        crit = header["crit"]
        if (
            not isinstance(crit, list)
            or not crit
            or not all(isinstance(name, str) for name in crit)
            or any(name not in UNDERSTOOD_CRITICAL for name in crit)
        ):
            raise _reject("unsupported critical header parameter")
    return _Header(MappingProxyType(header), alg, kid)
