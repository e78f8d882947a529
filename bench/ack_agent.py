"""The bare-SPOP baseline: jwtgate's own server and codec with a `check-jwt` handler that
does no JWT work and answers "valid" at once. The gap between this and the real agent is
what JWT handling costs; the gap between this and no-auth is the SPOP round trip.

    python -m bench.ack_agent --port 12345
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

from spoa.protocol import Message, Scope, SetVar
from spoa.server import SpoaServer, install_uvloop

# What HAProxy's rules need to let the request through: valid, and status 200.
ACCEPT = (SetVar(Scope.TXN, "valid", True), SetVar(Scope.TXN, "status", 200))


def accept(message: Message) -> Sequence[SetVar]:
    return ACCEPT


async def serve(port: int) -> None:
    server = SpoaServer({"check-jwt": accept}, fallback_actions=ACCEPT)
    await server.start("127.0.0.1", port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="an ACK-only SPOP agent (benchmark baseline)")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    install_uvloop()
    asyncio.run(serve(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
