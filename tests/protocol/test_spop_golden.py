"""Golden byte vectors: the worked examples of spop-notes.md (sections 2 and 12)
and frames captured from real HAProxy 2.6 and 2.8 (see docs/protocol.md)."""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path

import pytest

from spoa.protocol import (
    AgentConnection,
    FrameType,
    HelloReceived,
    Message,
    NotifyReceived,
    Scope,
    SetVar,
    Status,
    build_agent_hello,
    build_disconnect,
    build_frame,
    decode_varint,
    encode_actions,
    encode_messages,
    encode_value,
    encode_varint,
    split_frames,
)

FIXTURES = Path(__file__).parent / "fixtures"


def unhex(text: str) -> bytes:
    """Hex with `"quoted"` ASCII runs, as written in spop-notes.md."""
    out = bytearray()
    for index, part in enumerate(text.split('"')):
        if index % 2:
            out += part.encode()
        else:
            out += bytes.fromhex(part.replace("|", ""))
    return bytes(out)


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, "00"),
        (239, "ef"),
        (240, "f000"),
        (1000, "f82f"),
        (2287, "ff7f"),
        (2288, "f08000"),
        (16380, "fcf006"),
        (65535, "fff01e"),
        (2**32 - 1, "fff0fefe7e"),
        (2**64 - 1, "fff0fefefefefefefe0e"),
    ],
)
def test_varint_examples(value: int, encoded: str) -> None:
    raw = bytes.fromhex(encoded)
    assert encode_varint(value) == raw
    assert decode_varint(raw, 0, len(raw)) == (value, len(raw))


@pytest.mark.parametrize(
    ("limit", "length"), [(240, 2), (2288, 3), (264432, 4), (33818864, 5), (4328786160, 6)]
)
def test_varint_length_boundaries(limit: int, length: int) -> None:
    assert len(encode_varint(limit - 1)) == length - 1
    assert len(encode_varint(limit)) == length


def test_negative_int64_is_ten_byte_twos_complement() -> None:
    assert encode_value(-1) == bytes.fromhex("04fff0fefefefefefefe0e")


def test_bool_encodings() -> None:
    assert encode_value(True) == b"\x11"
    assert encode_value(False) == b"\x01"


def test_agent_hello_example() -> None:
    expected = unhex(
        '00000040 65 00000001 00 00 07"version" 08 03"2.0" 0e"max-frame-size" 03 fcf006'
        ' 0c"capabilities" 08 0a"pipelining"'
    )
    assert len(expected) == 68
    assert build_agent_hello(16380) == expected


def test_notify_example_decodes() -> None:
    notify = unhex('0000001d 03 00000001 01 01 09"check-jwt" 01 05"token" 08 03"abc"')
    built = build_frame(
        FrameType.NOTIFY, 1, 1, encode_messages([Message("check-jwt", (("token", "abc"),))])
    )
    assert built == notify
    conn = ready_connection()
    assert conn.receive_data(notify, 1.0) == [
        NotifyReceived(1, 1, (Message("check-jwt", (("token", "abc"),)),))
    ]


def test_ack_example() -> None:
    expected = unhex(
        '0000001d 67 00000001 01 01 | 01 03 02 05"valid" 11 | 01 03 02 03"sub" 08 03"bob"'
    )
    actions = [SetVar(Scope.TXN, "valid", True), SetVar(Scope.TXN, "sub", "bob")]
    assert build_frame(FrameType.ACK, 1, 1, encode_actions(actions)) == expected
    conn = ready_connection()
    conn.receive_data(unhex('0000001d 03 00000001 01 01 09"check-jwt" 01 05"token" 08 03"abc"'), 1)
    conn.send_ack(1, 1, actions)
    assert conn.data_to_send() == expected


def test_agent_disconnect_example() -> None:
    expected = unhex('00000025 66 00000001 00 00 0b"status-code" 03 00 07"message" 08 06"normal"')
    assert build_disconnect(Status.NORMAL, "normal") == expected


def ready_connection() -> AgentConnection:
    conn = AgentConnection(now=0.0)
    hello = (FIXTURES / "haproxy-2.6-hello.bin").read_bytes()
    conn.receive_data(hello, 0.0)
    conn.data_to_send()
    return conn


@pytest.mark.parametrize("version", ["2.6", "2.8"])
def test_captured_hello(version: str) -> None:
    hello = (FIXTURES / f"haproxy-{version}-hello.bin").read_bytes()
    conn = AgentConnection(max_frame_size=65536, now=0.0)
    (event,) = conn.receive_data(hello, 0.0)
    assert isinstance(event, HelloReceived)
    assert event.supported_versions == ("2.0",)
    assert event.max_frame_size == 16380
    assert event.capabilities == frozenset({"pipelining", "async"})
    assert event.pipelining
    assert not event.healthcheck
    assert event.engine_id is not None
    assert len(event.engine_id) == 36
    assert event.negotiated_max_frame_size == 16380
    assert conn.data_to_send() == build_agent_hello(16380)


@pytest.mark.parametrize("version", ["2.6", "2.8"])
def test_captured_notify(version: str) -> None:
    conn = ready_connection()
    notify = (FIXTURES / f"haproxy-{version}-notify.bin").read_bytes()
    (frame,) = split_frames(notify)
    # HAProxy 2.x numbers streams from 0: the first request has stream-id 0.
    assert (frame.header.stream_id, frame.header.frame_id) == (0, 1)
    (event,) = conn.receive_data(notify, 1.0)
    assert isinstance(event, NotifyReceived)
    assert (event.stream_id, event.frame_id) == (0, 1)
    (message,) = event.messages
    assert message.name == "check-jwt"
    assert message.args == (
        ("authorization", "Bearer abc.def.ghi"),
        ("method", "GET"),
        ("path", "/api/items"),
        ("host", "api.example.test"),
        ("policy", "default"),
        ("id", -42),
        ("ok", True),
        ("src", IPv4Address("127.0.0.1")),
    )
