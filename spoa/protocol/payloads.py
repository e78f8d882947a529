"""Payload grammars: KV lists (HELLO, DISCONNECT) and lists of messages (NOTIFY)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from ipaddress import IPv4Address, IPv6Address
from typing import NamedTuple

from .errors import InvalidFrame, InvalidValue, ResourceLimit
from .types import Value, decode_string, decode_value, encode_string, encode_value
from .varint import Buffer, decode_varint


class Message(NamedTuple):
    """One SPOE message of a NOTIFY: its name and its arguments, in order.

    Argument names may be empty or repeat; `get` returns the first match. A NamedTuple
    rather than a frozen dataclass: as immutable, and half the cost to build, which
    counts on the per-request path.
    """

    name: str
    args: tuple[tuple[str, Value], ...]

    def get(self, name: str, default: Value = None) -> Value:
        for arg_name, value in self.args:
            if arg_name == name:
                return value
        return default


def encode_kv_list(items: Iterable[tuple[str, Value]]) -> bytes:
    return b"".join(encode_string(name) + encode_value(value) for name, value in items)


def decode_kv_list(buf: Buffer, pos: int, end: int, max_items: int) -> list[tuple[str, Value]]:
    items: list[tuple[str, Value]] = []
    while pos < end:
        if len(items) >= max_items:
            raise ResourceLimit("too many KV items")
        name, pos = decode_string(buf, pos, end)
        value, pos = decode_value(buf, pos, end)
        items.append((name, value))
    return items


def encode_messages(messages: Iterable[Message]) -> bytes:
    """A LIST-OF-MESSAGES payload (HAProxy's side; used by tests and tools)."""
    parts = []
    for message in messages:
        if len(message.args) > 255:
            raise InvalidValue("a message carries at most 255 arguments")
        parts.append(encode_string(message.name) + bytes((len(message.args),)))
        parts.extend(encode_string(name) + encode_value(value) for name, value in message.args)
    return b"".join(parts)


_STRING_TYPE_BYTE = 8  # STRING with no flags, as HAProxy sends it
_NULL_TYPE_BYTE = 0
# Argument names repeat on every NOTIFY (HAProxy sends the configured ones): decoded once.
_ARG_NAMES: dict[bytes, str] = {}
_ARG_NAMES_LIMIT = 256


def decode_messages_python(buf: Buffer, pos: int, end: int, max_items: int) -> tuple[Message, ...]:
    """Decode the LIST-OF-MESSAGES payload of a NOTIFY; it may be empty.

    The reference decoder. `decode_messages` is the C one in `_speedups` when it was
    built (it must give the same answer and raise the same errors), else this one."""
    # The hot path of the agent: short argument names, NULLs and STRING values are
    # decoded inline; anything else goes through the general decoders.
    messages: list[Message] = []
    names = _ARG_NAMES
    while pos < end:
        if len(messages) >= max_items:
            raise ResourceLimit("too many messages")
        name, pos = decode_string(buf, pos, end)
        if pos >= end:
            raise InvalidFrame("message without an argument count")
        nb_args = buf[pos]
        pos += 1
        if nb_args > max_items:
            raise ResourceLimit("too many message arguments")
        args: list[tuple[str, Value]] = []
        append = args.append
        for _ in range(nb_args):
            size = buf[pos] if pos < end else 255
            if size < 240:
                pos += 1
                stop = pos + size
                if stop > end:
                    raise InvalidFrame("string longer than its frame")
                raw = bytes(buf[pos:stop])  # hashable even when buf is a bytearray
                arg_name = names.get(raw)
                if arg_name is None:
                    arg_name = raw.decode("utf-8", "surrogateescape")
                    if len(names) < _ARG_NAMES_LIMIT:
                        names[raw] = arg_name
                pos = stop
            else:
                arg_name, pos = decode_string(buf, pos, end)
            kind = buf[pos] if pos + 1 < end else -1
            value: Value
            if kind == _STRING_TYPE_BYTE:
                length = buf[pos + 1]
                pos += 2
                if length >= 240:
                    # Tokens are usually 240..2287 bytes: a two-byte varint.
                    if pos < end and buf[pos] < 128:
                        length += buf[pos] << 4
                        pos += 1
                    else:
                        length, pos = decode_varint(buf, pos - 1, end)
                stop = pos + length
                if stop > end:
                    raise InvalidFrame("string longer than its frame")
                value = buf[pos:stop].decode("utf-8", "surrogateescape")
                pos = stop
            elif kind == _NULL_TYPE_BYTE:
                value = None
                pos += 1
            else:
                value, pos = decode_value(buf, pos, end)
            append((arg_name, value))
        messages.append(Message(name, tuple(args)))
    return tuple(messages)


def speedups_refused() -> bool:
    """JWTGATE_NO_SPEEDUPS asks for the Python code; "0" and "" leave the C code on."""
    return os.environ.get("JWTGATE_NO_SPEEDUPS", "").strip() not in ("", "0")


def _load_speedups() -> Callable[[Buffer, int, int, int], tuple[Message, ...]] | None:
    """The C decoder, unless it was not built or JWTGATE_NO_SPEEDUPS asks for Python."""
    if speedups_refused():
        return None
    try:
        from . import _speedups
    except ImportError:
        return None
    _speedups.bind(Message, InvalidFrame, ResourceLimit, IPv4Address, IPv6Address)
    return _speedups.decode_messages


_accelerated = _load_speedups()
SPEEDUPS = _accelerated is not None
decode_messages = _accelerated or decode_messages_python
