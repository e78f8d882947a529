"""Every reason code, produced by the verifier for the case it names."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from verifier_helpers import (
    AUDIENCE,
    CONTEXT,
    ISSUER,
    NOW,
    POLICY,
    KeyPair,
    b64,
    default_claims,
    make_key,
    mint,
    rules,
    verifier_for,
)

from spoa.verifier import (
    ClaimMatcher,
    KeySet,
    MemoryKeyStore,
    Policy,
    PolicyError,
    Reason,
    Verdict,
    Verifier,
    bearer_error,
    http_status,
)
from spoa.verifier.claims import SCOPE_TOKEN, scope_tokens

ES = "ES256"


@pytest.fixture(scope="module")
def es_key() -> KeyPair:
    return make_key(ES, kid="es-1")


def _verify(
    key: KeyPair, token: Any, *, policy: Policy = POLICY, now: float = NOW, **rule_overrides: Any
) -> Verdict:
    algorithms = rule_overrides.pop("algorithms", {ES})
    verifier, _ = verifier_for([key.verification_key()], algorithms, **rule_overrides)
    return verifier.verify(token, policy, CONTEXT, now)


# Each case: (reason, function of the key giving a verdict).
CASES: dict[Reason, Callable[[KeyPair], Verdict]] = {
    Reason.OK: lambda k: _verify(k, mint(k)),
    Reason.MISSING_TOKEN: lambda k: _verify(k, ""),
    Reason.MALFORMED: lambda k: _verify(k, "not-a-token"),
    Reason.TOKEN_TOO_LARGE: lambda k: _verify(k, mint(k, default_claims(pad="x" * 9000))),
    Reason.UNSUPPORTED_ALG: lambda k: _verify(k, mint(k), algorithms=frozenset({"ES384"})),
    Reason.UNKNOWN_KID: lambda k: _verify(k, mint(k, header={"kid": "who-is-this"})),
    Reason.BAD_SIGNATURE: lambda k: _verify(k, mint(make_key(ES, kid="es-1"))),
    Reason.EXPIRED: lambda k: _verify(k, mint(k), now=NOW + 600 + 31),
    Reason.NOT_YET_VALID: lambda k: _verify(k, mint(k, default_claims(nbf=int(NOW) + 120))),
    Reason.IAT_IN_FUTURE: lambda k: _verify(k, mint(k, default_claims(iat=int(NOW) + 120))),
    Reason.LIFETIME_TOO_LONG: lambda k: _verify(k, mint(k), max_lifetime=300.0),
    Reason.BAD_ISSUER: lambda k: _verify(k, mint(k, default_claims(iss="https://evil.example"))),
    Reason.BAD_AUDIENCE: lambda k: _verify(k, mint(k, default_claims(aud="api://other"))),
    Reason.MISSING_CLAIM: lambda k: _verify(k, mint(k, default_claims(exp=None))),
    Reason.CLAIM_MISMATCH: lambda k: _verify(
        k,
        mint(k),
        policy=Policy("p", ("main",), claim_matchers=(ClaimMatcher.equal_to("sub", "root"),)),
    ),
    Reason.BAD_TYPE: lambda k: _verify(
        k, mint(k, header={"typ": "JWT"}), allowed_types=frozenset({"at+jwt"})
    ),
    Reason.INSUFFICIENT_SCOPE: lambda k: _verify(
        k, mint(k), policy=Policy("p", ("main",), require_scopes=frozenset({"orders:write"}))
    ),
    Reason.KEYS_UNAVAILABLE: lambda k: Verifier([rules({ES})], MemoryKeyStore()).verify(
        mint(k), POLICY, CONTEXT, NOW
    ),
    Reason.UNKNOWN_POLICY: lambda k: Verdict.rejected(Reason.UNKNOWN_POLICY),
    # The glue's, for a request with its token in two places (tests/test_glue.py).
    Reason.INVALID_REQUEST: lambda k: Verdict.rejected(Reason.INVALID_REQUEST),
    # A caller handing the verifier something that is not a token fails closed.
    Reason.INTERNAL_ERROR: lambda k: _verify(k, 12345),
}


def test_every_reason_has_a_case() -> None:
    assert set(CASES) == set(Reason)


@pytest.mark.parametrize("reason", list(Reason))
def test_reason_is_produced(reason: Reason, es_key: KeyPair) -> None:
    verdict = CASES[reason](es_key)
    assert verdict.reason is reason, verdict
    assert verdict.ok is (reason is Reason.OK)
    assert verdict.status == http_status(reason)


@pytest.mark.parametrize(
    "reason",
    [
        Reason.EXPIRED,
        Reason.IAT_IN_FUTURE,
        Reason.LIFETIME_TOO_LONG,
        Reason.BAD_AUDIENCE,
        Reason.BAD_TYPE,
        Reason.INSUFFICIENT_SCOPE,
    ],
)
def test_a_refusal_after_the_signature_still_says_when_the_token_expires(
    reason: Reason, es_key: KeyPair
) -> None:
    verdict = CASES[reason](es_key)
    assert verdict.reason is reason
    assert verdict.expires_at == int(NOW) + 600


def test_a_refusal_for_an_invalid_exp_carries_no_expiry(es_key: KeyPair) -> None:
    verdict = _verify(es_key, mint(es_key, default_claims(exp="soon")))
    assert verdict.reason is Reason.MALFORMED
    assert verdict.expires_at is None
    assert verdict.claims["exp"] == "soon"


def test_statuses_follow_rfc6750() -> None:
    assert http_status(Reason.OK) == 200
    assert http_status(Reason.INSUFFICIENT_SCOPE) == 403
    assert http_status(Reason.EXPIRED) == 401
    assert bearer_error(Reason.EXPIRED) == "invalid_token"
    assert bearer_error(Reason.MISSING_TOKEN) == ""
    assert bearer_error(Reason.INSUFFICIENT_SCOPE) == "insufficient_scope"


def test_a_failed_claim_rule_is_403_not_invalid_token() -> None:
    """Regression: a good token failing a policy's claim rule was a 401 invalid_token,
    which OAuth clients answer by refreshing the token and retrying, in a loop. It is
    an authorization failure: 403 insufficient_scope (RFC 6750 3.1)."""
    assert http_status(Reason.CLAIM_MISMATCH) == 403
    assert bearer_error(Reason.CLAIM_MISMATCH) == "insufficient_scope"
    assert http_status(Reason.MISSING_CLAIM) == 401  # the token itself lacks a claim


def test_insufficient_scope_names_the_required_scopes(es_key: KeyPair) -> None:
    policy = Policy("p", ("main",), require_scopes=frozenset({"orders:write", "orders:read"}))
    verdict = _verify(es_key, mint(es_key), policy=policy)
    assert verdict.status == 403
    assert verdict.required_scopes == {"orders:write", "orders:read"}


def test_claims_are_empty_unless_the_signature_verified(es_key: KeyPair) -> None:
    assert dict(_verify(es_key, mint(make_key(ES, kid="es-1"))).claims) == {}
    expired = _verify(es_key, mint(es_key), now=NOW + 10_000)
    assert expired.reason is Reason.EXPIRED
    assert expired.claims["sub"] == "user-42"


# --- Time checks ------------------------------------------------------------------------


def test_leeway_applies_to_exp_and_nbf(es_key: KeyPair) -> None:
    token = mint(es_key)
    assert _verify(es_key, token, now=NOW + 600 + 29).ok
    assert _verify(es_key, token, now=NOW + 600 + 30).reason is Reason.EXPIRED
    early = mint(es_key, default_claims(nbf=int(NOW) + 20))
    assert _verify(es_key, early).ok
    assert _verify(es_key, early, leeway=0.0).reason is Reason.NOT_YET_VALID


def test_exp_can_be_optional(es_key: KeyPair) -> None:
    token = mint(es_key, default_claims(exp=None))
    assert _verify(es_key, token, require_exp=False).ok


@pytest.mark.parametrize("bad", ["1800000000", True, None, [1], 1e400])
# None is JSON null: present but not a number, so malformed rather than missing.
def test_non_numeric_dates_are_malformed(bad: Any, es_key: KeyPair) -> None:
    claims = default_claims()
    claims["exp"] = bad
    raw = json.dumps(claims).encode().replace(b"Infinity", b"1e400")
    verdict = _verify(es_key, mint(es_key, raw_payload=raw))
    assert (
        verdict.reason in (Reason.MALFORMED, Reason.MISSING_CLAIM)
        if bad is None
        else (verdict.reason is Reason.MALFORMED)
    )


def test_lifetime_without_iat_counts_from_now(es_key: KeyPair) -> None:
    token = mint(es_key, default_claims(iat=None))
    assert _verify(es_key, token, max_lifetime=900.0).ok
    assert _verify(es_key, token, max_lifetime=100.0).reason is Reason.LIFETIME_TOO_LONG


# --- Issuer, audience, type ------------------------------------------------------------


def test_policy_must_trust_the_tokens_issuer(es_key: KeyPair) -> None:
    store = MemoryKeyStore()
    store.replace("main", KeySet((es_key.verification_key(),)), NOW)
    other = rules({ES}, name="other", issuer="https://other.example")
    verifier = Verifier([rules({ES}), other], store)
    only_other = Policy("p", ("other",))
    assert verifier.verify(mint(es_key), only_other, CONTEXT, NOW).reason is Reason.BAD_ISSUER


def test_several_issuers_are_chosen_by_iss_with_their_own_keys() -> None:
    key_a, key_b = make_key(ES, kid="same-kid"), make_key(ES, kid="same-kid")
    store = MemoryKeyStore()
    store.replace("a", KeySet((key_a.verification_key(),)), NOW)
    store.replace("b", KeySet((key_b.verification_key(),)), NOW)
    issuers = [rules({ES}, name="a", issuer="https://a"), rules({ES}, name="b", issuer="https://b")]
    verifier = Verifier(issuers, store)
    both = Policy("p", ("a", "b"))
    token_a = mint(key_a, default_claims(iss="https://a"))
    token_b = mint(key_b, default_claims(iss="https://b"))
    assert verifier.verify(token_a, both, CONTEXT, NOW).issuer == "a"
    assert verifier.verify(token_b, both, CONTEXT, NOW).issuer == "b"
    # Same kid, other issuer's key: a token claiming issuer b but signed by a's key fails.
    cross = mint(key_a, default_claims(iss="https://b"))
    assert verifier.verify(cross, both, CONTEXT, NOW).reason is Reason.BAD_SIGNATURE


def test_issuer_must_match_exactly(es_key: KeyPair) -> None:
    for iss in (ISSUER + "/", ISSUER.upper(), " " + ISSUER, ["https://issuer.example"]):
        assert _verify(es_key, mint(es_key, default_claims(iss=iss))).reason is Reason.BAD_ISSUER


def test_audience_string_or_list_any_of(es_key: KeyPair) -> None:
    assert _verify(es_key, mint(es_key, default_claims(aud=["x", AUDIENCE]))).ok
    assert (
        _verify(es_key, mint(es_key, default_claims(aud=["x", "y"]))).reason is Reason.BAD_AUDIENCE
    )
    assert _verify(es_key, mint(es_key, default_claims(aud=None))).reason is Reason.BAD_AUDIENCE
    assert _verify(es_key, mint(es_key, default_claims(aud=[1]))).reason is Reason.MALFORMED


def test_an_integer_claim_no_double_holds_is_malformed(es_key: KeyPair) -> None:
    """Regression: a signed `"x": 1000...0` (400 zeros) was accepted and forwarded in
    X-JWT-Claims, where a parser in the service reads Infinity or fails."""
    raw = json.dumps(default_claims()).encode()[:-1] + b', "x": 1' + b"0" * 400 + b"}"
    assert _verify(es_key, mint(es_key, raw_payload=raw)).reason is Reason.MALFORMED


def test_a_null_audience_is_malformed_not_absent(es_key: KeyPair) -> None:
    """Regression: `"aud": null` was read as no audience (bad_audience), where a null
    date, sub or jti is malformed."""
    raw = json.dumps({**default_claims(), "aud": None}).encode()
    assert _verify(es_key, mint(es_key, raw_payload=raw)).reason is Reason.MALFORMED


def test_policy_audiences_override_the_issuers(es_key: KeyPair) -> None:
    token = mint(es_key, default_claims(aud="api://billing"))
    assert _verify(es_key, token).reason is Reason.BAD_AUDIENCE
    assert _verify(
        es_key, token, policy=Policy("p", ("main",), audiences=frozenset({"api://billing"}))
    ).ok


@pytest.mark.parametrize("typ", ["at+jwt", "AT+JWT", "application/at+jwt", "Application/AT+JWT"])
def test_type_compares_case_insensitively_with_optional_prefix(typ: str, es_key: KeyPair) -> None:
    token = mint(es_key, header={"typ": typ})
    assert _verify(es_key, token, allowed_types=frozenset({"application/at+jwt"})).ok


@pytest.mark.parametrize(
    ("typ", "allowed"),
    [
        ("application/x/y", "x/y"),  # only a value without "/" takes the prefix
        ("x/y", "application/x/y"),
        ("application/at+jwt", "text/at+jwt"),
        ("at+jw\u212a", "at+jwk"),  # KELVIN SIGN: Unicode folding makes it "k"
    ],
)
def test_type_prefix_and_case_follow_the_media_type_rules(
    typ: str, allowed: str, es_key: KeyPair
) -> None:
    """Regression: "application/" was stripped from every value, so `application/x/y`
    matched `x/y`; and Unicode lowercasing folded non-ASCII letters into ASCII ones."""
    token = mint(es_key, header={"typ": typ})
    assert _verify(es_key, token, allowed_types=frozenset({allowed})).reason is Reason.BAD_TYPE


def test_ascii_case_is_ignored_beside_other_characters(es_key: KeyPair) -> None:
    token = mint(es_key, header={"typ": "AT+JWT\u00e9"})
    assert _verify(es_key, token, allowed_types=frozenset({"at+jwt\u00e9"})).ok


def test_missing_type_is_refused_when_types_are_enforced(es_key: KeyPair) -> None:
    token = mint(es_key, header={"typ": None})
    assert _verify(es_key, token, allowed_types=frozenset({"at+jwt"})).reason is Reason.BAD_TYPE
    assert _verify(es_key, token).ok  # not enforced by default


@pytest.mark.parametrize(
    "claims",
    [{"sub": 123}, {"sub": True}, {"jti": 7}, {"sub": ["a"]}, {"sub": None}, {"jti": None}],
)
def test_sub_and_jti_must_be_strings(claims: dict[str, Any], es_key: KeyPair) -> None:
    """Regression: `"sub": 123` verified and forwarded X-JWT-Sub: 123, the same header as
    `"sub": "123"`. RFC 7519 4.1.2 and 4.1.7 make both strings; a null one passed too."""
    token = mint(es_key, {**default_claims(), **claims})  # default_claims drops None
    assert _verify(es_key, token).reason is Reason.MALFORMED


def test_required_claims(es_key: KeyPair) -> None:
    token = mint(es_key, default_claims(client_id="cli"))
    assert _verify(es_key, token, required_claims=("sub", "client_id")).ok
    assert _verify(es_key, token, required_claims=("jti",)).reason is Reason.MISSING_CLAIM


@pytest.mark.parametrize("empty", ["", None])
def test_a_required_claim_that_is_empty_is_missing(es_key: KeyPair, empty: object) -> None:
    """Regression: `"sub": ""` satisfied required_claims = ["sub"], and the request went
    through with no X-JWT-Sub at all."""
    raw = json.dumps({**default_claims(), "client_id": empty}).encode()
    verdict = _verify(es_key, mint(es_key, raw_payload=raw), required_claims=("client_id",))
    assert verdict.reason is Reason.MISSING_CLAIM
    raw = json.dumps({**default_claims(), "sub": ""}).encode()
    verdict = _verify(es_key, mint(es_key, raw_payload=raw), required_claims=("sub",))
    assert verdict.reason is Reason.MISSING_CLAIM


# --- Scopes and matchers ----------------------------------------------------------------


@pytest.mark.parametrize(
    "claims",
    [
        {"scope": "a b  c"},
        {"scp": ["a", "b", "c"]},
        {"scp": "a b c"},
        {"scope": "a c", "scp": ["b"]},
        {"scp": ["a", "c", "b d", 'x"']},
    ],
)
def test_scopes_from_scope_or_scp(claims: dict[str, Any], es_key: KeyPair) -> None:
    token = mint(es_key, {**default_claims(scope=None), **claims})
    assert _verify(
        es_key, token, policy=Policy("p", ("main",), require_scopes=frozenset({"a", "c"}))
    ).ok
    short = Policy("p", ("main",), require_scopes=frozenset({"a", "d"}))
    assert _verify(es_key, token, policy=short).reason is Reason.INSUFFICIENT_SCOPE


def test_scope_wins_over_scp(es_key: KeyPair) -> None:
    """One claim is read, never the union: `scp` cannot add to a token's `scope`."""
    token = mint(es_key, {**default_claims(scope=None), "scope": "a", "scp": ["b", "c"]})
    policy = Policy("p", ("main",), require_scopes=frozenset({"a", "c"}))
    assert _verify(es_key, token, policy=policy).reason is Reason.INSUFFICIENT_SCOPE


def test_claim_matchers(es_key: KeyPair) -> None:
    token = mint(
        es_key, default_claims(roles=["reader", "admin"], tier="gold", level=1, active=True)
    )

    def check(*matchers: ClaimMatcher) -> Reason:
        return _verify(es_key, token, policy=Policy("p", ("main",), claim_matchers=matchers)).reason

    assert (
        check(ClaimMatcher.containing("roles", "admin"), ClaimMatcher.equal_to("tier", "gold"))
        is Reason.OK
    )
    assert check(ClaimMatcher.any_of("tier", ("silver", "gold"))) is Reason.OK
    assert check(ClaimMatcher.equal_to("roles", ["reader", "admin"])) is Reason.OK
    assert check(ClaimMatcher.containing("roles", "owner")) is Reason.CLAIM_MISMATCH
    assert check(ClaimMatcher.containing("tier", "g")) is Reason.CLAIM_MISMATCH  # not an array
    assert check(ClaimMatcher.equal_to("active", 1)) is Reason.CLAIM_MISMATCH  # true is not 1
    assert check(ClaimMatcher.equal_to("level", True)) is Reason.CLAIM_MISMATCH
    assert check(ClaimMatcher.equal_to("level", 1)) is Reason.OK
    assert check(ClaimMatcher.equal_to("group", "x")) is Reason.MISSING_CLAIM


def test_claim_matcher_needs_exactly_one_condition() -> None:
    with pytest.raises(PolicyError):
        ClaimMatcher("sub")
    with pytest.raises(PolicyError):
        ClaimMatcher("sub", equals="a", contains="b")
    with pytest.raises(PolicyError):
        ClaimMatcher("sub", one_of=())


def test_issuer_rules_are_validated() -> None:
    with pytest.raises(PolicyError):
        rules({"none"})
    with pytest.raises(PolicyError):
        rules(set())
    with pytest.raises(PolicyError):
        rules({ES}, leeway=-1.0)
    with pytest.raises(PolicyError):
        Verifier([rules({ES}), rules({ES})], MemoryKeyStore())


def test_token_as_bytes_verifies(es_key: KeyPair) -> None:
    assert _verify(es_key, mint(es_key).encode()).ok


def test_b64_helper_roundtrip() -> None:
    assert b64(b"\xff") == "_w"


def _scope_tokens_item_by_item(value: str) -> tuple[str, ...]:
    """The rule itself: split on SP, keep the items that are scope-tokens."""
    return tuple(item for item in value.split(" ") if SCOPE_TOKEN.fullmatch(item))


@pytest.mark.parametrize(
    "scope",
    [
        "a",
        "openid profile orders:read",
        "a  b",
        " a",
        "a ",
        "",
        " ",
        "a\tb",
        "read\u3000admin",
        'a "b" c',
        "a\\b c",
        "a\nb",
        "caf\u00e9 b",
        "a\x7fb c",
    ],
)
def test_scope_tokens_of_a_string(scope: str) -> None:
    """The one-match fast path for well-formed lists gives what the item-by-item rule gives."""
    assert scope_tokens({"scope": scope}) == _scope_tokens_item_by_item(scope)


@given(st.text(alphabet=st.sampled_from(' ab:"\\\t\u3000\x7f\x21~'), max_size=12))
def test_scope_tokens_match_the_rule(scope: str) -> None:
    assert scope_tokens({"scope": scope}) == _scope_tokens_item_by_item(scope)


@given(st.lists(st.text(alphabet=st.sampled_from(' ab:"\\\t\u3000\x7f\x21~'), max_size=12)))
def test_scope_tokens_remembered_give_the_rule_too(scopes: list[str]) -> None:
    # The scope string's result is remembered: a second reading must still follow the rule.
    for scope in scopes + scopes:
        assert scope_tokens({"scope": scope}) == _scope_tokens_item_by_item(scope)


def test_remembered_scope_strings_stay_bounded() -> None:
    from spoa.verifier import claims

    for index in range(claims._SCOPES_OF_MAX + 100):
        scope_tokens({"scope": f"read:{index} write"})
    assert len(claims._SCOPES_OF) <= claims._SCOPES_OF_MAX
    long_scope = "a " * claims._SCOPES_OF_MAX_CHARS + "b"
    assert scope_tokens({"scope": long_scope})[-1] == "b"
    assert long_scope not in claims._SCOPES_OF
