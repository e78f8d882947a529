"""Where the verifier reads keys from: the `KeyStore` protocol and an in-memory implementation.

The key manager (edge) replaces an issuer's whole `KeySet` at once; readers never see a half
update. A per-issuer generation number lets the verified-token cache notice a change
without scanning: only when the generation moved does it ask whether a fresh check would
still try its key.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from spoa.verifier.errors import TokenRejected
from spoa.verifier.keys import KeySet, VerificationKey
from spoa.verifier.reasons import Reason


class KeyStore(Protocol):
    def generation(self, issuer: str, now: float) -> int | None:
        """The issuer's current key-set generation, or None when it has no usable keys
        (none loaded yet, or older than its max_stale)."""
        ...

    def candidates(
        self, issuer: str, kid: str | None, alg: str, now: float
    ) -> tuple[int, tuple[VerificationKey, ...]]:
        """(generation, keys that may verify this kid and alg). Raises TokenRejected with
        KEYS_UNAVAILABLE, UNKNOWN_KID or UNSUPPORTED_ALG."""
        ...

    def usable_until(self, issuer: str) -> float | None:
        """The instant after which the issuer's current keys are too stale to use, unless
        refreshed first; None when it has no keys."""
        ...


@dataclass(frozen=True, slots=True)
class IssuerKeys:
    key_set: KeySet
    generation: int
    refreshed_at: float  # last successful load
    max_stale: float  # seconds after refreshed_at during which the set may be used

    def usable(self, now: float) -> bool:
        return now - self.refreshed_at <= self.max_stale


class MemoryKeyStore:
    """A `KeyStore` held in memory; updated by whole-set replacement per issuer.

    Listeners are called after every replacement or removal (not after a refresh that
    only confirms the same keys), from the thread that made it."""

    def __init__(self) -> None:
        self._issuers: dict[str, IssuerKeys] = {}
        self._generations = itertools.count(1)
        self._listeners: list[Callable[[], None]] = []

    def subscribe(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    def replace(
        self, issuer: str, key_set: KeySet, now: float, *, max_stale: float = math.inf
    ) -> int:
        """Install a freshly loaded key set; returns its generation."""
        generation = next(self._generations)
        self._issuers[issuer] = IssuerKeys(key_set, generation, now, max_stale)
        self._changed()
        return generation

    def confirm(self, issuer: str, now: float) -> None:
        """A refresh returned the same keys: keep the generation, reset the staleness clock."""
        current = self._issuers.get(issuer)
        if current is not None:
            self._issuers[issuer] = IssuerKeys(
                current.key_set, current.generation, now, current.max_stale
            )

    def expire(self, issuer: str) -> None:
        """Make the issuer's keys unusable now, whatever `now` a reader passes: the key
        manager's own clock says they outlived max_stale (a wall clock stepped back must
        not stretch it). The next replacement makes them usable again."""
        current = self._issuers.get(issuer)
        if current is not None and current.max_stale >= 0:
            self._issuers[issuer] = IssuerKeys(
                current.key_set, current.generation, current.refreshed_at, -math.inf
            )
            self._changed()

    def remove(self, issuer: str) -> None:
        self._issuers.pop(issuer, None)
        self._changed()

    def get(self, issuer: str) -> IssuerKeys | None:
        return self._issuers.get(issuer)

    def generation(self, issuer: str, now: float) -> int | None:
        entry = self._issuers.get(issuer)
        if entry is None or now - entry.refreshed_at > entry.max_stale:
            return None
        return entry.generation

    def candidates(
        self, issuer: str, kid: str | None, alg: str, now: float
    ) -> tuple[int, tuple[VerificationKey, ...]]:
        entry = self._issuers.get(issuer)
        if entry is None:
            raise TokenRejected("no keys loaded for issuer", reason=Reason.KEYS_UNAVAILABLE)
        if not entry.usable(now):
            raise TokenRejected("issuer keys are too stale", reason=Reason.KEYS_UNAVAILABLE)
        return entry.generation, entry.key_set.candidates(kid, alg)

    def usable_until(self, issuer: str) -> float | None:
        entry = self._issuers.get(issuer)
        return None if entry is None else entry.refreshed_at + entry.max_stale
