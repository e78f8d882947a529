"""Typed configuration the verifier checks against: issuer rules, policies, claim matchers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

from spoa.verifier.algorithms import SUPPORTED_ALGORITHMS, KeySlot, shared_key_slots
from spoa.verifier.errors import PolicyError


@dataclass(frozen=True, slots=True)
class IssuerRules:
    """How tokens of one trusted issuer are checked."""

    name: str
    issuer: str
    algorithms: frozenset[str]
    audiences: frozenset[str] = frozenset()
    leeway: float = 30.0
    require_exp: bool = True
    max_lifetime: float | None = None
    required_claims: tuple[str, ...] = ()
    allowed_types: frozenset[str] = frozenset()
    # Derived: allowed_types normalised by normalize_type (ASCII lower case, and
    # "application/" before a value without "/").
    normalized_types: frozenset[str] = field(init=False, repr=False, compare=False)
    # Derived: key types that need their alg named to serve (RS256 and PS256 both allowed).
    shared_key_slots: frozenset[KeySlot] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.name or not self.issuer:
            raise PolicyError("issuer rules need a name and an issuer")
        if not self.algorithms:
            raise PolicyError(f"issuer {self.name!r} allows no algorithms")
        unknown = self.algorithms - SUPPORTED_ALGORITHMS
        if unknown:
            raise PolicyError(
                f"issuer {self.name!r} allows unsupported algorithms {sorted(unknown)}"
            )
        if not math.isfinite(self.leeway) or self.leeway < 0:
            raise PolicyError(f"issuer {self.name!r} has an invalid leeway")
        if self.max_lifetime is not None and not self.max_lifetime > 0:
            raise PolicyError(f"issuer {self.name!r} has an invalid max_lifetime")
        object.__setattr__(
            self, "normalized_types", frozenset(normalize_type(t) for t in self.allowed_types)
        )
        object.__setattr__(self, "shared_key_slots", shared_key_slots(self.algorithms))


# ASCII letters only: Unicode lowercasing would make other letters equal to them (the
# Kelvin sign to "k").
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def normalize_type(value: str) -> str:
    """RFC 7515 §4.1.9: `typ` is a media type, compared without regard to ASCII case, and
    a value without "/" stands for "application/" and itself (so `x/y` is not
    `application/x/y`)."""
    lowered = value.lower() if value.isascii() else value.translate(_ASCII_LOWER)
    return lowered if "/" in lowered else "application/" + lowered


@dataclass(frozen=True, slots=True)
class ClaimMatcher:
    """A condition on one claim: exactly one of `equals`, `one_of`, `contains` is set."""

    claim: str
    equals: object = None
    one_of: tuple[object, ...] | None = None
    contains: object = None

    def __post_init__(self) -> None:
        if not self.claim:
            raise PolicyError("claim matcher needs a claim name")
        chosen = sum((self.equals is not None, self.one_of is not None, self.contains is not None))
        if chosen != 1:
            raise PolicyError(
                f"claim matcher for {self.claim!r} must set exactly one of equals, one_of, contains"
            )
        if self.one_of is not None and not self.one_of:
            raise PolicyError(f"claim matcher for {self.claim!r} has an empty one_of")

    @classmethod
    def equal_to(cls, claim: str, value: object) -> ClaimMatcher:
        return cls(claim, equals=value)

    @classmethod
    def any_of(cls, claim: str, values: tuple[object, ...]) -> ClaimMatcher:
        return cls(claim, one_of=tuple(values))

    @classmethod
    def containing(cls, claim: str, value: object) -> ClaimMatcher:
        return cls(claim, contains=value)


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    issuers: tuple[str, ...]
    audiences: frozenset[str] | None = None
    require_scopes: frozenset[str] = frozenset()
    claim_matchers: tuple[ClaimMatcher, ...] = ()

    def __post_init__(self) -> None:
        if not self.issuers:
            raise PolicyError(f"policy {self.name!r} trusts no issuer")


class RequestContext(NamedTuple):
    """What the request says about itself (for checks bound to it, such as DPoP's `htm`
    and `htu`). A NamedTuple: immutable, and cheap to build once per request."""

    method: str = ""
    path: str = ""
    host: str = ""
