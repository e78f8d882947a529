"""Key loading (PEM, JWK, JWKS, HMAC secrets) and how keys are matched to tokens."""

from __future__ import annotations

import json

import pytest
from verifier_helpers import (
    CONTEXT,
    NOW,
    POLICY,
    KeyPair,
    b64,
    default_claims,
    make_key,
    mint,
    verifier_for,
)

from spoa.verifier import (
    KeyLoadError,
    KeySet,
    Reason,
    TokenRejected,
    hmac_key,
    load_jwk,
    load_jwks,
    load_key_file_bytes,
    load_pem,
    shared_key_slots,
)
from spoa.verifier.algorithms import KeyKind


def test_pem_public_key_and_certificate(rsa_key: KeyPair) -> None:
    key = load_pem(rsa_key.public_pem(), kid="pem")
    assert key.kind is KeyKind.RSA
    assert key.kid == "pem"
    assert key.key_id == load_jwk(rsa_key.public_jwk()).key_id  # RFC 7638 thumbprint


def test_pem_private_key_is_refused(rsa_key: KeyPair) -> None:
    from cryptography.hazmat.primitives import serialization

    private_pem = rsa_key.private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(KeyLoadError) as caught:
        load_pem(private_pem)
    assert "BEGIN" not in str(caught.value)  # no key material in a message that may be logged


@pytest.mark.parametrize("alg", ["ES256", "ES384", "ES512", "Ed25519", "Ed448"])
def test_jwk_curves(alg: str) -> None:
    pair = make_key(alg, kid=alg)
    key = load_jwk(pair.public_jwk())
    assert key.fits(alg)
    assert not key.fits("RS256")
    assert not key.fits("HS256")


def test_jwks_skips_unusable_keys_and_reports_why(rsa_key: KeyPair) -> None:
    document = {
        "keys": [
            rsa_key.public_jwk(),
            rsa_key.public_jwk(use="enc", kid="enc"),
            {"kty": "oct", "k": b64(b"k" * 32)},
            {"kty": "EC", "crv": "secp256k1", "x": "AA", "y": "AA"},
            {"kty": "RSA", "n": "not-base64!", "e": "AQAB"},
            rsa_key.public_jwk(alg="HS256", kid="mismatch"),
            rsa_key.public_jwk(key_ops=["encrypt"], kid="ops"),
            "not an object",
        ]
    }
    key_set, report = load_jwks(json.dumps(document).encode())
    assert [k.kid for k in key_set.keys] == ["rsa-1"]
    assert report.kept == 1
    assert len(report.skipped) == 7


def test_jwks_limits_and_shape() -> None:
    with pytest.raises(KeyLoadError):
        load_jwks(b"[]")
    with pytest.raises(KeyLoadError):
        load_jwks(b'{"keys": {}}')
    with pytest.raises(KeyLoadError):
        load_jwks(b'{"keys": [], "keys": []}')
    with pytest.raises(KeyLoadError):
        load_jwks({"keys": [{}] * 5}, max_keys=4)


@pytest.mark.parametrize(
    ("body", "cause"),
    [
        (b"<html>", "JWKS is not valid JSON"),
        (b"[]", "JWKS is not a JSON object"),
        (b'{"keys": [], "n": 1' + b"0" * 400 + b"}", "JWKS holds a number out of range"),
        (b'{"keys": [], "keys": []}', "duplicate JSON member name"),
    ],
)
def test_a_jwks_that_does_not_parse_says_why(body: bytes, cause: str) -> None:
    """Regression: every parse failure read "JWKS is not a JSON object"."""
    with pytest.raises(KeyLoadError, match=cause):
        load_jwks(body)


def test_hmac_secrets_need_enough_entropy() -> None:
    with pytest.raises(KeyLoadError):
        hmac_key(b"short", alg="HS256")
    with pytest.raises(KeyLoadError):
        hmac_key(b"x" * 48, alg="HS512")
    with pytest.raises(KeyLoadError):
        hmac_key(b"x" * 64, alg="RS256")
    key = hmac_key(b"x" * 32, alg="HS256", kid="h")
    assert key.fits("HS256")
    assert not key.fits("HS384")  # pinned to the configured alg
    assert "x" * 32 not in repr(key)


def test_key_file_detection(rsa_key: KeyPair) -> None:
    assert load_key_file_bytes(rsa_key.public_pem(), kid="p").keys[0].kid == "p"
    assert load_key_file_bytes(json.dumps(rsa_key.public_jwk()).encode()).keys[0].kid == "rsa-1"
    jwks = json.dumps({"keys": [rsa_key.public_jwk()]}).encode()
    assert len(load_key_file_bytes(jwks).keys) == 1
    with pytest.raises(KeyLoadError):
        load_key_file_bytes(b"garbage")


def test_a_jwks_file_says_why_it_holds_no_usable_key(rsa_key: KeyPair) -> None:
    """Regression (audit): a jwks_file with only a private key was refused as "holds no
    usable keys", without a reason; one with a private and a public key dropped the
    private one without a word."""
    private = {**rsa_key.public_jwk(), "d": "AQAB", "p": "AQAB", "q": "AQAB"}
    for keys in ([private], [private, rsa_key.public_jwk(kid="public")]):
        with pytest.raises(KeyLoadError, match="private key material"):
            load_key_file_bytes(json.dumps({"keys": keys}).encode())
    encryption_only = json.dumps({"keys": [rsa_key.public_jwk(use="enc")]}).encode()
    with pytest.raises(KeyLoadError, match=r"no usable key in its JWKS \(key is not for sig"):
        load_key_file_bytes(encryption_only)
    secret = {"kty": "oct", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA", "kid": "h"}
    with pytest.raises(KeyLoadError, match="or a secret"):
        load_key_file_bytes(json.dumps({"keys": [secret, rsa_key.public_jwk()]}).encode())
    with pytest.raises(KeyLoadError, match="keys array is empty"):
        load_key_file_bytes(b'{"keys": []}')


def test_candidates_by_kid_and_alg(rsa_key: KeyPair, rsa_key_2: KeyPair) -> None:
    unnamed = make_key("ES256").verification_key(kid=None)
    key_set = KeySet((rsa_key.verification_key(), rsa_key_2.verification_key(), unnamed))
    assert [k.kid for k in key_set.candidates("rsa-2", "RS256")] == ["rsa-2"]
    # Keys configured without a kid stay candidates for any kid that fits their alg.
    assert key_set.candidates("other", "ES256") == (unnamed,)
    assert len(key_set.candidates(None, "RS256")) == 2
    with pytest.raises(TokenRejected) as caught:
        KeySet((rsa_key.verification_key(),)).candidates("nope", "RS256")
    assert caught.value.reason is Reason.UNKNOWN_KID
    with pytest.raises(TokenRejected) as caught:
        key_set.candidates("rsa-1", "HS256")
    assert caught.value.reason is Reason.UNSUPPORTED_ALG


def test_a_token_without_kid_may_try_only_a_few_keys() -> None:
    few = KeySet(tuple(make_key("ES256").verification_key(kid=None) for _ in range(4)))
    assert len(few.candidates(None, "ES256")) == 4
    many = KeySet(tuple(make_key("ES256", kid=f"k{i}").verification_key() for i in range(5)))
    with pytest.raises(TokenRejected) as caught:
        many.candidates(None, "ES256")
    assert caught.value.reason is Reason.UNKNOWN_KID
    assert len(many.candidates("k3", "ES256")) == 1


def test_candidates_answer_the_same_when_asked_again(rsa_key: KeyPair, rsa_key_2: KeyPair) -> None:
    unnamed = make_key("RS256").verification_key(kid=None)
    key_set = KeySet((rsa_key.verification_key(), rsa_key_2.verification_key(), unnamed))
    for _ in range(2):  # the second round is answered from the remembered choice
        assert [k.kid for k in key_set.candidates("rsa-1", "RS256")] == ["rsa-1", None]
        assert [k.kid for k in key_set.candidates("rsa-2", "RS256")] == ["rsa-2", None]
        assert key_set.candidates("not-held", "RS256") == (unnamed,)
        assert len(key_set.candidates(None, "RS256")) == 3
        with pytest.raises(TokenRejected):
            key_set.candidates("rsa-1", "ES256")


def test_kids_a_key_set_does_not_hold_share_one_remembered_choice(rsa_key: KeyPair) -> None:
    # The kid comes from the token: a flood of made-up kids must not grow the memory.
    unnamed = make_key("RS256").verification_key(kid=None)
    key_set = KeySet((rsa_key.verification_key(), unnamed))
    for index in range(500):
        assert key_set.candidates(f"made-up-{index}", "RS256") == (unnamed,)
    assert len(key_set._chosen) == 1


def test_a_key_whose_material_does_not_fit_its_kind_is_refused(rsa_key: KeyPair) -> None:
    from spoa.verifier.keys import VerificationKey

    public = rsa_key.private.public_key()
    with pytest.raises(KeyLoadError, match="does not fit"):
        VerificationKey(key_id="x", kid=None, kind=KeyKind.OCT, material=public)
    with pytest.raises(KeyLoadError, match="does not fit"):
        VerificationKey(key_id="x", kid=None, kind=KeyKind.RSA, material=b"0" * 32)


def test_a_made_up_kid_cannot_try_every_key_without_a_kid() -> None:
    """Regression: a token without kid may try at most MAX_KIDLESS_CANDIDATES keys, but
    one naming any kid the set does not hold tried every key without a kid: 20 such keys
    cost a forged token 20 signature checks."""
    from spoa.verifier.keys import MAX_KIDLESS_CANDIDATES

    unnamed = [make_key("ES256").verification_key() for _ in range(MAX_KIDLESS_CANDIDATES + 1)]
    named = make_key("ES256", kid="n").verification_key()
    keys = KeySet((*unnamed, named))
    for kid in (None, "made-up"):
        with pytest.raises(TokenRejected) as caught:
            keys.candidates(kid, "ES256")
        assert caught.value.reason is Reason.UNKNOWN_KID
    assert keys.candidates("n", "ES256") == (named,)  # its own key; the guesses are dropped
    few = KeySet(tuple(unnamed[:MAX_KIDLESS_CANDIDATES]))
    assert len(few.candidates("made-up", "ES256")) == MAX_KIDLESS_CANDIDATES
    assert len(few.candidates(None, "ES256")) == MAX_KIDLESS_CANDIDATES


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
def test_a_published_private_key_is_not_trusted(alg: str) -> None:
    """Regression: a JWK holding its private members (`d`, ...) was loaded for its public
    half; a key whose private part is published lets anyone sign, so it is refused, as a
    private PEM is."""
    from cryptography.hazmat.primitives import serialization
    from jwcrypto import jwk as jwcrypto_jwk

    key = make_key(alg)
    pem = key.private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    private_jwk = json.loads(jwcrypto_jwk.JWK.from_pem(pem).export_private())
    with pytest.raises(KeyLoadError, match="private key material"):
        load_jwk(private_jwk)
    keys, report = load_jwks({"keys": [private_jwk, key.public_jwk()]})
    assert len(keys.keys) == 1
    assert report.skipped


def test_an_ed25519_key_of_small_order_is_not_trusted() -> None:
    """Regression: OpenSSL takes any 32 bytes as an Ed25519 key. With the neutral element
    as key, R = neutral and S = 0 verify for any header and payload, so one such key in
    a JWKS let anyone sign. Such keys are now refused, from JWK, JWKS and PEM alike."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    neutral = b"\x01" + bytes(31)
    openssl_key = Ed25519PublicKey.from_public_bytes(neutral)  # taken without a word

    weak = {"kty": "OKP", "crv": "Ed25519", "x": b64(neutral), "kid": "weak"}
    with pytest.raises(KeyLoadError, match="small order"):
        load_jwk(weak)
    real = make_key("EdDSA", kid="real")
    keys, report = load_jwks({"keys": [weak, real.public_jwk()]})
    assert [key.kid for key in keys.keys] == ["real"]
    assert any("small order" in why for why in report.skipped)
    pem = openssl_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(KeyLoadError, match="small order"):
        load_pem(pem)


@pytest.mark.parametrize(
    ("key_alg", "allowed", "token_alg", "expected"),
    [
        # An RSA key that names no alg would verify RS256 and PS256 alike: it serves
        # neither while both are allowed (RFC 8725 3.1: one algorithm per key).
        ("RS256", {"RS256", "PS256"}, "RS256", Reason.UNSUPPORTED_ALG),
        ("RS256", {"RS256", "PS256"}, "PS256", Reason.UNSUPPORTED_ALG),
        ("RS256", {"RS256", "RS384"}, "RS384", Reason.UNSUPPORTED_ALG),
        # One RSA algorithm among others: the key's type says which it serves.
        ("RS256", {"RS256", "ES256"}, "RS256", Reason.OK),
        ("RS256", {"PS256", "ES256", "EdDSA"}, "PS256", Reason.OK),
        # A curve fits one ECDSA algorithm; "EdDSA" and "Ed25519" are one signature.
        ("ES256", {"ES256", "ES384"}, "ES256", Reason.OK),
        ("EdDSA", {"EdDSA", "Ed25519"}, "EdDSA", Reason.OK),
        ("EdDSA", {"EdDSA", "Ed25519"}, "Ed25519", Reason.OK),
    ],
)
def test_a_key_without_alg_serves_only_when_one_allowed_algorithm_fits_it(
    key_alg: str, allowed: set[str], token_alg: str, expected: Reason
) -> None:
    """RFC review: a JWK without `alg` verified RS256 and PS256 tokens alike."""
    key = make_key(key_alg, kid="k")
    verifier, _ = verifier_for([key.verification_key()], allowed)
    token = mint(key, default_claims(), alg=token_alg)
    assert verifier.verify(token, POLICY, CONTEXT, NOW).reason is expected


def test_a_key_that_names_its_alg_serves_it_beside_other_rsa_algorithms() -> None:
    key = make_key("RS256", kid="k")
    verifier, _ = verifier_for([key.verification_key(alg="PS256")], {"RS256", "PS256"})
    assert verifier.verify(mint(key, alg="PS256"), POLICY, CONTEXT, NOW).ok
    refused = verifier.verify(mint(key, alg="RS256"), POLICY, CONTEXT, NOW)
    assert refused.reason is Reason.UNSUPPORTED_ALG


def test_shared_key_slots_name_the_key_types_several_algorithms_fit() -> None:
    assert shared_key_slots({"RS256", "PS256", "ES256"}) == {(KeyKind.RSA, None)}
    assert shared_key_slots({"ES256", "ES384", "ES512"}) == frozenset()
    assert shared_key_slots({"EdDSA", "Ed25519", "Ed448"}) == frozenset()
    assert shared_key_slots({"HS256", "HS512"}) == {(KeyKind.OCT, None)}


def test_a_key_files_table_fills_in_and_must_agree_with_its_jwk() -> None:
    """A JWK file takes the kid and alg of its `keys` table where its key names none;
    where it does, the two must agree (diff review: only PEM keys took them)."""
    # Names neither kid (jwcrypto's export gives one of its own) nor alg.
    bare = {k: v for k, v in make_key("RS256").public_jwk().items() if k != "kid"}
    one = load_key_file_bytes(json.dumps(bare).encode(), kid="k1", alg="PS256").keys[0]
    assert (one.kid, one.alg) == ("k1", "PS256")
    named = {**bare, "kid": "r", "alg": "RS256"}
    with pytest.raises(KeyLoadError, match="names alg RS256, not the PS256"):
        load_key_file_bytes(json.dumps(named).encode(), alg="PS256")
    with pytest.raises(KeyLoadError, match="another kid"):
        load_key_file_bytes(json.dumps(named).encode(), kid="k1")
    ec_key = make_key("ES256", kid="e").public_jwk()
    with pytest.raises(KeyLoadError, match="does not fit"):
        load_key_file_bytes(json.dumps(ec_key).encode(), alg="ES384")


def test_a_jwks_files_alg_goes_to_the_keys_that_name_none_and_that_it_fits() -> None:
    """Regression (second diff review): a JWKS file's configured alg was forced on every
    key of its type, so a set with a key naming another alg, or keys of two curves, was
    refused whatever the file's alg."""
    named = make_key("RS256", kid="a").public_jwk(alg="PS256")
    bare = make_key("RS256", kid="b").public_jwk()  # names no alg
    p256, p384 = (
        make_key("ES256", kid="p256").public_jwk(),
        make_key("ES384", kid="p384").public_jwk(),
    )
    document = json.dumps({"keys": [named, bare, p256, p384]}).encode()
    pinned = {key.kid: key.alg for key in load_key_file_bytes(document, alg="RS256").keys}
    assert pinned == {"a": "PS256", "b": "RS256", "p256": None, "p384": None}
    by_curve = {key.kid: key.alg for key in load_key_file_bytes(document, alg="ES256").keys}
    assert by_curve == {"a": "PS256", "b": None, "p256": "ES256", "p384": None}
