"""The AgentConnection state machine: negotiation, framing, limits, time, and
malformed input of every kind ending in the right DISCONNECT status."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from spoa.protocol import (
    AgentConnection,
    ConnectionClosed,
    DisconnectReceived,
    Event,
    FrameFlags,
    FrameIdNotFound,
    FrameTooBig,
    FrameType,
    HelloReceived,
    Message,
    NotifyReceived,
    Scope,
    SetVar,
    Status,
    UnsetVar,
    Value,
    build_agent_hello,
    build_frame,
    decode_actions,
    decode_kv_list,
    encode_kv_list,
    encode_messages,
    encode_varint,
    split_frames,
)
from spoa.protocol.types import encode_string

HELLO_ITEMS: dict[str, Value] = {
    "supported-versions": "2.0",
    "max-frame-size": 16380,
    "capabilities": "pipelining,async",
    "engine-id": "engine-1",
}
REQUEST = Message("check-jwt", (("token", "abc"), ("method", "GET"), ("n", -5)))


def hello(**changes: Value) -> bytes:
    items = {**HELLO_ITEMS, **{k.replace("_", "-"): v for k, v in changes.items()}}
    payload = encode_kv_list((k, v) for k, v in items.items() if v is not None)
    return build_frame(FrameType.HAPROXY_HELLO, 0, 0, payload)


def hello_without(key: str) -> bytes:
    payload = encode_kv_list((k, v) for k, v in HELLO_ITEMS.items() if k != key)
    return build_frame(FrameType.HAPROXY_HELLO, 0, 0, payload)


def notify(stream_id: int = 1, frame_id: int = 1, *messages: Message) -> bytes:
    payload = encode_messages(messages or (REQUEST,))
    return build_frame(FrameType.NOTIFY, stream_id, frame_id, payload)


def hello_with_raw(name: str, typed_value: bytes) -> bytes:
    """A HELLO whose item `name` carries hand-made typed data (what encode never makes)."""
    items = encode_kv_list((k, v) for k, v in HELLO_ITEMS.items() if k != name)
    payload = items + encode_string(name) + typed_value
    return build_frame(FrameType.HAPROXY_HELLO, 0, 0, payload)


def disconnect(status: int, message: str) -> bytes:
    payload = encode_kv_list((("status-code", status), ("message", message)))
    return build_frame(FrameType.HAPROXY_DISCONNECT, 0, 0, payload)


def ready(**limits: int) -> AgentConnection:
    conn = AgentConnection(now=0.0, **limits)  # type: ignore[arg-type]
    conn.receive_data(hello(), 0.0)
    conn.data_to_send()
    return conn


def sent_disconnect_status(conn: AgentConnection) -> int | None:
    """The status of the AGENT-DISCONNECT the connection queued, if any."""
    for frame in split_frames(conn.data_to_send()):
        if frame.header.type == FrameType.AGENT_DISCONNECT:
            items = dict(decode_kv_list(frame.payload, 0, len(frame.payload), 8))
            status = items["status-code"]
            assert isinstance(status, int)
            return status
    return None


def closed_events(events: list[Event]) -> list[ConnectionClosed]:
    return [e for e in events if isinstance(e, ConnectionClosed)]


# -- negotiation ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("ours", "theirs", "agreed"), [(16380, 65536, 16380), (65536, 16380, 16380), (300, 256, 256)]
)
def test_max_frame_size_is_the_minimum(ours: int, theirs: int, agreed: int) -> None:
    conn = AgentConnection(max_frame_size=ours, now=0.0)
    (event,) = conn.receive_data(hello(max_frame_size=theirs), 0.0)
    assert isinstance(event, HelloReceived)
    assert event.negotiated_max_frame_size == agreed
    assert conn.data_to_send() == build_agent_hello(agreed)


def test_announces_pipelining_only() -> None:
    conn = AgentConnection(now=0.0)
    conn.receive_data(hello(capabilities=" pipelining , async,fragmentation "), 0.0)
    (frame,) = split_frames(conn.data_to_send())
    items = dict(decode_kv_list(frame.payload, 0, len(frame.payload), 8))
    assert items == {"version": "2.0", "max-frame-size": 16380, "capabilities": "pipelining"}
    assert conn.pipelining


def test_version_list_ignores_spaces() -> None:
    conn = AgentConnection(now=0.0)
    (event,) = conn.receive_data(hello(supported_versions=" 1.0 , 2.0 "), 0.0)
    assert isinstance(event, HelloReceived)
    assert event.supported_versions == ("1.0", "2.0")


def test_lists_ignore_any_white_space_around_items_but_not_inside() -> None:
    """Regression (SPOP probe): only the space was ignored, so "2.0<TAB>" was refused
    with status 8 where HAProxy's parser (isspace) skips it; and spaces inside an item
    were removed, reading "pipe lining" as pipelining."""
    conn = AgentConnection(now=0.0)
    (event,) = conn.receive_data(
        hello(supported_versions="\t2.0\r\n", capabilities="pipe lining,\tasync\t"), 0.0
    )
    assert isinstance(event, HelloReceived)
    assert event.supported_versions == ("2.0",)
    assert not conn.pipelining


@pytest.mark.parametrize("offered", ["2.1", "2.5, 1.0", "3.0,2.9"])
def test_a_later_minor_version_offers_2_0(offered: str) -> None:
    """Regression: "2.1" was refused with status 8, but announcing a minor version means
    every earlier one of that major too (SPOE.txt 3.2.4)."""
    conn = AgentConnection(now=0.0)
    (event,) = conn.receive_data(hello(supported_versions=offered), 0.0)
    assert isinstance(event, HelloReceived)
    (frame,) = split_frames(conn.data_to_send())
    assert dict(decode_kv_list(frame.payload, 0, len(frame.payload), 8))["version"] == "2.0"


def test_healthcheck_hello_gets_hello_then_closes() -> None:
    conn = AgentConnection(now=0.0)
    events = conn.receive_data(hello(capabilities="", healthcheck=True), 0.0)
    assert isinstance(events[0], HelloReceived)
    assert events[0].healthcheck
    assert events[1] == ConnectionClosed(Status.NORMAL, "health check answered")
    frames = split_frames(conn.data_to_send())
    assert [f.header.type for f in frames] == [FrameType.AGENT_HELLO]
    assert conn.closed


def test_healthcheck_hello_without_capabilities_is_status_7() -> None:
    # SPOE.txt 3.2.4 makes capabilities mandatory; HAProxy 2.6's `option spop-check`
    # HELLO carries it as "" (captured from a real one), which the test above sends.
    payload = encode_kv_list(
        [("supported-versions", "2.0"), ("max-frame-size", 16380), ("healthcheck", True)]
    )
    conn = AgentConnection(now=0.0)
    events = conn.receive_data(build_frame(FrameType.HAPROXY_HELLO, 0, 0, payload), 0.0)
    assert closed_events(events)[0].status == Status.CAPABILITIES_MISSING
    assert sent_disconnect_status(conn) == Status.CAPABILITIES_MISSING


# -- malformed input -----------------------------------------------------------

INVALID_AFTER_HELLO: list[tuple[str, bytes, Status]] = [
    ("second hello", hello(), Status.INVALID_FRAME),
    (
        "fragmented notify",
        build_frame(FrameType.NOTIFY, 1, 1, b"", FrameFlags.NONE),
        Status.FRAGMENTATION_NOT_SUPPORTED,
    ),
    (
        "continuation frame",
        build_frame(FrameType.UNSET, 1, 1, b""),
        Status.FRAGMENTATION_NOT_SUPPORTED,
    ),
    ("ack sent by haproxy", build_frame(FrameType.ACK, 1, 1, b""), Status.INVALID_FRAME),
    ("body shorter than a header", b"\x00\x00\x00\x03\x03\x00\x00", Status.INVALID_FRAME),
    ("frame longer than negotiated", (16381).to_bytes(4, "big"), Status.FRAME_TOO_BIG),
    ("truncated varint id", b"\x00\x00\x00\x07\x03\x00\x00\x00\x01\xf0\xf0", Status.INVALID_FRAME),
    (
        "varint of 11 bytes",
        b"\x00\x00\x00\x10\x03\x00\x00\x00\x01" + b"\xff" + b"\xff" * 10,
        Status.INVALID_FRAME,
    ),
    (
        "string past its frame",
        build_frame(FrameType.NOTIFY, 1, 1, b"\x09check-jwt\x01\x05token\x08\x40abc"),
        Status.INVALID_FRAME,
    ),
    (
        "message without arg count",
        build_frame(FrameType.NOTIFY, 1, 1, b"\x03abc"),
        Status.INVALID_FRAME,
    ),
    (
        "reserved data type",
        build_frame(FrameType.NOTIFY, 1, 1, b"\x03abc\x01\x01x\x0c"),
        Status.INVALID_FRAME,
    ),
    (
        "truncated ipv6",
        build_frame(FrameType.NOTIFY, 1, 1, b"\x03abc\x01\x01x\x07\x00\x00"),
        Status.INVALID_FRAME,
    ),
    (
        "too many arguments",
        build_frame(FrameType.NOTIFY, 1, 1, b"\x03abc\xff"),
        Status.RESOURCE_ALLOCATION,
    ),
    ("same ids twice in flight", notify(7, 1) + notify(7, 1), Status.INVALID_INTERLACED_FRAMES),
]


@pytest.mark.parametrize(
    ("data", "status"),
    [c[1:] for c in INVALID_AFTER_HELLO],
    ids=[c[0] for c in INVALID_AFTER_HELLO],
)
def test_invalid_input_after_hello(data: bytes, status: Status) -> None:
    conn = AgentConnection(max_list_items=64, now=0.0)
    conn.receive_data(hello(), 0.0)
    conn.data_to_send()
    events = conn.receive_data(data, 1.0)
    assert closed_events(events) == [ConnectionClosed(status, closed_events(events)[0].message)]
    assert sent_disconnect_status(conn) == status
    assert conn.closed
    # Later input is ignored, and nothing more is sent.
    assert conn.receive_data(notify(), 2.0) == []
    assert conn.data_to_send() == b""


INVALID_HELLO: list[tuple[str, bytes, Status]] = [
    ("notify first", notify(), Status.INVALID_FRAME),
    ("unknown type first", build_frame(50, 0, 0, b""), Status.INVALID_FRAME),
    ("no supported-versions", hello_without("supported-versions"), Status.VERSION_MISSING),
    ("no 2.0 offered", hello(supported_versions="1.0,3.0"), Status.UNSUPPORTED_VERSION),
    # Regression: "².0" passed str.isdigit() and int() raised: no DISCONNECT, a traceback.
    ("superscript digit", hello(supported_versions="\u00b2.0"), Status.UNSUPPORTED_VERSION),
    (
        "4999 leading zeros",
        hello(supported_versions="0" * 4999 + "2.0"),
        Status.UNSUPPORTED_VERSION,
    ),
    (
        "2 with a superscript minor",
        hello(supported_versions="2.\u00b2"),
        Status.UNSUPPORTED_VERSION,
    ),
    ("no max-frame-size", hello_without("max-frame-size"), Status.MAX_FRAME_SIZE_MISSING),
    ("max-frame-size not a number", hello(max_frame_size="big"), Status.MAX_FRAME_SIZE_MISSING),
    ("max-frame-size below 256", hello(max_frame_size=255), Status.BAD_MAX_FRAME_SIZE),
    # Regression: a 32-bit item kept the low bits of a larger varint, so 2**32 + 1000
    # negotiated 1000 (the raw SPOP probe).
    (
        "max-frame-size UINT32 over 32 bits",
        hello_with_raw("max-frame-size", b"\x03" + encode_varint(2**32 + 1000)),
        Status.INVALID_FRAME,
    ),
    (
        "max-frame-size INT32 over 32 bits",
        hello_with_raw("max-frame-size", b"\x02" + encode_varint(2**32 + 1000)),
        Status.INVALID_FRAME,
    ),
    ("no capabilities", hello_without("capabilities"), Status.CAPABILITIES_MISSING),
    # Regression: a number or binary capabilities got 4, where its peers get 5 and 6.
    ("capabilities not a string", hello(capabilities=1), Status.CAPABILITIES_MISSING),
    ("capabilities binary", hello(capabilities=b"pipelining"), Status.CAPABILITIES_MISSING),
    (
        "fragmented hello",
        build_frame(FrameType.HAPROXY_HELLO, 0, 0, b"", FrameFlags.NONE),
        Status.FRAGMENTATION_NOT_SUPPORTED,
    ),
    ("length over the pre-hello cap", b"\x7f\xff\xff\xff", Status.FRAME_TOO_BIG),
    # SPOE.txt 3.2.4: STREAM-ID and FRAME-ID must be 0.
    (
        "hello with ids",
        build_frame(FrameType.HAPROXY_HELLO, 1, 1, encode_kv_list(list(HELLO_ITEMS.items()))),
        Status.INVALID_FRAME,
    ),
]


@pytest.mark.parametrize(
    ("data", "status"), [c[1:] for c in INVALID_HELLO], ids=[c[0] for c in INVALID_HELLO]
)
def test_invalid_hello(data: bytes, status: Status) -> None:
    conn = AgentConnection(now=0.0)
    events = conn.receive_data(data, 0.0)
    assert [e.status for e in closed_events(events)] == [status]
    assert sent_disconnect_status(conn) == status


def test_too_many_kv_items_is_a_resource_error() -> None:
    payload = encode_kv_list([*HELLO_ITEMS.items(), *((f"x{i}", i) for i in range(10))])
    conn = AgentConnection(max_list_items=8, now=0.0)
    conn.receive_data(build_frame(FrameType.HAPROXY_HELLO, 0, 0, payload), 0.0)
    assert sent_disconnect_status(conn) == Status.RESOURCE_ALLOCATION


def test_inflight_limit() -> None:
    conn = ready(max_inflight=2)
    events = conn.receive_data(notify(1, 1) + notify(2, 1), 1.0)
    assert conn.inflight == 2
    assert len(events) == 2
    events = conn.receive_data(notify(3, 1), 1.0)
    assert closed_events(events)[0].status == Status.RESOURCE_ALLOCATION


def test_unknown_frame_types_are_skipped() -> None:
    conn = ready()
    events = conn.receive_data(build_frame(50, 0, 0, b"whatever") + notify(3, 1), 1.0)
    assert events == [NotifyReceived(3, 1, (REQUEST,))]


def test_unknown_frame_types_are_skipped_whatever_their_flags() -> None:
    """SPOE.txt 3.2.2: unknown frames may be skipped; HAProxy reads the type before FIN.
    Regression: one without FIN was refused as a fragment (status 10)."""
    conn = ready()
    unknown = build_frame(42, 0, 0, b"zz", FrameFlags.NONE)
    events = conn.receive_data(unknown + notify(3, 1), 1.0)
    assert events == [NotifyReceived(3, 1, (REQUEST,))]


def test_stream_id_zero_and_large_ids_are_echoed() -> None:
    conn = ready()
    events = conn.receive_data(notify(0, 1) + notify(2**32 - 1, 2**20), 1.0)
    assert [(e.stream_id, e.frame_id) for e in events if isinstance(e, NotifyReceived)] == [
        (0, 1),
        (2**32 - 1, 2**20),
    ]
    conn.send_ack(2**32 - 1, 2**20, [SetVar(Scope.TXN, "a", 1)])
    conn.send_ack(0, 1, [UnsetVar(Scope.REQ, "b")])
    frames = split_frames(conn.data_to_send())
    assert [(f.header.stream_id, f.header.frame_id) for f in frames] == [(2**32 - 1, 2**20), (0, 1)]
    assert all(f.header.type == FrameType.ACK and f.header.flags == 1 for f in frames)
    assert decode_actions(frames[1].payload, 0, len(frames[1].payload)) == [
        UnsetVar(Scope.REQ, "b")
    ]


@pytest.mark.parametrize(
    "stream_id", [239, 240, 241, 2287, 2288, 2289, 264431, 264432, 2**40 + 3, 2**64 - 1]
)
def test_ids_of_every_varint_width_are_echoed(stream_id: int) -> None:
    # The two-byte stream id is decoded inline and the ACK repeats the NOTIFY's id bytes.
    conn = ready()
    events = conn.receive_data(notify(stream_id, stream_id % 1000), 1.0)
    assert [(e.stream_id, e.frame_id) for e in events] == [(stream_id, stream_id % 1000)]
    conn.send_ack(stream_id, stream_id % 1000, [SetVar(Scope.TXN, "a", 1)])
    (frame,) = split_frames(conn.data_to_send())
    assert (frame.header.stream_id, frame.header.frame_id) == (stream_id, stream_id % 1000)
    assert conn.inflight == 0


def test_empty_notify() -> None:
    conn = ready()
    events = conn.receive_data(build_frame(FrameType.NOTIFY, 5, 1, b""), 1.0)
    assert events == [NotifyReceived(5, 1, ())]


# -- acks ----------------------------------------------------------------------


def test_ack_for_unknown_ids_is_refused() -> None:
    conn = ready()
    with pytest.raises(FrameIdNotFound):
        conn.send_ack(1, 1, [])


def test_ack_larger_than_negotiated_size_keeps_the_notify_in_flight() -> None:
    conn = AgentConnection(max_frame_size=256, now=0.0)
    conn.receive_data(hello(), 0.0)
    conn.data_to_send()
    conn.receive_data(notify(1, 1), 1.0)
    with pytest.raises(FrameTooBig):
        conn.send_ack(1, 1, [SetVar(Scope.TXN, "big", "x" * 300)])
    assert conn.inflight == 1
    conn.send_ack(1, 1, [SetVar(Scope.TXN, "ok", True)])
    assert conn.inflight == 0


def test_acks_in_any_order() -> None:
    conn = ready()
    conn.receive_data(notify(1, 1) + notify(3, 1) + notify(5, 1), 1.0)
    for stream_id in (5, 1, 3):
        conn.send_ack(stream_id, 1, [SetVar(Scope.TXN, "sid", stream_id)])
    frames = split_frames(conn.data_to_send())
    assert [f.header.stream_id for f in frames] == [5, 1, 3]
    assert conn.inflight == 0


def test_ack_after_close_is_ignored() -> None:
    conn = ready()
    conn.receive_data(notify(1, 1), 1.0)
    conn.receive_data(b"", 2.0)  # HAProxy's end: the ACK could still go
    conn.connection_lost()  # the connection's: it cannot
    assert conn.closed
    conn.send_ack(1, 1, [SetVar(Scope.TXN, "late", True)])
    assert conn.data_to_send() == b""


# -- closing -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "status"),
    [(0, Status.NORMAL), (2, Status.TIMEOUT), (4, Status.INVALID_FRAME), (1234, Status.UNKNOWN)],
)
def test_haproxy_disconnect(code: int, status: Status) -> None:
    conn = ready()
    events = conn.receive_data(disconnect(code, "bye now"), 1.0)
    assert events == [DisconnectReceived(code, "bye now"), ConnectionClosed(status, "bye now")]
    assert sent_disconnect_status(conn) == Status.NORMAL
    assert status.is_normal == (code in (0, 2))


@pytest.mark.parametrize(("stream_id", "frame_id"), [(1, 0), (0, 1), (7, 9)])
def test_haproxy_disconnect_with_ids_is_an_invalid_frame(stream_id: int, frame_id: int) -> None:
    # SPOE.txt 3.2.8: its stream-id and frame-id are 0, as a HELLO's are.
    conn = ready()
    payload = encode_kv_list((("status-code", 0), ("message", "bye")))
    frame = build_frame(FrameType.HAPROXY_DISCONNECT, stream_id, frame_id, payload)
    (event,) = conn.receive_data(frame, 1.0)
    assert isinstance(event, ConnectionClosed)
    assert event.status is Status.INVALID_FRAME
    assert sent_disconnect_status(conn) == Status.INVALID_FRAME


def test_after_a_half_close_the_notifys_in_flight_still_get_their_acks() -> None:
    """Regression (conformance review): EOF closed at once and dropped the answers
    still being worked out; every NOTIFY must be acknowledged (SPOE.txt 3.2.6)."""
    conn = ready()
    conn.receive_data(notify(1, 1) + notify(3, 1), 1.0)
    assert conn.receive_data(b"", 2.0) == []
    assert conn.draining
    assert not conn.closed
    assert conn.receive_data(notify(5, 1), 2.5) == []  # nothing is read after the end
    conn.send_ack(3, 1, [SetVar(Scope.TXN, "n", 3)])
    assert not conn.closed
    conn.send_ack(1, 1, [SetVar(Scope.TXN, "n", 1)])
    assert conn.closed
    frames = split_frames(conn.data_to_send())
    assert [(f.header.type, f.header.stream_id) for f in frames] == [
        (FrameType.ACK, 3),
        (FrameType.ACK, 1),
    ]
    assert conn.handle_timeout(3.0) == [ConnectionClosed(Status.NORMAL, "peer closed")]


def test_a_drain_that_outlasts_the_frame_timeout_is_closed() -> None:
    """Review: a handler that never answers must not hold a half-closed connection
    (and its slot of max_connections) for good."""
    conn = ready(frame_timeout=3)
    conn.receive_data(notify(1, 1), 1.0)
    conn.receive_data(b"", 2.0)
    assert conn.next_deadline() == 5.0
    assert conn.handle_timeout(4.9) == []
    (closed,) = conn.handle_timeout(5.0)
    assert closed == ConnectionClosed(
        Status.TIMEOUT, "answers not ready in time after the peer's end"
    )
    assert conn.closed


def test_a_lost_connection_closes_at_once_with_answers_in_flight() -> None:
    conn = ready()
    conn.receive_data(notify(1, 1), 1.0)
    assert conn.connection_lost() == [ConnectionClosed(Status.NORMAL, "peer closed")]
    assert not conn.draining


def test_a_half_close_with_nothing_in_flight_closes_at_once() -> None:
    conn = ready()
    conn.receive_data(notify(1, 1), 1.0)
    conn.send_ack(1, 1, [])
    assert conn.receive_data(b"", 2.0) == [ConnectionClosed(Status.NORMAL, "peer closed")]
    assert not conn.draining


def test_eof_is_a_normal_close() -> None:
    conn = ready()
    assert conn.receive_data(b"", 1.0) == [ConnectionClosed(Status.NORMAL, "peer closed")]
    assert conn.data_to_send() == b""
    assert conn.receive_data(b"", 1.0) == []


def test_local_disconnect() -> None:
    conn = ready()
    conn.send_disconnect(Status.NORMAL, "shutting down")
    assert conn.closed
    assert sent_disconnect_status(conn) == Status.NORMAL
    assert conn.receive_data(b"", 1.0) == [ConnectionClosed(Status.NORMAL, "shutting down")]


# -- time ----------------------------------------------------------------------


def test_hello_timeout() -> None:
    conn = AgentConnection(hello_timeout=5.0, now=100.0)
    assert conn.next_deadline() == 105.0
    assert conn.handle_timeout(104.9) == []
    assert conn.handle_timeout(105.0) == [ConnectionClosed(Status.TIMEOUT, "no HELLO in time")]
    assert sent_disconnect_status(conn) == Status.TIMEOUT
    assert conn.next_deadline() is None


def test_hello_timeout_counts_from_first_input_without_a_start_time() -> None:
    conn = AgentConnection(hello_timeout=5.0)
    assert conn.next_deadline() is None
    conn.receive_data(hello()[:3], 50.0)
    assert conn.next_deadline() == 55.0


def test_idle_timeout_only_without_notifies_in_flight() -> None:
    conn = AgentConnection(idle_timeout=30.0, now=0.0)
    conn.receive_data(hello(), 10.0)
    assert conn.next_deadline() == 40.0
    conn.receive_data(notify(1, 1), 20.0)
    assert conn.next_deadline() is None
    assert conn.handle_timeout(100.0) == []
    conn.send_ack(1, 1, [SetVar(Scope.TXN, "v", True)])
    assert conn.next_deadline() == 50.0
    assert conn.handle_timeout(49.0) == []
    assert conn.handle_timeout(50.0) == [ConnectionClosed(Status.TIMEOUT, "idle timeout")]


def test_a_trickled_frame_times_out_even_with_input_arriving() -> None:
    # Regression: a peer sending one byte at a time kept its connection forever,
    # since the idle timeout counts from the last byte received.
    conn = AgentConnection(idle_timeout=30.0, frame_timeout=5.0, now=0.0)
    conn.receive_data(hello(), 0.0)
    conn.data_to_send()
    frame = notify(1, 1)
    for step, byte in enumerate(frame[:-1], start=1):
        if step > 4:
            break
        conn.receive_data(bytes([byte]), float(step))
    assert conn.next_deadline() == 6.0  # counted from the frame's first byte, at t=1
    assert conn.handle_timeout(5.9) == []
    closed = conn.handle_timeout(6.0)
    assert closed == [ConnectionClosed(Status.TIMEOUT, "frame not completed in time")]
    assert sent_disconnect_status(conn) == Status.TIMEOUT


def test_the_frame_clock_restarts_with_each_new_frame() -> None:
    conn = AgentConnection(frame_timeout=5.0, now=0.0)
    conn.receive_data(hello(), 0.0)
    first, second = notify(1, 1), notify(2, 1)
    conn.receive_data(first[:3], 1.0)
    assert conn.next_deadline() == 6.0
    conn.receive_data(first[3:] + second[:3], 4.0)  # completes one, starts another
    assert conn.next_deadline() == 9.0
    conn.receive_data(second[3:], 8.0)
    conn.send_ack(1, 1, [SetVar(Scope.TXN, "v", True)])
    conn.send_ack(2, 1, [SetVar(Scope.TXN, "v", True)])
    assert conn.next_deadline() == 8.0 + 300.0  # only the idle timeout is left


def test_the_frame_clock_stops_while_the_caller_is_not_reading() -> None:
    """Regression: under write backpressure the server pauses reading with a frame half
    in; the frame timeout then fired on the agent's own pause and reset the peer."""
    conn = AgentConnection(frame_timeout=5.0, now=0.0)
    conn.receive_data(hello(), 0.0)
    frame = notify(1, 1)
    conn.receive_data(frame[:3], 1.0)
    conn.pause_input(True, 2.0)
    assert conn.next_deadline() == 1.0 + 300.0  # only the idle timeout is left
    assert conn.handle_timeout(60.0) == []
    conn.pause_input(False, 60.0)
    assert conn.next_deadline() == 65.0  # a full frame timeout from the resume
    events = conn.receive_data(frame[3:], 61.0)
    assert [type(e).__name__ for e in events] == ["NotifyReceived"]


# -- chunking and fuzzing ------------------------------------------------------

STREAM = hello() + notify(0, 1) + build_frame(77, 0, 0, b"skip me") + notify(300, 2)


def feed(chunks: list[bytes]) -> tuple[list[Event], bytes]:
    conn = AgentConnection(now=0.0)
    events: list[Event] = []
    out = b""
    for chunk in chunks:
        new_events = conn.receive_data(chunk, 1.0)
        events += new_events
        for event in new_events:
            if isinstance(event, NotifyReceived) and not conn.closed:
                conn.send_ack(event.stream_id, event.frame_id, [SetVar(Scope.TXN, "v", 1)])
        out += conn.data_to_send()
    return events, out


def test_byte_by_byte_equals_whole() -> None:
    whole = feed([STREAM])
    assert [type(e) for e in whole[0]] == [
        HelloReceived,
        NotifyReceived,
        NotifyReceived,
    ]
    assert feed([STREAM[i : i + 1] for i in range(len(STREAM))]) == whole


@settings(max_examples=50)
@given(st.lists(st.integers(min_value=1, max_value=len(STREAM)), max_size=20))
def test_random_chunks_equal_whole(cuts: list[int]) -> None:
    points = sorted({0, len(STREAM), *cuts})
    chunks = [STREAM[a:b] for a, b in itertools.pairwise(points)]
    assert feed(chunks) == feed([STREAM])


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(min_size=1, max_size=64), max_size=6))
def test_random_bytes_after_hello_never_raise(chunks: list[bytes]) -> None:
    conn = ready(max_list_items=16)
    events: list[Event] = []
    for chunk in chunks:
        events += conn.receive_data(chunk, 1.0)
    closes = closed_events(events)
    assert len(closes) <= 1
    assert conn.closed == bool(closes)
    out = conn.data_to_send()
    frames = split_frames(out)  # every frame whole
    if closes:
        assert [f.header.type for f in frames] == [FrameType.AGENT_DISCONNECT]
        assert sent_disconnect_status_of(out) == closes[0].status
    else:
        assert frames == []


@settings(max_examples=150)
@given(st.binary(min_size=1, max_size=200))
# A random body can be a well-formed HAPROXY-DISCONNECT (type 2, FIN, ids 0): the test
# used to reject that event and failed when hypothesis drew one.
@example(b"\x02\x00\x00\x00\x01\x00\x00")
def test_random_frame_bodies_after_hello_never_raise(body: bytes) -> None:
    conn = ready(max_list_items=16)
    events = conn.receive_data(len(body).to_bytes(4, "big") + body, 1.0)
    for event in events:
        assert isinstance(event, NotifyReceived | DisconnectReceived | ConnectionClosed)


def sent_disconnect_status_of(data: bytes) -> int:
    (frame,) = split_frames(data)
    status = dict(decode_kv_list(frame.payload, 0, len(frame.payload), 8))["status-code"]
    assert isinstance(status, int)
    return status
