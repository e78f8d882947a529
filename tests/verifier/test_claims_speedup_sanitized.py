"""The C claim compaction under ASan and UBSan, with the tests that verify tokens."""

from __future__ import annotations

from pathlib import Path

from tests.support.sanitized import run_sanitized


def test_the_claim_compaction_is_clean_under_asan_and_ubsan(tmp_path: Path) -> None:
    run_sanitized(
        tmp_path,
        "spoa.verifier._claims",
        [
            "tests/verifier/test_claims_speedup.py",
            "tests/verifier/test_verifier_cache.py",
            "tests/verifier/test_verify_many.py",
        ],
    )
