"""The JWKS schedule for one issuer, pure and clock-free: the caller passes `now`.

It answers: when to refresh next (Cache-Control max-age clamped to bounds, a little before
expiry), how long to back off after a failure, whether an unknown kid may trigger a refetch
(single flight, at most once per interval, negative cache), and whether the keys are still
fresh enough to use (max_stale since the last success).
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from enum import StrEnum

from spoa.verifier.errors import PolicyError

_MAX_AGE = re.compile(r"^\s*max-age\s*=\s*\"?(\d+)\"?\s*$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class JwksTiming:
    """Per-issuer JWKS settings (seconds, bytes, counts)."""

    refresh_min: float = 60.0
    refresh_max: float = 86_400.0
    default_max_age: float = 600.0  # used when the response has no usable max-age
    refresh_ahead: float = 0.1  # refresh this fraction of the lifetime before expiry
    backoff_initial: float = 1.0
    backoff_max: float = 300.0
    refetch_interval: float = 30.0  # at most one unknown-kid refetch per interval
    negative_ttl: float = 300.0  # an unknown kid is not refetched for this long
    negative_cache_size: int = 1024
    max_stale: float = 86_400.0  # keys are used at most this long after the last success
    fetch_timeout: float = 5.0
    max_response_bytes: int = 1 << 20
    max_keys: int = 100

    def __post_init__(self) -> None:
        if not 0 < self.refresh_min <= self.refresh_max:
            raise PolicyError("need 0 < refresh_min <= refresh_max")
        if not 0 <= self.refresh_ahead < 1:
            raise PolicyError("refresh_ahead must be in [0, 1)")
        if not 0 < self.backoff_initial <= self.backoff_max:
            raise PolicyError("need 0 < backoff_initial <= backoff_max")
        for name in ("refetch_interval", "negative_ttl", "max_stale", "fetch_timeout"):
            value = getattr(self, name)
            if not (value >= 0 and not math.isnan(value)):
                raise PolicyError(f"{name} must not be negative")
        if self.fetch_timeout <= 0:
            raise PolicyError("fetch_timeout must be positive")
        if self.max_response_bytes <= 0 or self.max_keys <= 0 or self.negative_cache_size < 0:
            raise PolicyError("size limits must be positive")

    def clamp_max_age(self, max_age: float | None) -> float:
        value = self.default_max_age if max_age is None else max_age
        return min(max(value, self.refresh_min), self.refresh_max)


def parse_max_age(cache_control: str | None) -> float | None:
    """The max-age of a Cache-Control header; no-store/no-cache count as 0; None if absent."""
    if not cache_control:
        return None
    result: float | None = None
    for directive in cache_control.split(","):
        name = directive.strip().lower()
        if name in ("no-store", "no-cache"):
            return 0.0
        match = _MAX_AGE.match(directive)
        if match is not None and result is None:
            result = float(match.group(1))
    return result


class RefetchDecision(StrEnum):
    FETCH = "fetch"  # start a fetch now
    JOIN = "join"  # a fetch is already in flight: wait for it
    KNOWN_UNKNOWN = "known_unknown"  # the kid was missing after a recent fetch
    RATE_LIMITED = "rate_limited"  # a refetch happened less than refetch_interval ago


class JwksSchedule:
    """Mutable schedule state for one issuer; every method takes `now`."""

    def __init__(self, timing: JwksTiming) -> None:
        self.timing = timing
        self.last_success: float | None = None
        self.expires_at: float | None = None
        self.next_attempt_at: float = -math.inf  # due at once
        self.failures = 0
        self.fetch_in_flight = False
        self.last_refetch_at: float | None = None
        self._unknown_kids: OrderedDict[str, float] = OrderedDict()

    def due(self, now: float) -> bool:
        return not self.fetch_in_flight and now >= self.next_attempt_at

    def usable(self, now: float) -> bool:
        return self.last_success is not None and now - self.last_success <= self.timing.max_stale

    def serving_stale(self, now: float) -> bool:
        """Past the advertised lifetime but still within max_stale."""
        return self.expires_at is not None and now >= self.expires_at and self.usable(now)

    def begin_fetch(self) -> None:
        self.fetch_in_flight = True

    def record_success(self, now: float, max_age: float | None) -> float:
        """Returns the clamped lifetime. The next refresh is due a little before it ends,
        and at the latest a third of the way to max_stale (below the alert at half): keys
        the IdP says are good for a day must not go unusable under a shorter max_stale
        while the IdP is healthy."""
        lifetime = self.timing.clamp_max_age(max_age)
        self.fetch_in_flight = False
        self.last_success = now
        self.expires_at = now + lifetime
        self.failures = 0
        refresh_in = lifetime * (1 - self.timing.refresh_ahead)
        self.next_attempt_at = now + min(refresh_in, self.timing.max_stale / 3)
        return lifetime

    def record_failure(self, now: float) -> float:
        """Returns the backoff delay before the next attempt."""
        self.fetch_in_flight = False
        self.failures += 1
        exponent = min(self.failures - 1, 62)
        delay = min(self.timing.backoff_initial * 2.0**exponent, self.timing.backoff_max)
        self.next_attempt_at = now + delay
        return delay

    def refetch_decision(self, kid: str, now: float) -> RefetchDecision:
        until = self._unknown_kids.get(kid)
        if until is not None:
            if now < until:
                return RefetchDecision.KNOWN_UNKNOWN
            del self._unknown_kids[kid]
        if self.fetch_in_flight:
            return RefetchDecision.JOIN
        last = self.last_refetch_at
        if last is not None and now - last < self.timing.refetch_interval:
            return RefetchDecision.RATE_LIMITED
        return RefetchDecision.FETCH

    def begin_refetch(self, now: float) -> None:
        self.last_refetch_at = now
        self.fetch_in_flight = True

    def remember_unknown_kid(self, kid: str, now: float) -> None:
        """After a fetch that did not bring this kid: stop asking for negative_ttl."""
        if self.timing.negative_cache_size == 0:
            return
        self._unknown_kids[kid] = now + self.timing.negative_ttl
        self._unknown_kids.move_to_end(kid)
        while len(self._unknown_kids) > self.timing.negative_cache_size:
            self._unknown_kids.popitem(last=False)
