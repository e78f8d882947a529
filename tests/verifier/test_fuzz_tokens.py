"""Fuzzing the token parser and the Verifier.

Properties:
- `parse_compact` raises only `TokenRejected`, for any bytes or text;
- `Verifier.verify` always returns a Verdict and never `internal_error` (which would mean an
  exception escaped a check and was caught by the last-resort guard);
- a verdict is `ok` only when the token is exactly what the trusted key signed and its claims
  satisfy the issuer rules at `now` (checked independently here);
- any change to a valid token's bytes makes it fail.

Suite example counts are modest (`JWTGATE_FUZZ_EXAMPLES`, default 150); `bench/fuzz.py` runs
the same checks for minutes. Minimised crashers in `crashers/` are replayed as regressions.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
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
    sign,
)

from spoa.verifier import (
    KeySet,
    MemoryKeyStore,
    Reason,
    TokenRejected,
    Verdict,
    Verifier,
    parse_compact,
)
from tests.support.fuzz import fuzz_examples

EXAMPLES = fuzz_examples(150)
CRASHERS = Path(__file__).parent / "crashers"
MAX_TOKEN_BYTES = 4096
LEEWAY = 30.0
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# One key per family, made once: HMAC is fast enough to sign thousands of examples.
HS_KEY = make_key("HS256", kid="hs-1")
ES_KEY = make_key("ES256", kid="es-1")


def new_verifier(max_token_bytes: int = MAX_TOKEN_BYTES) -> Verifier:
    """HS256 and ES256 keys of one issuer, default rules, a small cache."""
    store = MemoryKeyStore()
    issuer_rules = rules({"HS256", "ES256"}, leeway=LEEWAY)
    keys = (HS_KEY.verification_key(), ES_KEY.verification_key())
    store.replace(issuer_rules.name, KeySet(keys), NOW)
    return Verifier([issuer_rules], store, max_token_bytes=max_token_bytes, cache_size=100)


VERIFIER = new_verifier()


def check_token(token: str | bytes, verifier: Verifier | None = None) -> Verdict:
    """The shared property: parse raises only TokenRejected; verify never errs internally."""
    with contextlib.suppress(TokenRejected):
        parse_compact(token, MAX_TOKEN_BYTES)
    chosen = verifier or VERIFIER
    verdict = chosen.verify(token, POLICY, CONTEXT, NOW)
    assert isinstance(verdict, Verdict)
    assert verdict.reason is not Reason.INTERNAL_ERROR, "an exception escaped a check"
    assert verdict.ok == (verdict.reason is Reason.OK)
    # The cached path must agree with the full path.
    again = chosen.verify(token, POLICY, CONTEXT, NOW)
    assert (again.ok, again.reason) == (verdict.ok, verdict.reason)
    return verdict


def claims_acceptable(claims: Any) -> bool:
    """An independent reading of what the default issuer rules accept at NOW."""
    if not isinstance(claims, dict) or claims.get("iss") != ISSUER:
        return False
    aud = claims.get("aud")
    audiences = aud if isinstance(aud, list) else [aud]
    if AUDIENCE not in audiences:
        return False
    exp = claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return False
    return exp + LEEWAY > NOW


# --- strategies -----------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
header_names = st.sampled_from(
    ["alg", "kid", "typ", "crit", "b64", "jku", "jwk", "x5u", "x5c", "cty", "zip", "enc"]
)
claim_names = st.sampled_from(["iss", "aud", "exp", "nbf", "iat", "sub", "scope", "scp", "typ"])
segment_chars = st.sampled_from(
    list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ \t\x00é")
)


@st.composite
def hostile_headers(draw: st.DrawFn) -> dict[str, Any]:
    header: dict[str, Any] = {"alg": draw(st.sampled_from(["HS256", "ES256"])), "kid": "hs-1"}
    header.update(draw(st.dictionaries(header_names, json_values, max_size=4)))
    return header


@st.composite
def claims_sets(draw: st.DrawFn) -> dict[str, Any]:
    base = default_claims()
    for name in draw(st.lists(claim_names, max_size=3)):
        base.pop(name, None)
    base.update(draw(st.dictionaries(claim_names, json_values, max_size=3)))
    base.update(
        draw(
            st.dictionaries(
                claim_names,
                st.one_of(
                    st.just(ISSUER),
                    st.just(AUDIENCE),
                    st.just([AUDIENCE, "other"]),
                    st.floats(NOW - 3600, NOW + 3600),
                    st.integers(int(NOW) - 3600, int(NOW) + 3600),
                ),
                max_size=3,
            )
        )
    )
    return base


# --- properties -----------------------------------------------------------------------------


@pytest.mark.timeout(120)
@FUZZ_SETTINGS
@given(
    st.one_of(
        st.binary(max_size=600),
        st.text(max_size=600),
        # Lone surrogates: what undecodable bytes become on the way in (surrogateescape).
        st.lists(
            st.text(max_size=8) | st.text(st.characters(categories=("Cs",)), min_size=1),
            max_size=10,
        ).map("".join),
    )
)
def test_arbitrary_input_is_rejected_cleanly(token: bytes | str) -> None:
    verdict = check_token(token)
    assert not verdict.ok


@pytest.mark.timeout(120)
@FUZZ_SETTINGS
@given(
    st.lists(st.text(segment_chars, max_size=80), min_size=1, max_size=6).map(".".join),
)
def test_token_shaped_text_is_rejected_cleanly(token: str) -> None:
    verdict = check_token(token)
    assert not verdict.ok


@pytest.mark.timeout(120)
@FUZZ_SETTINGS
@given(header=hostile_headers(), claims=claims_sets())
def test_signed_hostile_headers(header: dict[str, Any], claims: dict[str, Any]) -> None:
    """Correctly signed tokens with odd headers: only the plain, understood ones pass."""
    key: KeyPair = HS_KEY if header.get("alg") == "HS256" else ES_KEY
    token = mint(key, claims, header={"kid": key.kid, **header, "typ": header.get("typ")})
    header = {name: value for name, value in header.items() if value is not None}  # as minted
    verdict = check_token(token)
    if verdict.ok:
        assert claims_acceptable(claims)
        assert header["alg"] == key.alg
        assert "crit" not in header
        assert header.get("b64", True) is True  # true is the usual payload (RFC 7797 3)


@pytest.mark.timeout(120)
@FUZZ_SETTINGS
@given(claims=claims_sets())
def test_signed_arbitrary_claims_match_the_rules(claims: dict[str, Any]) -> None:
    verdict = check_token(mint(HS_KEY, claims))
    if verdict.ok:
        assert claims_acceptable(claims), claims


def near_json(members: dict[str, Any]) -> st.SearchStrategy[bytes]:
    """JSON texts of `members` and texts just off them: white space around, a BOM, a
    member name written with an escape, a member repeated with another value, bytes
    after the end. Some parse to `members`, so a signed token made of them can pass."""
    text = json.dumps(members, separators=(",", ":")).encode()
    name = next(iter(members))
    escaped = b'"\\u%04x' % ord(name[0]) + name[1:].encode() + b'"'
    return st.one_of(
        st.just(text),
        st.sampled_from([b" ", b"\n", b"\t", b"\r\n"]).map(lambda space: space + text + space),
        st.just(b"\xef\xbb\xbf" + text),
        st.just(text.replace(b'"' + name.encode() + b'"', escaped, 1)),
        json_scalars.map(
            lambda value: text[:-1] + b',"%s":%s}' % (name.encode(), json.dumps(value).encode())
        ),
        st.binary(min_size=1, max_size=8).map(lambda tail: text + tail),
    )


@pytest.mark.timeout(120)
@FUZZ_SETTINGS
@given(
    raw_header=st.binary(max_size=120) | near_json({"alg": "HS256", "kid": HS_KEY.kid}),
    raw_payload=st.binary(max_size=120) | near_json(default_claims()),
)
def test_signed_raw_segments(raw_header: bytes, raw_payload: bytes) -> None:
    """Signed, but the header and payload are arbitrary bytes or near-JSON (duplicates,
    BOMs, escapes, trailing bytes). Regression (test review): with arbitrary bytes alone no
    example ever passed, so the checks of a passing token below never ran."""
    token = mint(HS_KEY, raw_header=raw_header, raw_payload=raw_payload)
    verdict = check_token(token)
    if verdict.ok:
        assert json.loads(raw_header).get("alg") == "HS256"
        assert claims_acceptable(json.loads(raw_payload))


HS256_HEADER = b'{"alg":"HS256"}'
VALID_TOKEN = mint(HS_KEY, default_claims())


@pytest.mark.timeout(120)
@FUZZ_SETTINGS
@given(
    edits=st.lists(
        st.tuples(st.integers(0, len(VALID_TOKEN) - 1), st.integers(0, 127)),
        min_size=1,
        max_size=4,
    ),
    cut=st.one_of(st.none(), st.integers(0, len(VALID_TOKEN))),
)
def test_any_edit_of_a_valid_token_fails(edits: list[tuple[int, int]], cut: int | None) -> None:
    chars = bytearray(VALID_TOKEN.encode())
    for index, value in edits:
        chars[index] = value
    if cut is not None:
        chars = chars[:cut]
    edited = bytes(chars)
    assume(edited != VALID_TOKEN.encode())
    verdict = check_token(edited.decode("latin-1"), new_verifier())
    assert not verdict.ok


def test_the_valid_token_itself_passes() -> None:
    """Guards the edit property: it must start from an accepted token."""
    assert check_token(VALID_TOKEN, new_verifier()).ok


@pytest.mark.timeout(60)
@settings(max_examples=max(20, EXAMPLES // 5), deadline=None)
@given(depth=st.integers(1, 5000), kind=st.sampled_from(["[", '{"a":']))
def test_deeply_nested_json_is_rejected_without_recursion_error(depth: int, kind: str) -> None:
    closing = "]" if kind == "[" else "}"
    payload = ('{"x":' + kind * depth + "1" + closing * depth + "}").encode()
    signing_input = f"{b64(HS256_HEADER)}.{b64(payload)}".encode()
    token = f"{signing_input.decode()}.{b64(sign('HS256', HS_KEY.private, signing_input))}"
    verdict = check_token(token, new_verifier(max_token_bytes=10**6))
    assert not verdict.ok


# --- regressions from the crasher corpus ----------------------------------------------------


def corpus() -> list[Path]:
    return sorted(CRASHERS.glob("*.txt"))


def test_corpus_is_present() -> None:
    assert corpus(), f"no regression inputs in {CRASHERS}"


@pytest.mark.parametrize("path", corpus(), ids=lambda p: p.name)
def test_crasher_corpus_replays_cleanly(path: Path) -> None:
    raw = path.read_bytes().rstrip(b"\n")
    assert not check_token(raw, new_verifier()).ok
    assert not check_token(raw.decode("latin-1"), new_verifier()).ok
