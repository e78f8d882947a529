"""The verifier's answer for one request."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from spoa.verifier.reasons import Reason, http_status

EMPTY_CLAIMS: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    status: int
    reason: Reason
    claims: Mapping[str, Any] = field(repr=False)
    expires_at: float | None
    issuer: str | None = None
    kid: str | None = None
    alg: str | None = None
    required_scopes: frozenset[str] = frozenset()
    cache_hit: bool = False

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
        return cls(
            ok=True,
            status=200,
            reason=Reason.OK,
            claims=claims,
            expires_at=expires_at,
            issuer=issuer,
            kid=kid,
            alg=alg,
            cache_hit=cache_hit,
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
