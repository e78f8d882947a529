"""The pure JWT verification core: `Verifier.verify(token, policy, context, now) -> Verdict`.

Standard library, `cryptography` and `jwcrypto` only; no I/O and no clock reads.
"""

from spoa.verifier.algorithms import SUPPORTED_ALGORITHMS, KeyKind, shared_key_slots
from spoa.verifier.claims import SCOPE_TOKEN, scope_tokens
from spoa.verifier.engine import DEFAULT_CACHE_SIZE, DEFAULT_MAX_TOKEN_BYTES, Verifier
from spoa.verifier.errors import KeyLoadError, PolicyError, TokenRejected, VerifierError
from spoa.verifier.keys import (
    DEFAULT_MAX_KEYS,
    MIN_RSA_BITS,
    KeyLoadReport,
    KeySet,
    VerificationKey,
    hmac_key,
    key_from_public,
    load_jwk,
    load_jwks,
    load_key_file_bytes,
    load_pem,
    serving,
)
from spoa.verifier.keystore import IssuerKeys, KeyStore, MemoryKeyStore
from spoa.verifier.lifecycle import JwksSchedule, JwksTiming, RefetchDecision, parse_max_age
from spoa.verifier.parsing import ParsedToken, parse_compact
from spoa.verifier.policy import ClaimMatcher, IssuerRules, Policy, RequestContext
from spoa.verifier.reasons import Reason, bearer_error, http_status
from spoa.verifier.verdict import Verdict

__all__ = [
    "DEFAULT_CACHE_SIZE",
    "DEFAULT_MAX_KEYS",
    "DEFAULT_MAX_TOKEN_BYTES",
    "MIN_RSA_BITS",
    "SCOPE_TOKEN",
    "SUPPORTED_ALGORITHMS",
    "ClaimMatcher",
    "IssuerKeys",
    "IssuerRules",
    "JwksSchedule",
    "JwksTiming",
    "KeyKind",
    "KeyLoadError",
    "KeyLoadReport",
    "KeySet",
    "KeyStore",
    "MemoryKeyStore",
    "ParsedToken",
    "Policy",
    "PolicyError",
    "Reason",
    "RefetchDecision",
    "RequestContext",
    "TokenRejected",
    "Verdict",
    "VerificationKey",
    "Verifier",
    "VerifierError",
    "bearer_error",
    "hmac_key",
    "http_status",
    "key_from_public",
    "load_jwk",
    "load_jwks",
    "load_key_file_bytes",
    "load_pem",
    "parse_compact",
    "parse_max_age",
    "scope_tokens",
    "serving",
    "shared_key_slots",
]
