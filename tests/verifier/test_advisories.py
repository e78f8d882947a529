"""Regression tests for known JWT attacks; each names the advisory class it pins.

References: RFC 8725 §2-3, CVE-2015-9235 / CVE-2022-29217 (alg confusion), CVE-2022-21449
("psychic signatures"), CVE-2018-0114 (embedded jwk), kid injection reports against
several libraries, and the HAProxy `alg=none` pitfall noted in our anchors.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from verifier_helpers import (
    CONTEXT,
    NOW,
    POLICY,
    KeyPair,
    b64,
    default_claims,
    make_key,
    mint,
    sign,
    verifier_for,
)

from spoa.verifier import KeyLoadError, KeySet, Reason, Verdict, load_jwks, load_pem
from spoa.verifier.algorithms import CURVE_ORDERS
from spoa.verifier.parsing import MAX_JSON_DEPTH

P256_ORDER = CURVE_ORDERS["P-256"]


@pytest.fixture(scope="module")
def es_key() -> KeyPair:
    return make_key("ES256", kid="es-1")


def _verify_with(keys: list[Any], algorithms: set[str], token: Any, **kw: Any) -> Verdict:
    verifier, _ = verifier_for(keys, algorithms, **kw)
    return verifier.verify(token, POLICY, CONTEXT, NOW)


def _token_from(header: dict[str, Any], payload: bytes, signature: bytes) -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(payload)}.{b64(signature)}"


# --- Algorithm confusion (CVE-2015-9235 family) ------------------------------------------


@pytest.mark.parametrize("allowed", [{"RS256"}, {"RS256", "HS256"}])
@pytest.mark.parametrize("kid", ["rsa-1", None])
def test_rsa_public_key_as_hmac_secret_is_refused(
    allowed: set[str], kid: str | None, rsa_key: KeyPair
) -> None:
    for secret in (rsa_key.public_pem(), json.dumps(rsa_key.public_jwk()).encode()):
        attacker = KeyPair("HS256", kid, secret)
        token = mint(attacker, header={"kid": kid})
        verdict = _verify_with([rsa_key.verification_key()], allowed, token)
        assert verdict.reason is Reason.UNSUPPORTED_ALG, verdict
        assert dict(verdict.claims) == {}


def test_signature_check_refuses_key_material_of_another_kind(rsa_key: KeyPair) -> None:
    # Below key selection as well: the check itself never treats a public key as a secret.
    from spoa.verifier.algorithms import ALGORITHMS, verify_signature

    public = rsa_key.private.public_key()
    pem = rsa_key.public_pem()
    signing_input = b"head.payload"
    forged = hmac.digest(pem, signing_input, "sha256")
    assert not verify_signature(ALGORITHMS["HS256"], public, None, signing_input, forged)
    assert not verify_signature(ALGORITHMS["HS256"], pem.decode(), None, signing_input, forged)  # type: ignore[arg-type]
    assert not verify_signature(ALGORITHMS["RS256"], pem, None, signing_input, b"x" * 256)
    assert not verify_signature(ALGORITHMS["ES256"], public, "P-256", signing_input, b"x" * 64)


def test_key_pinned_to_one_alg_refuses_another(rsa_key: KeyPair) -> None:
    pinned = rsa_key.verification_key(alg="RS256")
    token = mint(rsa_key, alg="PS256")
    assert _verify_with([pinned], {"RS256", "PS256"}, token).reason is Reason.UNSUPPORTED_ALG
    assert _verify_with([pinned], {"RS256", "PS256"}, mint(rsa_key)).ok


def test_curve_must_fit_the_alg(es_key: KeyPair) -> None:
    # A P-256 key cannot verify a token that claims ES384, and Ed25519 cannot stand in for Ed448.
    token = mint(es_key, alg="ES256", header={"alg": "ES384"})
    assert _verify_with([es_key.verification_key()], {"ES256", "ES384"}, token).reason is (
        Reason.UNSUPPORTED_ALG
    )
    ed = make_key("Ed25519", kid="ed")
    forged = mint(ed, header={"alg": "Ed448"})
    assert _verify_with([ed.verification_key()], {"Ed25519", "Ed448"}, forged).reason is (
        Reason.UNSUPPORTED_ALG
    )


# --- alg: none -----------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
@pytest.mark.parametrize("signature", [b"", b"\x00" * 32])
def test_unsecured_tokens_are_refused_in_any_case(
    alg: str, signature: bytes, es_key: KeyPair
) -> None:
    token = _token_from(
        {"alg": alg, "kid": "es-1"}, json.dumps(default_claims()).encode(), signature
    )
    verdict = _verify_with([es_key.verification_key()], {"ES256"}, token)
    assert verdict.reason is Reason.UNSUPPORTED_ALG


# --- Psychic signatures (CVE-2022-21449) and ECDSA encoding -------------------------------


def _es256_with(r: int, s: int, es_key: KeyPair) -> str:
    header = {"alg": "ES256", "kid": "es-1"}
    return _token_from(
        header, json.dumps(default_claims()).encode(), r.to_bytes(32, "big") + s.to_bytes(32, "big")
    )


@pytest.mark.parametrize(
    ("r", "s"),
    [(0, 0), (0, 1), (1, 0), (P256_ORDER, P256_ORDER), (P256_ORDER, 1), (1, P256_ORDER + 1)],
)
def test_psychic_signatures_are_refused(r: int, s: int, es_key: KeyPair) -> None:
    token = _es256_with(r, s, es_key)
    assert (
        _verify_with([es_key.verification_key()], {"ES256"}, token).reason is Reason.BAD_SIGNATURE
    )


def test_der_encoded_ecdsa_signature_is_refused(es_key: KeyPair) -> None:
    header = {"alg": "ES256", "kid": "es-1"}
    payload = json.dumps(default_claims()).encode()
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(payload)}".encode()
    from cryptography.hazmat.primitives import hashes

    der = es_key.private.sign(signing_input, ec.ECDSA(hashes.SHA256()))
    token = f"{signing_input.decode()}.{b64(der)}"
    assert (
        _verify_with([es_key.verification_key()], {"ES256"}, token).reason is Reason.BAD_SIGNATURE
    )
    raw = sign("ES256", es_key.private, signing_input)
    assert _verify_with(
        [es_key.verification_key()], {"ES256"}, f"{signing_input.decode()}.{b64(raw)}"
    ).ok


# --- kid injection ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kid",
    [
        "../../etc/passwd",
        "/dev/null",
        "' OR '1'='1",
        "1; DROP TABLE keys --",
        "a\x00b",
        "k" * 2000,
        "",
    ],
)
def test_kid_is_an_opaque_lookup_key(kid: str, es_key: KeyPair) -> None:
    token = mint(es_key, header={"kid": kid})
    verdict = _verify_with([es_key.verification_key()], {"ES256"}, token)
    assert verdict.reason is Reason.UNKNOWN_KID


def test_non_string_kid_is_malformed(es_key: KeyPair) -> None:
    token = mint(es_key, header={"kid": {"$ne": None}})
    assert _verify_with([es_key.verification_key()], {"ES256"}, token).reason is Reason.MALFORMED


# --- Embedded keys and key URLs (CVE-2018-0114 family) -----------------------------------


@pytest.mark.parametrize("member", ["jwk", "jku", "x5u", "x5c"])
@pytest.mark.parametrize("kid", ["es-1", "attacker"])
def test_embedded_keys_and_key_urls_are_never_used(member: str, kid: str, es_key: KeyPair) -> None:
    attacker = make_key("ES256", kid=kid)
    values: dict[str, Any] = {
        "jwk": attacker.public_jwk(),
        "jku": "http://127.0.0.1:1/jwks.json",
        "x5u": "http://127.0.0.1:1/cert.pem",
        "x5c": ["MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA"],
    }
    token = mint(attacker, header={member: values[member]})
    verdict = _verify_with([es_key.verification_key()], {"ES256"}, token)
    expected = Reason.BAD_SIGNATURE if kid == "es-1" else Reason.UNKNOWN_KID
    assert verdict.reason is expected


# --- crit, duplicates, encodings ---------------------------------------------------------


@pytest.mark.parametrize("crit", [["exp"], ["b64"], ["x-custom"], [], "exp", [1]])
def test_unknown_critical_headers_are_refused(crit: Any, es_key: KeyPair) -> None:
    token = mint(es_key, header={"crit": crit, "x-custom": 1, "exp": 1})
    assert _verify_with([es_key.verification_key()], {"ES256"}, token).reason is Reason.MALFORMED


@pytest.mark.parametrize("cty", ["JWT", "jwt", "application/JWT"])
def test_nested_jwt_content_type_is_refused(cty: str, es_key: KeyPair) -> None:
    """Regression: cty JWT with a JSON payload was accepted; RFC 7519 7.2 reads that payload
    as another JWT, which it is not."""
    token = mint(es_key, header={"cty": cty})
    assert _verify_with([es_key.verification_key()], {"ES256"}, token).reason is Reason.MALFORMED
    plain = mint(es_key, header={"cty": "application/json"})
    assert _verify_with([es_key.verification_key()], {"ES256"}, plain).ok


def test_duplicate_claims_are_refused(es_key: KeyPair) -> None:
    claims = json.dumps(default_claims(sub="user"))[:-1] + ', "sub": "admin"}'
    token = mint(es_key, raw_payload=claims.encode())
    assert _verify_with([es_key.verification_key()], {"ES256"}, token).reason is Reason.MALFORMED
    header = b'{"alg":"ES256","kid":"es-1","alg":"HS256"}'
    token = mint(es_key, raw_header=header)
    assert _verify_with([es_key.verification_key()], {"ES256"}, token).reason is Reason.MALFORMED


@pytest.mark.parametrize(
    "where",
    [
        '"sub": "a\\ud800b"',  # a lone high surrogate in a value
        '"name": "\\udfff"',  # a lone low surrogate
        '"\\ud83d": 1',  # in a member name
        '"roles": ["admin", ["\\uDBFF"]]',  # nested, upper-case hex
    ],
)
def test_lone_surrogate_escapes_are_refused(where: str, es_key: KeyPair) -> None:
    """Signed or not, such a string is not text: forwarding it would crash or be read
    differently by the backend's parser. Regression: a signed one crashed the glue."""
    claims = json.dumps(default_claims(sub="user"))[:-1] + ", " + where + "}"
    token = mint(es_key, raw_payload=claims.encode())
    assert _verify_with([es_key.verification_key()], {"ES256"}, token).reason is Reason.MALFORMED
    header = b'{"alg":"ES256","kid":"es-1","x":"\\ud800"}'
    token = mint(es_key, raw_header=header)
    assert _verify_with([es_key.verification_key()], {"ES256"}, token).reason is Reason.MALFORMED


def test_escaped_surrogate_pairs_are_text(es_key: KeyPair) -> None:
    claims = json.dumps(default_claims(sub="user"))[:-1] + ', "name": "\\ud83d\\ude00 \\\\ud800"}'
    token = mint(es_key, raw_payload=claims.encode())
    verdict = _verify_with([es_key.verification_key()], {"ES256"}, token)
    assert verdict.ok
    assert verdict.claims["name"] == "\U0001f600 \\ud800"  # a pair, then a literal backslash


@pytest.mark.parametrize(
    ("claim", "raw", "accepted"),
    [
        ("exp", str(2**63 - 1), True),  # the largest signed 64-bit second is a date
        ("exp", str(2**63), False),
        ("exp", "1e300", False),
        ("exp", "1e400", False),  # json reads this as infinity
        ("nbf", "-1e300", False),
        ("iat", str(-(2**63)), True),
        ("iat", str(-(2**63) - 1), False),
    ],
)
def test_numeric_dates_beyond_64_bits_are_malformed(
    claim: str, raw: str, accepted: bool, es_key: KeyPair
) -> None:
    """Regression: a signed exp of 1e300 was accepted and then could not be forwarded as
    HAProxy's 64-bit integer, so the glue raised and HAProxy answered 503."""
    claims = default_claims()
    claims.pop(claim, None)
    text = json.dumps(claims)[:-1] + f', "{claim}": {raw}}}'
    token = mint(es_key, raw_payload=text.encode())
    verdict = _verify_with([es_key.verification_key()], {"ES256"}, token)
    assert verdict.ok is accepted, verdict.reason
    if not accepted:
        assert verdict.reason is Reason.MALFORMED
        if claim == "exp":
            assert verdict.expires_at is None


def test_jwe_is_refused(es_key: KeyPair) -> None:
    jwe = "eyJhbGciOiJSU0EtT0FFUCIsImVuYyI6IkEyNTZHQ00ifQ.a.b.c.d"
    assert _verify_with([es_key.verification_key()], {"ES256"}, jwe).reason is Reason.MALFORMED


def test_base64url_must_be_strict(es_key: KeyPair) -> None:
    token = mint(es_key)
    head, payload, signature = token.split(".")
    variants = [
        f"{head}=.{payload}.{signature}",  # padding
        f"{head}.{payload}.{signature[:10]} {signature[10:]}",  # whitespace
        f"{head}.{payload.replace('-', '+').replace('_', '/')}.{signature}"
        if ("-" in payload or "_" in payload)
        else f"{head}.{payload[:-1]}+.{signature}",  # standard alphabet
        f"{head}.{payload}.{signature[:-1]}",  # wrong length
        f"{head}.{payload}.{signature}.",  # four parts
        f"{head}.{payload}é.{signature}",  # non-ASCII
    ]
    for variant in variants:
        verdict = _verify_with([es_key.verification_key()], {"ES256"}, variant)
        assert verdict.reason is Reason.MALFORMED, variant
    # Non-canonical trailing bits: "_w" and "_x" would decode to the same byte.
    one_byte = mint(es_key, raw_header=b'{"alg":"ES256","kid":"es-1"}')
    h, p, s = one_byte.split(".")
    assert len(s) % 4 != 0
    tail = s[-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    bumped = alphabet[alphabet.index(tail) + 1] if tail != "_" else "-"
    verdict = _verify_with([es_key.verification_key()], {"ES256"}, f"{h}.{p}.{s[:-1]}{bumped}")
    assert verdict.reason is Reason.MALFORMED


@pytest.mark.parametrize("b64", [False, 0, 1, "true"])
def test_unencoded_payload_option_is_refused(b64: object, es_key: KeyPair) -> None:
    token = mint(es_key, header={"b64": b64})
    assert _verify_with([es_key.verification_key()], {"ES256"}, token).reason is Reason.MALFORMED


def test_b64_true_is_the_usual_payload(es_key: KeyPair) -> None:
    """Regression: b64 true was refused, but it asks for the ordinary base64url payload
    (RFC 7797 3), and without crit it needs no understanding (RFC 7515 4.1.11)."""
    token = mint(es_key, header={"b64": True})
    assert _verify_with([es_key.verification_key()], {"ES256"}, token).ok


@pytest.mark.parametrize("name", ["typ", "cty"])
@pytest.mark.parametrize("value", [5, True, ["JWT"], {"a": 1}])
def test_typ_and_cty_are_strings(name: str, value: object, es_key: KeyPair) -> None:
    """Regression: with no typ rule, a typ or cty of another type was accepted; both
    are media type strings (RFC 7515 4.1.9, 4.1.10)."""
    token = mint(es_key, header={name: value})
    assert _verify_with([es_key.verification_key()], {"ES256"}, token).reason is Reason.MALFORMED


# --- Size and nesting --------------------------------------------------------------------


def test_huge_token_is_refused_before_decoding(es_key: KeyPair) -> None:
    garbage = "!" * 9000  # not even base64url: size wins
    assert (
        _verify_with([es_key.verification_key()], {"ES256"}, garbage).reason
        is Reason.TOKEN_TOO_LARGE
    )
    big = mint(es_key, default_claims(blob="x" * 20_000))
    assert (
        _verify_with([es_key.verification_key()], {"ES256"}, big).reason is Reason.TOKEN_TOO_LARGE
    )


def test_deeply_nested_json_is_malformed_not_a_crash(es_key: KeyPair) -> None:
    depth = 100_000
    payload = b'{"iss":"https://issuer.example","n":' + b"[" * depth + b"]" * depth + b"}"
    token = mint(es_key, raw_payload=payload)
    verifier, _ = verifier_for([es_key.verification_key()], {"ES256"})
    verifier.max_token_bytes = len(token) + 1
    verdict = verifier.verify(token, POLICY, CONTEXT, NOW)
    assert verdict.reason is Reason.MALFORMED


@pytest.mark.parametrize("name", ["plain", "\N{GRINNING FACE}"])
def test_a_signed_tokens_nesting_limit_does_not_move_with_its_strings(
    name: str, es_key: KeyPair
) -> None:
    """Regression (audit): with an escaped surrogate pair in a claim, a valid token nested
    329 levels deep was malformed, and without it accepted up to about 950."""
    for depth, accepted in ((MAX_JSON_DEPTH - 1, True), (MAX_JSON_DEPTH, False), (329, False)):
        claims = default_claims(name=name, n=json.loads("[" * depth + "]" * depth))
        token = mint(es_key, raw_payload=json.dumps(claims).encode())  # ensure_ascii: \ud83d
        verifier, _ = verifier_for([es_key.verification_key()], {"ES256"})
        verifier.max_token_bytes = len(token) + 1
        verdict = verifier.verify(token, POLICY, CONTEXT, NOW)
        assert verdict.ok is accepted, depth
        if not accepted:
            assert verdict.reason is Reason.MALFORMED


# --- Token type confusion (RFC 8725 §3.11, RFC 9068) -------------------------------------


@pytest.mark.parametrize("typ", ["JWT", "dpop+jwt", "logout+jwt", None])
def test_id_tokens_and_other_types_are_not_access_tokens(typ: str | None, es_key: KeyPair) -> None:
    token = mint(es_key, default_claims(nonce="n-0S6", azp="client"), header={"typ": typ})
    verdict = _verify_with(
        [es_key.verification_key()], {"ES256"}, token, allowed_types=frozenset({"at+jwt"})
    )
    assert verdict.reason is Reason.BAD_TYPE


# --- Key hygiene -------------------------------------------------------------------------


def test_weak_rsa_keys_are_refused_and_skipped() -> None:
    weak = make_key("RS256", kid="weak", rsa_bits=1024)
    with pytest.raises(KeyLoadError):
        load_pem(weak.public_pem())
    key_set, report = load_jwks({"keys": [weak.public_jwk()]})
    assert key_set.keys == ()
    assert report.skipped


def test_encryption_keys_in_a_jwks_are_ignored(rsa_key: KeyPair) -> None:
    key_set, _ = load_jwks({"keys": [rsa_key.public_jwk(use="enc")]})
    assert key_set.keys == ()
    verifier, _ = verifier_for([], {"RS256"})
    verdict = verifier.verify(mint(rsa_key), POLICY, CONTEXT, NOW)
    assert verdict.reason is Reason.UNKNOWN_KID


def test_symmetric_keys_from_a_jwks_are_ignored() -> None:
    key_set, report = load_jwks({"keys": [{"kty": "oct", "k": b64(b"s" * 32), "kid": "h"}]})
    assert key_set == KeySet(())
    assert report.skipped
