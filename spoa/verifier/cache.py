"""The verified-token cache: a bounded LRU keyed by the whole token.

An entry holds what the signature and issuer-level checks established; the per-request checks
(time, audience, scopes, claim matchers) run again on every hit. Entries never outlive `exp`
and die when their signing key leaves the issuer's key set.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from spoa.verifier.claims import TokenTimes
from spoa.verifier.verdict import Verdict


class CacheEntry:
    """Mutable only in `generation`, which is bumped after confirming the key is still held."""

    __slots__ = (
        "audiences",
        "claims",
        "exp",
        "generation",
        "iat",
        "issuer",
        "key_id",
        "leeway",
        "lifetime_floor",
        "nbf",
        "ok_verdict",
        "scopes",
    )

    def __init__(
        self,
        *,
        issuer: str,
        key_id: str,
        generation: int,
        claims: Mapping[str, Any],
        times: TokenTimes,
        leeway: float,
        audiences: frozenset[str],
        scopes: frozenset[str],
        ok_verdict: Verdict,
    ) -> None:
        self.issuer = issuer
        self.key_id = key_id
        self.generation = generation
        self.claims = claims
        self.exp = times.exp
        self.nbf = times.nbf
        self.iat = times.iat
        self.lifetime_floor = times.lifetime_floor
        self.leeway = leeway
        self.audiences = audiences
        self.scopes = scopes
        self.ok_verdict = ok_verdict  # returned as is when every per-request check passes


@dataclass(frozen=True, slots=True)
class CacheStats:
    entries: int
    hits: int
    misses: int
    evictions: int


class VerifiedTokenCache:
    def __init__(self, max_entries: int) -> None:
        if max_entries < 0:
            raise ValueError("cache size must not be negative")
        self.max_entries = max_entries
        self._entries: OrderedDict[str | bytes, CacheEntry] = OrderedDict()
        # Running totals for metrics; plain integer increments, cheap on the hot path.
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, token: str | bytes) -> CacheEntry | None:
        entry = self._entries.get(token)
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
            # Evicted meanwhile by another thread? The entry itself is still valid.
            with contextlib.suppress(KeyError):
                self._entries.move_to_end(token)
        return entry

    def put(self, token: str | bytes, entry: CacheEntry) -> None:
        if self.max_entries == 0:
            return
        self._entries[token] = entry
        self._entries.move_to_end(token)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
            self.evictions += 1

    def stats(self) -> CacheStats:
        return CacheStats(len(self._entries), self.hits, self.misses, self.evictions)

    def discard(self, token: str | bytes) -> None:
        self._entries.pop(token, None)

    def clear(self) -> None:
        self._entries.clear()
