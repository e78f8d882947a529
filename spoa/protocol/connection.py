"""The agent side of one SPOP connection, as a sans-I/O state machine.

Bytes go in through `receive_data`, events come out; answers are queued as
whole frames and drained with `data_to_send`. The caller passes the time in
and arms a timer for `next_deadline()`. A protocol violation never raises out
of `receive_data`: it queues AGENT-DISCONNECT with the matching status, reports
`ConnectionClosed`, and all later input is ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

from .actions import Action, encode_actions
from .errors import (
    BadMaxFrameSize,
    CapabilitiesMissing,
    FragmentationNotSupported,
    FrameIdNotFound,
    FrameTooBig,
    InvalidFrame,
    InvalidInterlacedFrames,
    MaxFrameSizeMissing,
    ResourceLimit,
    SpopError,
    Status,
    UnsupportedVersion,
    VersionMissing,
)
from .events import (
    AnswersReplayed,
    ConnectionClosed,
    DisconnectReceived,
    Event,
    HelloReceived,
    NotifyReceived,
)
from .frames import (
    DEFAULT_MAX_FRAME_SIZE,
    LENGTH_SIZE,
    MIN_FRAME_BODY,
    MIN_MAX_FRAME_SIZE,
    FrameFlags,
    FrameType,
    build_ack,
    build_frame,
)
from .memo import AnswerMemo
from .payloads import decode_kv_list, decode_messages, encode_kv_list
from .types import Value, encode_string
from .varint import decode_varint, encode_varint

SPOP_VERSION = "2.0"
AGENT_CAPABILITIES = "pipelining"
MAX_FRAME_SIZE_LIMIT = 0xFFFFFFFF

DEFAULT_MAX_LIST_ITEMS = 256
DEFAULT_MAX_INFLIGHT = 20
DEFAULT_HELLO_TIMEOUT = 10.0
DEFAULT_IDLE_TIMEOUT = 300.0
DEFAULT_FRAME_TIMEOUT = 5.0

_NOTIFY = FrameType.NOTIFY.value
_HAPROXY_HELLO = FrameType.HAPROXY_HELLO.value
_HAPROXY_DISCONNECT = FrameType.HAPROXY_DISCONNECT.value
_FIN = FrameFlags.FIN.value  # in the last byte of FLAGS
_KNOWN_FRAME_TYPES = frozenset(frame_type.value for frame_type in FrameType)


class _State(Enum):
    AWAIT_HELLO = "await-hello"
    READY = "ready"
    DRAINING = "draining"  # HAProxy closed its side; NOTIFYs in flight still get ACKs
    CLOSED = "closed"


def build_disconnect(status: Status | int, message: str) -> bytes:
    """A whole AGENT-DISCONNECT frame (status-code is sent as UINT32)."""
    payload = (
        encode_string("status-code")
        + b"\x03"
        + encode_varint(int(status))
        + encode_kv_list((("message", message),))
    )
    return build_frame(FrameType.AGENT_DISCONNECT, 0, 0, payload)


def build_agent_hello(max_frame_size: int, capabilities: str = AGENT_CAPABILITIES) -> bytes:
    """A whole AGENT-HELLO frame (max-frame-size is sent as UINT32)."""
    payload = (
        encode_kv_list((("version", SPOP_VERSION),))
        + encode_string("max-frame-size")
        + b"\x03"
        + encode_varint(max_frame_size)
        + encode_kv_list((("capabilities", capabilities),))
    )
    return build_frame(FrameType.AGENT_HELLO, 0, 0, payload)


# What HAProxy's own list parser skips around items (C isspace(), in the C locale).
_LIST_SPACE = " \t\n\v\f\r"


def _split_list(text: str) -> tuple[str, ...]:
    """SPOP comma lists ignore white space around their items (SPOE.txt 3.2.4)."""
    return tuple(item for item in (part.strip(_LIST_SPACE) for part in text.split(",")) if item)


def _offers_version_2_0(text: str) -> bool:
    """True for "2.N": announcing a minor version of major 2 means every earlier one of it
    too (SPOE.txt 3.2.4), so "2.1" offers the 2.0 we speak."""
    major, _, minor = text.partition(".")
    # ASCII digits only: str.isdigit() also takes "²", which int() then refuses (an
    # exception escaping the codec, no DISCONNECT); the minor is never converted.
    return major == "2" and minor.isascii() and minor.isdigit()


class AgentConnection:
    """One HAProxy-to-agent connection, from the agent's side.

    Limits: `max_frame_size` is what we accept and announce (HAProxy's own
    default is 16380; the reply is min(ours, HAProxy's), and before HELLO it
    caps the first frame); `max_list_items` bounds each KV list, message list
    and argument list; `max_inflight` bounds NOTIFYs awaiting an ACK and must
    be at least HAProxy's `max-waiting-frames` (20 by default).
    `hello_timeout` (seconds) closes a connection whose HELLO never comes,
    counted from `now` (or from the first `receive_data` when `now` is None);
    `idle_timeout` closes a connection with nothing in flight and no input for
    that long; keep it above HAProxy's `timeout idle` / `timeout server`.
    `frame_timeout` closes a connection whose started frame is not complete
    within that long, so a peer cannot hold one open by trickling bytes.
    `answer_memo`, when given, acknowledges repeated NOTIFYs from remembered answers
    (reported as `AnswersReplayed`) at every frame boundary once HELLO is done.
    """

    def __init__(
        self,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_list_items: int = DEFAULT_MAX_LIST_ITEMS,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        hello_timeout: float = DEFAULT_HELLO_TIMEOUT,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
        frame_timeout: float = DEFAULT_FRAME_TIMEOUT,
        now: float | None = None,
        answer_memo: AnswerMemo | None = None,
    ) -> None:
        if not MIN_MAX_FRAME_SIZE <= max_frame_size <= MAX_FRAME_SIZE_LIMIT:
            raise ValueError("max_frame_size must be within [256, 2**32-1]")
        if max_list_items < 1 or max_inflight < 1:
            raise ValueError("max_list_items and max_inflight must be positive")
        if (
            hello_timeout <= 0
            or frame_timeout <= 0
            or (idle_timeout is not None and idle_timeout <= 0)
        ):
            raise ValueError("timeouts must be positive")
        self._max_frame_size = max_frame_size
        self._max_list_items = max_list_items
        self._max_inflight = max_inflight
        self._hello_timeout = hello_timeout
        self._idle_timeout = idle_timeout
        self._frame_timeout = frame_timeout
        self._partial_since: float | None = None  # when the incomplete frame started
        self._input_paused = False  # the caller stopped reading: the frame clock stops
        self._state = _State.AWAIT_HELLO
        self._frame_limit = max_frame_size
        self._negotiated_max_frame_size: int | None = None
        self._pipelining = False
        self._inbuf = bytearray()
        self._outbox: list[bytes] = []
        self._events: list[Event] = []
        # In-flight NOTIFYs: (stream-id, frame-id) -> the two varints as they came, which
        # the ACK repeats byte for byte.
        self._inflight: dict[tuple[int, int], bytes] = {}
        self._hello_deadline = None if now is None else now + hello_timeout
        self._last_input = now
        self._close_status: Status | None = None
        self._drain_deadline: float | None = None
        self._memo = answer_memo

    # -- state -------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._state is _State.CLOSED

    @property
    def draining(self) -> bool:
        """HAProxy closed its side with NOTIFYs in flight: their ACKs may still be sent,
        and the last one closes the connection."""
        return self._state is _State.DRAINING

    @property
    def close_status(self) -> Status | None:
        """The status of the DISCONNECT that ended the connection, sent or received; None
        while open, or when the peer closed without one."""
        return self._close_status

    @property
    def inflight(self) -> int:
        """NOTIFYs received and not yet acknowledged."""
        return len(self._inflight)

    @property
    def negotiated_max_frame_size(self) -> int | None:
        return self._negotiated_max_frame_size

    @property
    def pipelining(self) -> bool:
        """HAProxy listed pipelining, so several NOTIFYs may be in flight."""
        return self._pipelining

    # -- input -------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        """Feed bytes from HAProxy; b"" means the peer closed its side. Then the NOTIFYs
        still in flight may be acknowledged (`draining`); the last ACK closes."""
        if self._state is _State.CLOSED or self._state is _State.DRAINING:
            return self._take_events()  # no input after the end
        self._last_input = now
        if self._hello_deadline is None:
            self._hello_deadline = now + self._hello_timeout
        if not data:
            if self._state is _State.READY and self._inflight and not self._inbuf:
                # Every NOTIFY gets its ACK (SPOE.txt 3.2.6), even after a half-close;
                # within frame_timeout, so that a stuck handler cannot hold it for good.
                self._state = _State.DRAINING
                self._drain_deadline = now + self._frame_timeout
                return self._take_events()
            message = "peer closed mid-frame" if self._inbuf else "peer closed"
            self._close(Status.NORMAL, message, disconnected=False)
            return self._take_events()
        try:
            completed = self._consume(data)
        except SpopError as error:
            self._fail(error)
            return self._take_events()
        if not self._inbuf:
            self._partial_since = None
        elif completed or self._partial_since is None:
            self._partial_since = now  # a new frame started in this read
        return self._take_events()

    def _consume(self, data: bytes) -> bool:
        """Handle every whole frame in the input; True when at least one was."""
        inbuf = self._inbuf
        if inbuf:
            inbuf += data
            buf: bytes | bytearray = inbuf
        else:
            buf = data
        size = len(buf)
        pos = 0
        memo = self._memo
        if memo is not None and not (memo.enabled and memo.table):
            memo = None  # nothing to replay in this read
        while size - pos >= 4:
            if memo is not None and self._state is _State.READY:
                # Replayed NOTIFYs are acknowledged here and never in flight.
                end, acks, tags = memo.answer(
                    buf, pos, size, self._frame_limit, self._max_list_items, self._inflight
                )
                if tags:
                    self._outbox.append(acks)
                    self._events.append(AnswersReplayed(tags))
                    pos = end
                    if size - pos < 4:
                        break
            length = int.from_bytes(buf[pos : pos + 4], "big")
            # Decided from the length alone, before any of the body is buffered.
            if length > self._frame_limit:
                raise FrameTooBig("frame longer than the negotiated max-frame-size")
            end = pos + 4 + length
            if end > size:
                break
            self._handle_frame(buf, pos + 4, end)
            pos = end
            if self._state is _State.CLOSED:
                return True
        if buf is inbuf:
            del inbuf[:pos]
        elif pos < size:
            self._inbuf = bytearray(buf[pos:])
        return pos > 0

    def _handle_frame(self, buf: bytes | bytearray, start: int, end: int) -> None:
        if end - start < MIN_FRAME_BODY:
            raise InvalidFrame("frame shorter than its header")
        frame_type = buf[start]
        if not buf[start + 4] & _FIN and frame_type in _KNOWN_FRAME_TYPES:
            # An unknown type is skipped below whatever its flags, as HAProxy does.
            raise FragmentationNotSupported("fragmented frame (FIN not set)")
        ids_start = pos = start + 5
        stream_id = buf[pos]
        if stream_id < 240:
            pos += 1
        elif pos + 1 < end and buf[pos + 1] < 128:  # HAProxy's stream ids soon take two bytes
            stream_id += buf[pos + 1] << 4
            pos += 2
        else:
            stream_id, pos = decode_varint(buf, pos, end)
        frame_id = buf[pos] if pos < end else 0
        if pos < end and frame_id < 240:
            pos += 1
        else:
            frame_id, pos = decode_varint(buf, pos, end)

        state = self._state
        if frame_type == _NOTIFY and state is _State.READY:
            key = (stream_id, frame_id)
            inflight = self._inflight
            if key in inflight:
                raise InvalidInterlacedFrames("NOTIFY ids already in flight")
            if len(inflight) >= self._max_inflight:
                raise ResourceLimit("too many NOTIFY frames in flight")
            messages = decode_messages(buf, pos, end, self._max_list_items)
            inflight[key] = bytes(buf[ids_start:pos])
            self._events.append(NotifyReceived(stream_id, frame_id, messages))
        elif frame_type == _HAPROXY_HELLO:
            if state is not _State.AWAIT_HELLO:
                raise InvalidFrame("second HELLO")
            if stream_id or frame_id:
                raise InvalidFrame("HELLO with a stream-id or frame-id other than 0")
            self._handle_hello(buf, pos, end)
        elif frame_type == _HAPROXY_DISCONNECT:
            if stream_id or frame_id:
                # As for HELLO (SPOE.txt 3.2.8); HAProxy's own peers refuse such a frame.
                raise InvalidFrame("DISCONNECT with a stream-id or frame-id other than 0")
            self._handle_disconnect(buf, pos, end)
        elif state is _State.AWAIT_HELLO:
            raise InvalidFrame("first frame is not HAPROXY-HELLO")
        elif frame_type == FrameType.UNSET:
            raise FragmentationNotSupported("fragment continuation frame")
        elif frame_type in (FrameType.AGENT_HELLO, FrameType.AGENT_DISCONNECT, FrameType.ACK):
            raise InvalidFrame("agent frame type sent by HAProxy")
        # Any other type is unknown: skipped whole, framing stays intact.

    def _handle_hello(self, buf: bytes | bytearray, pos: int, end: int) -> None:
        items: dict[str, Value] = {}
        for name, value in decode_kv_list(buf, pos, end, self._max_list_items):
            items.setdefault(name, value)
        versions_text = items.get("supported-versions")
        if not isinstance(versions_text, str):
            raise VersionMissing("HELLO without supported-versions")
        versions = _split_list(versions_text)
        if not any(_offers_version_2_0(version) for version in versions):
            raise UnsupportedVersion("HAProxy does not offer SPOP 2.0")
        their_max = items.get("max-frame-size")
        if not isinstance(their_max, int) or isinstance(their_max, bool):
            raise MaxFrameSizeMissing("HELLO without max-frame-size")
        if their_max < MIN_MAX_FRAME_SIZE:
            raise BadMaxFrameSize("max-frame-size below 256")
        healthcheck = items.get("healthcheck") is True
        capabilities_text = items.get("capabilities")
        if capabilities_text is None:
            # Mandatory in every HELLO (SPOE.txt 3.2.4); HAProxy's health check sends it
            # empty.
            raise CapabilitiesMissing("HELLO without capabilities")
        if not isinstance(capabilities_text, str):
            # As for the other two items: a value of the wrong type is one not found.
            raise CapabilitiesMissing("capabilities is not a string")
        capabilities = frozenset(_split_list(capabilities_text))
        engine_id = items.get("engine-id")
        negotiated = min(self._max_frame_size, their_max)

        self._outbox.append(build_agent_hello(negotiated))
        self._negotiated_max_frame_size = negotiated
        self._frame_limit = negotiated
        self._pipelining = "pipelining" in capabilities
        self._events.append(
            HelloReceived(
                supported_versions=versions,
                max_frame_size=their_max,
                capabilities=capabilities,
                healthcheck=healthcheck,
                engine_id=engine_id if isinstance(engine_id, str) else None,
                negotiated_max_frame_size=negotiated,
            )
        )
        if healthcheck:
            # A health check ends after our HELLO; no DISCONNECT is needed.
            self._close(Status.NORMAL, "health check answered", disconnected=False)
        else:
            self._state = _State.READY

    def _handle_disconnect(self, buf: bytes | bytearray, pos: int, end: int) -> None:
        items: dict[str, Value] = {}
        for name, value in decode_kv_list(buf, pos, end, self._max_list_items):
            items.setdefault(name, value)
        code = items.get("status-code")
        status_code = code if isinstance(code, int) and not isinstance(code, bool) else 99
        text = items.get("message")
        message = text if isinstance(text, str) else ""
        self._events.append(DisconnectReceived(status_code, message))
        self._outbox.append(build_disconnect(Status.NORMAL, "bye"))
        self._close(Status.from_code(status_code), message or "HAProxy disconnected")

    # -- output ------------------------------------------------------------

    def send_ack(self, stream_id: int, frame_id: int, actions: Sequence[Action]) -> None:
        """Queue the ACK of an in-flight NOTIFY. Ignored once the connection is closed.

        Raises FrameIdNotFound for ids not in flight, InvalidValue for an action
        that cannot be encoded and FrameTooBig when the ACK would exceed the
        negotiated frame size; the NOTIFY then stays in flight.
        """
        if self._state is _State.CLOSED:
            return
        key = (stream_id, frame_id)
        ids = self._inflight.get(key)
        if ids is None:
            raise FrameIdNotFound("no NOTIFY in flight with these ids")
        frame = build_ack(ids, encode_actions(actions))
        if len(frame) - LENGTH_SIZE > (self._negotiated_max_frame_size or self._max_frame_size):
            raise FrameTooBig("ACK longer than the negotiated max-frame-size")
        del self._inflight[key]
        self._outbox.append(frame)
        if self._state is _State.DRAINING and not self._inflight:
            self._close(Status.NORMAL, "peer closed", disconnected=False)

    def send_disconnect(self, status: Status, message: str) -> None:
        """Queue AGENT-DISCONNECT and close. `ConnectionClosed` comes out of the
        next `receive_data` or `handle_timeout` call."""
        if self._state is _State.CLOSED:
            return
        self._outbox.append(build_disconnect(status, message))
        self._close(status, message)

    def data_to_send(self) -> bytes:
        """Drain the outbox: zero or more whole frames."""
        if not self._outbox:
            return b""
        data = b"".join(self._outbox)
        self._outbox.clear()
        return data

    # -- time --------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When `handle_timeout` should next be called, on the caller's clock."""
        if self._state is _State.AWAIT_HELLO:
            return self._hello_deadline
        if self._state is _State.DRAINING:
            return self._drain_deadline
        if self._state is not _State.READY:
            return None
        frame = self._frame_deadline()
        idle = self._idle_deadline()
        if frame is None or idle is None:
            return frame if idle is None else idle
        return min(frame, idle)

    def pause_input(self, paused: bool, now: float) -> None:
        """Say that the caller stopped (or resumed) reading, e.g. under write backpressure.
        A frame left incomplete by our own pause is not the peer trickling bytes: its
        clock stops while paused and starts again, in full, on resume."""
        self._input_paused = paused
        if not paused and self._partial_since is not None:
            self._partial_since = now

    def _frame_deadline(self) -> float | None:
        if self._partial_since is None or self._input_paused:
            return None
        return self._partial_since + self._frame_timeout

    def _idle_deadline(self) -> float | None:
        if self._inflight or self._idle_timeout is None or self._last_input is None:
            return None
        return self._last_input + self._idle_timeout

    def handle_timeout(self, now: float) -> list[Event]:
        if self._state is _State.AWAIT_HELLO:
            if self._hello_deadline is not None and now >= self._hello_deadline:
                self._outbox.append(build_disconnect(Status.TIMEOUT, "no HELLO in time"))
                self._close(Status.TIMEOUT, "no HELLO in time")
        elif self._state is _State.READY:
            frame = self._frame_deadline()
            idle = self._idle_deadline()
            if frame is not None and now >= frame:
                self._outbox.append(build_disconnect(Status.TIMEOUT, "frame not completed in time"))
                self._close(Status.TIMEOUT, "frame not completed in time")
            elif idle is not None and now >= idle:
                self._outbox.append(build_disconnect(Status.TIMEOUT, "idle timeout"))
                self._close(Status.TIMEOUT, "idle timeout")
        elif (
            self._state is _State.DRAINING
            and self._drain_deadline is not None
            and now >= self._drain_deadline
        ):
            self._close(Status.TIMEOUT, "answers not ready in time after the peer's end")
        return self._take_events()

    def connection_lost(self) -> list[Event]:
        """The transport is gone (reset, or closed after a half-close): close at once,
        with whatever is still in flight."""
        if self._state is not _State.CLOSED:
            self._close(Status.NORMAL, "peer closed", disconnected=False)
        return self._take_events()

    # -- internals ---------------------------------------------------------

    def _fail(self, error: SpopError) -> None:
        self._outbox.append(build_disconnect(error.status, error.message))
        self._close(error.status, error.message)

    def _close(self, status: Status, message: str, *, disconnected: bool = True) -> None:
        """`disconnected`: a DISCONNECT frame was sent or received."""
        self._state = _State.CLOSED
        self._close_status = status if disconnected else None
        self._inflight.clear()
        self._inbuf = bytearray()
        self._events.append(ConnectionClosed(status, message))

    def _take_events(self) -> list[Event]:
        events = self._events
        if not events:
            return []
        self._events = []
        return events
