"""Run tests against an ASan+UBSan build of one of the package's C extensions.

The extensions read bytes that come, through HAProxy, from the network. This builds a
sanitized copy of one in a scratch copy of the tree and runs the given tests against it
in a child interpreter: any out-of-bounds read, use after free or undefined operation
aborts that run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _runtime(name: str) -> str:
    path = subprocess.run(
        ["gcc", f"-print-file-name={name}"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert os.path.isabs(path), f"gcc has no {name} (Debian's gcc ships it)"
    return path


def run_sanitized(tmp_path: Path, module: str, tests: Sequence[str]) -> None:
    """Build `module` (e.g. "spoa.protocol._speedups", from its .c beside it) with the
    sanitizers, then run `tests` with it; fail on any report."""
    shutil.copytree(ROOT / "spoa", tmp_path / "spoa", ignore=shutil.ignore_patterns("*.so"))
    shutil.copytree(ROOT / "tests", tmp_path / "tests")
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    stem = tmp_path.joinpath(*module.split("."))
    target = stem.with_name(stem.name + sysconfig.get_config_var("EXT_SUFFIX"))
    subprocess.run(
        [
            "gcc",
            "-shared",
            "-fPIC",
            "-O1",
            "-g",
            "-fno-omit-frame-pointer",
            "-fsanitize=address,undefined",
            "-fno-sanitize-recover=all",
            f"-I{sysconfig.get_paths()['include']}",
            str(stem.with_suffix(".c")),
            "-o",
            str(target),
        ],
        check=True,
        capture_output=True,
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(tmp_path),
        "LD_PRELOAD": f"{_runtime('libasan.so')} {_runtime('libubsan.so')}",
        # Every object from malloc, so ASan sees the bounds of each buffer (pymalloc's
        # arenas would hide an overrun). CPython's own leaks are not ours to report.
        "PYTHONMALLOC": "malloc",
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
    }
    env.pop("JWTGATE_NO_SPEEDUPS", None)
    probe = subprocess.run(
        [sys.executable, "-c", f"import {module} as m; print(m.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip() == str(target)  # the sanitized build, not the installed one
    result = subprocess.run(
        # --capture=sys: a sanitizer report goes to the real stderr, kept below.
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--capture=sys", *tests],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    report = result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode == 0, report
    assert "ERROR: AddressSanitizer" not in report
    assert "runtime error" not in report
