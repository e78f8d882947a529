"""The C base64url decoder (`spoa/verifier/_b64url.c`) against the Python reference.

Every token's payload and signature go through it, straight from the request: the two
must give the same bytes, or refuse with the same message, for any input.
"""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spoa.verifier import parsing
from spoa.verifier.errors import TokenRejected
from spoa.verifier.reasons import Reason
from tests.support.fuzz import fuzz_examples
from tests.support.speedups import speedups_with_switch

ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def outcome(decode: object, segment: bytes) -> tuple[str, object]:
    try:
        return "ok", decode(segment)  # type: ignore[operator]
    except TokenRejected as exc:
        return "refused", (str(exc), exc.reason)


def assert_same(segment: bytes) -> tuple[str, object]:
    expected = outcome(parsing.b64url_decode_python, segment)
    assert outcome(parsing.b64url_decode, segment) == expected
    return expected


def unpadded(raw: bytes) -> bytes:
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


def test_the_c_decoder_is_built_and_in_use() -> None:
    # scripts/setup builds it; a silent fall-back would cost each cache miss 2.5-4.5 µs.
    assert parsing.SPEEDUPS, "spoa/verifier/_b64url.c was not built"


@pytest.mark.parametrize(("value", "c_in_use"), [("1", False), ("0", True), ("", True)])
def test_the_python_decoder_can_be_forced(value: str, c_in_use: bool) -> None:
    assert speedups_with_switch("spoa.verifier.parsing", value) is c_in_use


@pytest.mark.parametrize(
    ("segment", "message"),
    [
        (b"A", "segment has an impossible base64url length"),
        (b"AAAAA", "segment has an impossible base64url length"),
        (b"AB", "segment is not canonical base64url"),  # 'B' carries a dropped 1 bit
        (b"AAB", "segment is not canonical base64url"),
        (b"AA==", "segment is not base64url"),  # padding
        (b"A+/A", "segment is not base64url"),  # standard alphabet
        (b"AA A", "segment is not base64url"),
        (b"AAA\x00", "segment is not base64url"),
        (b"\xffAAA", "segment is not base64url"),
        (b"*A", "segment is not base64url"),  # checked after the tail, as in Python
    ],
)
def test_refusals(segment: bytes, message: str) -> None:
    assert assert_same(segment) == ("refused", (message, Reason.MALFORMED))


@pytest.mark.parametrize("raw", [b"", b"\x00", b"\xff\xfe", b"abc", bytes(range(256))])
def test_round_trips(raw: bytes) -> None:
    assert assert_same(unpadded(raw)) == ("ok", raw)


def test_only_bytes_are_taken() -> None:
    if parsing.SPEEDUPS:
        with pytest.raises(TypeError):
            parsing.b64url_decode("AAAA")  # type: ignore[arg-type]


@given(st.binary(max_size=700))
@settings(max_examples=fuzz_examples(600))
def test_same_bytes_as_the_reference_for_any_data(raw: bytes) -> None:
    assert assert_same(unpadded(raw)) == ("ok", raw)


@given(st.binary(max_size=40))
@settings(max_examples=fuzz_examples(1500))
def test_same_answer_as_the_reference_for_any_input(segment: bytes) -> None:
    assert_same(segment)


@given(
    st.binary(min_size=1, max_size=60),
    st.data(),
)
@settings(max_examples=fuzz_examples(1500))
def test_same_answer_for_a_valid_segment_with_one_byte_changed(
    raw: bytes, data: st.DataObject
) -> None:
    segment = bytearray(unpadded(raw))
    index = data.draw(st.integers(0, len(segment) - 1))
    segment[index] = data.draw(st.one_of(st.sampled_from(ALPHABET), st.integers(0, 255)))
    assert_same(bytes(segment))
