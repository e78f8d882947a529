"""Limits, each against a real `jwtgate run` process spoken to with a raw SPOP client over
loopback (ports chosen at run time), plus the JWKS limits through a real loopback issuer and
the verified-token cache bound through the `bench/memory.py` command.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spoa.devkit.issuer import LocalIssuer
from spoa.devkit.stack import ManagedProcess, free_port, http_get, wait_for_port
from spoa.protocol import (
    FrameType,
    Message,
    Status,
    build_frame,
    decode_actions,
    decode_kv_list,
    encode_kv_list,
    encode_messages,
    split_frames,
)

ROOT = Path(__file__).resolve().parents[2]
AUDIENCE = "api://orders"
MAX_FRAME_SIZE = 1024
MAX_CONNECTIONS = 3
MAX_TOKEN_BYTES = 600
HELLO_TIMEOUT = 0.5
pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def issuer() -> Iterator[LocalIssuer]:
    with LocalIssuer(alg="ES256") as running:
        yield running


def start_agent(tmp: Path, issuer: LocalIssuer, extra_issuer: str = "") -> ManagedProcess:
    port, metrics = free_port(), free_port()
    config = tmp / "agent.toml"
    config.write_text(
        f'[agent]\nlisten = "127.0.0.1:{port}"\nmax_frame_size = {MAX_FRAME_SIZE}\n'
        f"max_connections = {MAX_CONNECTIONS}\nmax_inflight = 20\n"
        f'hello_timeout = "{HELLO_TIMEOUT}s"\nidle_timeout = "2s"\n'
        f'max_token_bytes = {MAX_TOKEN_BYTES}\nready_timeout = "5s"\n'
        f'[metrics]\nlisten = "127.0.0.1:{metrics}"\n[log]\nlevel = "warning"\n'
        f'[[issuers]]\nname = "local"\nissuer = "{issuer.issuer}"\n'
        f'audiences = ["{AUDIENCE}"]\nalgorithms = ["ES256"]\njwks_uri = "{issuer.jwks_url}"\n'
        f"{extra_issuer}"
        '[policies.default]\nissuers = ["local"]\n'
    )
    process = ManagedProcess(
        "agent",
        [sys.executable, "-m", "spoa", "run", "--config", str(config)],
        log_path=tmp / "agent.log",
    ).start()
    process.port = port  # type: ignore[attr-defined]
    process.metrics = metrics  # type: ignore[attr-defined]
    return process


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory, issuer: LocalIssuer) -> Iterator[int]:
    process = start_agent(tmp_path_factory.mktemp("agent"), issuer)
    try:
        wait_for_port(process.port, timeout=20, process=process)  # type: ignore[attr-defined]
        yield process.port  # type: ignore[attr-defined]
    finally:
        process.stop()


# --- a raw SPOP client ------------------------------------------------------------------------


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def hello_frame(max_frame_size: int = 16380) -> bytes:
    items = [
        ("supported-versions", "2.0"),
        ("max-frame-size", max_frame_size),
        ("capabilities", "pipelining"),
    ]
    return build_frame(FrameType.HAPROXY_HELLO, 0, 0, encode_kv_list(items))


def read_frame(sock: socket.socket) -> tuple[int, bytes] | None:
    """(type, whole frame) or None when the agent closed the connection."""
    head = b""
    while len(head) < 4:
        chunk = sock.recv(4 - len(head))
        if not chunk:
            return None
        head += chunk
    length = int.from_bytes(head, "big")
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            return None
        body += chunk
    return body[0], head + body


def disconnect_status(frame: bytes) -> int:
    parsed = split_frames(frame)[0]
    items = dict(decode_kv_list(parsed.payload, 0, len(parsed.payload), 16))
    status = items["status-code"]
    assert isinstance(status, int)
    return status


def handshake(port: int) -> socket.socket:
    sock = connect(port)
    sock.sendall(hello_frame())
    answer = read_frame(sock)
    assert answer is not None
    assert answer[0] == FrameType.AGENT_HELLO
    return sock


def check(port: int, authorization: str, frame_id: int = 1) -> dict[str, object]:
    sock = handshake(port)
    try:
        sock.sendall(notify(1, frame_id, authorization))
        answer = read_frame(sock)
        assert answer is not None
        assert answer[0] == FrameType.ACK
        parsed = split_frames(answer[1])[0]
        actions = decode_actions(parsed.payload, 0, len(parsed.payload))
        return {action.name: getattr(action, "value", None) for action in actions}
    finally:
        sock.close()


def notify(stream_id: int, frame_id: int, authorization: str) -> bytes:
    message = Message(
        "check-jwt",
        (("authorization", authorization), ("method", "GET"), ("path", "/"), ("host", "h")),
    )
    return build_frame(FrameType.NOTIFY, stream_id, frame_id, encode_messages([message]))


def expect_disconnect(sock: socket.socket, status: Status) -> None:
    answer = read_frame(sock)
    assert answer is not None, "closed without AGENT-DISCONNECT"
    assert answer[0] == FrameType.AGENT_DISCONNECT
    assert disconnect_status(answer[1]) == status
    assert read_frame(sock) is None


# --- the limits -------------------------------------------------------------------------------


def test_agent_announces_its_max_frame_size(agent: int) -> None:
    sock = connect(agent)
    sock.sendall(hello_frame())
    answer = read_frame(sock)
    sock.close()
    assert answer is not None
    parsed = split_frames(answer[1])[0]
    items = dict(decode_kv_list(parsed.payload, 0, len(parsed.payload), 16))
    assert items["max-frame-size"] == MAX_FRAME_SIZE


def test_frame_above_max_frame_size_is_refused_from_its_length(agent: int) -> None:
    sock = handshake(agent)
    # Only the length prefix is sent: the agent must not wait for (or buffer) the body.
    sock.sendall((MAX_FRAME_SIZE + 1).to_bytes(4, "big"))
    expect_disconnect(sock, Status.FRAME_TOO_BIG)


def test_too_many_items_in_a_frame_is_a_resource_error(agent: int) -> None:
    sock = handshake(agent)
    args = tuple((f"a{i}", 1) for i in range(255))
    payload = encode_messages([Message("check-jwt", args)])
    sock.sendall(build_frame(FrameType.NOTIFY, 1, 1, payload[: MAX_FRAME_SIZE - 16]))
    answer = read_frame(sock)
    assert answer is not None
    # Either the item bound or the truncation is caught; never an ACK for such a frame.
    assert answer[0] == FrameType.AGENT_DISCONNECT
    assert disconnect_status(answer[1]) in {Status.RESOURCE_ALLOCATION, Status.INVALID_FRAME}


def test_item_bound_alone(agent: int) -> None:
    sock = handshake(agent)
    # 300 argument-less messages of 3 bytes each: the frame fits, the list bound (256) not.
    payload = encode_messages([Message("m", ())] * 300)
    sock.sendall(build_frame(FrameType.NOTIFY, 1, 1, payload))
    expect_disconnect(sock, Status.RESOURCE_ALLOCATION)


def test_token_above_max_token_bytes_is_token_too_large(agent: int, issuer: LocalIssuer) -> None:
    valid = issuer.mint({"aud": AUDIENCE, "sub": "u"})
    assert len(valid) < MAX_TOKEN_BYTES
    assert check(agent, f"Bearer {valid}")["status"] == 200
    padded = issuer.mint({"aud": AUDIENCE, "sub": "u", "pad": "x" * (MAX_TOKEN_BYTES // 2)})
    assert MAX_TOKEN_BYTES < len(padded) < MAX_FRAME_SIZE - 100
    verdict = check(agent, f"Bearer {padded}")
    assert verdict["status"] == 401
    assert verdict["reason"] == "token_too_large"


def test_connection_without_hello_is_closed(agent: int) -> None:
    started = time.monotonic()
    sock = connect(agent)
    expect_disconnect(sock, Status.TIMEOUT)
    assert time.monotonic() - started < HELLO_TIMEOUT + 2


def test_partial_hello_times_out(agent: int) -> None:
    sock = connect(agent)
    sock.sendall(hello_frame()[:7])
    expect_disconnect(sock, Status.TIMEOUT)


def test_partial_frame_after_hello_times_out(agent: int) -> None:
    """A frame that never completes is closed by the idle timeout (2s here)."""
    sock = handshake(agent)
    started = time.monotonic()
    sock.sendall(notify(1, 1, "Bearer x")[:9])
    expect_disconnect(sock, Status.TIMEOUT)
    assert time.monotonic() - started < 2 + 2


def test_connections_beyond_max_connections_are_refused(agent: int) -> None:
    held = [handshake(agent) for _ in range(MAX_CONNECTIONS)]
    try:
        extra = connect(agent)
        expect_disconnect(extra, Status.RESOURCE_ALLOCATION)
    finally:
        for sock in held:
            sock.close()
    # A slot frees once the agent has seen a close: until then a new peer is refused.
    deadline = time.monotonic() + 5
    while True:
        sock = connect(agent)
        sock.sendall(hello_frame())
        answer = read_frame(sock)
        sock.close()
        assert answer is not None
        if answer[0] == FrameType.AGENT_HELLO:
            break
        assert disconnect_status(answer[1]) == Status.RESOURCE_ALLOCATION
        assert time.monotonic() < deadline, "no slot came free after the closes"
        time.sleep(0.01)


def pipeline(port: int, tokens: list[str]) -> tuple[int, int | None]:
    """A NOTIFY per token, all in one write; (ACKs received, DISCONNECT status or None)."""
    sock = handshake(port)
    count = len(tokens)
    try:
        sock.sendall(b"".join(notify(1, i, f"Bearer {t}") for i, t in enumerate(tokens, 1)))
        acks = 0
        while acks < count:
            answer = read_frame(sock)
            if answer is None:
                return acks, None
            if answer[0] == FrameType.AGENT_DISCONNECT:
                return acks, disconnect_status(answer[1])
            assert answer[0] == FrameType.ACK
            acks += 1
        return acks, None
    finally:
        sock.close()


def test_inflight_frames_are_bounded(agent: int, issuer: LocalIssuer) -> None:
    """HAProxy's max-waiting-frames (20) pipelined at once are all answered; a peer that
    pushes far more than max_inflight in one go is cut off with a resource error.

    Every NOTIFY carries a token of its own. Regression (test review): with one token
    for all, the second batch was answered from the replay memo, never went in flight,
    and the test passed on its "all answered" branch without reaching the limit."""
    tokens = [issuer.mint({"aud": AUDIENCE, "sub": f"u{i}"}) for i in range(220)]
    assert pipeline(agent, tokens[:20]) == (20, None)
    acks, status = pipeline(agent, tokens[20:])
    assert status == Status.RESOURCE_ALLOCATION, (acks, status)
    assert acks < 200


# --- JWKS limits ------------------------------------------------------------------------------


def readyz(metrics_port: int) -> int:
    status, _ = http_get(f"http://127.0.0.1:{metrics_port}/readyz", timeout=1)
    return status


def test_an_opt_in_to_plain_http_keys_is_logged_at_start(
    tmp_path: Path, issuer: LocalIssuer
) -> None:
    """allow_plain_http weakens the key transport: the agent says so where operators look."""
    process = start_agent(tmp_path, issuer, "allow_plain_http = true\n")
    try:
        wait_for_port(process.port, timeout=20, process=process)  # type: ignore[attr-defined]
        assert "plain_http_keys_allowed" in process.log_text()
    finally:
        process.stop()


@pytest.mark.parametrize("limit", ["max_jwks_bytes", "max_keys"])
def test_jwks_over_its_limits_is_refused(tmp_path: Path, limit: str) -> None:
    with LocalIssuer(alg="ES256", keep=4, huge_size=64 * 1024) as big_issuer:
        for _ in range(3):
            big_issuer.rotate()  # four keys published
        if limit == "max_jwks_bytes":
            big_issuer.mode = "huge"
            extra = "max_jwks_bytes = 16384\n"
        else:
            extra = "max_keys = 3\n"
        process = start_agent(tmp_path, big_issuer, extra)
        try:
            metrics = process.metrics  # type: ignore[attr-defined]
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and not process.exited():
                if "jwks_fetch_failed" in process.log_text():
                    break
                time.sleep(0.1)
            assert "jwks_fetch_failed" in process.log_text(), process.log_tail()
            if not process.exited():
                try:
                    ready = readyz(metrics)
                except OSError:  # start-up gave up meanwhile: not ready either
                    ready = 0
                assert ready != 200
        finally:
            process.stop()


# --- the verified-token cache -----------------------------------------------------------------


def test_cache_never_exceeds_its_bound_over_20k_distinct_tokens() -> None:
    """bench/memory.py exits non-zero if the cache ever holds more than its bound."""
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "memory.py"),
            "--tokens",
            "20000",
            "--cache",
            "1000",
            "--json-only",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    summary = json.loads(result.stdout.strip().splitlines()[-1])["summary"]
    assert summary["max_cache_entries"] == 1000
    assert summary["tokens"] == 20000
