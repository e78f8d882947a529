"""The verified-token cache: a bounded LRU keyed by the SHA-256 of the whole token.

An entry holds what the signature and issuer-level checks established; the per-request checks
(time, audience, scopes, claim matchers) run again on every hit. Entries never outlive `exp`
and die when their signing key leaves the issuer's key set.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from spoa.verifier.claims import TokenTimes
from spoa.verifier.keys import KeyIdentity
from spoa.verifier.speedups import optional_speedup
from spoa.verifier.verdict import Verdict


def token_digest(token: str | bytes) -> bytes:
    """The cache key: SHA-256 of the whole token. A cryptographic digest, never Python's
    hash(): a collision would hand a forged token a cached verdict. It also keeps 32 bytes
    per entry instead of the token's ~600."""
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).digest()


# Values that repeat across verified tokens (claim names, issuer, audiences, scope sets)
# are kept once: most of a cache entry's memory was copies of them. Only values of tokens
# whose signature verified get here, and the table is bounded: emptied when full, so that
# values first seen late (an issuer added by a reload) are kept too, not only those of
# the first few thousand tokens. Entries keep the objects they share either way.
_SHARED: dict[Any, Any] = {}
_SHARED_MAX = 8192
_SHARED_STR_MAX = 256

_T = TypeVar("_T")


def _sharer(adding: int) -> Callable[[Any, Any], Any]:
    """`share(x, x)`: the kept value equal to x, keeping x. A table without room for
    `adding` more is emptied first; when `adding` alone is more than it holds, values are
    only looked up (`get(x, x)` is x itself when it is not kept)."""
    if len(_SHARED) + adding > _SHARED_MAX:
        if adding > _SHARED_MAX:
            return _SHARED.get
        _SHARED.clear()
    return _SHARED.setdefault


def shared(value: _T) -> _T:
    return _sharer(1)(value, value)  # type: ignore[no-any-return]


def compact_claims_python(payload: dict[str, Any]) -> dict[str, Any]:
    """The payload with its names and short string values shared with other entries. The
    reference for `_claims.c`, which `compact_claims` is when it was built."""
    # One C call per value instead of a Python one; room for a name and a value per
    # member is checked once.
    share = _sharer(2 * len(payload))
    return {
        share(name, name) if type(name) is str else name: share(value, value)
        if type(value) is str and len(value) <= _SHARED_STR_MAX
        else value
        for name, value in payload.items()
    }


_compact_c: Callable[[dict[Any, Any], int, int, dict[str, Any]], dict[str, Any]] | None = (
    optional_speedup("spoa.verifier._claims", "compact")
)
SPEEDUPS = _compact_c is not None


def compact_claims(payload: dict[str, Any]) -> dict[str, Any]:
    """The payload with its names and short string values shared with other entries: in
    C when it was built (about 1 us less per cache miss), else `compact_claims_python`."""
    if _compact_c is None:
        return compact_claims_python(payload)
    return _compact_c(_SHARED, _SHARED_MAX, _SHARED_STR_MAX, payload)


class CacheEntry:
    """Mutable only in `generation`, which is bumped after confirming the key is still held."""

    __slots__ = (
        "audiences",
        "claims",
        "exp",
        "generation",
        "iat",
        "issuer",
        "key",
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
        key: KeyIdentity,
        generation: int,
        claims: Mapping[str, Any],
        times: TokenTimes,
        leeway: float,
        audiences: frozenset[str],
        scopes: frozenset[str],
        ok_verdict: Verdict,
    ) -> None:
        self.issuer = issuer
        self.key = key
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
        self._entries: OrderedDict[bytes, CacheEntry] = OrderedDict()
        # Running totals for metrics; plain integer increments, cheap on the hot path.
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> CacheEntry | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
            # Evicted meanwhile by another thread? The entry itself is still valid.
            # (try/except, not contextlib.suppress: this runs on every cache hit.)
            try:  # noqa: SIM105
                self._entries.move_to_end(key)
            except KeyError:
                pass
        return entry

    def peek(self, key: bytes) -> CacheEntry | None:
        """The entry, without counting a hit or refreshing its place."""
        return self._entries.get(key)

    def put(self, key: bytes, entry: CacheEntry) -> None:
        if self.max_entries == 0:
            return
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
            self.evictions += 1

    def stats(self) -> CacheStats:
        return CacheStats(len(self._entries), self.hits, self.misses, self.evictions)

    def discard(self, key: bytes) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()
