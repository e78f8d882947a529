"""Property-based round-trips for every SPOP type, payload and frame."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from spoa.protocol import (
    FrameType,
    Message,
    Scope,
    SetVar,
    UnsetVar,
    build_frame,
    decode_actions,
    decode_kv_list,
    decode_messages,
    decode_value,
    decode_varint,
    encode_actions,
    encode_kv_list,
    encode_messages,
    encode_set_vars,
    encode_value,
    encode_varint,
    split_frames,
)
from tests.protocol.strategies import messages, names, uint64, values

var_names = st.from_regex(r"[A-Za-z0-9._]{1,63}", fullmatch=True)
actions = st.one_of(
    st.builds(SetVar, st.sampled_from(Scope), var_names, values),
    st.builds(UnsetVar, st.sampled_from(Scope), var_names),
)


@given(uint64)
def test_varint_round_trip(value: int) -> None:
    raw = encode_varint(value)
    assert len(raw) <= 10
    assert decode_varint(raw + b"tail", 0, len(raw) + 4) == (value, len(raw))


@given(values)
def test_value_round_trip(value: object) -> None:
    raw = encode_value(value)  # type: ignore[arg-type]
    decoded, end = decode_value(raw, 0, len(raw))
    assert end == len(raw)
    assert decoded == value
    assert type(decoded) is type(value)


@given(st.binary())
def test_any_string_bytes_survive_decode_and_encode(raw: bytes) -> None:
    # STRING is not guaranteed UTF-8: whatever HAProxy sent must encode back unchanged.
    framed = b"\x08" + encode_varint(len(raw)) + raw
    text, _ = decode_value(framed, 0, len(framed))
    assert isinstance(text, str)
    assert encode_value(text) == framed


@given(st.lists(st.tuples(names, values), max_size=10))
def test_kv_list_round_trip(items: list[tuple[str, object]]) -> None:
    raw = encode_kv_list(items)  # type: ignore[arg-type]
    assert decode_kv_list(raw, 0, len(raw), 64) == items


@given(st.lists(messages, max_size=5))
def test_messages_round_trip(batch: list[Message]) -> None:
    raw = encode_messages(batch)
    assert decode_messages(raw, 0, len(raw), 64) == tuple(batch)


@given(st.lists(actions, max_size=12))
def test_actions_round_trip(batch: list[SetVar | UnsetVar]) -> None:
    raw = encode_actions(batch)
    assert decode_actions(raw, 0, len(raw)) == batch


@given(st.sampled_from(Scope), st.lists(st.tuples(var_names, values), max_size=12))
def test_set_vars_encode_as_their_set_var_actions(
    scope: Scope, variables: list[tuple[str, object]]
) -> None:
    expected = encode_actions([SetVar(scope, name, value) for name, value in variables])  # type: ignore[arg-type]
    assert encode_set_vars(scope, variables) == expected  # type: ignore[arg-type]


@settings(max_examples=60)
@given(
    st.sampled_from(FrameType),
    uint64,
    uint64,
    st.binary(max_size=300),
    st.integers(min_value=0, max_value=3),
)
def test_frame_round_trip(
    frame_type: FrameType, stream_id: int, frame_id: int, payload: bytes, flags: int
) -> None:
    raw = build_frame(frame_type, stream_id, frame_id, payload, flags)
    (frame,) = split_frames(raw)
    assert frame.header.type == frame_type
    assert frame.header.flags == flags
    assert (frame.header.stream_id, frame.header.frame_id) == (stream_id, frame_id)
    assert frame.payload == payload
