"""The bare-SPOP baselines: agents that do no JWT work and answer "valid" at once.

- default: jwtgate's own server and codec with a `check-jwt` handler that returns at once.
  The gap between this and the real agent is what JWT handling costs.
- `--minimal`: a hand-written asyncio agent that decodes only what it must (frame length,
  type and the NOTIFY's ids) and answers every NOTIFY with one pre-built ACK. It is the
  practical ceiling for any Python agent; the gap between it and the default one is what
  jwtgate's general SPOP layer costs.

    python -m bench.ack_agent --port 12345 [--minimal]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from typing import cast

from spoa.protocol import (
    FrameType,
    Message,
    Scope,
    SetVar,
    Status,
    build_agent_hello,
    build_disconnect,
    decode_kv_list,
    encode_actions,
)
from spoa.protocol.varint import decode_varint
from spoa.server import SpoaServer, install_uvloop

# What HAProxy's rules need to let the request through: valid, and status 200.
ACCEPT = (SetVar(Scope.TXN, "valid", True), SetVar(Scope.TXN, "status", 200))
MAX_FRAME_SIZE = 16380


def accept(message: Message) -> Sequence[SetVar]:
    return ACCEPT


class MinimalAckProtocol(asyncio.Protocol):
    """Just enough SPOP for HAProxy: HELLO, NOTIFY -> ACK, DISCONNECT. No validation."""

    _ACK_HEAD = bytes((FrameType.ACK, 0, 0, 0, 1))  # type, FIN flags
    _ACTIONS = encode_actions(ACCEPT)

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        out: list[bytes] = []
        close = False
        pos, size = 0, len(buffer)
        while size - pos >= 4:
            length = int.from_bytes(buffer[pos : pos + 4], "big")
            end = pos + 4 + length
            if end > size:
                break
            frame_type = buffer[pos + 4]
            if frame_type == FrameType.NOTIFY:
                ids_start = pos + 9
                _, after = decode_varint(buffer, ids_start, end)
                _, after = decode_varint(buffer, after, end)
                body = self._ACK_HEAD + bytes(buffer[ids_start:after]) + self._ACTIONS
                out.append(len(body).to_bytes(4, "big") + body)
            elif frame_type == FrameType.HAPROXY_HELLO:
                _, after = decode_varint(buffer, pos + 9, end)
                _, after = decode_varint(buffer, after, end)
                items = dict(decode_kv_list(buffer, after, end, 64))
                theirs = items.get("max-frame-size")
                ours = min(MAX_FRAME_SIZE, theirs if isinstance(theirs, int) else MAX_FRAME_SIZE)
                out.append(build_agent_hello(ours))
                close = items.get("healthcheck") is True
            elif frame_type == FrameType.HAPROXY_DISCONNECT:
                out.append(build_disconnect(Status.NORMAL, "bye"))
                close = True
            pos = end
        del buffer[:pos]
        if self._transport is not None:
            if out:
                self._transport.write(b"".join(out))
            if close:
                self._transport.close()


async def serve(port: int, minimal: bool) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if minimal:
        server = await loop.create_server(MinimalAckProtocol, "127.0.0.1", port)
        await stop.wait()
        server.close()
        await server.wait_closed()
        return
    spoa_server = SpoaServer({"check-jwt": accept}, fallback_actions=ACCEPT)
    await spoa_server.start("127.0.0.1", port)
    await stop.wait()
    await spoa_server.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="an ACK-only SPOP agent (benchmark baseline)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--minimal", action="store_true", help="the hand-written agent, not jwtgate's server"
    )
    args = parser.parse_args(argv)
    install_uvloop()
    asyncio.run(serve(args.port, args.minimal))
    return 0


if __name__ == "__main__":
    sys.exit(main())
