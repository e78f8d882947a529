"""The C NOTIFY decoder, replay scanner and set-var encoder under ASan and UBSan.

It reads bytes that come, through HAProxy, from the network. This builds a sanitized copy
of the extension in a scratch directory and runs the differential and fuzz tests against
it in a child interpreter: any out-of-bounds read, use after free or undefined operation
aborts that run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTS = [
    "tests/protocol/test_speedups.py",
    "tests/protocol/test_fuzz_connection.py",
    "tests/protocol/test_memo.py",
]


def _runtime(name: str) -> str:
    path = subprocess.run(
        ["gcc", f"-print-file-name={name}"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert os.path.isabs(path), f"gcc has no {name} (Debian's gcc ships it)"
    return path


def test_the_decoder_is_clean_under_asan_and_ubsan(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "spoa", tmp_path / "spoa", ignore=shutil.ignore_patterns("*.so"))
    shutil.copytree(ROOT / "tests", tmp_path / "tests")
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    target = tmp_path / "spoa" / "protocol" / f"_speedups{sysconfig.get_config_var('EXT_SUFFIX')}"
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
            str(tmp_path / "spoa" / "protocol" / "_speedups.c"),
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
        [sys.executable, "-c", "import spoa.protocol._speedups as s; print(s.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip() == str(target)  # the sanitized build, not the installed one
    result = subprocess.run(
        # --capture=sys: a sanitizer report goes to the real stderr, kept below.
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--capture=sys", *TESTS],
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
