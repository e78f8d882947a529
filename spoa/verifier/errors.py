"""One exception tree for the verifier core; every rejection carries its reason code.

Messages never include tokens, signatures or key material: they may reach a log.
"""

from __future__ import annotations

from spoa.verifier.reasons import Reason


class VerifierError(Exception):
    """Root of every error the verifier core raises."""

    reason: Reason = Reason.INTERNAL_ERROR

    def __init__(self, message: str, *, reason: Reason | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class TokenRejected(VerifierError):
    """The token failed a check; `reason` says which."""


class KeyLoadError(VerifierError):
    """A key, key set or secret could not be loaded or is unfit for use."""


class PolicyError(VerifierError):
    """A policy, issuer rule or claim matcher is ill-formed (a configuration mistake)."""
