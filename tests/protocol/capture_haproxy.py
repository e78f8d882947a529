"""Record the exact bytes a real HAProxy sends to an SPOE agent.

    .venv/bin/python -m tests.protocol.capture_haproxy [/path/to/haproxy]

A loopback listener answers HAProxy's HELLO with a fixed AGENT-HELLO and keeps
HAProxy's HELLO frame and the NOTIFY of one HTTP request, writing them to
tests/protocol/fixtures/haproxy-<version>-{hello,notify}.bin. Re-run only to
refresh the fixtures; the tests read the frozen files.
"""

from __future__ import annotations

import socket
import sys
import threading
import urllib.request
from pathlib import Path

from spoa.devkit.stack import free_port
from spoa.protocol import build_agent_hello
from tests.support.haproxy import DEBIAN_HAPROXY, HAProxy, binary_version

FIXTURES = Path(__file__).parent / "fixtures"

ARGS = (
    "authorization=req.hdr(authorization) method=method path=path host=req.hdr(host)"
    " policy=str(default) id=int(-42) ok=bool(1) src=src"
)
SPOE_CONFIG = f"""
[capture]
spoe-agent capture-agent
    messages check-jwt
    option var-prefix cap
    timeout hello 2s
    timeout idle 30s
    timeout processing 1s
    use-backend agents

spoe-message check-jwt
    args {ARGS}
    event on-frontend-http-request
"""

HAPROXY_CONFIG = """
global
    nbthread 1
defaults
    mode http
    timeout connect 2s
    timeout client 5s
    timeout server 5s
frontend web
    bind 127.0.0.1:"${FRONT_PORT}"
    filter spoe engine capture config "${SPOE_CONFIG}"
    http-request return status 200 content-type text/plain string done
backend agents
    mode tcp
    server agent 127.0.0.1:"${AGENT_PORT}"
"""


def _read_frame(conn: socket.socket) -> bytes:
    def exactly(count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = conn.recv(count - len(data))
            if not chunk:
                raise ConnectionError("HAProxy closed the connection")
            data += chunk
        return data

    head = exactly(4)
    return head + exactly(int.from_bytes(head, "big"))


def capture(binary: Path) -> tuple[str, bytes, bytes]:
    """Return (version, HELLO frame, NOTIFY frame) as sent by `binary`."""
    workdir = FIXTURES.parent
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(10)
    frames: list[bytes] = []

    def agent() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            hello = _read_frame(conn)
            conn.sendall(build_agent_hello(16380, "pipelining"))
            frames.extend((hello, _read_frame(conn)))

    thread = threading.Thread(target=agent)
    thread.start()
    spoe_path = workdir / "fixtures" / ".capture-spoe.cfg"
    spoe_path.write_text(SPOE_CONFIG)
    front_port = free_port()
    env = {
        "FRONT_PORT": str(front_port),
        "AGENT_PORT": str(listener.getsockname()[1]),
        "SPOE_CONFIG": str(spoe_path),
    }
    try:
        with HAProxy(HAPROXY_CONFIG, env=env, binary=binary):
            request = urllib.request.Request(
                f"http://127.0.0.1:{front_port}/api/items?page=2",
                headers={"Authorization": "Bearer abc.def.ghi", "Host": "api.example.test"},
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                response.read()
            thread.join(timeout=10)
    finally:
        listener.close()
        spoe_path.unlink()
        thread.join(timeout=10)
    return binary_version(binary), frames[0], frames[1]


def main() -> None:
    binary = Path(sys.argv[1]) if len(sys.argv) > 1 else DEBIAN_HAPROXY
    version, hello, notify = capture(binary)
    (FIXTURES / f"haproxy-{version}-hello.bin").write_bytes(hello)
    (FIXTURES / f"haproxy-{version}-notify.bin").write_bytes(notify)
    print(f"haproxy {version}: hello {len(hello)} bytes, notify {len(notify)} bytes")


if __name__ == "__main__":
    main()
