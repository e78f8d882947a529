"""The C NOTIFY decoder, replay scanner and set-var encoder under ASan and UBSan."""

from __future__ import annotations

from pathlib import Path

from tests.support.sanitized import run_sanitized


def test_the_decoder_is_clean_under_asan_and_ubsan(tmp_path: Path) -> None:
    run_sanitized(
        tmp_path,
        "spoa.protocol._speedups",
        [
            "tests/protocol/test_speedups.py",
            "tests/protocol/test_fuzz_connection.py",
            "tests/protocol/test_memo.py",
        ],
    )
