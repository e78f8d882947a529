"""The devkit's echo backend: what the demo and the end-to-end tests count requests with."""

from __future__ import annotations

import http.client
import json
import signal
import socket

import pytest

from spoa.devkit import stack
from spoa.devkit.stack import EchoBackend, stopping_on_signals


def _responses(raw: bytes, count: int) -> list[dict[str, object]]:
    """The JSON bodies of the first `count` responses in `raw`."""
    bodies = []
    for _ in range(count):
        head, _, rest = raw.partition(b"\r\n\r\n")
        length = int(
            next(
                line.split(b":", 1)[1]
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
        )
        bodies.append(json.loads(rest[:length]))
        raw = rest[length:]
    return bodies


def test_a_request_body_is_read_not_taken_for_the_next_request() -> None:
    """Regression (review): the echo backend never read request bodies but kept the
    connection alive, so a POST body holding `GET /admin/SMUGGLED` was served as a
    request of its own, with the next request's headers, past the gateway's check."""
    backend = EchoBackend("app").start()
    try:
        smuggled = b"GET /admin/SMUGGLED HTTP/1.1\r\nHost: x\r\nX-Pad: "
        raw = (
            b"POST /api HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(smuggled)
            + smuggled
            + b"GET /api/follow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", backend.port), timeout=5) as sock:
            sock.sendall(raw)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
        paths = [body["path"] for body in _responses(received, 2)]
        assert paths == ["/api", "/api/follow"]
        assert backend.requests == 2
    finally:
        backend.stop()


def test_a_content_length_that_is_no_ascii_number_closes_the_connection(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Regression: "²" passed str.isdigit() and int() raised in the handler, which printed
    a traceback. Such a body cannot be delimited: the answer is given, then the connection
    closed, as for a chunked body."""
    backend = EchoBackend("app").start()
    try:
        head = b"POST /api HTTP/1.1\r\nHost: x\r\nContent-Length: \xb2\r\n\r\n"
        raw = head + b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"
        with socket.create_connection(("127.0.0.1", backend.port), timeout=5) as sock:
            sock.sendall(raw)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
        assert [body["path"] for body in _responses(received, 1)] == ["/api"]
        assert received.count(b"HTTP/1.") == 1
        assert backend.requests == 1
    finally:
        backend.stop()
    assert "Traceback" not in capfd.readouterr().err


def test_answers_are_not_held_back_by_nagles_algorithm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression (fault review): headers and body went out in two writes, and the body
    waited for the client's delayed ACK: 40 ms on every kept-alive request, in the demo's
    latency figures and in any end-to-end timing over keep-alive."""
    nodelay: list[int] = []
    setup = stack._EchoHandler.setup

    def recording_setup(handler: stack._EchoHandler) -> None:
        setup(handler)
        nodelay.append(handler.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    monkeypatch.setattr(stack._EchoHandler, "setup", recording_setup)
    backend = EchoBackend("app").start()
    try:
        client = http.client.HTTPConnection("127.0.0.1", backend.port, timeout=5)
        for _ in range(2):  # kept alive: one connection
            client.request("GET", "/api")
            assert client.getresponse().read()
        client.close()
    finally:
        backend.stop()
    assert nodelay == [1]


def test_signals_started_ignored_stay_ignored() -> None:
    """Under `nohup` a closed terminal must not stop a long bench run (regression: the
    handler replaced the inherited SIG_IGN)."""
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with stopping_on_signals():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)
