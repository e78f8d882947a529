"""The verifier's answer for one request."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

from spoa.verifier.reasons import Reason, http_status

EMPTY_CLAIMS: Mapping[str, Any] = MappingProxyType({})
_NO_SCOPES: frozenset[str] = frozenset()
_new_tuple = tuple.__new__


class Verdict(NamedTuple):
    """Immutable. A NamedTuple rather than a frozen dataclass: a cache miss builds two
    and a frozen dataclass sets each of its ten fields through object.__setattr__."""

    ok: bool
    status: int
    reason: Reason
    claims: Mapping[str, Any]
    expires_at: float | None
    issuer: str | None = None
    kid: str | None = None
    alg: str | None = None
    required_scopes: frozenset[str] = frozenset()
    cache_hit: bool = False

    def __repr__(self) -> str:
        # Claims left out: they are a user's identity, and reprs end up in logs.
        return (
            f"Verdict(ok={self.ok}, status={self.status}, reason={self.reason.value}, "
            f"issuer={self.issuer!r}, kid={self.kid!r}, alg={self.alg!r}, "
            f"cache_hit={self.cache_hit})"
        )

    @classmethod
    def accepted(
        cls,
        claims: Mapping[str, Any],
        expires_at: float | None,
        issuer: str,
        kid: str | None,
        alg: str | None,
        *,
        cache_hit: bool,
    ) -> Verdict:
        # Straight to tuple.__new__ (what NamedTuple's generated __new__ calls): a miss
        # builds two, and the generated one is another Python call each.
        return _new_tuple(
            cls,
            (True, 200, Reason.OK, claims, expires_at, issuer, kid, alg, _NO_SCOPES, cache_hit),
        )

    @classmethod
    def rejected(
        cls,
        reason: Reason,
        *,
        claims: Mapping[str, Any] = EMPTY_CLAIMS,
        expires_at: float | None = None,
        issuer: str | None = None,
        kid: str | None = None,
        alg: str | None = None,
        required_scopes: frozenset[str] = frozenset(),
        cache_hit: bool = False,
    ) -> Verdict:
        """A refusal with the status that belongs to `reason` (used by the glue too,
        e.g. for MISSING_TOKEN or UNKNOWN_POLICY)."""
        return cls(
            ok=False,
            status=http_status(reason),
            reason=reason,
            claims=claims,
            expires_at=expires_at,
            issuer=issuer,
            kid=kid,
            alg=alg,
            required_scopes=required_scopes,
            cache_hit=cache_hit,
        )
