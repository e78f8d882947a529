"""SPOP typed data: a type byte (type in the low nibble, flags in the high one)
followed by the value.

Python values map as: None -> NULL, bool -> BOOL, int -> INT64 (UINT64 for
2**63..2**64-1), str -> STRING (UTF-8, surrogateescape so any bytes round-trip),
bytes -> BINARY, IPv4Address -> IPV4, IPv6Address -> IPV6.
"""

from __future__ import annotations

from enum import IntEnum
from ipaddress import IPv4Address, IPv6Address

from .errors import InvalidFrame, InvalidValue
from .varint import MAX_UINT64, Buffer, decode_varint, encode_varint

Value = None | bool | int | str | bytes | IPv4Address | IPv6Address

_INT64_MIN = -(1 << 63)
_SIGN_BIT = 1 << 63
_TWO_TO_64 = 1 << 64
_UINT32_MAX = 0xFFFFFFFF
_INT32_MIN_SIGN_EXTENDED = _TWO_TO_64 - (1 << 31)


class DataType(IntEnum):
    NULL = 0
    BOOL = 1
    INT32 = 2
    UINT32 = 3
    INT64 = 4
    UINT64 = 5
    IPV4 = 6
    IPV6 = 7
    STRING = 8
    BINARY = 9


TYPE_MASK = 0x0F
BOOL_TRUE_FLAG = 0x10

NULL_BYTES = b"\x00"
TRUE_BYTES = b"\x11"
FALSE_BYTES = b"\x01"
_STRING = DataType.STRING.value
_BINARY = DataType.BINARY.value


def _utf8(text: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError:  # lone surrogates that came from undecodable input
        return text.encode("utf-8", "surrogateescape")


# Type byte and one-byte length of every short STRING: the common case.
SHORT_STRING_HEADS = tuple(bytes((DataType.STRING, length)) for length in range(240))


def encode_string(text: str) -> bytes:
    """A length-prefixed string without a type byte (names in KV lists, messages, actions)."""
    raw = _utf8(text)
    return encode_varint(len(raw)) + raw


def _prefixed_span(buf: Buffer, pos: int, end: int) -> tuple[int, int]:
    """Where the bytes of a length-prefixed string or binary lie: (start, stop)."""
    if pos < end and buf[pos] < 240:
        length = buf[pos]
        pos += 1
    else:
        length, pos = decode_varint(buf, pos, end)
    stop = pos + length
    if stop > end:
        raise InvalidFrame("string longer than its frame")
    return pos, stop


def decode_string(buf: Buffer, pos: int, end: int) -> tuple[str, int]:
    """Decode a length-prefixed string without a type byte."""
    start, stop = _prefixed_span(buf, pos, end)
    raw = buf[start:stop]
    try:
        return raw.decode(), stop
    except UnicodeDecodeError:
        return raw.decode("utf-8", "surrogateescape"), stop


def encode_value(value: Value) -> bytes:
    """Encode one typed value, type byte included."""
    # bool before int: bool is a subclass of int.
    if value is None:
        return NULL_BYTES
    if value is True:
        return TRUE_BYTES
    if value is False:
        return FALSE_BYTES
    if isinstance(value, str):
        raw = _utf8(value)
        size = len(raw)
        if size < 240:
            return SHORT_STRING_HEADS[size] + raw
        return b"\x08" + encode_varint(size) + raw
    if isinstance(value, int):
        if 0 <= value <= MAX_UINT64:
            kind = b"\x04" if value < _SIGN_BIT else b"\x05"
            return kind + encode_varint(value)
        if _INT64_MIN <= value < 0:
            return b"\x04" + encode_varint(value + _TWO_TO_64)
        raise InvalidValue("integer outside the 64-bit range")
    if isinstance(value, bytes):
        return b"\x09" + encode_varint(len(value)) + value
    if isinstance(value, IPv4Address):
        return b"\x06" + value.packed
    if isinstance(value, IPv6Address):
        return b"\x07" + value.packed
    raise InvalidValue(f"no SPOP type for {type(value).__name__}")


def decode_value(buf: Buffer, pos: int, end: int) -> tuple[Value, int]:
    """Decode one typed value at buf[pos:end]; return (value, position after it)."""
    if pos >= end:
        raise InvalidFrame("truncated typed data")
    type_byte = buf[pos]
    pos += 1
    kind = type_byte & TYPE_MASK
    if kind == _STRING:
        return decode_string(buf, pos, end)
    if kind == _BINARY:
        start, stop = _prefixed_span(buf, pos, end)
        return bytes(buf[start:stop]), stop
    if kind == 0:
        return None, pos
    if kind == 1:
        return bool(type_byte & BOOL_TRUE_FLAG), pos
    if kind <= 5:
        number, pos = decode_varint(buf, pos, end)
        if kind == 2:  # INT32: 32 bits, or a negative sign-extended to 64 as HAProxy sends it
            if number <= _UINT32_MAX:
                if number & 0x80000000:
                    number -= 1 << 32
            elif number >= _INT32_MIN_SIGN_EXTENDED:
                number -= _TWO_TO_64
            else:
                # Its low bits would be another number (a max-frame-size of 2**32 + 1000
                # read as 1000): refused, not truncated.
                raise InvalidFrame("INT32 value out of range")
        elif kind == 3 and number > _UINT32_MAX:
            raise InvalidFrame("UINT32 value out of range")
        elif kind == 4 and number & _SIGN_BIT:  # INT64
            number -= _TWO_TO_64
        return number, pos
    if kind == 6:
        if pos + 4 > end:
            raise InvalidFrame("truncated IPv4 address")
        return IPv4Address(bytes(buf[pos : pos + 4])), pos + 4
    if kind == 7:
        if pos + 16 > end:
            raise InvalidFrame("truncated IPv6 address")
        return IPv6Address(bytes(buf[pos : pos + 16])), pos + 16
    raise InvalidFrame(f"reserved data type {kind}")
