"""A whole jwtgate deployment on loopback: HAProxy with the shipped haproxy/ files,
jwtgate agents, and echo backends. Used by the demo, the end-to-end tests and the
benchmarks, so all three run what users run.

Every process started here is stopped on exit, whatever happens; ports are chosen at
run time.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn

from spoa.devkit.errors import DevkitError


class StackError(DevkitError):
    """A process of the stack could not be started or did not become ready."""


_STOPPING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _interrupt(signum: int, frame: object) -> None:
    # A second `kill` must not cut short the clean-up the first one started.
    for stopping in _STOPPING_SIGNALS:
        signal.signal(stopping, signal.SIG_IGN)
    raise KeyboardInterrupt


@contextlib.contextmanager
def stopping_on_signals() -> Iterator[None]:
    """Within: a `kill` or `timeout` (SIGTERM) or a closed terminal (SIGHUP) stops the
    caller as Ctrl-C does, so its `finally` blocks run. The processes started here run in
    sessions of their own (Ctrl-C reaches us, not them) and would outlive it otherwise.
    A signal the caller was started ignoring (`nohup`) stays ignored."""
    previous = {
        signum: signal.signal(signum, _interrupt)
        for signum in _STOPPING_SIGNALS
        if signal.getsignal(signum) is not signal.SIG_IGN
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_main(main: Callable[[], int]) -> NoReturn:
    """Exit with what a command's `main` returns. A `kill`, `timeout` or closed terminal
    stops it as Ctrl-C does, with every process it started stopped, and ends in exit
    status 130 and one line, not a traceback. (Regression: `timeout` killed the bench's
    load generator alone, and the agent it had started ran on.)"""
    with stopping_on_signals():
        try:
            code = main()
        except KeyboardInterrupt:
            print("interrupted: every process it started is stopped", file=sys.stderr)
            code = 130
    sys.exit(code)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
    )
    if found is None:
        raise StackError("haproxy is not installed (apt-get install haproxy)")
    return found


def haproxy_config_dir() -> Path:
    """The repository's haproxy/ directory (the files users copy)."""
    env = os.environ.get("JWTGATE_HAPROXY_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "haproxy")
    for candidate in candidates:
        if (candidate / "haproxy.cfg").is_file() and (candidate / "spoe-jwt.conf").is_file():
            return candidate
    raise StackError(
        "cannot find haproxy/haproxy.cfg; run from a checkout or set JWTGATE_HAPROXY_DIR"
    )


def wait_for_port(port: int, *, timeout: float, process: ManagedProcess | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.exited():
            raise StackError(f"{process.name} exited early:\n{process.log_tail()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise StackError(f"nothing listens on 127.0.0.1:{port} after {timeout:g}s")


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    if not url.startswith("http://127.0.0.1:"):
        raise StackError(f"the stack only talks to loopback, not {url}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (checked)
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class ManagedProcess:
    """A child process with its output in a log file; stop() always reaps it."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_path: Path,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(os.environ if env is None else env)
        self.log_path = log_path
        self.cwd = cwd
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagedProcess:
        log = self.log_path.open("ab")
        try:
            self._process = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in the terminal reaches us, not them
            )
        finally:
            log.close()
        return self

    @property
    def pid(self) -> int:
        if self._process is None:
            raise StackError(f"{self.name} is not running")
        return self._process.pid

    def exited(self) -> bool:
        return self._process is None or self._process.poll() is not None

    def signal(self, signum: int) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signum)

    def wait(self, timeout: float) -> int | None:
        if self._process is None:
            return None
        try:
            return self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit status."""
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


# --- echo backends -----------------------------------------------------------------------


_CLIENT_ADDRESS_HEADERS = frozenset({"x-forwarded-for", "forwarded", "x-real-ip"})
_ROUTING_HEADERS = frozenset({"x-original-url", "x-rewrite-url"})


def _as_dashed(name: str) -> str:
    """A header name as a CGI server reads it, spelled with dashes: X.Real_IP -> x-real-ip."""
    return re.sub("[^a-z0-9]", "-", name.lower())


class _EchoHandler(BaseHTTPRequestHandler):
    server: _EchoServer
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: with Nagle's algorithm the body waited for
    # the client's delayed ACK, 40 ms on every kept-alive request.
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        self._consume_body()
        if self.path == "/healthz":
            self._reply(200, {"ok": True})
            return
        self.server.requests += 1
        # Any spelling (X_JWT_Sub, X.JWT.Sub): CGI and FastCGI servers read them as one.
        headers = {
            k.lower(): v for k, v in self.headers.items() if _as_dashed(k).startswith("x-jwt-")
        }
        self._reply(
            200,
            {
                "backend": self.server.name,
                "path": self.path,
                "jwt_headers": headers,
                "authorization": "authorization" in {k.lower() for k in self.headers},
                # What could turn the connection into a tunnel past the gateway.
                "upgrade_headers": {
                    k.lower(): v
                    for k, v in self.headers.items()
                    if k.lower() in ("upgrade", "connection", "http2-settings")
                },
                # What a service might route by instead of the path.
                "routing_headers": {
                    k.lower(): v
                    for k, v in self.headers.items()
                    if _as_dashed(k) in _ROUTING_HEADERS
                },
                # What the service would take for the client's address.
                "client_address_headers": {
                    k.lower(): v
                    for k, v in self.headers.items()
                    if _as_dashed(k) in _CLIENT_ADDRESS_HEADERS
                },
            },
        )

    do_POST = do_GET

    def _consume_body(self) -> None:
        """Read the request's body, so the next request on a kept-alive connection starts
        where this one ends (unread, a body could carry a request of its own past the
        gateway). A body it cannot delimit closes the connection instead."""
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") is not None or (
            # ASCII digits only: isdigit() also takes "²", which int() refuses.
            length is not None and not (length.isascii() and length.isdigit())
        ):
            self.close_connection = True
        elif length is not None:
            self.rfile.read(int(length))

    def _reply(self, status: int, body: Mapping[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Backend", self.server.name)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _EchoServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, name: str) -> None:
        super().__init__(("127.0.0.1", 0), _EchoHandler)
        self.name = name
        self.requests = 0

    def handle_error(self, request: Any, client_address: Any) -> None:
        # HAProxy's health checks close early; a reset peer is not worth a traceback.
        pass


class EchoBackend:
    """An HTTP service that answers with its name and the X-JWT-* headers it received."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._server = _EchoServer(name)
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"echo-{name}")

    @property
    def port(self) -> int:
        port: int = self._server.server_address[1]
        return port

    @property
    def requests(self) -> int:
        return self._server.requests

    def start(self) -> EchoBackend:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


# --- the stack ---------------------------------------------------------------------------


@dataclass
class AgentProcess:
    name: str
    port: int
    metrics_port: int
    config_path: Path
    process: ManagedProcess

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"


@dataclass
class StackOptions:
    """What to start. `agent_config` is the jwtgate.toml text without [agent]/[metrics]
    tables' listen keys, which the stack fills in per agent."""

    agent_config: str
    agents: int = 2
    workers: int = 1
    backends: int = 2
    haproxy_env: Mapping[str, str] = field(default_factory=dict)
    haproxy: str | None = None  # binary; Debian's by default
    ready_timeout: float = 30.0
    workdir: Path | None = None


class Stack:
    """HAProxy + agents + echo backends, all on 127.0.0.1. A context manager."""

    def __init__(self, options: StackOptions) -> None:
        self.options = options
        self._own_workdir = options.workdir is None
        self.workdir = options.workdir or Path(tempfile.mkdtemp(prefix="jwtgate-stack-"))
        self.agents: list[AgentProcess] = []
        self.backends: list[EchoBackend] = []
        self.haproxy: ManagedProcess | None = None
        self.frontend_port = 0
        self.stats_port = 0
        self._exit = contextlib.ExitStack()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.frontend_port}"

    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        for index in range(self.options.backends):
            backend = EchoBackend(f"app{index + 1}").start()
            self._exit.callback(backend.stop)
            self.backends.append(backend)
        for index in range(self.options.agents):
            self.agents.append(self._start_agent(index))
        for agent in self.agents:
            self.wait_agent_ready(agent)
        self._start_haproxy()

    def close(self) -> None:
        self._exit.close()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- agents --

    def agent_toml(self, agent_port: int, metrics_port: int) -> str:
        return (
            f'[agent]\nlisten = "127.0.0.1:{agent_port}"\nworkers = {self.options.workers}\n'
            f'ready_timeout = "{self.options.ready_timeout:g}s"\n'
            f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n' + self.options.agent_config
        )

    def _start_agent(self, index: int) -> AgentProcess:
        name = f"agent{index + 1}"
        port, metrics_port = free_port(), free_port()
        config_path = self.workdir / f"{name}.toml"
        config_path.write_text(self.agent_toml(port, metrics_port))
        process = ManagedProcess(
            name,
            [sys.executable, "-m", "spoa", "run", "--config", str(config_path)],
            log_path=self.workdir / f"{name}.log",
        ).start()
        self._exit.callback(process.stop)
        return AgentProcess(name, port, metrics_port, config_path, process)

    def wait_agent_ready(self, agent: AgentProcess) -> None:
        deadline = time.monotonic() + self.options.ready_timeout
        while time.monotonic() < deadline:
            if agent.process.exited():
                raise StackError(f"{agent.name} exited early:\n{agent.process.log_tail()}")
            with contextlib.suppress(OSError):
                status, _ = http_get(f"{agent.metrics_url}/readyz", timeout=0.5)
                if status == 200:
                    wait_for_port(agent.port, timeout=5, process=agent.process)
                    return
            time.sleep(0.05)
        raise StackError(f"{agent.name} not ready after {self.options.ready_timeout:g}s")

    def restart_agent(self, agent: AgentProcess) -> None:
        agent.process.stop()
        agent.process = ManagedProcess(
            agent.name,
            agent.process.argv,
            log_path=agent.process.log_path,
        ).start()
        self._exit.callback(agent.process.stop)
        self.wait_agent_ready(agent)

    # -- haproxy --

    def haproxy_environment(self) -> dict[str, str]:
        config_dir = haproxy_config_dir()
        env = dict(os.environ)
        env.update(
            {
                "JWTGATE_LISTEN": f"127.0.0.1:{self.frontend_port}",
                "JWTGATE_STATS_LISTEN": f"127.0.0.1:{self.stats_port}",
                "JWTGATE_SPOE_CONF": str(config_dir / "spoe-jwt.conf"),
                # The demo shows the report-only example policy on /shadow.
                "JWTGATE_SHADOW": "1",
            }
        )
        for index, agent in enumerate(self.agents[:2]):
            env[f"JWTGATE_AGENT{index + 1}"] = f"127.0.0.1:{agent.port}"
        if len(self.agents) == 1:
            env["JWTGATE_AGENT2"] = f"127.0.0.1:{self.agents[0].port}"
        for index, backend in enumerate(self.backends[:2]):
            env[f"JWTGATE_BACKEND{index + 1}"] = f"127.0.0.1:{backend.port}"
        if len(self.backends) == 1:
            env["JWTGATE_BACKEND2"] = f"127.0.0.1:{self.backends[0].port}"
        env.update(self.options.haproxy_env)
        return env

    def _start_haproxy(self) -> None:
        self.frontend_port, self.stats_port = free_port(), free_port()
        binary = self.options.haproxy or haproxy_binary()
        config = haproxy_config_dir() / "haproxy.cfg"
        env = self.haproxy_environment()
        check = subprocess.run(
            [binary, "-c", "-q", "-f", str(config)], env=env, capture_output=True, check=False
        )
        if check.returncode != 0:
            raise StackError(f"haproxy rejects {config}:\n{check.stderr.decode(errors='replace')}")
        self.haproxy = ManagedProcess(
            "haproxy",
            [binary, "-db", "-f", str(config)],
            env=env,
            log_path=self.workdir / "haproxy.log",
        ).start()
        self._exit.callback(self.haproxy.stop)
        wait_for_port(self.frontend_port, timeout=10, process=self.haproxy)
        self.wait_servers_up(timeout=self.options.ready_timeout)

    def server_states(self) -> dict[tuple[str, str], str]:
        """(backend, server) -> status, from HAProxy's stats page."""
        status, body = http_get(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=1)
        if status != 200:
            return {}
        rows = csv.DictReader(io.StringIO(body.decode().lstrip("# ")))
        return {
            (row["pxname"], row["svname"]): row["status"]
            for row in rows
            if row["svname"] not in ("FRONTEND", "BACKEND")
        }

    def wait_servers_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states: dict[tuple[str, str], str] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                states = self.server_states()
                if states and all(s.startswith("UP") for s in states.values()):
                    return
            time.sleep(0.1)
        raise StackError(f"HAProxy servers not all UP after {timeout:g}s: {states}")
