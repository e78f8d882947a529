"""Compact JWS parsing. parse_json_object against a plain reference: its fast path (the C
scanner called directly, duplicates found by counting) must accept and refuse exactly what
json.loads with a member-by-member duplicate check does. And the kept header parses."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spoa.verifier import parsing
from spoa.verifier.errors import TokenRejected
from spoa.verifier.parsing import (
    MAX_JSON_CONTAINERS,
    MAX_JSON_DEPTH,
    parse_compact,
    parse_json_object,
)
from spoa.verifier.reasons import Reason
from tests.support.fuzz import fuzz_examples


class _Refused(Exception):
    pass


def _pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for name, _value in pairs:
        if name in seen:
            raise _Refused
        seen.add(name)
    return dict(pairs)


def _no_constant(_name: str) -> Any:
    raise _Refused


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _Refused
    return value


def _double_sized(text: str) -> int:
    value = int(text)
    float(value)  # OverflowError past what a double holds
    return value


def reference(raw: bytes) -> dict[str, Any] | None:
    """The parsed object, or None where parse_json_object must refuse."""
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_CONTAINERS:
        return None  # counted in the raw text, strings included
    try:
        value = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_pairs_hook,
            parse_constant=_no_constant,
            parse_float=_finite,
            parse_int=_double_sized,
        )
        # Every string must be text (no lone surrogate escape).
        json.dumps(value, ensure_ascii=False).encode("utf-8")
        if _depth(value) > MAX_JSON_DEPTH:
            return None
    except (_Refused, ValueError, OverflowError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def parsed(raw: bytes) -> dict[str, Any] | None:
    try:
        return parse_json_object(raw, "payload")
    except TokenRejected as exc:
        reason = exc.reason
    assert reason is Reason.MALFORMED
    return None


@pytest.mark.parametrize(
    ("raw", "accepted"),
    [
        (b'{"a":1}', True),
        (b' \t\r\n{"a":1} \n', True),  # JSON whitespace around the object
        (b'{"a":1}x', False),  # trailing data
        (b'{"a":1}{}', False),
        (b'{"a":1,"a":1}', False),  # duplicate, even with equal values
        (b'{"a":{"b":1,"b":2}}', False),  # nested duplicate
        (b'{"a":[{"b":1,"b":2}]}', False),
        (b'{"a":NaN}', False),
        (b'{"a":Infinity}', False),
        # Regression: a number no double holds parsed as infinity and was forwarded "inf".
        (b'{"a":1e400}', False),
        (b'{"a":[-1e400]}', False),
        (b'{"a":1e308}', True),
        (b'{"a":1.5e-400}', True),  # underflows to 0.0: a finite value
        # Regression: an integer no double holds was kept exact, accepted and forwarded.
        (b'{"a":1' + b"0" * 400 + b"}", False),
        (b'{"a":[{"b":-1' + b"0" * 309 + b"}]}", False),
        (b'{"a":' + str(2**1024).encode() + b"}", False),
        (b'{"a":' + str(2**1024 - 2**971).encode() + b"}", True),  # the largest double
        (b'{"a":1' + b"0" * 308 + b"}", True),  # 1e308 as an integer
        (b'{"a":"' + b"9" * 400 + b'"}', True),  # digits in a string are no number
        (b'{"a":1.' + b"0" * 400 + b"}", True),
        (b"[]", False),
        (b"", False),
        (b"{", False),
        (b'"{"', False),
        (b'{"a":"\\ud800"}', False),
        (b'{"a":"\\ud83d\\ude00"}', True),  # an escaped pair is one character
        (b'\xef\xbb\xbf{"a":1}', False),  # a byte-order mark is not JSON
    ],
)
def test_examples(raw: bytes, accepted: bool) -> None:
    assert (parsed(raw) is not None) is accepted
    assert parsed(raw) == reference(raw)


def _nested(depth: int, opening: str, closing: str, inner: str = "1") -> bytes:
    """An object whose member nests arrays or objects until `depth` levels in all."""
    return ('{"a":' + opening * (depth - 1) + inner + closing * (depth - 1) + "}").encode()


@pytest.mark.parametrize(("opening", "closing"), [("[", "]"), ('{"b":', "}")])
@pytest.mark.parametrize("inner", ["1", '"\\ud83d\\ude00"'])
def test_nesting_is_refused_beyond_the_limit_whatever_the_strings_hold(
    opening: str, closing: str, inner: str
) -> None:
    """Regression (audit): a string with an escaped surrogate pair sent the nested value
    through a recursive walk that ran out of stack at about half the depth the scanner
    took, so the same nesting passed or failed by whether an emoji was in it."""
    for depth in (MAX_JSON_DEPTH - 1, MAX_JSON_DEPTH):
        raw = _nested(depth, opening, closing, inner)
        assert parsed(raw) is not None, depth
        assert parsed(raw) == reference(raw)
    for depth in (MAX_JSON_DEPTH + 1, 400, 900, 5000):
        raw = _nested(depth, opening, closing, inner)
        with pytest.raises(
            TokenRejected, match=r"nested more than|not valid JSON|more than 256 arrays"
        ):
            parse_json_object(raw, "payload")
        assert reference(raw) is None


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    # More than MAX_JSON_DEPTH brackets in all, so the parsed value's depth is walked.
    raw = ('{"a":"' + "[" * 120 + '","b":["' + "{" * 120 + '"]}').encode()
    assert parsed(raw) == {"a": "[" * 120, "b": ["{" * 120]}


@pytest.mark.parametrize(
    "raw",
    [
        b'{"x":[' + b",".join([b"[" * 126 + b"]" * 126] * 3) + b"]}",
        b'{"x":[' + b",".join([b"{}"] * 300) + b"]}",
        b'{"x":"' + b"[" * 300 + b'"}',  # in a string too: the count is of the raw text
    ],
)
def test_more_arrays_and_objects_than_the_bound_are_refused_before_any_walk(raw: bytes) -> None:
    """Regression (DoS review): a forged 8 KB token of thousands of small arrays went
    through the depth, surrogate and integer walks in Python: 20 times the cost of an
    ordinary forged token of its size."""
    with pytest.raises(TokenRejected, match="holds more than 256 arrays and objects"):
        parse_json_object(raw, "payload")
    assert parse_json_object(raw, "JWKS", max_containers=1024) is not None


def test_a_long_digit_run_is_found_wherever_it_is() -> None:
    run = b"9" * 309  # beyond the largest double; 308 nines are within it
    assert parsed(b'{"a":' + run + b"}") is None
    assert parsed(b'{"a":[1,2,' + run + b"]}") is None
    assert parsed(b'{"a":' + run[:-1] + b"}") == {"a": int(run[:-1])}
    assert parsed(b'{"a":"' + run + b'"}') == {"a": run.decode()}  # a string is no number


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), inner), max_size=4)
    ),
    max_leaves=12,
)


def _render(value: Any) -> str:
    """JSON text where lists of pairs become objects, so member names may repeat."""
    if isinstance(value, list) and value and all(isinstance(item, tuple) for item in value):
        return "{" + ",".join(f"{json.dumps(k)}:{_render(v)}" for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_render(item) for item in value) + "]"
    return json.dumps(value)


@settings(max_examples=fuzz_examples(400), deadline=None)
@given(
    members=st.lists(st.tuples(st.sampled_from(["a", "b", "c", "d"]), _json_values), max_size=5),
    before=st.sampled_from(["", " ", "\n\t", "x"]),
    after=st.sampled_from(["", " ", "\r\n", "x", "}", ",{}"]),
)
def test_agrees_with_the_reference(members: list[tuple[str, Any]], before: str, after: str) -> None:
    body = "{" + ",".join(f"{json.dumps(k)}:{_render(v)}" for k, v in members) + "}"
    raw = (before + body + after).encode()
    assert parsed(raw) == reference(raw)


@settings(max_examples=fuzz_examples(400), deadline=None)
@given(raw=st.binary(max_size=40).map(lambda tail: b"{" + tail))
def test_agrees_on_arbitrary_bytes(raw: bytes) -> None:
    assert parsed(raw) == reference(raw)


def _token(header: dict[str, Any], payload: dict[str, Any]) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part(header)}.{part(payload)}.c2ln"


def test_a_header_segment_is_parsed_once_and_shared_read_only() -> None:
    header = {"alg": "RS256", "kid": "k-shared", "typ": "at+jwt"}
    first = parse_compact(_token(header, {"sub": "a"}), 8192)
    second = parse_compact(_token(header, {"sub": "b"}), 8192)
    assert first.header is second.header
    assert (first.alg, first.kid) == ("RS256", "k-shared")
    assert first.payload != second.payload
    with pytest.raises(TypeError):
        first.header["alg"] = "none"  # type: ignore[index]


def test_the_kept_headers_are_bounded_and_refusals_are_not_kept() -> None:
    for index in range(parsing._HEADERS_MAX + 50):
        parse_compact(_token({"alg": "ES256", "kid": f"k{index}"}, {}), 8192)
    assert len(parsing._HEADERS) <= parsing._HEADERS_MAX
    refused = _token({"alg": "none"}, {})
    for _ in range(2):
        with pytest.raises(TokenRejected) as caught:
            parse_compact(refused, 8192)
        assert caught.value.reason is Reason.UNSUPPORTED_ALG
    assert refused.split(".")[0].encode() not in parsing._HEADERS


def test_a_long_header_is_parsed_but_never_kept() -> None:
    """Regression (DoS review): 256 forged 8 KB headers, each kept before any signature
    check, held 65 MiB of parsed values."""
    long_header = {"alg": "ES256", "kid": "k", "x": "y" * 2000}
    token = _token(long_header, {})
    assert parse_compact(token, 8192).kid == "k"
    assert token.split(".")[0].encode() not in parsing._HEADERS


def _reference_b64url(segment: bytes) -> bytes | None:
    """Strict base64url by the definition: the alphabet only, no padding, and the bytes
    must encode back to exactly this text (which refuses non-canonical tails)."""
    alphabet = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    if any(byte not in alphabet for byte in segment) or len(segment) % 4 == 1:
        return None
    decoded = base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4))
    return decoded if base64.urlsafe_b64encode(decoded).rstrip(b"=") == segment else None


def _ours_b64url(segment: bytes) -> bytes | None:
    try:
        return parsing.b64url_decode(segment)
    except TokenRejected as exc:
        if exc.reason is not Reason.MALFORMED:
            raise
        return None


_B64URL_ISH = st.binary(max_size=12) | st.text(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_+/= \n\t*.", max_size=24
).map(str.encode)


@settings(max_examples=fuzz_examples(600), deadline=None)
@given(_B64URL_ISH)
def test_base64url_agrees_with_its_definition(segment: bytes) -> None:
    assert _ours_b64url(segment) == _reference_b64url(segment)


def test_base64url_every_single_byte_after_a_valid_prefix() -> None:
    for byte in range(256):
        for prefix in (b"", b"QU", b"QUJD", b"QUJDRA"):
            segment = prefix + bytes([byte])
            assert _ours_b64url(segment) == _reference_b64url(segment), segment
            segment = prefix + bytes([byte]) + b"A"
            assert _ours_b64url(segment) == _reference_b64url(segment), segment
