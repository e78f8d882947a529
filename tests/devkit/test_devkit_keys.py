"""Signing keys, JWKS documents and key directories, checked against jwcrypto."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed448
from jwcrypto import jwk

from spoa.devkit import keys as keys_module
from spoa.devkit.errors import KeyDirError, KeyMaterialError, UnsupportedAlgorithmError
from spoa.devkit.keys import (
    GENERATION_NAMES,
    PublicKey,
    SigningKey,
    generate_signing_key,
    init_key_dir,
    jwk_thumbprint,
    jwks_document,
    load_current_key,
    load_key_ring,
    load_signing_key_pem,
    rotate_key_dir,
)

ASYMMETRIC_NAMES = [name for name in GENERATION_NAMES if not name.startswith("HS")]


@pytest.fixture(scope="module")
def keys_by_name() -> dict[str, SigningKey]:
    return {name: generate_signing_key(name) for name in GENERATION_NAMES}


@pytest.mark.parametrize("name", ASYMMETRIC_NAMES)
def test_public_jwk_matches_jwcrypto_and_kid_is_its_thumbprint(
    keys_by_name: dict[str, SigningKey], name: str
) -> None:
    key = keys_by_name[name]
    document = key.public_jwk()
    assert document["kid"] == key.kid
    assert document["alg"] == key.alg
    assert document["use"] == "sig"
    assert "d" not in document
    parsed = jwk.JWK(**document)
    assert not parsed.has_private
    assert parsed.thumbprint() == key.kid
    from_pem = jwk.JWK.from_pem(key.public_pem())
    assert from_pem.thumbprint() == key.kid


@pytest.mark.parametrize("name", ASYMMETRIC_NAMES)
def test_public_pem_is_spki(keys_by_name: dict[str, SigningKey], name: str) -> None:
    pem = keys_by_name[name].public_pem()
    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----\n")


@pytest.mark.parametrize("name", GENERATION_NAMES)
def test_private_pem_round_trips(keys_by_name: dict[str, SigningKey], name: str) -> None:
    key = keys_by_name[name]
    loaded = load_signing_key_pem(key.private_pem(), key.alg)
    assert loaded.kid == key.kid
    assert loaded.alg == key.alg
    if key.is_symmetric:
        assert loaded == key
    else:
        assert loaded.public_jwk() == key.public_jwk()
    if key.alg.startswith(("HS", "RS", "Ed")):  # deterministic signature schemes
        assert loaded.sign(b"payload") == key.sign(b"payload")


@pytest.mark.parametrize(("alg", "size"), [("HS256", 32), ("HS384", 48), ("HS512", 64)])
def test_hmac_secret_has_the_hash_size_and_no_public_form(alg: str, size: int) -> None:
    key = generate_signing_key(alg)
    assert isinstance(key.private_key, bytes)
    assert len(key.private_key) == size
    assert jwk.JWK(**key.secret_jwk()).thumbprint() == key.kid
    with pytest.raises(KeyMaterialError):
        key.public_jwk()
    with pytest.raises(KeyMaterialError):
        key.public_pem()


def test_repr_never_shows_the_secret() -> None:
    key = generate_signing_key("HS256")
    assert isinstance(key.private_key, bytes)
    assert repr(key.private_key) not in repr(key)
    assert key.private_key.hex() not in repr(key)
    assert "private_key" not in repr(key)


def test_eddsa_curves() -> None:
    assert generate_signing_key("Ed448").public_jwk()["crv"] == "Ed448"
    assert generate_signing_key("Ed25519").public_jwk()["crv"] == "Ed25519"
    assert generate_signing_key("EdDSA").alg == "EdDSA"


def test_explicit_kid_is_kept() -> None:
    assert generate_signing_key("ES256", kid="2026-01").kid == "2026-01"


@pytest.mark.parametrize("alg", ["none", "HS1", "ES256K", "RSA-OAEP", ""])
def test_unsupported_algorithms_are_refused(alg: str) -> None:
    with pytest.raises(UnsupportedAlgorithmError):
        generate_signing_key(alg)


def test_key_material_must_fit_the_algorithm() -> None:
    p256 = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(KeyMaterialError):
        SigningKey("k", "ES384", p256)
    with pytest.raises(KeyMaterialError):
        SigningKey("k", "RS256", p256)
    with pytest.raises(KeyMaterialError):
        SigningKey("k", "HS256", p256)
    with pytest.raises(KeyMaterialError):
        SigningKey("k", "EdDSA", b"secret")


def test_thumbprint_refuses_unknown_key_types() -> None:
    with pytest.raises(KeyMaterialError):
        jwk_thumbprint({"kty": "weird"})


def test_jwks_document_parses_with_jwcrypto_and_leaves_out_hmac_keys(
    keys_by_name: dict[str, SigningKey],
) -> None:
    ring = list(keys_by_name.values())
    document = jwks_document(ring)
    key_set = jwk.JWKSet.from_json(json.dumps(document))
    expected = {key.kid for key in ring if not key.is_symmetric}
    assert {member["kid"] for member in document["keys"]} == expected
    assert len(document["keys"]) == len(expected)
    for kid in expected:
        assert key_set.get_key(kid) is not None
    for member in document["keys"]:
        assert member["kty"] != "oct"
        assert "d" not in member


# ---------------------------------------------------------------- key directories


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_key_dir_writes_the_documented_files(tmp_path: Path) -> None:
    directory = tmp_path / "keys"
    key = init_key_dir(directory, "ES256")
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        ["current", "keys.json", "jwks.json", f"{key.kid}.key.pem", f"{key.kid}.pub.pem"]
    )
    assert (directory / "current").read_text() == f"{key.kid}\n"
    assert _mode(directory / f"{key.kid}.key.pem") == 0o600
    assert _mode(directory / f"{key.kid}.pub.pem") & 0o044 == 0o044
    assert (directory / f"{key.kid}.pub.pem").read_bytes() == key.public_pem()
    key_set = jwk.JWKSet.from_json((directory / "jwks.json").read_text())
    assert key_set.get_key(key.kid).thumbprint() == key.kid
    loaded = load_current_key(directory)
    assert (loaded.kid, loaded.alg) == (key.kid, "ES256")
    assert loaded.public_jwk() == key.public_jwk()


def test_init_refuses_an_existing_key_dir(tmp_path: Path) -> None:
    init_key_dir(tmp_path, "ES256")
    with pytest.raises(KeyDirError, match="rotate"):
        init_key_dir(tmp_path, "ES256")


def test_kids_that_cannot_be_file_names_are_refused(tmp_path: Path) -> None:
    for kid in ("../escape", "a/b", ".hidden", ""):
        with pytest.raises(KeyDirError):
            init_key_dir(tmp_path / "keys", "ES256", kid=kid)
    assert not (tmp_path / "escape.key.pem").exists()


def test_rotation_keeps_the_newest_keys_and_only_the_current_private_key(tmp_path: Path) -> None:
    first = init_key_dir(tmp_path, "ES256")
    second = rotate_key_dir(tmp_path, keep=2)
    third = rotate_key_dir(tmp_path, keep=2)
    published = json.loads((tmp_path / "jwks.json").read_text())
    assert [member["kid"] for member in published["keys"]] == [third.kid, second.kid]
    assert load_current_key(tmp_path).kid == third.kid
    assert (tmp_path / "current").read_text().strip() == third.kid
    private_files = sorted(p.name for p in tmp_path.glob("*.key.pem"))
    public_files = sorted(p.name for p in tmp_path.glob("*.pub.pem"))
    assert private_files == [f"{third.kid}.key.pem"]
    assert public_files == sorted([f"{third.kid}.pub.pem", f"{second.kid}.pub.pem"])
    assert not any(first.kid in p.name for p in tmp_path.iterdir())
    ring = load_key_ring(tmp_path)
    assert isinstance(ring[0], SigningKey)
    assert isinstance(ring[1], PublicKey)
    assert ring[1].public_jwk() == second.public_jwk()


@pytest.mark.parametrize("keep", [1, 3])
def test_rotation_honours_keep(tmp_path: Path, keep: int) -> None:
    init_key_dir(tmp_path, "EdDSA")
    kids = [rotate_key_dir(tmp_path, keep=keep).kid for _ in range(4)]
    published = json.loads((tmp_path / "jwks.json").read_text())
    assert [member["kid"] for member in published["keys"]] == kids[::-1][:keep]


def test_rotation_refuses_keep_below_one(tmp_path: Path) -> None:
    init_key_dir(tmp_path, "ES256")
    with pytest.raises(KeyDirError):
        rotate_key_dir(tmp_path, keep=0)


def test_rotation_keeps_the_kind_of_key_unless_told_otherwise(tmp_path: Path) -> None:
    init_key_dir(tmp_path, "Ed448")
    rotated = rotate_key_dir(tmp_path)
    assert isinstance(rotated.private_key, ed448.Ed448PrivateKey)
    switched = rotate_key_dir(tmp_path, alg="ES384")
    assert load_current_key(tmp_path).alg == "ES384"
    assert switched.public_jwk()["crv"] == "P-384"


def test_hmac_key_dir_keeps_secrets_for_verifiers_and_publishes_nothing(tmp_path: Path) -> None:
    first = init_key_dir(tmp_path, "HS256")
    second = rotate_key_dir(tmp_path, keep=2)
    assert json.loads((tmp_path / "jwks.json").read_text()) == {"keys": []}
    ring = load_key_ring(tmp_path)
    assert [entry.kid for entry in ring] == [second.kid, first.kid]
    assert all(isinstance(entry, SigningKey) for entry in ring)
    assert ring[1] == first
    assert all(_mode(p) == 0o600 for p in tmp_path.glob("*.key.pem"))
    assert load_current_key(tmp_path) == second


def test_missing_or_broken_key_dirs_give_key_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(KeyDirError, match="not a key directory"):
        load_current_key(tmp_path)
    with pytest.raises(KeyDirError, match="not a key directory"):
        rotate_key_dir(tmp_path)
    key = init_key_dir(tmp_path, "ES256")
    (tmp_path / f"{key.kid}.key.pem").unlink()
    with pytest.raises(KeyDirError, match="missing"):
        load_current_key(tmp_path)
    (tmp_path / "keys.json").write_text("{not json")
    with pytest.raises(KeyDirError, match="not valid JSON"):
        load_key_ring(tmp_path)


def test_an_interrupted_write_leaves_the_previous_file_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    init_key_dir(tmp_path, "ES256")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def failing_replace(source: str, target: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(keys_module.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        rotate_key_dir(tmp_path)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name in before} == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_readers_never_see_half_written_files_during_rotation(tmp_path: Path) -> None:
    init_key_dir(tmp_path, "ES256")
    stop = threading.Event()
    problems: list[str] = []
    reads = 0

    def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            try:
                document = json.loads((tmp_path / "jwks.json").read_bytes())
                if not document["keys"]:
                    problems.append("empty key set")
                load_current_key(tmp_path)
                reads += 1
            except (ValueError, KeyDirError, KeyMaterialError) as exc:
                problems.append(f"{type(exc).__name__}: {exc}")

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(30):
            rotate_key_dir(tmp_path, keep=2)
    finally:
        stop.set()
        thread.join()
    assert problems == []
    assert reads > 0
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
