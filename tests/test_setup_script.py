"""scripts/setup refuses what it cannot use before it touches anything.

It may remove a `.venv` made with another interpreter, so a PYTHON it cannot make a venv
with, or a directory that is not a jwtgate checkout, must stop it first. Each case runs a
copy of the script inside a throwaway directory: should a check ever let one through, the
harm stays there, and the test sees it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _fake_checkout(directory: Path, name: str = "jwtgate") -> Path:
    (directory / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup", directory / "scripts" / "setup")
    (directory / "pyproject.toml").write_text(f'[project]\nname = "{name}"\n')
    venv = directory / ".venv"
    venv.mkdir()
    (venv / "pyvenv.cfg").write_text("executable = /nowhere/python3\n")
    return directory / "scripts" / "setup"


def _run(script: Path, cwd: Path, python: str | None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    if python is not None:
        env["PYTHON"] = python
    return subprocess.run(
        [str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize(
    "python",
    [
        # Regression (caught before it landed): an exit-status check let /bin/true
        # through, and the run went on to remove the checkout's .venv.
        "/bin/true",
        "no-such-python3",
    ],
)
def test_a_python_it_cannot_use_is_named(tmp_path: Path, python: str) -> None:
    script = _fake_checkout(tmp_path)
    done = _run(script, tmp_path, python)
    assert done.returncode == 1
    assert f"PYTHON={python} is not a Python 3.11 or newer" in done.stderr
    assert (tmp_path / ".venv" / "pyvenv.cfg").exists()


def test_it_works_only_in_a_jwtgate_checkout(tmp_path: Path) -> None:
    script = _fake_checkout(tmp_path, name="something-else")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = _run(script, elsewhere, None)
    assert done.returncode == 1
    assert "is not a jwtgate checkout" in done.stderr
    assert (tmp_path / ".venv" / "pyvenv.cfg").exists()
