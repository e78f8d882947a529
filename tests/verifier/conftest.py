"""Shared fixtures for the verifier and key-manager tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Make `tests.support` importable whichever way pytest was started.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from verifier_helpers import KeyPair, make_key  # noqa: E402


@pytest.fixture(scope="session")
def rsa_key() -> KeyPair:
    return make_key("RS256", kid="rsa-1")


@pytest.fixture(scope="session")
def rsa_key_2() -> KeyPair:
    return make_key("RS256", kid="rsa-2")


@pytest.fixture(scope="session")
def all_keys(rsa_key: KeyPair) -> dict[str, KeyPair]:
    """One signing key per algorithm (RSA shared across RS/PS, as an IdP would)."""
    keys: dict[str, KeyPair] = {}
    for alg in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"):
        keys[alg] = rsa_key
    for alg in ("ES256", "ES384", "ES512", "EdDSA", "Ed25519", "Ed448"):
        keys[alg] = make_key(alg, kid=f"{alg.lower()}-1")
    for alg in ("HS256", "HS384", "HS512"):
        keys[alg] = make_key(alg, kid=f"{alg.lower()}-1")
    return keys
