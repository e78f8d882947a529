"""A small real HTTP server on loopback for JWKS and discovery tests.

Routes are set per path with a body, status, Cache-Control, an optional delay, and an
optional trickle (the body sent one byte per interval); every request is counted per path.
Both wait on an event, so `close()` never waits for them.
"""

from __future__ import annotations

import json
import ssl
import threading
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Route:
    body: bytes
    status: int = 200
    cache_control: str | None = None
    delay: float = 0.0
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    trickle: float = 0.0  # seconds between the body's bytes; 0 sends it at once
    trickle_head: bool = False  # the status line and headers too
    # Never answer, but keep the connection busy every `trickle` seconds: "continue" sends
    # `100 Continue` after `100 Continue`; "chunk-line" a chunk-size line that never ends.
    endless: str = ""


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        with self.server.lock:
            self.server.counts[path] += 1
            route = self.server.routes.get(path)
        if route is None:
            route = Route(body=b"{}", status=404)
        if route.delay > 0:
            self.server.release.wait(route.delay)
        try:
            if route.endless:
                self._endless(route)
                return
            if route.trickle_head:
                self._trickle_head(route)
                return
            self.send_response(route.status)
            self.send_header("Content-Type", route.content_type)
            self.send_header("Content-Length", str(len(route.body)))
            if route.cache_control is not None:
                self.send_header("Cache-Control", route.cache_control)
            for name, value in route.headers:
                self.send_header(name, value)
            self.end_headers()
            if route.trickle > 0:
                for index in range(len(route.body)):
                    self.wfile.write(route.body[index : index + 1])
                    self.wfile.flush()
                    if self.server.release.wait(route.trickle):
                        return
            else:
                self.wfile.write(route.body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout tests); nothing to do

    def _endless(self, route: Route) -> None:
        if route.endless == "chunk-line":
            self.wfile.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        piece = b"HTTP/1.1 100 Continue\r\n\r\n" if route.endless == "continue" else b"0"
        while True:
            self.wfile.write(piece)
            self.wfile.flush()
            if self.server.release.wait(route.trickle):
                return

    def _trickle_head(self, route: Route) -> None:
        head = [f"HTTP/1.1 {route.status} Slow", f"Content-Length: {len(route.body)}"]
        head += [f"{name}: {value}" for name, value in route.headers]
        for byte in ("\r\n".join(head) + "\r\n\r\n").encode():
            self.wfile.write(bytes((byte,)))
            self.wfile.flush()
            if self.server.release.wait(route.trickle):
                return
        self.wfile.write(route.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True

    def __init__(self, tls: ssl.SSLContext | None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        if tls is not None:
            # A failed handshake surfaces in accept() as an OSError, which the server skips.
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        self.lock = threading.Lock()
        self.routes: dict[str, Route] = {}
        self.counts: Counter[str] = Counter()
        self.release = threading.Event()


class JwksServer:
    """Use as a context manager; `url(path)` gives the address of a route. With `tls`
    (a server-side context) it speaks HTTPS."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self._scheme = "https" if tls is not None else "http"
        self._server = _Server(tls)
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="jwks-server"
        )

    def __enter__(self) -> JwksServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def url(self, path: str) -> str:
        return f"{self._scheme}://127.0.0.1:{self.port}{path}"

    def set(
        self,
        path: str,
        body: bytes | str | dict[str, Any],
        *,
        status: int = 200,
        cache_control: str | None = None,
        delay: float = 0.0,
        headers: dict[str, str] | None = None,
        trickle: float = 0.0,
        trickle_head: bool = False,
        endless: str = "",
    ) -> None:
        if isinstance(body, dict):
            raw = json.dumps(body).encode()
        elif isinstance(body, str):
            raw = body.encode()
        else:
            raw = body
        with self._server.lock:
            extra = tuple((headers or {}).items())
            self._server.routes[path] = Route(
                raw,
                status,
                cache_control,
                delay,
                headers=extra,
                trickle=trickle,
                trickle_head=trickle_head,
                endless=endless,
            )

    def requests(self, path: str) -> int:
        with self._server.lock:
            return self._server.counts[path]

    def close(self) -> None:
        self._server.release.set()  # wake handlers sleeping in a delay
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()  # joins the handler threads (block_on_close)
