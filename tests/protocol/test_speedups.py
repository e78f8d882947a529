"""The C NOTIFY decoder against the pure-Python reference: same messages out of the same
bytes, and the same exception (type and message) out of broken ones. Also the C set-var
encoder: the reference's bytes, or it declines and the reference encodes or raises."""

from __future__ import annotations

import enum
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spoa.protocol import (
    Message,
    Scope,
    SpopError,
    actions,
    encode_messages,
    encode_value,
    encode_varint,
    payloads,
)
from tests.protocol.strategies import messages as message_strategy
from tests.protocol.strategies import mutate, names
from tests.support.fuzz import fuzz_examples
from tests.support.speedups import speedups_with_switch

messages = st.lists(message_strategy, max_size=4)
# Hand-made typed data the encoder never produces: INT32/UINT32, flags on NULL and
# STRING, truncations, reserved types, over-long varints.
odd_values = st.sampled_from(
    [
        b"\x02" + encode_varint(0xFFFFFFFF),
        b"\x02" + encode_varint(2**40 + 5),
        b"\x03" + encode_varint(2**40 + 7),
        b"\x04" + encode_varint(2**63),
        b"\x05" + encode_varint(2**64 - 1),
        b"\x10",
        b"\x18\x03abc",
        b"\x19\x01\xff",
        b"\x11",
        b"\x01",
        b"\x0a",
        b"\x0f",
        b"\x06\x01\x02",
        b"\x07" + bytes(15),
        b"\x08\xf5",
        b"\x08\xf5\x80",
        b"\x04" + b"\xff" * 11,
        b"\x08\x05ab",
        b"\x08\x02\xff\xfe",
        b"",
    ]
)


def outcome(decode: object, buf: bytes | bytearray, pos: int, end: int, limit: int) -> object:
    try:
        return ("ok", decode(buf, pos, end, limit))  # type: ignore[operator]
    except SpopError as error:
        return ("error", type(error), error.message)


def assert_same(buf: bytes | bytearray, pos: int = 0, end: int | None = None, limit: int = 256):
    end = len(buf) if end is None else end
    expected = outcome(payloads.decode_messages_python, buf, pos, end, limit)
    assert outcome(payloads.decode_messages, buf, pos, end, limit) == expected
    return expected


def test_the_c_decoder_is_built_and_in_use() -> None:
    # scripts/setup builds it (gcc and the Python headers are part of the set-up); a
    # silent fall-back to Python would cost about a fifth more CPU per request.
    assert payloads.SPEEDUPS, "spoa/protocol/_speedups.c was not built"
    assert payloads.decode_messages is not payloads.decode_messages_python


@pytest.mark.parametrize(("value", "c_in_use"), [("1", False), ("0", True), ("", True)])
def test_the_python_decoder_can_be_forced(value: str, c_in_use: bool) -> None:
    # Regression: "0" used to turn the C code off too (any non-empty value did).
    assert speedups_with_switch("spoa.protocol.payloads", value) is c_in_use


@given(messages)
@settings(max_examples=fuzz_examples(400))
def test_same_messages_as_the_reference(decoded: list[Message]) -> None:
    raw = encode_messages(decoded)
    kind, result = assert_same(raw)  # type: ignore[misc]
    assert kind == "ok"
    assert result == tuple(decoded)
    assert all(type(message) is Message for message in result)


@given(messages, st.data())
@settings(max_examples=fuzz_examples(400))
def test_same_outcome_on_mutated_input(decoded: list[Message], data: st.DataObject) -> None:
    raw = mutate(data, encode_messages(decoded) or b"\x00")
    assert_same(bytes(raw))
    assert_same(raw)  # a bytearray, as the connection's buffer is


@given(st.binary(max_size=300))
@settings(max_examples=fuzz_examples(500))
def test_same_outcome_on_random_bytes(raw: bytes) -> None:
    assert_same(raw)


@given(names, st.lists(odd_values, min_size=1, max_size=4))
@settings(max_examples=fuzz_examples(300))
def test_same_outcome_on_hand_made_typed_data(name: str, raw_values: list[bytes]) -> None:
    body = b"".join(b"\x01a" + value for value in raw_values)
    raw = encode_value(name)[1:] + bytes((len(raw_values),)) + body
    assert_same(raw)


@given(messages, st.binary(max_size=8), st.binary(max_size=8))
def test_same_outcome_inside_a_larger_buffer(
    decoded: list[Message], before: bytes, after: bytes
) -> None:
    raw = before + encode_messages(decoded) + after
    assert_same(raw, len(before), len(raw) - len(after))
    # and with `end` cutting into the payload
    assert_same(raw, len(before), max(len(before), len(raw) - len(after) - 3))


@pytest.mark.parametrize("limit", [0, 1, 2, 3])
def test_same_limits(limit: int) -> None:
    decoded = [Message("m", (("a", 1), ("b", 2), ("c", 3)))] * 3
    assert_same(encode_messages(decoded), limit=limit)


def test_an_end_past_the_buffer_is_clamped_not_read() -> None:
    raw = encode_messages([Message("check-jwt", (("authorization", "x" * 300),))])
    kind, *_ = outcome(payloads.decode_messages, raw[:-5], 0, len(raw), 256)  # type: ignore[misc]
    assert kind == "error"


# --- the set-var encoder ------------------------------------------------------------------


class _Level(enum.IntEnum):
    HIGH = 7


class _Word(enum.StrEnum):
    OK = "ok"


valid_var_names = st.from_regex(r"[A-Za-z0-9._]{1,63}", fullmatch=True)
# What an answer holds, all of which the C encoder takes.
answer_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, -(2**63), -1, 0, 239, 240, 2**32]),
    st.text(st.characters(exclude_categories=("Cs",)), max_size=300),
)
var_names = st.one_of(valid_var_names, st.sampled_from(["", "a" * 64, "a b", "é", "a-b"]))
var_values = st.one_of(
    answer_values,
    st.sampled_from([2**64, -(2**63) - 1, 2**70, -(2**70)]),
    st.text(max_size=300),
    st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), max_size=3),
    st.binary(max_size=8),
    st.builds(IPv4Address, st.integers(0, 2**32 - 1)),
    st.builds(IPv6Address, st.integers(0, 2**128 - 1)),
    st.sampled_from([_Level.HIGH, _Word.OK, 1.5]),
)
var_items = st.one_of(
    st.tuples(var_names, var_values),
    st.tuples(var_names, var_values).map(list),  # not a pair: the C encoder declines
    st.tuples(var_names, var_values, var_values),
)


def encoded(encode: object, scope: object, variables: object) -> object:
    try:
        return ("ok", encode(scope, variables))  # type: ignore[operator]
    except (SpopError, TypeError, ValueError) as error:
        return ("error", type(error), str(error))


def test_the_c_encoder_is_in_use_for_an_answer() -> None:
    assert actions._encode_set_vars_c is not None
    variables = [("sub", "user-1"), ("exp", 1764373600), ("valid", True), ("aud", "a" * 300)]
    assert actions._encode_set_vars_c(2, variables) == actions.encode_set_vars_python(
        Scope.TXN, variables
    )


@given(st.sampled_from(Scope), st.lists(st.tuples(valid_var_names, answer_values), max_size=20))
@settings(max_examples=fuzz_examples(500))
def test_the_c_encoder_takes_every_answer_value(
    scope: Scope, variables: list[tuple[str, Any]]
) -> None:
    assert actions._encode_set_vars_c is not None
    direct = actions._encode_set_vars_c(int(scope), variables)
    assert direct == actions.encode_set_vars_python(scope, variables)


@given(st.one_of(st.sampled_from(Scope), st.integers(-2, 6)), st.lists(var_items, max_size=6))
@settings(max_examples=fuzz_examples(500))
def test_the_c_encoder_gives_the_reference_bytes_or_declines(
    scope: int, variables: list[Any]
) -> None:
    expected = encoded(actions.encode_set_vars_python, scope, variables)
    assert encoded(actions.encode_set_vars, scope, variables) == expected
    assert actions._encode_set_vars_c is not None
    direct = actions._encode_set_vars_c(int(scope), variables)
    if direct is not None:
        assert expected == ("ok", direct)


@pytest.mark.parametrize("scope", [-1, 5, 2**40])
def test_the_c_encoder_declines_an_unknown_scope(scope: int) -> None:
    assert actions._encode_set_vars_c is not None
    assert actions._encode_set_vars_c(scope, [("a", 1)]) is None
    with pytest.raises(SpopError, match="unknown variable scope"):
        actions.encode_set_vars(scope, [("a", 1)])  # type: ignore[arg-type]
