"""The C base64url decoder under ASan and UBSan, with every test that parses tokens."""

from __future__ import annotations

from pathlib import Path

from tests.support.sanitized import run_sanitized


def test_the_base64url_decoder_is_clean_under_asan_and_ubsan(tmp_path: Path) -> None:
    run_sanitized(
        tmp_path,
        "spoa.verifier._b64url",
        [
            "tests/verifier/test_b64url.py",
            "tests/verifier/test_parsing.py",
            "tests/verifier/test_fuzz_tokens.py",
        ],
    )
