"""Fuzzing the SPOP decoder and the AgentConnection state machine.

Properties, for any input split at any points and any timer calls:
- nothing raises out of `receive_data` / `handle_timeout` (a violation is a DISCONNECT);
- events are well formed, `ConnectionClosed` comes exactly once at most, nothing after it;
- everything the agent writes parses as whole frames within the negotiated size;
- NOTIFYs in flight never exceed `max_inflight`, and input is never buffered beyond one frame.

The suite runs modest example counts (`JWTGATE_FUZZ_EXAMPLES`, default 150); `bench/fuzz.py`
drives the same checks for minutes. Minimised crashers live in `crashers/` and are replayed.
"""

from __future__ import annotations

import gc
import tracemalloc
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spoa.protocol import (
    AgentConnection,
    ConnectionClosed,
    DisconnectReceived,
    FrameType,
    HelloReceived,
    Message,
    NotifyReceived,
    Scope,
    SetVar,
    Status,
    Value,
    encode_kv_list,
    encode_messages,
    encode_varint,
    split_frames,
)
from spoa.protocol import build_frame as _build_frame
from tests.support.fuzz import fuzz_examples

EXAMPLES = fuzz_examples(150)
CRASHERS = Path(__file__).parent / "crashers"
MAX_FRAME_SIZE = 1024
MAX_INFLIGHT = 4
MAX_LIST_ITEMS = 16
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,  # the shared 2-core machine makes per-example deadlines flaky
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def hello(**overrides: Value) -> bytes:
    items: dict[str, Value] = {
        "supported-versions": "2.0",
        "max-frame-size": 16380,
        "capabilities": "pipelining",
        "engine-id": "fuzz",
    }
    items.update(overrides)
    payload = encode_kv_list((k, v) for k, v in items.items() if v is not None)
    return _build_frame(FrameType.HAPROXY_HELLO, 0, 0, payload)


def notify(stream_id: int, frame_id: int, messages: list[Message]) -> bytes:
    return _build_frame(FrameType.NOTIFY, stream_id, frame_id, encode_messages(messages))


# --- the checker shared with bench/fuzz.py --------------------------------------------------


@dataclass
class Run:
    """What one fuzzed connection produced."""

    conn: AgentConnection
    closes: list[ConnectionClosed] = field(default_factory=list)
    output: bytearray = field(default_factory=bytearray)
    notifies: int = 0


def drive(
    chunks: list[bytes],
    *,
    ticks: list[float] | None = None,
    answer: bool = True,
    max_frame_size: int = MAX_FRAME_SIZE,
) -> Run:
    """Feed `chunks` one by one (with optional timer calls) and check every invariant."""
    conn = AgentConnection(
        max_frame_size=max_frame_size,
        max_list_items=MAX_LIST_ITEMS,
        max_inflight=MAX_INFLIGHT,
        hello_timeout=5.0,
        idle_timeout=30.0,
        now=0.0,
    )
    run = Run(conn)
    now = 0.0
    tick_list = list(ticks or [])
    for chunk in chunks:
        now += 0.01
        events = conn.receive_data(chunk, now)
        if tick_list:
            now += tick_list.pop()
            events += conn.handle_timeout(now)
        _check_events(run, events, answer)
        run.output += conn.data_to_send()
        assert conn.inflight <= MAX_INFLIGHT
        _check_buffer_bound(conn, max_frame_size)
    # The peer closing ends the connection, exactly once: at once, or after the NOTIFYs
    # in flight are answered. Here they never are, and the transport's end closes it.
    _check_events(run, conn.receive_data(b"", now + 1), answer)
    if conn.draining:
        assert not answer
        assert conn.inflight > 0
        assert conn.next_deadline() is not None  # a drain has its deadline
        _check_events(run, conn.connection_lost(), answer)
    run.output += conn.data_to_send()
    assert conn.closed
    assert len(run.closes) == 1
    assert conn.receive_data(b"\x00\x00\x00\x05", now + 2) == []
    assert conn.handle_timeout(now + 1e6) == []
    _check_output(run, max_frame_size)
    return run


def _check_events(run: Run, events: list[object], answer: bool) -> None:
    for event in events:
        assert not run.closes, f"event after ConnectionClosed: {event!r}"
        if isinstance(event, ConnectionClosed):
            assert isinstance(event.status, Status)
            run.closes.append(event)
        elif isinstance(event, NotifyReceived):
            run.notifies += 1
            for message in event.messages:
                assert isinstance(message.name, str)
                assert len(message.args) <= MAX_LIST_ITEMS
            if answer and not run.conn.closed:
                run.conn.send_ack(
                    event.stream_id,
                    event.frame_id,
                    [SetVar(Scope.TXN, "status", 401)],
                )
        else:
            assert isinstance(event, HelloReceived | DisconnectReceived), event


def _check_buffer_bound(conn: AgentConnection, max_frame_size: int) -> None:
    # Input is held for at most one incomplete frame: its 4-byte length plus the body.
    buffered = len(conn._inbuf)  # white-box on purpose: this is the memory bound
    assert buffered <= 4 + max_frame_size


def _check_output(run: Run, max_frame_size: int) -> None:
    for frame in split_frames(bytes(run.output)):
        assert frame.header.type in (
            FrameType.AGENT_HELLO,
            FrameType.AGENT_DISCONNECT,
            FrameType.ACK,
        )
    raw = bytes(run.output)
    pos = 0
    while pos < len(raw):
        length = int.from_bytes(raw[pos : pos + 4], "big")
        assert length <= max_frame_size
        pos += 4 + length


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return [piece for piece in pieces if piece]


# --- strategies -----------------------------------------------------------------------------

values: st.SearchStrategy[Value] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.builds(IPv4Address, st.integers(0, 2**32 - 1)),
    st.builds(IPv6Address, st.integers(0, 2**128 - 1)),
)
names = st.text(max_size=12)
messages = st.builds(
    Message,
    names,
    st.lists(st.tuples(names, values), max_size=MAX_LIST_ITEMS + 2).map(tuple),
)
small_ids = st.integers(0, 3)
any_ids = st.integers(0, 2**64 - 1)


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """One frame-ish thing: well formed, mutated, truncated, or of an odd type."""
    kind = draw(st.sampled_from(["notify", "notify", "mutated", "raw", "disconnect", "hello"]))
    if kind == "notify":
        ids = draw(st.sampled_from([small_ids, any_ids]))
        return notify(draw(ids), draw(ids), draw(st.lists(messages, max_size=3)))
    if kind == "disconnect":
        payload = encode_kv_list([("status-code", draw(values)), ("message", draw(values))])
        return _build_frame(FrameType.HAPROXY_DISCONNECT, 0, 0, payload)
    if kind == "hello":
        return hello(**{"max-frame-size": draw(values)})
    if kind == "raw":
        frame_type = draw(st.integers(0, 255))
        flags = draw(st.integers(0, 2**32 - 1))
        payload = draw(st.binary(max_size=64))
        return _build_frame(frame_type, draw(any_ids), draw(any_ids), payload, flags=flags)
    base = bytearray(
        notify(draw(small_ids), draw(small_ids), draw(st.lists(messages, min_size=1, max_size=2)))
    )
    for _ in range(draw(st.integers(1, 4))):
        index = draw(st.integers(0, len(base) - 1))
        base[index] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        base = base[: draw(st.integers(0, len(base)))]
    return bytes(base)


@st.composite
def hello_items(draw: st.DrawFn) -> bytes:
    """A HELLO whose items are arbitrary: missing, mistyped, odd versions and sizes."""
    items = draw(
        st.dictionaries(
            st.sampled_from(
                ["supported-versions", "max-frame-size", "capabilities", "healthcheck", "x"]
            ),
            st.one_of(
                values,
                st.sampled_from(["2.0", "2.0,1.0", " 2.0 ", "3.0", "02.00", "2.", ".0"]),
                st.integers(0, 2**32),
            ),
        )
    )
    return _build_frame(FrameType.HAPROXY_HELLO, 0, 0, encode_kv_list(items.items()))


cuts = st.lists(st.integers(0, 10_000), max_size=8)
ticks = st.lists(st.floats(0, 40, allow_nan=False), max_size=6)


# --- properties -----------------------------------------------------------------------------


@pytest.mark.timeout(120)
@FUZZ_SETTINGS
@given(data=st.binary(max_size=2048), cut_points=cuts)
def test_random_bytes_never_escape(data: bytes, cut_points: list[int]) -> None:
    drive(split_at(data, cut_points))


@pytest.mark.timeout(120)
@FUZZ_SETTINGS
@given(data=st.binary(max_size=512), cut_points=cuts, timer=ticks)
def test_random_bytes_after_hello(data: bytes, cut_points: list[int], timer: list[float]) -> None:
    run = drive(split_at(hello() + data, cut_points), ticks=timer)
    # The valid HELLO is answered first whatever follows, unless it came in too slowly.
    if run.closes[0].status is not Status.TIMEOUT:
        assert split_frames(bytes(run.output))[0].header.type == FrameType.AGENT_HELLO


@pytest.mark.timeout(120)
@FUZZ_SETTINGS
@given(first=hello_items(), rest=st.lists(frames(), max_size=4), cut_points=cuts)
def test_hostile_hello(first: bytes, rest: list[bytes], cut_points: list[int]) -> None:
    drive(split_at(first + b"".join(rest), cut_points))


@pytest.mark.timeout(120)
@FUZZ_SETTINGS
@given(
    stream=st.lists(frames(), max_size=12),
    cut_points=cuts,
    timer=ticks,
    answer=st.booleans(),
)
def test_frame_sequences(
    stream: list[bytes], cut_points: list[int], timer: list[float], answer: bool
) -> None:
    run = drive(split_at(hello() + b"".join(stream), cut_points), ticks=timer, answer=answer)
    if not answer:
        # Unanswered NOTIFYs beyond the bound end the connection with status 13.
        assert run.notifies <= MAX_INFLIGHT


@pytest.mark.timeout(60)
@FUZZ_SETTINGS
@given(
    declared=st.integers(0, 2**32 - 1),
    body=st.binary(max_size=64),
)
def test_declared_length_decides_before_buffering(declared: int, body: bytes) -> None:
    """A frame announcing more than the limit is refused from its 4-byte length alone."""
    run = drive([hello(), declared.to_bytes(4, "big"), body])
    if declared > MAX_FRAME_SIZE:
        assert run.closes[0].status is Status.FRAME_TOO_BIG


# --- regressions from the crasher corpus ----------------------------------------------------


def corpus() -> list[Path]:
    return sorted(path for path in CRASHERS.glob("*.bin"))


def test_corpus_is_present() -> None:
    assert corpus(), f"no regression inputs in {CRASHERS}"


@pytest.mark.parametrize("path", corpus(), ids=lambda p: p.name)
def test_crasher_corpus_replays_cleanly(path: Path) -> None:
    data = path.read_bytes()
    drive([data])
    drive([data[i : i + 1] for i in range(len(data))])  # and one byte at a time
    drive([hello(), data])


# --- bounded memory -------------------------------------------------------------------------


def test_notify_ack_cycles_do_not_grow_memory() -> None:
    """Ten thousand NOTIFY/ACK rounds on one connection: no per-frame residue."""
    conn = AgentConnection(max_frame_size=16380, now=0.0)
    conn.receive_data(hello(), 0.0)
    conn.data_to_send()
    message = [Message("check-jwt", (("authorization", "Bearer abc"), ("path", "/x")))]
    frames_in = [notify(1, frame_id % 200, message) for frame_id in range(200)]

    def rounds(count: int) -> None:
        for index in range(count):
            for event in conn.receive_data(frames_in[index % 200], 1.0):
                assert isinstance(event, NotifyReceived)
                conn.send_ack(event.stream_id, event.frame_id, [SetVar(Scope.TXN, "ok", True)])
            conn.data_to_send()

    rounds(2_000)  # warm up allocator caches
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        rounds(10_000)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert not conn.closed
    assert after - before < 64 * 1024, f"grew by {after - before} bytes"


def test_large_varint_ids_are_bounded() -> None:
    """Ids beyond 64 bits are a malformed varint, not a big integer."""
    overlong = b"\xff" * 11
    body = bytes((FrameType.NOTIFY,)) + b"\x00\x00\x00\x01" + overlong + encode_varint(1)
    run = drive([hello(), len(body).to_bytes(4, "big") + body])
    assert run.closes[0].status is Status.INVALID_FRAME
