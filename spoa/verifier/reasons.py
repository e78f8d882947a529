"""The reason-code vocabulary shared by verdicts, logs, metrics and WWW-Authenticate.

Documented for operators in docs/reasons.md; keep the two in step.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    OK = "ok"
    MISSING_TOKEN = "missing_token"
    INVALID_REQUEST = "invalid_request"
    MALFORMED = "malformed"
    TOKEN_TOO_LARGE = "token_too_large"
    UNSUPPORTED_ALG = "unsupported_alg"
    UNKNOWN_KID = "unknown_kid"
    BAD_SIGNATURE = "bad_signature"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    IAT_IN_FUTURE = "iat_in_future"
    LIFETIME_TOO_LONG = "lifetime_too_long"
    BAD_ISSUER = "bad_issuer"
    BAD_AUDIENCE = "bad_audience"
    MISSING_CLAIM = "missing_claim"
    CLAIM_MISMATCH = "claim_mismatch"
    BAD_TYPE = "bad_type"
    INSUFFICIENT_SCOPE = "insufficient_scope"
    KEYS_UNAVAILABLE = "keys_unavailable"
    UNKNOWN_POLICY = "unknown_policy"
    INTERNAL_ERROR = "internal_error"


# RFC 6750 §3.1: no token is 401 without an error code, a bad token is 401 invalid_token,
# too few privileges are 403: missing scopes, or a good token failing a policy's claim
# rules (a 401 invalid_token would make clients refresh the token and retry in a loop).
# Agent-side failures are 401 too: fail closed, never let through.
_STATUS: dict[Reason, int] = dict.fromkeys(Reason, 401)
_STATUS[Reason.OK] = 200
# The request, not the token, is malformed (RFC 6750 §3.1 invalid_request): a token sent
# in two places, or an Authorization value that is not one Bearer token.
_STATUS[Reason.INVALID_REQUEST] = 400
_STATUS[Reason.INSUFFICIENT_SCOPE] = 403
_STATUS[Reason.CLAIM_MISMATCH] = 403
# A request naming a policy that is not configured is a configuration error, not the client's.
_STATUS[Reason.UNKNOWN_POLICY] = 500

# RFC 6750 error codes for the WWW-Authenticate header ("" = send no error attribute).
_BEARER_ERROR: dict[Reason, str] = dict.fromkeys(Reason, "invalid_token")
_BEARER_ERROR[Reason.OK] = ""
_BEARER_ERROR[Reason.MISSING_TOKEN] = ""
_BEARER_ERROR[Reason.INVALID_REQUEST] = "invalid_request"
_BEARER_ERROR[Reason.INSUFFICIENT_SCOPE] = "insufficient_scope"
_BEARER_ERROR[Reason.CLAIM_MISMATCH] = "insufficient_scope"
_BEARER_ERROR[Reason.KEYS_UNAVAILABLE] = ""
_BEARER_ERROR[Reason.UNKNOWN_POLICY] = ""
_BEARER_ERROR[Reason.INTERNAL_ERROR] = ""


def http_status(reason: Reason) -> int:
    """The HTTP status HAProxy should answer with for this reason."""
    return _STATUS[reason]


def bearer_error(reason: Reason) -> str:
    """The RFC 6750 `error` attribute for this reason, or "" when none applies."""
    return _BEARER_ERROR[reason]
