"""A loopback OpenID issuer: discovery, a rotating JWKS, token minting and fault injection.

`LocalIssuer` is a real HTTP server on 127.0.0.1 running in background threads, so a blocking
test and an asyncio agent can both talk to it. Its `mode` can be switched at run time to make
the JWKS endpoint misbehave, which is how the key manager's failure handling is tested.

Standalone, for the demo:

    python -m spoa.devkit.issuer --port 0 --alg RS256 --rotate-every 10s --keys-dir DIR

prints its base URL on the first line of stdout, keeps DIR's key directory in step with its key
ring (so other processes can mint with the current key) and stops cleanly on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, get_args

from spoa.config import parse_duration as config_duration
from spoa.devkit.errors import IssuerError
from spoa.devkit.keys import SigningKey, generate_signing_key, jwks_document, save_key_ring
from spoa.devkit.tokens import mint_token

FaultMode = Literal[
    "ok", "down", "unavailable", "error", "slow", "garbage", "huge", "drop_current"
]  # fmt: skip
#: ok: serve normally. down: stop listening (connection refused). unavailable: 503.
#: error: 500. slow: wait `slow_delay` seconds, then serve normally. garbage: 200 with a body
#: that is not JSON. huge: 200 with a valid JWKS padded past `huge_size` bytes.
#: drop_current: publish the key set without the current key.
FAULT_MODES: Final[frozenset[str]] = frozenset(get_args(FaultMode))

DISCOVERY_PATH: Final = "/.well-known/openid-configuration"
OAUTH_METADATA_PATH: Final = "/.well-known/oauth-authorization-server"
JWKS_PATH: Final = "/jwks.json"
_GARBAGE_BODY: Final = b"<html><body>502 upstream exploded, this is not a key set</body></html>"
_CHUNK: Final = 64 * 1024


class _Server(ThreadingHTTPServer):
    # Request threads are joined by server_close(), so stop() leaves nothing behind.
    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], issuer: LocalIssuer) -> None:
        self.issuer = issuer
        self.closing = threading.Event()
        self.open_connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client hanging up mid-response is expected under fault injection; stay quiet.
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)

    def drop_connections(self) -> None:
        with self.connections_lock:
            connections = list(self.open_connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "jwtgate-devkit-issuer"
    sys_version = ""
    timeout = 10.0  # a client that connects and never sends cannot pin a thread for long

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.open_connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.open_connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: request lines would clutter test and demo output."""

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        issuer = self.server.issuer
        mode, slow_delay = issuer._count_request(path)
        if mode == "slow" and self.server.closing.wait(slow_delay):
            return  # shutting down: hang up without an answer
        if mode == "unavailable":
            self._send_json(
                HTTPStatus.SERVICE_UNAVAILABLE, {"error": "injected 503"}, {"Retry-After": "1"}
            )
        elif mode == "error":
            self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "injected 500"})
        elif mode == "garbage":
            self._send_body(HTTPStatus.OK, _GARBAGE_BODY, {"Content-Type": "application/json"})
        elif path in (DISCOVERY_PATH, OAUTH_METADATA_PATH):
            self._send_document(issuer.discovery_document(), mode)
        elif path == JWKS_PATH:
            self._send_document(issuer.jwks(include_current=mode != "drop_current"), mode)
        else:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": "not found"})

    def _send_document(self, document: dict[str, Any], mode: str) -> None:
        issuer = self.server.issuer
        body = json.dumps(document, separators=(",", ":")).encode("utf-8")
        if mode == "huge":
            padding = max(0, issuer.huge_size - len(body))
            body = body[:-1] + b',"padding":"' + b"A" * padding + b'"}'
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        headers = {
            "Content-Type": "application/json",
            "Cache-Control": f"public, max-age={issuer.max_age}",
            "ETag": etag,
        }
        if self.headers.get("If-None-Match") == etag:
            self._send_body(HTTPStatus.NOT_MODIFIED, b"", headers)
        else:
            self._send_body(HTTPStatus.OK, body, headers)

    def _send_json(
        self, status: HTTPStatus, document: object, headers: Mapping[str, str] | None = None
    ) -> None:
        body = json.dumps(document).encode("utf-8")
        self._send_body(status, body, {"Content-Type": "application/json", **(headers or {})})

    def _send_body(self, status: HTTPStatus, body: bytes, headers: Mapping[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if status != HTTPStatus.NOT_MODIFIED:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with memoryview(body) as view:
            for start in range(0, len(view), _CHUNK):
                self.wfile.write(view[start : start + _CHUNK])


class LocalIssuer:
    """A loopback issuer with a rotating key ring. Use as a context manager, or start()/stop()."""

    def __init__(
        self,
        *,
        alg: str = "RS256",
        host: str = "127.0.0.1",
        port: int = 0,
        issuer: str | None = None,
        max_age: int = 60,
        keep: int = 2,
        rotate_every: float | None = None,
        keys_dir: str | Path | None = None,
        initial_key: SigningKey | None = None,
        slow_delay: float = 2.0,
        huge_size: int = 2 * 1024 * 1024,
        on_rotate: Callable[[SigningKey], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if keep < 1:
            raise IssuerError(f"keep must be at least 1, got {keep}")
        if rotate_every is not None and rotate_every <= 0:
            raise IssuerError(f"rotate_every must be positive, got {rotate_every}")
        first = initial_key if initial_key is not None else generate_signing_key(alg)
        self._generation_name = first.generation_name
        self._host = host
        self._port = port
        self._issuer_override = issuer
        self.max_age = max_age
        self.keep = keep
        self.slow_delay = slow_delay
        self.huge_size = huge_size
        self._rotate_every = rotate_every
        self._keys_dir = Path(keys_dir) if keys_dir is not None else None
        self._on_rotate = on_rotate
        self._clock = clock
        self._lock = threading.Lock()
        self._ring: list[SigningKey] = [first]
        self._mode: FaultMode = "ok"
        self._counts: Counter[str] = Counter()
        self._server: _Server | None = None
        self._serve_thread: threading.Thread | None = None
        self._rotation_thread: threading.Thread | None = None
        self._stop_rotation = threading.Event()
        self._started = False
        self.rotation_errors: list[BaseException] = []

    # -------------------------------------------------------------- lifecycle

    def start(self) -> LocalIssuer:
        if self._started:
            raise IssuerError("the issuer is already started")
        self._started = True
        self._save_keys()
        try:
            self._open_listener()
            if self._mode == "down":
                self._close_listener()
        except BaseException:
            self._started = False
            raise
        if self._rotate_every is not None:
            self._stop_rotation.clear()
            self._rotation_thread = threading.Thread(
                target=self._rotate_periodically,
                args=(self._rotate_every,),
                name=f"LocalIssuer-rotation:{self._port}",
            )
            self._rotation_thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and rotating; every thread the issuer started is joined."""
        if not self._started:
            return
        self.stop_rotating()
        self._close_listener()
        self._started = False

    def stop_rotating(self) -> None:
        """Keep the current key from now on (the issuer goes on serving)."""
        self._stop_rotation.set()
        if self._rotation_thread is not None:
            self._rotation_thread.join()
            self._rotation_thread = None

    def __enter__(self) -> LocalIssuer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _open_listener(self) -> None:
        try:
            server = _Server((self._host, self._port), self)
        except OSError as exc:
            raise IssuerError(f"cannot listen on {self._host}:{self._port}: {exc}") from exc
        self._port = server.server_address[1]
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"LocalIssuer-http:{self._port}",
        )
        thread.start()
        self._server, self._serve_thread = server, thread

    def _close_listener(self) -> None:
        server, thread = self._server, self._serve_thread
        self._server = self._serve_thread = None
        if server is None or thread is None:
            return
        server.closing.set()
        server.shutdown()
        server.drop_connections()
        server.server_close()  # joins the request threads
        thread.join()

    # -------------------------------------------------------------- addresses

    @property
    def port(self) -> int:
        if self._port == 0:
            raise IssuerError("the port is chosen at start(); start the issuer first")
        return self._port

    @property
    def url(self) -> str:
        """Base URL, for example http://127.0.0.1:40123 (no trailing slash)."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    @property
    def issuer(self) -> str:
        """The `iss` value: the override if one was given, else the base URL."""
        return self._issuer_override if self._issuer_override is not None else self.url

    @property
    def jwks_url(self) -> str:
        return self.url + JWKS_PATH

    @property
    def discovery_url(self) -> str:
        return self.url + DISCOVERY_PATH

    # -------------------------------------------------------------- fault injection

    @property
    def mode(self) -> FaultMode:
        return self._mode

    @mode.setter
    def mode(self, mode: FaultMode) -> None:
        if mode not in FAULT_MODES:
            raise IssuerError(f"unknown mode {mode!r}; expected one of {sorted(FAULT_MODES)}")
        with self._lock:
            previous, self._mode = self._mode, mode
        if not self._started or previous == mode:
            return
        if mode == "down":
            self._close_listener()
        elif previous == "down":
            self._open_listener()  # same port as before

    def _count_request(self, path: str) -> tuple[FaultMode, float]:
        with self._lock:
            self._counts[path] += 1
            return self._mode, self.slow_delay

    def request_count(self, path: str = JWKS_PATH) -> int:
        with self._lock:
            return self._counts[path]

    def request_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()

    # -------------------------------------------------------------- keys

    @property
    def current_key(self) -> SigningKey:
        with self._lock:
            return self._ring[0]

    @property
    def keys(self) -> list[SigningKey]:
        """The published key ring, newest (current) first."""
        with self._lock:
            return list(self._ring)

    def rotate(self, key: SigningKey | None = None) -> SigningKey:
        """Make a new key (or `key`) current; the newest `keep` keys stay published."""
        new_key = key if key is not None else generate_signing_key(self._generation_name)
        with self._lock:
            if any(existing.kid == new_key.kid for existing in self._ring):
                raise IssuerError(f"kid {new_key.kid!r} is already in the key ring")
            self._ring = [new_key, *self._ring][: self.keep]
        self._save_keys()
        if self._on_rotate is not None:
            self._on_rotate(new_key)
        return new_key

    def _rotate_periodically(self, interval: float) -> None:
        while not self._stop_rotation.wait(interval):
            try:
                self.rotate()
            except Exception as exc:  # keep rotating; the error is kept for inspection
                self.rotation_errors.append(exc)

    def _save_keys(self) -> None:
        if self._keys_dir is not None:
            save_key_ring(self._keys_dir, self.keys)

    def jwks(self, *, include_current: bool = True) -> dict[str, Any]:
        ring = self.keys
        return jwks_document(ring if include_current else ring[1:])

    def discovery_document(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "jwks_uri": self.jwks_url,
            "authorization_endpoint": self.url + "/authorize",
            "token_endpoint": self.url + "/token",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": sorted({key.alg for key in self.keys}),
        }

    def mint(
        self,
        claims: Mapping[str, Any] | None = None,
        *,
        key: SigningKey | None = None,
        now: float | None = None,
        lifetime: float | None = 300,
        header: Mapping[str, Any] | None = None,
        typ: str | None = "at+jwt",
    ) -> str:
        """A token from the current key (or `key`), with this issuer as `iss` unless given."""
        payload = {"iss": self.issuer, **(claims or {})}
        return mint_token(
            key if key is not None else self.current_key,
            payload,
            now=self._clock() if now is None else now,
            lifetime=lifetime,
            header=header,
            typ=typ,
        )


# ------------------------------------------------------------------ standalone process


def parse_duration(text: str) -> float:
    """An argparse type: the same durations as jwtgate.toml ("250ms", "10s", "2m", "1h")."""
    try:
        return config_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a duration like "10s", got {text!r}') from None


def _argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m spoa.devkit.issuer",
        description="Serve OIDC discovery and a rotating JWKS on loopback for development.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=0, help="port; 0 picks a free one")
    parser.add_argument("--alg", default="RS256", help="signing algorithm (default %(default)s)")
    parser.add_argument("--issuer", help="the iss value (default: the base URL)")
    parser.add_argument(
        "--rotate-every", type=parse_duration, help='rotate the signing key, e.g. "10s"'
    )
    parser.add_argument(
        "--keep", type=int, default=2, help="keys kept published (default %(default)s)"
    )
    parser.add_argument(
        "--max-age", type=int, default=60, help="JWKS Cache-Control max-age in seconds"
    )
    parser.add_argument(
        "--keys-dir", type=Path, help="key directory kept in step, for other processes to mint"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    options = _argument_parser().parse_args(argv)
    # Block the stop signals before any thread starts (threads inherit the mask), then wait
    # for them synchronously: no handler runs at an awkward moment inside a lock.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        with LocalIssuer(
            alg=options.alg,
            host=options.host,
            port=options.port,
            issuer=options.issuer,
            max_age=options.max_age,
            keep=options.keep,
            rotate_every=options.rotate_every,
            keys_dir=options.keys_dir,
        ) as issuer:
            print(issuer.url, flush=True)
            signal.sigwait(stop_signals)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
    return 0


if __name__ == "__main__":
    sys.exit(main())
