"""SPOP frames: a 4-byte big-endian length, then TYPE:u8, FLAGS:u32 BE,
STREAM-ID and FRAME-ID varints, then the payload.

Frames are always built whole so the caller can write each one with a single
write (HAProxy 3.2+ may reset a connection whose AGENT-HELLO arrives split).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, IntFlag

from .errors import InvalidFrame
from .varint import Buffer, decode_varint, encode_varint

LENGTH_SIZE = 4
# TYPE + FLAGS + two one-byte varints: the shortest possible frame body.
MIN_FRAME_BODY = 7
MIN_MAX_FRAME_SIZE = 256
DEFAULT_MAX_FRAME_SIZE = 16380


class FrameType(IntEnum):
    UNSET = 0
    HAPROXY_HELLO = 1
    HAPROXY_DISCONNECT = 2
    NOTIFY = 3
    AGENT_HELLO = 101
    AGENT_DISCONNECT = 102
    ACK = 103


class FrameFlags(IntFlag):
    NONE = 0
    FIN = 1
    ABORT = 2


@dataclass(frozen=True, slots=True)
class FrameHeader:
    type: int
    flags: int
    stream_id: int
    frame_id: int


@dataclass(frozen=True, slots=True)
class Frame:
    """A decoded frame: its header and raw payload (used by tests and tools)."""

    header: FrameHeader
    payload: bytes


# FLAGS with FIN alone, as every frame is sent and as HAProxy sends every NOTIFY.
FIN_FLAGS = b"\x00\x00\x00\x01"
# An ACK body starts with its type and those flags.
_ACK_HEAD = bytes((FrameType.ACK.value,)) + FIN_FLAGS


def build_ack(ids: bytes, payload: bytes) -> bytes:
    """An ACK frame: `ids` are the NOTIFY's STREAM-ID and FRAME-ID varints as they came."""
    return (5 + len(ids) + len(payload)).to_bytes(4, "big") + _ACK_HEAD + ids + payload


def build_frame(
    frame_type: int,
    stream_id: int,
    frame_id: int,
    payload: bytes,
    flags: int = FrameFlags.FIN,
) -> bytes:
    """One complete frame, length prefix included."""
    flag_bytes = FIN_FLAGS if flags == FrameFlags.FIN else int(flags).to_bytes(4, "big")
    body_head = (
        bytes((frame_type,)) + flag_bytes + encode_varint(stream_id) + encode_varint(frame_id)
    )
    return (len(body_head) + len(payload)).to_bytes(4, "big") + body_head + payload


def parse_header(buf: Buffer, pos: int, end: int) -> tuple[FrameHeader, int]:
    """Parse the frame header in body buf[pos:end]; return it and the payload offset."""
    if end - pos < MIN_FRAME_BODY:
        raise InvalidFrame("frame shorter than its header")
    frame_type = buf[pos]
    flags = int.from_bytes(buf[pos + 1 : pos + 5], "big")
    pos += 5
    stream_id, pos = decode_varint(buf, pos, end)
    frame_id, pos = decode_varint(buf, pos, end)
    return FrameHeader(frame_type, flags, stream_id, frame_id), pos


def split_frames(data: bytes) -> list[Frame]:
    """Split a byte string made of whole frames (a test and tooling helper)."""
    frames = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < LENGTH_SIZE:
            raise InvalidFrame("truncated length prefix")
        length = int.from_bytes(data[pos : pos + LENGTH_SIZE], "big")
        start = pos + LENGTH_SIZE
        end = start + length
        if end > len(data):
            raise InvalidFrame("truncated frame")
        header, payload_at = parse_header(data, start, end)
        frames.append(Frame(header, data[payload_at:end]))
        pos = end
    return frames
