"""Claim checks (RFC 7519 §4.1, RFC 9068). Each raises TokenRejected with its reason."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

from spoa.verifier.errors import TokenRejected
from spoa.verifier.policy import ClaimMatcher, IssuerRules, normalize_type
from spoa.verifier.reasons import Reason

# NumericDates are kept within signed 64-bit seconds: what HAProxy's integers (the
# forwarded `exp`) and most JWT libraries can hold. Beyond it a date means nothing.
NUMERIC_DATE_LIMIT = 2**63  # exclusive; Python compares ints and floats exactly


def numeric_date(payload: Mapping[str, Any], name: str) -> float | None:
    """A NumericDate claim as float, None when absent; anything but a finite number within
    ±2**63 seconds is malformed."""
    value = payload.get(name)
    if value is None and name not in payload:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokenRejected(f"{name} is not a number", reason=Reason.MALFORMED)
    if not -NUMERIC_DATE_LIMIT <= value < NUMERIC_DATE_LIMIT:  # also refuses inf and NaN
        raise TokenRejected(f"{name} is out of range", reason=Reason.MALFORMED)
    return float(value)


def check_type(header: Mapping[str, Any], rules: IssuerRules) -> None:
    if not rules.normalized_types:
        return
    typ = header.get("typ")
    if not isinstance(typ, str) or normalize_type(typ) not in rules.normalized_types:
        raise TokenRejected("token type is not accepted", reason=Reason.BAD_TYPE)


class TokenTimes(NamedTuple):
    """The instants a verified token's validity depends on, kept for cache hits."""

    exp: float | None
    nbf: float | None
    iat: float | None
    # With max_lifetime and no iat, the lifetime is counted from `now`: before this
    # instant (a clock that jumped back) it would be too long.
    lifetime_floor: float | None


def check_issuer_claims(
    payload: Mapping[str, Any],
    rules: IssuerRules,
    now: float,
) -> TokenTimes:
    """Checks that depend only on the token and its issuer."""
    exp = numeric_date(payload, "exp")
    nbf = numeric_date(payload, "nbf")
    iat = numeric_date(payload, "iat")
    lifetime_floor = None
    if exp is None and rules.require_exp:
        raise TokenRejected("exp is required", reason=Reason.MISSING_CLAIM)
    if iat is not None and iat > now + rules.leeway:
        raise TokenRejected("iat is in the future", reason=Reason.IAT_IN_FUTURE)
    if rules.max_lifetime is not None:
        if exp is None:
            raise TokenRejected(
                "exp is required for a bounded lifetime", reason=Reason.MISSING_CLAIM
            )
        start = iat if iat is not None else now
        if exp - start > rules.max_lifetime + rules.leeway:
            raise TokenRejected("token lifetime is too long", reason=Reason.LIFETIME_TOO_LONG)
        if iat is None:
            lifetime_floor = exp - rules.max_lifetime - rules.leeway
    # RFC 7519 4.1.2 and 4.1.7: a subject or token id, when present, is a string (null
    # too is refused); a number would forward as text no different from its digits.
    for claim in ("sub", "jti"):
        if claim in payload and type(payload[claim]) is not str:
            raise TokenRejected(f"{claim} is not a string", reason=Reason.MALFORMED)
    for claim in rules.required_claims:
        # Null or "" is no value: an empty sub would pass as a subject and forward none.
        value = payload.get(claim)
        if value is None or value == "":
            raise TokenRejected("a required claim is missing", reason=Reason.MISSING_CLAIM)
    return TokenTimes(exp, nbf, iat, lifetime_floor)


def check_times(exp: float | None, nbf: float | None, leeway: float, now: float) -> None:
    if exp is not None and now >= exp + leeway:
        raise TokenRejected("token has expired", reason=Reason.EXPIRED)
    if nbf is not None and now + leeway < nbf:
        raise TokenRejected("token is not valid yet", reason=Reason.NOT_YET_VALID)


def token_audiences(payload: Mapping[str, Any]) -> frozenset[str]:
    """`aud` as a set: a string or an array of strings (RFC 7519 §4.1.3). A null `aud` is
    malformed, as a null date, `sub` or `jti` is, not an absent one."""
    aud = payload.get("aud")
    if aud is None and "aud" not in payload:
        return frozenset()
    if isinstance(aud, str):
        return frozenset((aud,))
    if isinstance(aud, list) and all(isinstance(item, str) for item in aud):
        return frozenset(aud)
    raise TokenRejected("aud is neither a string nor an array of strings", reason=Reason.MALFORMED)


# RFC 6749 section 3.3 (used by RFC 9068): scope-token = 1*( %x21 / %x23-5B / %x5D-7E ).
SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
# The common case in one match: scope-tokens separated by single spaces.
_SCOPE_LIST = re.compile(f"{SCOPE_TOKEN.pattern}(?: {SCOPE_TOKEN.pattern})*")
# Its result per scope string: a pure function of the text, and the same few strings come
# in token after token (each cache miss reads them twice: the claims, then the answer).
# Bounded, and emptied when full.
_SCOPES_OF: dict[str, tuple[str, ...]] = {}
_SCOPES_OF_MAX = 1024
_SCOPES_OF_MAX_CHARS = 512


def scope_tokens(payload: Mapping[str, Any]) -> tuple[str, ...]:
    """The token's scopes, in order, from one claim: `scope` (RFC 9068, a string of
    scope-tokens separated by single spaces) or, only when there is no `scope`, `scp`
    (a string or an array, as some IdPs send). Strings split on SP alone, and items that
    are not scope-tokens are dropped: no other separator (tab, U+3000, ...) can make
    `"read\u3000admin"` grant `admin`, and the forwarded `scope` is what was checked."""
    # A `scope` member, even null, is the source: `scp` never adds to it.
    value = payload["scope"] if "scope" in payload else payload.get("scp")
    if isinstance(value, str):
        known = _SCOPES_OF.get(value)
        if known is not None:
            return known
        if _SCOPE_LIST.fullmatch(value) is not None:
            found = tuple(value.split(" "))
            # Only exact str (what JSON gives) is kept: a subclass may redefine equality.
            if type(value) is str and len(value) <= _SCOPES_OF_MAX_CHARS:
                if len(_SCOPES_OF) >= _SCOPES_OF_MAX:
                    _SCOPES_OF.clear()
                _SCOPES_OF[value] = found
            return found
        items: list[Any] = value.split(" ")
    elif isinstance(value, list):
        items = value
    else:
        return ()
    fullmatch = SCOPE_TOKEN.fullmatch
    return tuple(item for item in items if type(item) is str and fullmatch(item))


def check_audience(token_aud: frozenset[str], accepted: frozenset[str]) -> None:
    """Any-of match; an empty accepted set means the audience is not enforced."""
    if accepted and token_aud.isdisjoint(accepted):
        raise TokenRejected("audience not accepted", reason=Reason.BAD_AUDIENCE)


def json_equal(left: object, right: object) -> bool:
    """JSON equality: true is not 1, and containers compare element-wise by the same rule."""
    if isinstance(left, bool) or isinstance(right, bool):
        return type(left) is type(right) and left == right
    if isinstance(left, list | tuple) and isinstance(right, list | tuple):
        return len(left) == len(right) and all(
            json_equal(a, b) for a, b in zip(left, right, strict=True)
        )
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(json_equal(left[k], right[k]) for k in left)
    return left == right


def check_matchers(payload: Mapping[str, Any], matchers: tuple[ClaimMatcher, ...]) -> None:
    for matcher in matchers:
        if matcher.claim not in payload:
            raise TokenRejected("a required claim is missing", reason=Reason.MISSING_CLAIM)
        value = payload[matcher.claim]
        if matcher.equals is not None:
            matched = json_equal(value, matcher.equals)
        elif matcher.one_of is not None:
            matched = any(json_equal(value, option) for option in matcher.one_of)
        else:
            matched = isinstance(value, list) and any(
                json_equal(item, matcher.contains) for item in value
            )
        if not matched:
            raise TokenRejected("a claim does not match the policy", reason=Reason.CLAIM_MISMATCH)
