"""The answer memo: which NOTIFYs are replayed from remembered answers, what the replayed
ACKs hold, the C scanner against the Python reference, and the AgentConnection path.

The reference (`answer_frames_python`) decodes each message and re-encodes its key
arguments; the C scanner keys by their raw bytes. On canonically encoded input both must
give the same answer; on anything else the C one may stop earlier, never answer a frame
the reference would not, nor answer it differently.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spoa.protocol import (
    AgentConnection,
    AnswerMemo,
    AnswersReplayed,
    ConnectionClosed,
    Event,
    FrameFlags,
    FrameType,
    HelloReceived,
    Message,
    NotifyReceived,
    Scope,
    SetVar,
    Status,
    build_frame,
    decode_actions,
    decode_kv_list,
    encode_actions,
    encode_kv_list,
    encode_messages,
    encode_value,
    encode_varint,
    payloads,
    split_frames,
)
from spoa.protocol import memo as memo_module
from spoa.protocol.memo import ABSENT, ADMISSION_SAMPLE, answer_frames_python, key_of
from spoa.protocol.payloads import decode_messages_python
from spoa.protocol.types import encode_string
from spoa.protocol.varint import decode_varint
from tests.protocol.strategies import messages as any_message
from tests.protocol.strategies import mutate, names, uint64, values
from tests.support.fuzz import fuzz_examples

# bench/fuzz.py raises the differential tests' example counts through this variable.

Scan = Callable[..., tuple[int, bytes, list[Hashable]]]

NAME = "check-jwt"
KEYS = ("token", "host")
COUNTDOWN = (Scope.TXN, "expires_in")
NOW = 1000.0
LIMIT = 512  # frame limit of the hand-made cases
MAX_ITEMS = 3  # list limit of the hand-made cases: REQUEST has exactly that many arguments
OK = encode_actions([SetVar(Scope.TXN, "ok", True)])
REQUEST = Message(NAME, (("token", "abc"), ("host", "example.com"), ("n", 5)))

C_SCANNER: Scan | None = memo_module.answer_frames if payloads.SPEEDUPS else None
requires_c = pytest.mark.skipif(C_SCANNER is None, reason="spoa/protocol/_speedups.c not built")
IMPLS = [
    pytest.param(answer_frames_python, id="python"),
    pytest.param(C_SCANNER, id="c", marks=requires_c),
]


# -- helpers -------------------------------------------------------------------


def notify(stream_id: int, frame_id: int, *messages: Message, flags: int = FrameFlags.FIN) -> bytes:
    return build_frame(FrameType.NOTIFY, stream_id, frame_id, encode_messages(messages), flags)


def raw_notify(stream_id: int, frame_id: int, payload: bytes) -> bytes:
    return build_frame(FrameType.NOTIFY, stream_id, frame_id, payload)


def ack(stream_id: int, frame_id: int, payload: bytes) -> bytes:
    """The ACK the connection's own send_ack path would build: the independent oracle."""
    return build_frame(FrameType.ACK, stream_id, frame_id, payload)


def request(
    bearer: object = "abc", host: object = "example.com", *extra: tuple[str, object]
) -> Message:
    return Message(NAME, (("token", bearer), ("host", host), *extra))  # type: ignore[arg-type]


def new_memo(**options: object) -> AnswerMemo:
    return AnswerMemo(NAME, KEYS, clock=lambda: NOW, countdown_var=COUNTDOWN, **options)  # type: ignore[arg-type]


def remember(
    memo: AnswerMemo,
    message: Message,
    tag: Hashable = "hit",
    *,
    payload: bytes = OK,
    valid_from: float = -math.inf,
    valid_until: float = math.inf,
    countdown_to: float | None = None,
) -> bytes:
    key = memo.key_for(message)
    assert key is not None
    assert memo.remember(
        key,
        payload,
        valid_from=valid_from,
        valid_until=valid_until,
        countdown_to=countdown_to,
        tag=tag,
        epoch=memo.epoch,
    )
    return key


def scan(
    impl: Scan,
    memo: AnswerMemo,
    buf: bytes | bytearray,
    *,
    now: float = NOW,
    frame_limit: int = LIMIT,
    max_items: int = MAX_ITEMS,
    inflight: dict[tuple[int, int], bytes] | None = None,
) -> tuple[int, bytes, list[Hashable]]:
    return impl(
        buf,
        0,
        len(buf),
        frame_limit,
        max_items,
        memo._name,
        memo._key_names,
        memo.table,
        now,
        memo._countdown_head,
        {} if inflight is None else inflight,
    )


def raw_frames(data: bytes) -> list[bytes]:
    """Whole frames, length prefix included, as bytes (no header parsing)."""
    out, pos = [], 0
    while pos < len(data):
        stop = pos + 4 + int.from_bytes(data[pos : pos + 4], "big")
        assert stop <= len(data)
        out.append(data[pos:stop])
        pos = stop
    return out


def end_of_frames(buf: bytes | bytearray, count: int) -> int:
    """Where the `count`-th frame of buf ends, walking the length prefixes."""
    pos = 0
    for _ in range(count):
        pos += 4 + int.from_bytes(buf[pos : pos + 4], "big")
    return pos


def wrapped_varint(value: int) -> bytes:
    """A 10-byte varint that wraps (mod 2**64) to `value`: the only way SPOP's varint can
    encode a number in more bytes than it needs."""
    offset = sum(128 << (4 + 7 * i) for i in range(8))
    low = (value - 240 - offset) % 2**60
    out = bytes([240 + (low & 15), *(128 + ((low >> (4 + 7 * i)) & 127) for i in range(8))])
    out += bytes([((value - 240 - offset - low) % 2**64) >> 60])
    assert decode_varint(out, 0, len(out)) == (value, 10)
    return out


def payload_of_size(size: int) -> bytes:
    """A set-var payload of exactly `size` bytes."""
    for length in range(size):
        payload = encode_actions([SetVar(Scope.TXN, "pad", "x" * length)])
        if len(payload) == size:
            return payload
    raise AssertionError(f"no payload of {size} bytes")


def frame_of_body_length(length: int, stream_id: int = 2) -> bytes:
    """A NOTIFY of REQUEST's key arguments whose body is exactly `length` bytes."""
    for pad in range(length):
        frame = notify(stream_id, 1, request("abc", "example.com", ("n", "x" * pad)))
        if len(frame) - 4 == length:
            return frame
    raise AssertionError(f"no frame of {length} bytes")


def check_consistent(
    buf: bytes | bytearray,
    c_result: tuple[int, bytes, list[Hashable]],
    py_result: tuple[int, bytes, list[Hashable]],
) -> None:
    """C answered a prefix of what the reference answered, frame for frame."""
    c_pos, c_acks, c_tags = c_result
    py_pos, py_acks, py_tags = py_result
    py_frames = raw_frames(py_acks)
    assert len(py_frames) == len(py_tags)
    assert py_pos == end_of_frames(buf, len(py_tags))
    assert c_pos <= py_pos
    assert c_tags == py_tags[: len(c_tags)]
    assert c_acks == b"".join(py_frames[: len(c_tags)])
    assert py_acks.startswith(c_acks)
    assert c_pos == end_of_frames(buf, len(c_tags))


# -- differential: C against the reference -------------------------------------------

# Key values from a small pool, so different requests share keys, and some wide ones.
keyed_values = st.one_of(
    st.sampled_from([None, "", "a", "b", b"", b"a"]),
    st.text(max_size=12),
    st.text(min_size=240, max_size=300),
    st.binary(max_size=12),
    st.binary(min_size=240, max_size=260),
)
frame_ids = st.one_of(st.integers(min_value=0, max_value=3000), uint64)
PAYLOADS = [
    b"",
    OK,
    encode_actions([SetVar(Scope.TXN, "sub", "user"), SetVar(Scope.REQ, "n", 2**40)]),
    payload_of_size(300),  # an ACK over the smaller frame limits
]
JUST_AFTER = math.nextafter(NOW, math.inf)
# Mostly windows that hold NOW (both edges included), so that streams replay far enough.
WINDOWS = [(-math.inf, math.inf), (0.0, 2000.0), (NOW, JUST_AFTER), (NOW, math.inf)] * 6 + [
    (JUST_AFTER, math.inf),
    (-math.inf, NOW),
    (2000.0, 3000.0),
]
COUNTDOWNS = [None] * 6 + [NOW, 999.5, 1000.9999, 1500.25, 2.0**40, 1e19]


def mostly(common: object, *others: object) -> st.SearchStrategy:
    return st.sampled_from([common] * 10 * len(others) + list(others))


@st.composite
def requests(draw: st.DrawFn) -> Message:
    args: list[tuple[str, object]] = draw(st.lists(st.tuples(names, values), max_size=2))
    for key in KEYS:
        how = draw(mostly("keyed", "absent", "any", "twice"))
        if how == "absent":
            continue
        value = draw(values if how == "any" else keyed_values)
        args.insert(draw(st.integers(min_value=0, max_value=len(args))), (key, value))
        if how == "twice":
            again = (key, draw(keyed_values))
            args.insert(draw(st.integers(min_value=0, max_value=len(args))), again)
    name = draw(mostly(NAME, NAME + "x", ""))
    return Message(name, tuple(args))  # type: ignore[arg-type]


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[AnswerMemo, bytes, int, int]:
    """A memo holding the keys of some of the requests, their frames, and the limits."""
    memo = new_memo(max_entries=64)
    frames = []
    for index in range(draw(st.integers(min_value=1, max_value=6))):
        message = draw(requests())
        kind = draw(mostly("plain", "two", "empty", "type", "flags", "other"))
        frame_type, flags, payload = FrameType.NOTIFY, FrameFlags.FIN, encode_messages([message])
        if kind == "two":
            payload = encode_messages([message, draw(requests())])
        elif kind == "empty":
            payload = b""
        elif kind == "type":
            frame_type = draw(st.sampled_from([0, 1, 2, 50, 101, 103]))
        elif kind == "flags":
            flags = draw(st.sampled_from([0, 2, 3, 5, 0x101, 0x80000001]))
        elif kind == "other":
            payload = encode_messages(draw(st.lists(any_message, max_size=2)))
        frames.append(build_frame(frame_type, draw(frame_ids), draw(frame_ids), payload, flags))
        key = key_of(message, KEYS)
        if key is not None and draw(st.integers(min_value=0, max_value=9)):
            valid_from, valid_until = draw(st.sampled_from(WINDOWS))
            memo.remember(
                key,
                draw(st.sampled_from(PAYLOADS)),
                valid_from=valid_from,
                valid_until=valid_until,
                countdown_to=draw(st.sampled_from(COUNTDOWNS)),
                tag=index,
                epoch=memo.epoch,
            )
    frame_limit = draw(mostly(16380, 256, 300, 1024))
    max_items = draw(mostly(256, 0, 1, 2, 3, 8))
    return memo, b"".join(frames), frame_limit, max_items


def both(
    memo: AnswerMemo,
    buf: bytes | bytearray,
    frame_limit: int,
    max_items: int,
    now: float = NOW,
):
    assert C_SCANNER is not None
    options = {"frame_limit": frame_limit, "max_items": max_items, "now": now}
    return (
        scan(C_SCANNER, memo, buf, **options),  # type: ignore[arg-type]
        scan(answer_frames_python, memo, buf, **options),  # type: ignore[arg-type]
    )


@requires_c
def test_the_c_scanner_is_in_use() -> None:
    assert memo_module.answer_frames is not answer_frames_python


@requires_c
@given(scenarios())
@settings(max_examples=fuzz_examples(200))
def test_same_answers_as_the_reference_on_canonical_input(
    scenario: tuple[AnswerMemo, bytes, int, int],
) -> None:
    memo, buf, frame_limit, max_items = scenario
    c_result, py_result = both(memo, buf, frame_limit, max_items)
    assert c_result == py_result
    check_consistent(buf, c_result, py_result)
    # and from a bytearray, as the connection's buffer may be
    assert both(memo, bytearray(buf), frame_limit, max_items) == (py_result, py_result)


@requires_c
@given(scenarios(), st.data())
@settings(max_examples=fuzz_examples(200))
def test_c_answers_a_prefix_of_the_reference_on_mutated_input(
    scenario: tuple[AnswerMemo, bytes, int, int], data: st.DataObject
) -> None:
    memo, buf, frame_limit, max_items = scenario
    raw = mutate(data, buf)
    c_result, py_result = both(memo, bytes(raw), frame_limit, max_items)
    check_consistent(bytes(raw), c_result, py_result)


def random_memo() -> AnswerMemo:
    memo = new_memo()
    for tag, (token, host) in enumerate(
        [("a", "b"), (None, None), ("", ""), (b"", "a"), ("a", b"a")]
    ):
        remember(memo, request(token, host), tag)
    for tag, args in enumerate([(), (("token", "a"),), (("host", None),)], start=10):
        remember(memo, Message(NAME, args), tag)  # type: ignore[arg-type]
    assert ABSENT * 2 in memo.table
    return memo


RANDOM_MEMO = random_memo()


@requires_c
@given(st.binary(max_size=300))
@settings(max_examples=fuzz_examples(300))
def test_c_answers_a_prefix_of_the_reference_on_random_bytes(raw: bytes) -> None:
    check_consistent(raw, *both(RANDOM_MEMO, raw, 1024, 8))


@requires_c
@given(
    st.lists(st.tuples(frame_ids, st.binary(max_size=40)), min_size=1, max_size=4),
    st.sampled_from([1, 2, 3, 8]),
)
@settings(max_examples=fuzz_examples(200))
def test_c_answers_a_prefix_of_the_reference_on_random_message_bodies(
    bodies: list[tuple[int, bytes]], max_items: int
) -> None:
    # The right name, then random arguments: the argument parsing is what is fuzzed.
    head = encode_string(NAME)
    buf = b"".join(raw_notify(stream_id, 1, head + body) for stream_id, body in bodies)
    check_consistent(buf, *both(RANDOM_MEMO, buf, 1024, max_items))


# Typed data the encoder never produces, each with the value the Python decoder reads.
NON_CANONICAL: list[tuple[str, bytes, object]] = [
    ("string with flag bits", b"\x18\x01a", "a"),
    ("string with the top flag", b"\x88\x01a", "a"),
    ("null with flag bits", b"\x10", None),
    ("null with every flag", b"\xf0", None),
    ("binary with flag bits", b"\x29\x01a", b"a"),
    ("string with a wrapped length", b"\x08" + wrapped_varint(1) + b"a", "a"),
    ("empty string, wrapped length", b"\x08" + wrapped_varint(0), ""),
    ("binary with a wrapped length", b"\x09" + wrapped_varint(1) + b"a", b"a"),
    ("long string, wrapped length", b"\x08" + wrapped_varint(250) + b"y" * 250, "y" * 250),
]


def hand_made(stream_id: int, token: bytes, host: bytes = encode_value("b")) -> bytes:
    payload = (
        encode_string(NAME)
        + b"\x03"
        + encode_string("token")
        + token
        + encode_string("n")
        + encode_value(7)
        + encode_string("host")
        + host
    )
    return raw_notify(stream_id, 1, payload)


@requires_c
@pytest.mark.parametrize(
    ("raw", "value"), [c[1:] for c in NON_CANONICAL], ids=[c[0] for c in NON_CANONICAL]
)
def test_non_canonical_key_values_never_get_a_different_answer(raw: bytes, value: object) -> None:
    memo = new_memo()
    remember(memo, request(value, "b"), "canonical")
    remember(memo, request("q", "b"), "q")
    remember(memo, request(value, value), "both")
    frame = hand_made(2, raw)
    (message,) = decode_messages_python(frame, 11, len(frame), 8)
    assert message.get("token") == value  # what the reference reads
    assert scan(answer_frames_python, memo, frame, max_items=8)[2] == ["canonical"]
    for buf in (
        frame,
        notify(1, 1, request("q", "b")) + frame + notify(3, 1, request("q", "b")),
        hand_made(1, encode_value("q")) + frame,
        hand_made(1, encode_value(value), raw),  # in the host argument too
    ):
        check_consistent(buf, *both(memo, buf, LIMIT, 8))


@requires_c
@given(
    st.lists(
        st.sampled_from([c[1] for c in NON_CANONICAL] + [encode_value(v) for v in ("a", None)]),
        min_size=2,
        max_size=2,
    ),
    st.lists(
        st.sampled_from(
            [b"\x02\x05", b"\x11", b"\x0c", b"\x06\x01", b"\x04\xff"]
            + [b"\x02" + encode_varint(n) for n in (2**31, 2**32, 2**64 - 2**31 - 1, 2**64 - 1)]
            + [b"\x03" + encode_varint(n) for n in (2**32 - 1, 2**32)]
        )
    ),
)
@settings(max_examples=fuzz_examples(100))
def test_c_answers_a_prefix_of_the_reference_on_hand_made_typed_data(
    keys: list[bytes], junk: list[bytes]
) -> None:
    memo = random_memo()
    remember(memo, request("a", None), "a-null")
    buf = hand_made(1, keys[0], keys[1]) + hand_made(2, keys[1], keys[0])
    buf += b"".join(raw_notify(3, 1, encode_string(NAME) + b"\x01\x01x" + j) for j in junk)
    check_consistent(buf, *both(memo, buf, LIMIT, 8))


# -- each stop condition ---------------------------------------------------------------


def stop_memo() -> AnswerMemo:
    memo = new_memo()
    remember(memo, REQUEST, "hit")
    remember(memo, request("later"), "later", valid_from=math.nextafter(NOW, math.inf))
    remember(memo, request("expired"), "expired", valid_until=NOW)
    remember(memo, request("big"), "big", payload=payload_of_size(LIMIT - 6))  # ACK: LIMIT + 1
    return memo


NOTIFY_PAYLOAD = encode_messages([REQUEST])
STOPS: list[tuple[str, bytes]] = [
    *(
        (f"frame type {frame_type}", build_frame(frame_type, 2, 1, NOTIFY_PAYLOAD))
        for frame_type in (0, 1, 2, 50, 101, 102, 103)
    ),
    *(
        (f"flags {flags:#x}", notify(2, 1, REQUEST, flags=flags))
        for flags in (0, 2, 3, 5, 0x101, 0x1000001, 0x80000001)
    ),
    ("two messages", notify(2, 1, REQUEST, REQUEST)),
    ("a second message of another name", notify(2, 1, REQUEST, Message("other", ()))),
    ("no message", notify(2, 1)),
    *(
        (f"message name {name!r}", notify(2, 1, Message(name, REQUEST.args)))
        for name in ("check-jw", "check-jwt2", "CHECK-JWT", "")
    ),
    ("token twice", notify(2, 1, request("abc", "example.com", ("token", "abc")))),
    ("host twice", notify(2, 1, Message(NAME, (("host", "example.com"), *REQUEST.args)))),
    ("null token twice", notify(2, 1, request(None, "example.com", ("token", None)))),
    *(
        (f"token of type {type(value).__name__} {value}", notify(2, 1, request(value)))
        for value in (5, 0, 2**64 - 1, True, False, IPv4Address("10.0.0.1"), IPv6Address(1))
    ),
    ("host of type int", notify(2, 1, request("abc", 1))),
    ("no entry", notify(2, 1, request("unknown"))),
    ("no entry for these arguments absent", notify(2, 1, Message(NAME, (("n", 5),)))),
    ("not valid yet", notify(2, 1, request("later"))),
    ("valid until now, exclusive", notify(2, 1, request("expired"))),
    ("ack longer than the frame limit", notify(2, 1, request("big"))),
    ("frame longer than the frame limit", frame_of_body_length(LIMIT + 1)),
    ("frame shorter than 7 bytes", b"\x00\x00\x00\x06\x03\x00\x00\x00\x01\x01"),
    ("empty frame", b"\x00\x00\x00\x00"),
    (
        "more arguments than max_items",
        notify(2, 1, request("abc", "example.com", ("n", 5), ("x", 1))),
    ),
    ("truncated stream id", b"\x00\x00\x00\x07\x03\x00\x00\x00\x01\xf0\xf0"),
    ("truncated frame id", b"\x00\x00\x00\x07\x03\x00\x00\x00\x01\x02\xf0"),
    ("stream id of 11 bytes", b"\x00\x00\x00\x11\x03\x00\x00\x00\x01" + b"\xff" * 11 + b"\x01"),
    ("reserved type in another argument", raw_notify(2, 1, NOTIFY_PAYLOAD[:-2] + b"\x0c")),
    ("truncated ipv6 argument", raw_notify(2, 1, NOTIFY_PAYLOAD[:-2] + b"\x07\x00\x00")),
    ("truncated int argument", raw_notify(2, 1, NOTIFY_PAYLOAD[:-2] + b"\x04\xf0")),
    # Regression: the C scanner read any varint here, where decoding refuses 32-bit
    # values that do not fit (status 4), and replayed the answer.
    (
        "UINT32 argument over 32 bits",
        raw_notify(2, 1, NOTIFY_PAYLOAD[:-2] + b"\x03" + encode_varint(2**32 + 1000)),
    ),
    (
        "INT32 argument over 32 bits",
        raw_notify(2, 1, NOTIFY_PAYLOAD[:-2] + b"\x02" + encode_varint(2**40)),
    ),
    (
        "string past its frame",
        raw_notify(
            2,
            1,
            encode_string(NAME)
            + b"\x02"
            + encode_string("token")
            + encode_value("abc")
            + encode_string("host")
            + b"\x08\x40abc",
        ),
    ),
    ("a byte after the message", raw_notify(2, 1, NOTIFY_PAYLOAD + b"\x00")),
    ("message without an argument count", raw_notify(2, 1, encode_string(NAME))),
    ("argument count past the arguments", raw_notify(2, 1, encode_string(NAME) + b"\x02")),
]
# Frames cut short: they can only come last.
STOPS_AT_END: list[tuple[str, bytes]] = [
    ("frame missing its last byte", notify(2, 1, REQUEST)[:-1]),
    ("only the length", notify(2, 1, REQUEST)[:4]),
    ("half the length", b"\x00\x00"),
    ("length and header", notify(2, 1, REQUEST)[:11]),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", [c[1] for c in STOPS], ids=[c[0] for c in STOPS])
def test_each_stop_condition(impl: Scan, bad: bytes) -> None:
    memo = stop_memo()
    first, last = notify(1, 1, REQUEST), notify(3, 1, REQUEST)
    assert scan(impl, memo, bad) == (0, b"", [])
    # a stop in the middle: the frames before it are answered, and pos is where it starts
    assert scan(impl, memo, first + bad + last) == (len(first), ack(1, 1, OK), ["hit"])
    assert scan(impl, memo, first + first + bad) == (
        2 * len(first),
        2 * ack(1, 1, OK),
        ["hit", "hit"],
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", [c[1] for c in STOPS_AT_END], ids=[c[0] for c in STOPS_AT_END])
def test_a_partial_frame_at_the_end_stops(impl: Scan, bad: bytes) -> None:
    memo = stop_memo()
    first = notify(1, 1, REQUEST)
    assert scan(impl, memo, bad) == (0, b"", [])
    assert scan(impl, memo, first + bad) == (len(first), ack(1, 1, OK), ["hit"])


@pytest.mark.parametrize("impl", IMPLS)
def test_the_edges_of_each_limit_are_replayed(impl: Scan) -> None:
    # The other side of each stop above: these must be answered, so the stops are exact.
    memo = stop_memo()
    remember(memo, request("from-now"), "from-now", valid_from=NOW, valid_until=NOW + 1)
    remember(memo, request("until-next"), "until-next", valid_until=math.nextafter(NOW, math.inf))
    remember(memo, request("ack-at-limit"), "ack-at-limit", payload=payload_of_size(LIMIT - 7))
    cases = [
        (notify(2, 1, request("from-now")), "from-now"),
        (notify(2, 1, request("until-next")), "until-next"),
        (notify(2, 1, request("ack-at-limit")), "ack-at-limit"),
        (frame_of_body_length(LIMIT), "hit"),
        (notify(2, 1, REQUEST), "hit"),  # exactly MAX_ITEMS arguments
    ]
    for frame, tag in cases:
        pos, acks, tags = scan(impl, memo, frame)
        assert (pos, tags) == (len(frame), [tag])
        assert len(split_frames(acks)) == 1
        assert len(acks) - 4 <= LIMIT
    pos, acks, tags = scan(impl, memo, notify(2, 1, request("ack-at-limit")))
    assert len(acks) - 4 == LIMIT
    assert scan(impl, memo, notify(2, 1, REQUEST), max_items=2) == (0, b"", [])
    assert scan(impl, memo, notify(2, 1, REQUEST), max_items=0) == (0, b"", [])


@pytest.mark.parametrize("impl", IMPLS)
def test_max_items_counts_the_message_too(impl: Scan) -> None:
    memo = new_memo()
    bare = Message(NAME, ())
    remember(memo, bare, "bare")
    frame = notify(1, 1, bare)
    assert scan(impl, memo, frame, max_items=0) == (0, b"", [])  # one message is too many
    assert scan(impl, memo, frame, max_items=1) == (len(frame), ack(1, 1, OK), ["bare"])


@pytest.mark.parametrize("impl", IMPLS)
def test_a_stretch_of_hits_stops_at_the_first_miss_and_no_further(impl: Scan) -> None:
    memo = stop_memo()
    hits = [notify(i, 1, REQUEST) for i in range(1, 5)]
    miss = notify(9, 1, request("unknown"))
    buf = b"".join(hits[:3]) + miss + hits[3]
    pos, acks, tags = scan(impl, memo, buf)
    assert pos == buf.index(miss)
    assert tags == ["hit"] * 3
    assert acks == b"".join(ack(i, 1, OK) for i in range(1, 4))
    # from a later starting position and with an end before the buffer's
    fixed = (
        LIMIT,
        MAX_ITEMS,
        memo._name,
        memo._key_names,
        memo.table,
        NOW,
        memo._countdown_head,
        {},
    )
    rest = impl(buf, pos + len(miss), len(buf), *fixed)
    assert rest == (len(buf), ack(4, 1, OK), ["hit"])
    cut = impl(buf, 0, len(hits[0]) + 3, *fixed)
    assert cut == (len(hits[0]), ack(1, 1, OK), ["hit"])


@pytest.mark.parametrize("impl", IMPLS)
def test_a_notify_with_the_ids_of_one_in_flight_stops_the_scan(impl: Scan) -> None:
    memo = stop_memo()
    buf = notify(1, 1, REQUEST) + notify(1, 2, REQUEST) + notify(300, 70000, REQUEST)
    first = len(notify(1, 1, REQUEST))
    assert scan(impl, memo, buf, inflight={(1, 2): b"\x01\x02"}) == (
        first,
        ack(1, 1, OK),
        ["hit"],
    )
    stopped = scan(impl, memo, buf, inflight={(300, 70000): b"", (2, 2): b""})
    assert stopped[0] == len(buf) - len(notify(300, 70000, REQUEST))
    assert scan(impl, memo, buf, inflight={(2, 1): b""})[0] == len(buf)


@pytest.mark.parametrize("impl", IMPLS)
def test_nothing_is_answered_from_an_empty_table_or_input(impl: Scan) -> None:
    assert scan(impl, new_memo(), notify(1, 1, REQUEST)) == (0, b"", [])
    assert scan(impl, stop_memo(), b"") == (0, b"", [])


# -- key semantics -------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_an_absent_key_argument_is_not_a_null_one(impl: Scan) -> None:
    absent = Message(NAME, (("host", "h"),))
    null = Message(NAME, (("token", None), ("host", "h")))
    assert key_of(absent, KEYS) != key_of(null, KEYS)
    for remembered, other in ((absent, null), (null, absent)):
        memo = new_memo()
        remember(memo, remembered)
        assert scan(impl, memo, notify(1, 1, remembered))[2] == ["hit"]
        assert scan(impl, memo, notify(1, 1, other)) == (0, b"", [])


@pytest.mark.parametrize("impl", IMPLS)
def test_a_string_is_not_the_binary_of_its_bytes(impl: Scan) -> None:
    memo = new_memo()
    remember(memo, request("abc", "h"))
    assert key_of(request(b"abc", "h"), KEYS) != key_of(request("abc", "h"), KEYS)
    assert scan(impl, memo, notify(1, 1, request(b"abc", "h"))) == (0, b"", [])
    assert scan(impl, memo, notify(1, 1, request("abc", b"h"))) == (0, b"", [])


non_key_args = st.lists(st.tuples(names.filter(lambda name: name not in KEYS), values), max_size=5)


@pytest.mark.parametrize("impl", IMPLS)
@given(keyed_values, keyed_values, non_key_args, st.randoms(use_true_random=False))
@settings(max_examples=60)
def test_only_the_key_arguments_make_the_key(
    impl: Scan, token: object, host: object, extra: list[tuple[str, object]], rng
) -> None:
    memo = new_memo()
    remember(memo, Message(NAME, (("token", token), ("host", host))))  # type: ignore[arg-type]
    args = [("token", token), ("host", host), *extra]
    rng.shuffle(args)  # any order, the key arguments included
    message = Message(NAME, tuple(args))  # type: ignore[arg-type]
    assert key_of(message, KEYS) == key_of(Message(NAME, (("host", host), ("token", token))), KEYS)
    frame = notify(1, 1, message)
    assert scan(impl, memo, frame, frame_limit=2**24, max_items=256) == (
        len(frame),
        ack(1, 1, OK),
        ["hit"],
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_the_order_of_the_key_arguments_does_not_matter(impl: Scan) -> None:
    memo = new_memo()
    remember(memo, Message(NAME, (("token", "t"), ("host", "h"))))
    reversed_args = notify(2, 1, Message(NAME, (("n", 1), ("host", "h"), ("token", "t"))))
    assert scan(impl, memo, reversed_args) == (len(reversed_args), ack(2, 1, OK), ["hit"])
    swapped = notify(3, 1, Message(NAME, (("host", "t"), ("token", "h"))))
    assert scan(impl, memo, swapped) == (0, b"", [])  # the values, though, are not swappable


# -- the countdown -------------------------------------------------------------

COUNTDOWN_CASES = [
    (1000.0, 999.0, 1),
    (1000.0, 998.999999, 1),
    (1000.0, 999.000001, 0),
    (1000.0, 999.5, 0),
    (1000.0, 1000.0, 0),
    (1000.0, 1000.000001, 0),  # just past: negative, clamped
    (1000.0, 1500.0, 0),
    (1001.0, 1000.0, 1),
    (1239.999, 1000.0, 239),
    (1240.0, 1000.0, 240),  # the first two-byte varint
    (1000.0 + 2287.9, 1000.0, 2287),
    (1000.0 + 2288.0, 1000.0, 2288),  # the first three-byte varint
    (2.0**40 + 1000.0, 1000.0, 2**40),
    (2.0**40 + 0.75, 0.5, 2**40),
    (2.0**62, 0.0, 2**62),
    (math.nextafter(2.0**63, 0.0), 0.0, 2**63 - 1024),  # the largest one below 2**63
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("countdown_to", "now", "seconds"), COUNTDOWN_CASES)
def test_the_countdown_is_the_whole_seconds_left(
    impl: Scan, countdown_to: float, now: float, seconds: int
) -> None:
    assert seconds == max(0, int(countdown_to - now))
    memo = new_memo()
    remember(memo, REQUEST, countdown_to=countdown_to)
    frame = notify(300, 2, REQUEST)
    pos, acks, tags = scan(impl, memo, frame, now=now)
    assert (pos, tags) == (len(frame), ["hit"])
    (replayed,) = split_frames(acks)
    assert decode_actions(replayed.payload, 0, len(replayed.payload)) == [
        SetVar(Scope.TXN, "ok", True),
        SetVar(Scope.TXN, "expires_in", seconds),
    ]
    assert replayed.payload == OK + encode_actions([SetVar(Scope.TXN, "expires_in", seconds)])


@requires_c
@given(
    st.floats(min_value=-1e12, max_value=1e12),
    st.floats(min_value=-1e12, max_value=1e12),
)
@settings(max_examples=fuzz_examples(200))
def test_both_count_down_alike(countdown_to: float, now: float) -> None:
    memo = new_memo()
    remember(memo, REQUEST, countdown_to=countdown_to)
    frame = notify(1, 1, REQUEST)
    c_result, py_result = both(memo, frame, LIMIT, MAX_ITEMS, now)
    assert c_result == py_result
    (replayed,) = split_frames(py_result[1])
    *_, countdown = decode_actions(replayed.payload, 0, len(replayed.payload))
    assert countdown == SetVar(Scope.TXN, "expires_in", max(0, int(countdown_to - now)))


@pytest.mark.parametrize("impl", IMPLS)
def test_a_countdown_of_2_to_the_63_or_more_is_not_replayed(impl: Scan) -> None:
    memo = new_memo()
    remember(memo, REQUEST, countdown_to=2.0**63)
    remember(memo, request("far"), "far", countdown_to=1e19)
    assert scan(impl, memo, notify(1, 1, REQUEST), now=0.0) == (0, b"", [])
    assert scan(impl, memo, notify(1, 1, request("far")), now=NOW) == (0, b"", [])
    # a clock that went back far enough does it as well
    assert scan(impl, memo, notify(1, 1, REQUEST), now=-(2.0**63)) == (0, b"", [])


@pytest.mark.parametrize("impl", IMPLS)
def test_no_countdown_without_a_countdown_time(impl: Scan) -> None:
    memo = new_memo()
    remember(memo, REQUEST, countdown_to=None)
    _, acks, _ = scan(impl, memo, notify(1, 1, REQUEST))
    assert acks == ack(1, 1, OK)
    remember(memo, REQUEST, payload=b"", countdown_to=None)
    assert scan(impl, memo, notify(1, 1, REQUEST))[1] == ack(1, 1, b"")


# -- the ACK frames ------------------------------------------------------------

IDS = [0, 1, 239, 240, 241, 2287, 2288, 264431, 264432, 2**40 + 3, 2**63, 2**64 - 1]


@pytest.mark.parametrize("impl", IMPLS)
def test_acks_repeat_the_notify_ids_of_every_width(impl: Scan) -> None:
    memo = new_memo()
    remember(memo, REQUEST)
    pairs = [(stream_id, IDS[-1 - i]) for i, stream_id in enumerate(IDS)]
    buf = b"".join(notify(stream_id, frame_id, REQUEST) for stream_id, frame_id in pairs)
    pos, acks, tags = scan(impl, memo, buf)
    assert (pos, tags) == (len(buf), ["hit"] * len(IDS))
    frames = split_frames(acks)
    assert [(f.header.stream_id, f.header.frame_id) for f in frames] == pairs
    assert all(f.header.type == FrameType.ACK == 103 for f in frames)
    assert all(f.header.flags == FrameFlags.FIN for f in frames)
    assert all(f.payload == OK for f in frames)
    for raw, (stream_id, frame_id) in zip(raw_frames(acks), pairs, strict=True):
        ids = encode_varint(stream_id) + encode_varint(frame_id)
        assert raw[4:9] == b"\x67\x00\x00\x00\x01"
        assert raw[9 : 9 + len(ids)] == ids
        assert int.from_bytes(raw[:4], "big") == len(raw) - 4


@pytest.mark.parametrize("impl", IMPLS)
def test_acks_repeat_non_minimal_id_bytes_as_they_came(impl: Scan) -> None:
    memo = new_memo()
    remember(memo, REQUEST)
    ids = wrapped_varint(7) + wrapped_varint(0)
    body = b"\x03\x00\x00\x00\x01" + ids + encode_messages([REQUEST])
    frame = len(body).to_bytes(4, "big") + body
    pos, acks, _ = scan(impl, memo, frame)
    assert pos == len(frame)
    assert acks == (5 + len(ids) + len(OK)).to_bytes(4, "big") + b"\x67\x00\x00\x00\x01" + ids + OK
    (replayed,) = split_frames(acks)
    assert (replayed.header.stream_id, replayed.header.frame_id) == (7, 0)


# -- AnswerMemo.remember ---------------------------------------------------------

KEY = b"\x08\x01k" + ABSENT


def remember_key(memo: AnswerMemo, key: bytes = KEY, **changes: object) -> bool:
    options: dict[str, object] = {
        "valid_from": 0.0,
        "valid_until": 2000.0,
        "countdown_to": None,
        "tag": "t",
        "epoch": memo.epoch,
    }
    options.update(changes)
    return memo.remember(key, OK, **options)  # type: ignore[arg-type]


def test_remember_refuses_an_answer_from_before_a_clear() -> None:
    memo = new_memo()
    epoch = memo.epoch
    assert remember_key(memo, b"before")
    memo.clear()
    assert memo.table == {}
    assert not remember_key(memo, epoch=epoch)
    assert memo.table == {}
    assert remember_key(memo, epoch=memo.epoch)
    assert list(memo.table) == [KEY]


def test_remember_refuses_when_disabled_and_a_disabled_memo_answers_nothing() -> None:
    memo = new_memo()
    assert remember_key(memo, b"\x00\x00")
    memo.enabled = False
    assert not remember_key(memo)
    assert list(memo.table) == [b"\x00\x00"]
    frame = notify(1, 1, Message(NAME, (("token", None), ("host", None))))
    assert memo.answer(frame, 0, len(frame), LIMIT, MAX_ITEMS, {}) == (0, b"", [])
    memo.enabled = True
    assert memo.answer(frame, 0, len(frame), LIMIT, MAX_ITEMS, {})[2] == ["t"]


@pytest.mark.parametrize(
    ("valid_from", "valid_until"),
    [(5.0, 5.0), (6.0, 5.0), (math.nan, 5.0), (0.0, math.nan), (math.inf, math.inf)],
)
def test_remember_refuses_an_empty_window(valid_from: float, valid_until: float) -> None:
    memo = new_memo()
    assert not remember_key(memo, valid_from=valid_from, valid_until=valid_until)
    assert memo.table == {}


def test_remember_takes_an_open_window() -> None:
    memo = new_memo()
    assert remember_key(memo, valid_from=-math.inf, valid_until=math.inf)
    assert memo.table[KEY].valid_from == -math.inf


@pytest.mark.parametrize("countdown_to", [math.inf, -math.inf, math.nan])
def test_remember_refuses_a_countdown_that_is_not_finite(countdown_to: float) -> None:
    memo = new_memo()
    assert not remember_key(memo, countdown_to=countdown_to)
    assert memo.table == {}


def test_remember_needs_a_countdown_variable_for_a_countdown() -> None:
    memo = AnswerMemo(NAME, KEYS, clock=lambda: NOW)
    with pytest.raises(ValueError, match="countdown"):
        remember_key(memo, countdown_to=5.0)
    assert remember_key(memo, countdown_to=None)


def test_remember_stores_floats() -> None:
    memo = new_memo()
    assert remember_key(memo, valid_from=1, valid_until=2, countdown_to=3)
    entry = memo.table[KEY]
    assert [type(v) for v in entry[1:4]] == [float, float, float]


def test_a_churning_memo_admits_only_a_sample_until_replays_pay_again() -> None:
    memo = new_memo(max_entries=4)
    frame = notify(1, 1, Message(NAME, (("token", None), ("host", None))))  # key 00 00

    def window(replays: int) -> None:
        """Four admitted answers (a window closes at the fourth), with this many replays
        before the last one."""
        kept = 0
        while kept < 4:
            if memo.admit():
                assert remember_key(memo, bytes([0 if kept == 0 else kept + 1, 0]))
                kept += 1
                if kept == 3:
                    for _ in range(replays):
                        assert memo.answer(frame, 0, len(frame), LIMIT, MAX_ITEMS, {})[2] == ["t"]

    assert all(memo.admit() for _ in range(50))  # a fresh memo takes every candidate
    window(replays=0)  # its answers earned nothing: from now on only a sample
    admitted = [memo.admit() for _ in range(ADMISSION_SAMPLE * 3)]
    assert admitted.count(True) == 3
    window(replays=3)  # fewer replays than answers: still a sample
    assert [memo.admit() for _ in range(ADMISSION_SAMPLE)].count(True) == 1
    window(replays=4)  # it paid
    assert all(memo.admit() for _ in range(50))
    assert memo.replayed == 7
    memo.enabled = False
    assert not memo.admit()


def test_the_oldest_entry_goes_first() -> None:
    memo = new_memo(max_entries=3)
    for key in (b"1", b"2", b"3", b"4"):
        assert remember_key(memo, key, tag=key)
    assert list(memo.table) == [b"2", b"3", b"4"]
    assert remember_key(memo, b"5")
    assert list(memo.table) == [b"3", b"4", b"5"]


def test_remembering_a_key_again_makes_it_the_newest() -> None:
    memo = new_memo(max_entries=3)
    for key in (b"1", b"2", b"3"):
        assert remember_key(memo, key, tag=key)
    assert remember_key(memo, b"1", tag="again")
    assert list(memo.table) == [b"2", b"3", b"1"]
    assert memo.table[b"1"].tag == "again"
    assert remember_key(memo, b"4")
    assert list(memo.table) == [b"3", b"1", b"4"]
    # re-remembering a key of a full table evicts nothing
    assert remember_key(memo, b"1", tag="third")
    assert list(memo.table) == [b"3", b"4", b"1"]
    # nor does it of a table with room left
    memo = new_memo(max_entries=4)
    for key in (b"1", b"2", b"3"):
        assert remember_key(memo, key, tag=key)
    assert remember_key(memo, b"1", tag="again")
    assert list(memo.table) == [b"2", b"3", b"1"]
    assert remember_key(memo, b"4")
    assert remember_key(memo, b"5")
    assert list(memo.table) == [b"3", b"1", b"4", b"5"]


@pytest.mark.parametrize("impl", IMPLS)
def test_rekey_forgets_and_keys_by_the_new_arguments(impl: Scan) -> None:
    memo = new_memo()
    remember(memo, REQUEST)
    epoch = memo.epoch
    memo.rekey(("host",))
    assert memo.table == {}
    assert memo.epoch == epoch + 1
    assert memo.key_for(REQUEST) == encode_value("example.com")
    remember(memo, REQUEST)
    frame = notify(1, 1, request("another token", "example.com"))
    assert scan(impl, memo, frame) == (len(frame), ack(1, 1, OK), ["hit"])
    assert scan(impl, memo, notify(1, 1, request("abc", "other.example"))) == (0, b"", [])
    with pytest.raises(ValueError, match="1 to 8 arguments"):
        memo.rekey(())


def test_memo_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="1 to 8 arguments"):
        AnswerMemo(NAME, (), clock=lambda: NOW)
    # Regression: nine key arguments were taken, and the C scanner's ValueError then
    # escaped AgentConnection.receive_data.
    nine = [f"k{i}" for i in range(9)]
    with pytest.raises(ValueError, match="1 to 8 arguments"):
        AnswerMemo(NAME, nine, clock=lambda: NOW)
    eight = AnswerMemo(NAME, nine[:8], clock=lambda: NOW)
    with pytest.raises(ValueError, match="1 to 8 arguments"):
        eight.rekey(nine)
    with pytest.raises(ValueError, match="max_entries"):
        AnswerMemo(NAME, KEYS, clock=lambda: NOW, max_entries=0)
    memo = new_memo()
    assert memo.key_for(Message("other", REQUEST.args)) is None
    assert memo.key_for(REQUEST) == key_of(REQUEST, KEYS)


# -- AgentConnection -------------------------------------------------------------

HELLO = build_frame(
    FrameType.HAPROXY_HELLO,
    0,
    0,
    encode_kv_list(
        [("supported-versions", "2.0"), ("max-frame-size", 16380), ("capabilities", "pipelining")]
    ),
)


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def tokens_memo(clock: Clock | None = None, count: int = 8) -> AnswerMemo:
    """Entries for tokens t0..t{count-1}, tagged with their number, valid 900..1100."""
    memo = AnswerMemo(NAME, KEYS, clock=clock or Clock(), countdown_var=COUNTDOWN)
    for i in range(count):
        remember(memo, request(f"t{i}"), i, valid_from=900.0, valid_until=1100.0)
    return memo


def hit(stream_id: int, token: int | str | None = None) -> bytes:
    """A NOTIFY of token t{stream_id} (or t{token}), frame id 1."""
    return notify(stream_id, 1, request(f"t{stream_id if token is None else token}"))


def connection(memo: AnswerMemo | None) -> AgentConnection:
    conn = AgentConnection(now=0.0, answer_memo=memo)
    (event,) = conn.receive_data(HELLO, 0.0)
    assert isinstance(event, HelloReceived)
    conn.data_to_send()
    return conn


def notify_events(events: list[Event]) -> list[tuple[int, int]]:
    return [(e.stream_id, e.frame_id) for e in events if isinstance(e, NotifyReceived)]


def test_a_burst_of_hits_is_answered_without_a_handler() -> None:
    conn = connection(tokens_memo())
    events = conn.receive_data(b"".join(hit(i) for i in range(5)), 1.0)
    assert events == [AnswersReplayed([0, 1, 2, 3, 4])]
    assert conn.data_to_send() == b"".join(ack(i, 1, OK) for i in range(5))
    assert conn.inflight == 0
    assert conn.next_deadline() == 1.0 + 300.0  # no frame left half read
    # and again, on the next read
    assert conn.receive_data(hit(6) + hit(7), 2.0) == [AnswersReplayed([6, 7])]
    assert conn.data_to_send() == ack(6, 1, OK) + ack(7, 1, OK)


def test_a_miss_hands_itself_and_the_rest_to_the_handler() -> None:
    conn = connection(tokens_memo())
    burst = hit(1) + hit(2) + hit(3, "unknown") + hit(4) + hit(5)
    events = conn.receive_data(burst, 1.0)
    # The miss takes the handler path; replay goes on right after it.
    assert events == [
        AnswersReplayed([1, 2]),
        NotifyReceived(3, 1, (request("tunknown"),)),
        AnswersReplayed([4, 5]),
    ]
    assert conn.data_to_send() == ack(1, 1, OK) + ack(2, 1, OK) + ack(4, 1, OK) + ack(5, 1, OK)
    assert conn.inflight == 1
    conn.send_ack(3, 1, [SetVar(Scope.TXN, "handled", 3)])
    frames = split_frames(conn.data_to_send())
    assert [f.header.stream_id for f in frames] == [3]
    assert conn.inflight == 0
    assert conn.receive_data(hit(6), 2.0) == [AnswersReplayed([6])]


def test_no_replay_before_hello() -> None:
    conn = AgentConnection(now=0.0, answer_memo=tokens_memo())
    events = conn.receive_data(hit(1), 0.0)
    assert [type(e) for e in events] == [ConnectionClosed]
    assert conn.close_status == Status.INVALID_FRAME
    # HELLO and NOTIFYs in one read: replayed once HELLO was handled
    conn = AgentConnection(now=0.0, answer_memo=tokens_memo())
    events = conn.receive_data(HELLO + hit(1) + hit(2), 0.0)
    assert [type(e) for e in events] == [HelloReceived, AnswersReplayed]
    frames = split_frames(conn.data_to_send())
    assert [f.header.type for f in frames] == [FrameType.AGENT_HELLO, FrameType.ACK, FrameType.ACK]


def test_a_frame_completed_from_the_buffer_is_replayed_too() -> None:
    conn = connection(tokens_memo())
    first = hit(1)
    assert conn.receive_data(first[:6], 1.0) == []
    assert conn.receive_data(first[6:] + hit(2), 1.0) == [AnswersReplayed([1, 2])]
    assert conn.data_to_send() == ack(1, 1, OK) + ack(2, 1, OK)
    assert conn.inflight == 0


def test_the_rest_of_a_buffered_frame_is_not_scanned_for_replays() -> None:
    # The body of a frame of an unknown type holds a whole NOTIFY that would hit. Its
    # rest, arriving after its head was buffered, must be read as that frame's body.
    outer = build_frame(50, 0, 0, hit(1))
    conn = connection(tokens_memo())
    assert conn.receive_data(outer[:11], 1.0) == []
    assert conn.receive_data(outer[11:] + hit(2), 1.0) == [AnswersReplayed([2])]
    assert conn.data_to_send() == ack(2, 1, OK)  # nothing for the NOTIFY inside the body
    assert conn.inflight == 0


def test_hits_then_a_partial_frame() -> None:
    conn = AgentConnection(now=0.0, frame_timeout=5.0, answer_memo=tokens_memo())
    conn.receive_data(HELLO, 0.0)
    conn.data_to_send()
    second = hit(2)
    assert conn.receive_data(hit(1) + second[:5], 1.0) == [AnswersReplayed([1])]
    assert conn.data_to_send() == ack(1, 1, OK)
    assert conn.next_deadline() == 6.0  # the frame clock runs for the partial frame
    assert conn.receive_data(second[5:], 2.0) == [AnswersReplayed([2])]
    assert conn.next_deadline() == 2.0 + 300.0  # idle again: the frame clock stopped


def test_replays_go_on_beside_a_notify_in_flight_but_never_reuse_its_ids() -> None:
    conn = connection(tokens_memo())
    assert notify_events(conn.receive_data(hit(1, "unknown"), 1.0)) == [(1, 1)]
    assert conn.receive_data(hit(2) + hit(3), 1.0) == [AnswersReplayed([2, 3])]
    assert conn.data_to_send() == ack(2, 1, OK) + ack(3, 1, OK)
    assert conn.inflight == 1
    # A hit with the ids still in flight is not replayed: the connection refuses it.
    events = conn.receive_data(hit(1), 1.0)
    assert [type(e) for e in events] == [ConnectionClosed]
    assert conn.close_status == Status.INVALID_INTERLACED_FRAMES


def test_the_memo_clock_decides_and_a_cleared_or_disabled_memo_replays_nothing() -> None:
    clock = Clock(1100.0)  # valid_until is exclusive
    memo = tokens_memo(clock)
    conn = connection(memo)
    assert notify_events(conn.receive_data(hit(1), 1.0)) == [(1, 1)]
    conn.send_ack(1, 1, [])
    clock.now = 900.0  # valid_from is inclusive
    assert conn.receive_data(hit(2), 1.0) == [AnswersReplayed([2])]
    memo.enabled = False
    assert notify_events(conn.receive_data(hit(3), 1.0)) == [(3, 1)]
    conn.send_ack(3, 1, [])
    memo.enabled = True
    memo.clear()
    assert notify_events(conn.receive_data(hit(4), 1.0)) == [(4, 1)]


def test_the_countdown_is_counted_on_the_memo_clock() -> None:
    clock = Clock(1000.25)
    memo = AnswerMemo(NAME, KEYS, clock=clock, countdown_var=COUNTDOWN)
    remember(memo, REQUEST, countdown_to=1060.0)
    conn = connection(memo)
    assert conn.receive_data(notify(1, 1, REQUEST), 5.0) == [AnswersReplayed(["hit"])]
    (replayed,) = split_frames(conn.data_to_send())
    assert decode_actions(replayed.payload, 0, len(replayed.payload))[-1] == SetVar(
        Scope.TXN, "expires_in", 59
    )


MALFORMED: list[tuple[str, bytes]] = [
    ("reserved data type", raw_notify(9, 1, b"\x03abc\x01\x01x\x0c")),
    ("string past its frame", raw_notify(9, 1, encode_string(NAME) + b"\x01\x05token\x08\x40ab")),
    ("too many arguments", raw_notify(9, 1, b"\x03abc\xff")),
    ("truncated varint id", b"\x00\x00\x00\x07\x03\x00\x00\x00\x01\xf0\xf0"),
    ("body shorter than a header", b"\x00\x00\x00\x03\x03\x00\x00"),
    ("frame longer than negotiated", (16381).to_bytes(4, "big")),
    ("fragmented notify", notify(9, 1, REQUEST, flags=FrameFlags.NONE)),
    ("continuation frame", build_frame(FrameType.UNSET, 9, 1, b"")),
    ("ack sent by haproxy", build_frame(FrameType.ACK, 9, 1, b"")),
    ("second hello", HELLO),
]


def disconnect_status(data: bytes) -> int:
    frame = split_frames(data)[-1]
    assert frame.header.type == FrameType.AGENT_DISCONNECT
    status = dict(decode_kv_list(frame.payload, 0, len(frame.payload), 8))["status-code"]
    assert isinstance(status, int)
    return status


@pytest.mark.parametrize("bad", [c[1] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_input_after_replays_closes_as_without_a_memo(bad: bytes) -> None:
    data = hit(1) + hit(2) + bad + hit(3)
    without = connection(None)
    expected = [e for e in without.receive_data(data, 1.0) if isinstance(e, ConnectionClosed)]
    expected_status = disconnect_status(without.data_to_send())

    conn = connection(tokens_memo())
    events = conn.receive_data(data, 1.0)
    assert events[0] == AnswersReplayed([1, 2])
    assert events[1:] == expected
    assert conn.closed
    assert conn.close_status == expected[0].status
    out = conn.data_to_send()
    assert out.startswith(ack(1, 1, OK) + ack(2, 1, OK))
    assert [f.header.type for f in split_frames(out)] == [
        FrameType.ACK,
        FrameType.ACK,
        FrameType.AGENT_DISCONNECT,
    ]
    assert disconnect_status(out) == expected_status == expected[0].status
    assert conn.receive_data(hit(4), 2.0) == []
