from ipaddress import IPv4Address, IPv6Address

from .errors import InvalidFrame, ResourceLimit
from .payloads import Message

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
