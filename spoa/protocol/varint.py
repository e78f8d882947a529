"""The SPOP varint: HAProxy's "peers" encoding of an unsigned 64-bit integer.

Values below 240 take one byte; larger ones put the low 4 bits in a first byte
>= 0xF0 and 7 bits per following byte, each continuation byte >= 0x80 and
carrying an offset that decoding cancels by adding whole bytes.
"""

from __future__ import annotations

from .errors import InvalidFrame, InvalidValue

MAX_UINT64 = (1 << 64) - 1
MAX_VARINT_BYTES = 10

_ONE_BYTE = tuple(bytes((value,)) for value in range(240))

Buffer = bytes | bytearray


def encode_varint(value: int) -> bytes:
    """Encode 0 <= value < 2**64."""
    if 0 <= value < 240:
        return _ONE_BYTE[value]
    if value < 0 or value > MAX_UINT64:
        raise InvalidValue("varint out of the unsigned 64-bit range")
    out = bytearray(((value & 0xFF) | 0xF0,))
    value = (value - 240) >> 4
    while value >= 128:
        out.append((value & 0xFF) | 0x80)
        value = (value - 128) >> 7
    out.append(value)
    return bytes(out)


def decode_varint(buf: Buffer, pos: int, end: int) -> tuple[int, int]:
    """Decode the varint at buf[pos:end]; return (value, position after it).

    Raises InvalidFrame when the input stops mid-varint or runs past 10 bytes.
    """
    if pos >= end:
        raise InvalidFrame("truncated varint")
    value = buf[pos]
    pos += 1
    if value < 240:
        return value, pos
    shift = 4
    limit = min(end, pos + MAX_VARINT_BYTES - 1)
    while pos < limit:
        byte = buf[pos]
        pos += 1
        value += byte << shift
        if byte < 128:
            return value & MAX_UINT64, pos
        shift += 7
    if limit < end:
        raise InvalidFrame("varint longer than 10 bytes")
    raise InvalidFrame("truncated varint")
