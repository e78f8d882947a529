"""Payload grammars: KV lists (HELLO, DISCONNECT) and lists of messages (NOTIFY)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .errors import InvalidFrame, InvalidValue, ResourceLimit
from .types import Value, decode_string, decode_value, encode_string, encode_value
from .varint import Buffer, decode_varint


@dataclass(frozen=True, slots=True)
class Message:
    """One SPOE message of a NOTIFY: its name and its arguments, in order.

    Argument names may be empty or repeat; `get` returns the first match.
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


def decode_messages(buf: Buffer, pos: int, end: int, max_items: int) -> tuple[Message, ...]:
    """Decode the LIST-OF-MESSAGES payload of a NOTIFY; it may be empty."""
    # The hot path of the agent: short names and short STRING values are decoded
    # inline; anything else goes through the general decoders.
    messages: list[Message] = []
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
            if pos + 1 < end and buf[pos] < 240:
                stop = pos + 1 + buf[pos]
                if stop > end:
                    raise InvalidFrame("string longer than its frame")
                raw = buf[pos + 1 : stop]
                try:
                    arg_name = raw.decode()
                except UnicodeDecodeError:
                    arg_name = raw.decode("utf-8", "surrogateescape")
                pos = stop
            else:
                arg_name, pos = decode_string(buf, pos, end)
            if pos + 1 < end and buf[pos] & 0x0F == 8:
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
                raw = buf[pos:stop]
                try:
                    value: Value = raw.decode()
                except UnicodeDecodeError:
                    value = raw.decode("utf-8", "surrogateescape")
                pos = stop
            else:
                value, pos = decode_value(buf, pos, end)
            append((arg_name, value))
        messages.append(Message(name, tuple(args)))
    return tuple(messages)
