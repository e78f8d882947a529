"""The `jwtgate` command line, run as a user runs it: a real subprocess."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest

import spoa
from spoa.devkit.stack import free_port, http_get
from tests.support.polling import wait_until


def jwtgate(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spoa", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["run"],
        ["check-config"],
        ["reload"],
        ["token"],
        ["keys"],
        ["keys", "init"],
        ["demo"],
        ["bench"],
    ],
)
def test_every_command_has_useful_help(command: list[str]) -> None:
    result = jwtgate(*command, "--help")
    assert result.returncode == 0
    assert "usage: jwtgate" in result.stdout
    assert len(result.stdout.splitlines()) > 5


def test_the_exit_statuses_in_help_are_the_ones_used() -> None:
    from spoa.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE

    text = " ".join(jwtgate("--help").stdout.split())
    assert f"exit status: {EXIT_OK} done" in text
    assert f"{EXIT_FAILURE} failure" in text
    assert f"{EXIT_USAGE} usage error" in text
    assert "130 interrupted" in text
    assert jwtgate("run", "--no-such-option").returncode == EXIT_USAGE


def test_version_says_which_decoders_run() -> None:
    result = jwtgate("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("jwtgate ")
    # scripts/setup builds both
    assert "C NOTIFY decoder, C base64url decoder" in result.stdout


def test_no_command_prints_usage_not_a_traceback() -> None:
    result = jwtgate()
    assert result.returncode == 2
    assert "commands:" in result.stdout
    assert "Traceback" not in result.stderr


def test_keys_and_token_round_trip(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    assert jwtgate("keys", "init", str(keys), "--alg", "ES256").returncode == 0
    jwks = json.loads(jwtgate("keys", "show", str(keys)).stdout)
    assert len(jwks["keys"]) == 1
    result = jwtgate(
        "token",
        "--key",
        str(keys),
        "--iss",
        "https://issuer.test",
        "--sub",
        "alice",
        "--aud",
        "api",
        "--scope",
        "read write",
        "--claim",
        "tenant=acme",
        "--claim",
        'roles=["a","b"]',
        "--lifetime",
        "10m",
    )
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    public = jwt.PyJWK(jwks["keys"][0])
    claims = jwt.decode(token, public, algorithms=["ES256"], audience="api")
    assert claims["sub"] == "alice"
    assert claims["scope"] == "read write"
    assert claims["tenant"] == "acme"
    assert claims["roles"] == ["a", "b"]
    assert 590 <= claims["exp"] - claims["iat"] <= 600
    assert jwt.get_unverified_header(token)["typ"] == "at+jwt"

    assert jwtgate("keys", "rotate", str(keys), "--keep", "2").returncode == 0
    rotated = json.loads(jwtgate("keys", "show", str(keys)).stdout)
    assert len(rotated["keys"]) == 2
    new_token = jwtgate("token", "--key", str(keys), "--sub", "bob").stdout.strip()
    assert jwt.get_unverified_header(new_token)["kid"] == rotated["keys"][0]["kid"]


def test_key_errors_are_one_line(tmp_path: Path) -> None:
    result = jwtgate("token", "--key", str(tmp_path / "missing"), "--alg", "RS256")
    assert result.returncode == 1
    assert result.stderr.startswith("jwtgate: cannot load a signing key")
    assert "Traceback" not in result.stderr
    # Without --alg too: the missing path is the problem to report, not the missing flag.
    no_alg = jwtgate("token", "--key", str(tmp_path / "missing"))
    assert no_alg.stderr.startswith("jwtgate: cannot load a signing key")
    assert "no such file or directory" in no_alg.stderr
    keys = tmp_path / "k"
    jwtgate("keys", "init", str(keys))
    again = jwtgate("keys", "init", str(keys))
    assert again.returncode == 1
    assert "already holds keys" in again.stderr
    bad_claim = jwtgate("token", "--key", str(keys), "--claim", "novalue")
    assert bad_claim.returncode == 1
    assert "--claim expects NAME=VALUE" in bad_claim.stderr


def test_reload_signals_a_running_agent(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    jwtgate("keys", "init", str(keys))
    agent_port, metrics_port = free_port(), free_port()
    config = tmp_path / "jwtgate.toml"
    config.write_text(
        f'[agent]\nlisten = "127.0.0.1:{agent_port}"\n'
        f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
        '[[issuers]]\nname = "dev"\nissuer = "https://dev"\naudiences = ["api"]\n'
        f'algorithms = ["RS256"]\njwks_file = "{keys / "jwks.json"}"\n'
        '[policies.default]\nissuers = ["dev"]\n'
    )
    pid_file = tmp_path / "agent.pid"
    log = (tmp_path / "agent.log").open("w")
    agent = subprocess.Popen(
        [sys.executable, "-m", "spoa", "run", "--config", str(config), "--pid-file", str(pid_file)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not pid_file.exists():
            time.sleep(0.05)
        assert int(pid_file.read_text()) == agent.pid

        def ready() -> bool:
            try:
                return http_get(f"http://127.0.0.1:{metrics_port}/readyz")[0] == 200
            except OSError:
                return False

        # Regression (test review): a 503 spun the loop without a pause, and a start that
        # never became ready went on unnoticed.
        wait_until(ready, max(deadline - time.monotonic(), 1.0), "the agent's /readyz")
        jwtgate("keys", "rotate", str(keys))
        result = jwtgate("reload", "--pid-file", str(pid_file))
        assert result.returncode == 0
        assert "reload requested" in result.stdout
        while time.monotonic() < deadline:
            text = (tmp_path / "agent.log").read_text()
            if '"event": "reloaded"' in text:
                break
            time.sleep(0.05)
        assert '"event": "reloaded"' in (tmp_path / "agent.log").read_text()
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(15)
        log.close()
    assert agent.returncode == 0
    assert not pid_file.exists()  # removed on a clean stop


def test_reload_of_a_missing_process_is_a_clear_error(tmp_path: Path) -> None:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    result = jwtgate("reload", "--pid", str(process.pid))
    assert result.returncode == 1
    assert f"no process {process.pid}" in result.stderr


@pytest.mark.parametrize("extra", [[], ["run", "--name", "jwtgate"], ["run", "jwtgate"]])
def test_reload_never_signals_a_process_that_is_not_an_agent(
    extra: list[str], tmp_path: Path
) -> None:
    """Regression: a pid file left by a killed agent sent SIGHUP to whatever process had
    taken its number since, which ended it, and reported success. `jwtgate` and `run`
    elsewhere on a command line (`docker run --name jwtgate`) do not make an agent."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *extra])
    try:
        pid_file = tmp_path / "agent.pid"
        pid_file.write_text(f"{other.pid}\n")
        for args in (("--pid-file", str(pid_file)), ("--pid", str(other.pid))):
            result = jwtgate("reload", *args)
            assert result.returncode == 1
            assert f"process {other.pid} is not a jwtgate agent" in result.stderr
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


@pytest.mark.parametrize("pid", ["0", "-1", "-4242", "1", "99999999999999999999"])
def test_reload_never_signals_a_process_group_or_init(pid: str, tmp_path: Path) -> None:
    """Regression: `reload --pid 0` sent SIGHUP to the caller's whole process group (and
    -1 would reach every process), and a huge pid came out as a traceback."""
    result = jwtgate("reload", "--pid", pid)
    assert result.returncode == 1
    assert "is not the process id of an agent" in result.stderr
    pid_file = tmp_path / "agent.pid"
    pid_file.write_text("0\n")
    result = jwtgate("reload", "--pid-file", str(pid_file))
    assert (result.returncode, "Traceback" in result.stderr) == (1, False)


def test_bad_paths_and_rates_are_errors_not_tracebacks(tmp_path: Path) -> None:
    """Regression: an unwritable pid file and `demo --rate 0` raised tracebacks."""
    keys = tmp_path / "keys"
    jwtgate("keys", "init", str(keys))
    config = tmp_path / "c.toml"
    config.write_text(
        '[metrics]\nlisten = ""\n[[issuers]]\nname = "local"\nissuer = "https://i.example"\n'
        f'algorithms = ["ES256"]\naudiences = ["api"]\njwks_file = "{keys}/jwks.json"\n'
        '[policies.default]\nissuers = ["local"]\n'
    )
    missing_dir = tmp_path / "nowhere" / "agent.pid"
    result = jwtgate("run", "--config", str(config), "--pid-file", str(missing_dir))
    assert result.returncode == 1
    assert "cannot write the pid file" in result.stderr
    assert "Traceback" not in result.stderr
    for rate in ("0", "-5", "nan", "inf"):
        result = jwtgate("demo", "--rate", rate)
        assert result.returncode == 2
        assert "above 0" in result.stderr


def test_run_refuses_a_busy_port(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    jwtgate("keys", "init", str(keys))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = tmp_path / "c.toml"
        config.write_text(
            f'[agent]\nlisten = "127.0.0.1:{port}"\n[metrics]\nlisten = ""\n'
            '[[issuers]]\nname = "dev"\nissuer = "https://dev"\naudiences = ["api"]\n'
            f'algorithms = ["RS256"]\njwks_file = "{keys / "jwks.json"}"\n'
            '[policies.default]\nissuers = ["dev"]\n'
        )
        pid_file = tmp_path / "agent.pid"
        pid_file.write_text("4242\n")  # the running agent's
        result = jwtgate("run", "--config", str(config), "--pid-file", str(pid_file))
    assert result.returncode == 1
    assert "agent.listen: cannot listen on" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    # Regression: the failed start wrote its pid over the running agent's, then removed
    # the file, and `jwtgate reload --pid-file` could no longer find the running agent.
    assert pid_file.read_text() == "4242\n"


def _package_copy(root: Path) -> Path:
    """This checkout's `spoa` package alone under `root`, as a tree without scripts/."""
    shutil.copytree(
        Path(spoa.__file__).parent, root / "spoa", ignore=shutil.ignore_patterns("__pycache__")
    )
    return root


def _jwtgate_from(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The command line of the package copy under `root`."""
    return subprocess.run(
        [sys.executable, "-m", "spoa", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )


def test_bench_runs_the_checkouts_script_and_passes_its_exit_code(tmp_path: Path) -> None:
    root = _package_copy(tmp_path)
    (root / "scripts").mkdir()
    script = root / "scripts" / "bench"
    script.write_text('#!/bin/sh\necho "bench was run with: $*" > "$(dirname "$0")/ran"\nexit 3\n')
    script.chmod(0o755)
    result = _jwtgate_from(root, "bench", "--short")
    assert result.returncode == 3
    assert (root / "scripts" / "ran").read_text() == "bench was run with: --short\n"


def test_bench_takes_the_place_of_the_command(tmp_path: Path) -> None:
    """So that a `kill` of `jwtgate bench` reaches scripts/bench and its clean-up.
    Regression: it ran as a child, orphaned with everything it started."""
    root = _package_copy(tmp_path)
    (root / "scripts").mkdir()
    script = root / "scripts" / "bench"
    script.write_text('#!/bin/sh\necho $$ > "$(dirname "$0")/pid"\n')
    script.chmod(0o755)
    command = subprocess.Popen(
        [sys.executable, "-m", "spoa", "bench"],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert command.wait(30) == 0
    assert int((root / "scripts" / "pid").read_text()) == command.pid


def test_bench_outside_a_checkout_says_where_the_suite_is(tmp_path: Path) -> None:
    root = _package_copy(tmp_path)
    result = _jwtgate_from(root, "bench")
    assert result.returncode == 1
    assert result.stderr.startswith("jwtgate: the benchmark suite lives in the source checkout")
    assert "Traceback" not in result.stderr
