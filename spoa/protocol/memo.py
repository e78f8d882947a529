"""Remembered answers, replayed for repeated NOTIFYs without running a handler.

The caller (the glue) remembers the actions it answered for a message, keyed by the
exact values of the message's *key arguments*, with the wall-clock window in which that
answer stays the same. A later NOTIFY holding one message of that name, whose key
arguments encode to a remembered key, is then acknowledged at once with those actions
while `valid_from <= now < valid_until`. An optional countdown variable is recomputed at
each replay: `max(0, int(countdown_to - now))`, as an INT64 set-var appended last.

Nothing here decides what an answer means. The caller promises that its answer depends
only on the key arguments and the clock within the window, and clears the memo whenever
anything else it depends on changes (keys, configuration). `epoch` guards the race of an
answer computed before a clear and remembered after it.

Replay takes whole, plain NOTIFY frames from where the scan starts: type NOTIFY, flags
exactly FIN, valid ids not in flight, exactly one message, every byte well-formed, key
arguments NULL, STRING or BINARY and not repeated, the ACK within the frame limit. At the
first frame that is anything else, it stops; the connection's normal path handles that
frame and scans again after it. A replayed NOTIFY is acknowledged at once, so it is never
in flight, and the ids of one may come again in the next (as after any ACK).
`answer_frames` is the C scanner in `_speedups` when it was built; `answer_frames_python`
is the reference it is tested against.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import NamedTuple

from .actions import Scope, _action_head
from .errors import SpopError
from .frames import FIN_FLAGS, LENGTH_SIZE, MIN_FRAME_BODY, FrameType, build_ack
from .payloads import SPEEDUPS, Message, decode_messages_python
from .types import encode_value
from .varint import Buffer, decode_varint

# The key part of a key argument the message does not carry. No typed data starts with
# 0xFF (type 15 is reserved), so it cannot collide with an encoded value.
ABSENT = b"\xff"
DEFAULT_MEMO_ENTRIES = 4096
# While remembered answers are evicted before they are replayed, one candidate in this
# many is remembered (see AnswerMemo.admit).
ADMISSION_SAMPLE = 16
MAX_KEY_ARGS = 8  # what the C scanner handles

_NOTIFY = FrameType.NOTIFY.value
_COUNTDOWN_LIMIT = 2.0**63


class MemoEntry(NamedTuple):
    """One remembered answer. `tag` is handed back with every replay (for counting)."""

    payload: bytes
    valid_from: float
    valid_until: float
    countdown_to: float | None
    tag: Hashable


Table = dict[bytes, MemoEntry]


def key_part(value: object) -> bytes | None:
    """The canonical encoding of one key argument's value; None for a type that is not
    keyed (anything but NULL, STRING and BINARY)."""
    if value is None or type(value) is str or type(value) is bytes:
        return encode_value(value)
    return None


def countdown_tail(head: bytes, countdown_to: float, now: float) -> bytes:
    return head + encode_value(max(0, int(countdown_to - now)))  # INT64 below 2**63


def answer_frames_python(
    buf: Buffer,
    pos: int,
    end: int,
    frame_limit: int,
    max_items: int,
    message_name: bytes,
    key_names: tuple[bytes, ...],
    table: Table,
    now: float,
    countdown_head: bytes,
    inflight: Mapping[tuple[int, int], bytes],
) -> tuple[int, bytes, list[Hashable]]:
    """Replay answers for the NOTIFYs at buf[pos:end], up to the first that cannot be.

    Returns (position after the last replayed frame, their ACK frames, their tags). The
    reference: it decodes each message with the Python decoder and keys it by value."""
    acks: list[bytes] = []
    tags: list[Hashable] = []
    name = message_name.decode("utf-8", "surrogateescape")
    wanted = [key.decode("utf-8", "surrogateescape") for key in key_names]
    while end - pos >= 4:
        length = int.from_bytes(buf[pos : pos + 4], "big")
        start, stop = pos + 4, pos + 4 + length
        if length > frame_limit or stop > end or length < MIN_FRAME_BODY:
            break
        if buf[start] != _NOTIFY or bytes(buf[start + 1 : start + 5]) != FIN_FLAGS:
            break
        try:
            stream_id, body = decode_varint(buf, start + 5, stop)
            frame_id, body = decode_varint(buf, body, stop)
            messages = decode_messages_python(buf, body, stop, max_items)
        except SpopError:
            break
        if (stream_id, frame_id) in inflight:
            break
        if len(messages) != 1 or messages[0].name != name:
            break
        key = key_of(messages[0], wanted)
        entry = table.get(key) if key is not None else None
        if entry is None or not entry.valid_from <= now < entry.valid_until:
            break
        payload = entry.payload
        if entry.countdown_to is not None:
            if not entry.countdown_to - now < _COUNTDOWN_LIMIT:
                break
            payload += countdown_tail(countdown_head, entry.countdown_to, now)
        ack = build_ack(bytes(buf[start + 5 : body]), payload)
        if len(ack) - LENGTH_SIZE > frame_limit:
            break
        acks.append(ack)
        tags.append(entry.tag)
        pos = stop
    return pos, b"".join(acks), tags


def key_of(message: Message, key_names: Sequence[str]) -> bytes | None:
    """The memo key of a message: its key arguments' values, encoded, in order. None when
    a key argument repeats or has a type that is not keyed."""
    parts: list[bytes] = []
    for wanted in key_names:
        found: bytes | None = None
        for arg_name, value in message.args:
            if arg_name != wanted:
                continue
            if found is not None:
                return None
            found = key_part(value)
            if found is None:
                return None
        parts.append(ABSENT if found is None else found)
    return b"".join(parts)


AnswerFrames = Callable[
    [
        Buffer,
        int,
        int,
        int,
        int,
        bytes,
        tuple[bytes, ...],
        Table,
        float,
        bytes,
        dict[tuple[int, int], bytes],
    ],
    tuple[int, bytes, list[Hashable]],
]


def _c_scanner() -> AnswerFrames | None:
    """The C scanner, when payloads found the extension built and allowed (SPEEDUPS)."""
    if not SPEEDUPS:
        return None
    from ._speedups import answer_frames as scanner

    return scanner


answer_frames: AnswerFrames = _c_scanner() or answer_frames_python


class AnswerMemo:
    """Answers remembered for one message name, keyed by some of its arguments.

    `clock` is the wall clock the windows are on. At most `max_entries` are kept; the
    oldest goes first. Disabled, it remembers and replays nothing.

    Remembering has a cost, wasted when more answers are in use than the memo holds:
    each is evicted before its next use. So after every `max_entries` answers remembered,
    the memo compares them with the replays they earned in that time; when there were
    fewer replays, `admit` takes only one candidate in ADMISSION_SAMPLE until a window
    pays again. This decides only which answers are kept, never what an answer is."""

    def __init__(
        self,
        message_name: str,
        key_args: Sequence[str],
        *,
        clock: Callable[[], float],
        countdown_var: tuple[Scope, str] | None = None,
        max_entries: int = DEFAULT_MEMO_ENTRIES,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be positive")
        self._use_key_args(key_args)
        self.message_name = message_name
        self.clock = clock
        self.max_entries = max_entries
        self.enabled = True
        self.epoch = 0
        self.replayed = 0  # answers replayed, in total
        # An OrderedDict (a dict to the C scanner) so the oldest entry goes in O(1):
        # deleting from the front of a plain dict leaves holes each `next(iter())` walks.
        self.table: OrderedDict[bytes, MemoEntry] = OrderedDict()
        self._sample = 1  # admit one candidate in this many
        self._offered = 0
        self._window_kept = 0
        self._window_start = 0  # `replayed` when the window began
        self._name = message_name.encode("utf-8", "surrogateescape")
        self._countdown_head = b""
        if countdown_var is not None:
            scope, name = countdown_var
            self._countdown_head = _action_head(1, scope, name)

    def key_for(self, message: Message) -> bytes | None:
        if message.name != self.message_name:
            return None
        return key_of(message, self.key_args)

    def admit(self) -> bool:
        """Whether to remember the next answer: ask once per candidate, before building
        it. False while disabled, and for all but a sample while the memo churns."""
        if not self.enabled:
            return False
        self._offered += 1
        return self._offered % self._sample == 0

    def remember(
        self,
        key: bytes,
        payload: bytes,
        *,
        valid_from: float,
        valid_until: float,
        countdown_to: float | None,
        tag: Hashable,
        epoch: int,
    ) -> bool:
        """Remember an answer; False (and nothing kept) when the memo was cleared since
        `epoch` was read, when it is disabled, when the window is empty or the countdown is
        not finite."""
        if not self.enabled or epoch != self.epoch:
            return False
        # NaN compares false, so it fails here too; -inf..inf is a valid open window.
        if not valid_from < valid_until:
            return False
        if countdown_to is not None and not math.isfinite(countdown_to):
            return False
        if countdown_to is not None and not self._countdown_head:
            raise ValueError("this memo has no countdown variable")
        table = self.table
        table.pop(key, None)  # re-inserted at the end: the oldest stays first
        while len(table) >= self.max_entries:
            table.popitem(last=False)
        countdown = None if countdown_to is None else float(countdown_to)
        table[key] = MemoEntry(payload, float(valid_from), float(valid_until), countdown, tag)
        self._window_kept += 1
        if self._window_kept >= self.max_entries:
            earned = self.replayed - self._window_start
            self._sample = ADMISSION_SAMPLE if earned < self._window_kept else 1
            self._window_kept = 0
            self._window_start = self.replayed
        return True

    def rekey(self, key_args: Sequence[str]) -> None:
        """Key by other arguments from now on (a reload); forgets every answer."""
        self._use_key_args(key_args)
        self.clear()

    def _use_key_args(self, key_args: Sequence[str]) -> None:
        if not 1 <= len(key_args) <= MAX_KEY_ARGS:
            raise ValueError(f"an answer memo is keyed by 1 to {MAX_KEY_ARGS} arguments")
        self.key_args = tuple(key_args)
        self._key_names = tuple(key.encode("utf-8", "surrogateescape") for key in key_args)

    def clear(self) -> None:
        """Forget every answer; answers computed before now will not be remembered."""
        self.epoch += 1
        self.table.clear()

    def answer(
        self,
        buf: Buffer,
        pos: int,
        end: int,
        frame_limit: int,
        max_items: int,
        inflight: dict[tuple[int, int], bytes],
    ) -> tuple[int, bytes, list[Hashable]]:
        """Replay what can be replayed at buf[pos:end] (see `answer_frames`); a NOTIFY with
        the ids of one in `inflight` stops it."""
        if not self.table or not self.enabled:
            return pos, b"", []
        result = answer_frames(
            buf,
            pos,
            end,
            frame_limit,
            max_items,
            self._name,
            self._key_names,
            self.table,
            float(self.clock()),
            self._countdown_head,
            inflight,
        )
        self.replayed += len(result[2])
        return result
