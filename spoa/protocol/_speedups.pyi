from collections.abc import Hashable
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from .errors import InvalidFrame, ResourceLimit
from .payloads import Message
from .types import Value

def bind(
    message: type[Message],
    invalid_frame: type[InvalidFrame],
    resource_limit: type[ResourceLimit],
    ipv4: type[IPv4Address],
    ipv6: type[IPv6Address],
) -> None: ...
def decode_messages(
    buf: bytes | bytearray, pos: int, end: int, max_items: int
) -> tuple[Message, ...]: ...
def answer_frames(
    buf: bytes | bytearray,
    pos: int,
    end: int,
    frame_limit: int,
    max_items: int,
    message_name: bytes,
    key_names: tuple[bytes, ...],
    table: dict[bytes, Any],
    now: float,
    countdown_head: bytes,
    inflight: dict[tuple[int, int], bytes],
) -> tuple[int, bytes, list[Hashable]]: ...
def encode_set_vars(
    scope: int, variables: list[tuple[str, Value]] | tuple[tuple[str, Value], ...]
) -> bytes | None: ...
