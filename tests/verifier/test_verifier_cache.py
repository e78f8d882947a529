"""The verified-token cache: hits re-run per-request checks, entries die with exp and keys."""

from __future__ import annotations

import json

import pytest
from verifier_helpers import (
    CONTEXT,
    NOW,
    POLICY,
    KeyPair,
    default_claims,
    make_key,
    mint,
    rules,
    verifier_for,
)

from spoa.verifier import ClaimMatcher, KeySet, MemoryKeyStore, Policy, Reason, Verifier


@pytest.fixture(scope="module")
def key() -> KeyPair:
    return make_key("ES256", kid="k1")


def test_second_verify_is_a_hit_with_the_same_claims(key: KeyPair) -> None:
    verifier, _ = verifier_for([key.verification_key()], {"ES256"})
    token = mint(key)
    first = verifier.verify(token, POLICY, CONTEXT, NOW)
    second = verifier.verify(token, POLICY, CONTEXT, NOW + 1)
    assert first.ok
    assert not first.cache_hit
    assert second.ok
    assert second.cache_hit
    assert second.claims == first.claims
    assert (second.issuer, second.kid, second.alg, second.expires_at) == (
        "main", "k1", "ES256", first.expires_at,
    )  # fmt: skip


def test_hit_rechecks_expiry_and_drops_the_entry(key: KeyPair) -> None:
    verifier, _ = verifier_for([key.verification_key()], {"ES256"})
    token = mint(key)
    assert verifier.verify(token, POLICY, CONTEXT, NOW).ok
    expired = verifier.verify(token, POLICY, CONTEXT, NOW + 600 + 30)
    assert expired.reason is Reason.EXPIRED
    assert expired.cache_hit
    assert len(verifier.cache) == 0


def test_hit_rechecks_not_before(key: KeyPair) -> None:
    verifier, _ = verifier_for([key.verification_key()], {"ES256"}, leeway=0.0)
    token = mint(key, default_claims(nbf=int(NOW) + 10, iat=int(NOW)))
    assert verifier.verify(token, POLICY, CONTEXT, NOW + 10).ok  # cached now
    assert verifier.verify(token, POLICY, CONTEXT, NOW + 5).reason is Reason.NOT_YET_VALID


def test_hit_rechecks_iat_after_the_clock_jumps_back(key: KeyPair) -> None:
    # Regression: a cached token stayed valid before its iat (found by the fault suite).
    verifier, _ = verifier_for([key.verification_key()], {"ES256"}, leeway=0.0)
    token = mint(key, default_claims(iat=int(NOW)))
    assert verifier.verify(token, POLICY, CONTEXT, NOW).ok  # cached now
    assert verifier.verify(token, POLICY, CONTEXT, NOW - 3600).reason is Reason.IAT_IN_FUTURE


def test_hit_rechecks_a_lifetime_counted_from_now(key: KeyPair) -> None:
    # No iat: the lifetime bound counts from `now`, so an earlier clock makes it too long.
    verifier, _ = verifier_for([key.verification_key()], {"ES256"}, leeway=0.0, max_lifetime=900.0)
    token = mint(key, default_claims(iat=None))  # exp = NOW + 600
    assert verifier.verify(token, POLICY, CONTEXT, NOW).ok  # cached now
    late = verifier.verify(token, POLICY, CONTEXT, NOW - 600)  # 1200 s before exp
    assert late.reason is Reason.LIFETIME_TOO_LONG
    assert verifier.verify(token, POLICY, CONTEXT, NOW - 200).ok


def test_hit_runs_each_policys_own_checks(key: KeyPair) -> None:
    verifier, _ = verifier_for([key.verification_key()], {"ES256"})
    token = mint(key, default_claims(roles=["reader"]))
    assert verifier.verify(token, POLICY, CONTEXT, NOW).ok
    writer = Policy("w", ("main",), require_scopes=frozenset({"orders:write"}))
    verdict = verifier.verify(token, writer, CONTEXT, NOW)
    assert verdict.cache_hit
    assert verdict.status == 403
    assert verdict.required_scopes == {"orders:write"}
    other_audience = Policy("a", ("main",), audiences=frozenset({"api://billing"}))
    assert verifier.verify(token, other_audience, CONTEXT, NOW).reason is Reason.BAD_AUDIENCE
    admins = Policy("m", ("main",), claim_matchers=(ClaimMatcher.containing("roles", "admin"),))
    assert verifier.verify(token, admins, CONTEXT, NOW).reason is Reason.CLAIM_MISMATCH
    untrusting = Policy("u", ("elsewhere",))
    assert verifier.verify(token, untrusting, CONTEXT, NOW).reason is Reason.BAD_ISSUER
    assert verifier.verify(token, POLICY, CONTEXT, NOW).ok


def test_entry_is_dropped_when_its_key_leaves_the_set(key: KeyPair) -> None:
    verifier, store = verifier_for([key.verification_key()], {"ES256"})
    token = mint(key)
    assert verifier.verify(token, POLICY, CONTEXT, NOW).ok
    newcomer = make_key("ES256", kid="k2")
    # Rotation that keeps the key: still a hit.
    store.replace("main", KeySet((key.verification_key(), newcomer.verification_key())), NOW)
    assert verifier.verify(token, POLICY, CONTEXT, NOW).cache_hit
    # The key is gone: the entry goes, and a fresh verify finds no key.
    store.replace("main", KeySet((newcomer.verification_key(),)), NOW)
    verdict = verifier.verify(token, POLICY, CONTEXT, NOW)
    assert verdict.reason is Reason.UNKNOWN_KID
    assert not verdict.cache_hit
    assert len(verifier.cache) == 0


def test_same_kid_with_a_new_key_invalidates_the_entry(key: KeyPair) -> None:
    verifier, store = verifier_for([key.verification_key()], {"ES256"})
    token = mint(key)
    assert verifier.verify(token, POLICY, CONTEXT, NOW).ok
    impostor = make_key("ES256", kid="k1")
    store.replace("main", KeySet((impostor.verification_key(),)), NOW)
    assert verifier.verify(token, POLICY, CONTEXT, NOW).reason is Reason.BAD_SIGNATURE


def test_stale_keys_fail_closed_even_on_a_hit(key: KeyPair) -> None:
    store = MemoryKeyStore()
    store.replace("main", KeySet((key.verification_key(),)), NOW, max_stale=60.0)
    verifier = Verifier([rules({"ES256"})], store)
    token = mint(key)
    assert verifier.verify(token, POLICY, CONTEXT, NOW).ok
    assert verifier.verify(token, POLICY, CONTEXT, NOW + 60).cache_hit
    assert verifier.verify(token, POLICY, CONTEXT, NOW + 61).reason is Reason.KEYS_UNAVAILABLE
    store.confirm("main", NOW + 62)  # a refresh brought the same keys back
    assert verifier.verify(token, POLICY, CONTEXT, NOW + 62).ok


def test_cache_is_a_bounded_lru(key: KeyPair) -> None:
    verifier, _ = verifier_for([key.verification_key()], {"ES256"}, cache_size=3)
    tokens = [mint(key, default_claims(jti=str(i))) for i in range(5)]
    for token in tokens:
        assert verifier.verify(token, POLICY, CONTEXT, NOW).ok
    assert len(verifier.cache) == 3
    assert verifier.verify(tokens[4], POLICY, CONTEXT, NOW).cache_hit
    assert not verifier.verify(tokens[0], POLICY, CONTEXT, NOW).cache_hit
    # tokens[0] was re-inserted and evicted the least recently used one (tokens[2]).
    assert not verifier.verify(tokens[2], POLICY, CONTEXT, NOW).cache_hit


def test_cache_size_zero_disables_caching(key: KeyPair) -> None:
    verifier, _ = verifier_for([key.verification_key()], {"ES256"}, cache_size=0)
    token = mint(key)
    assert verifier.verify(token, POLICY, CONTEXT, NOW).ok
    assert not verifier.verify(token, POLICY, CONTEXT, NOW).cache_hit


def test_failed_tokens_are_not_cached(key: KeyPair) -> None:
    verifier, _ = verifier_for([key.verification_key()], {"ES256"})
    forged = mint(make_key("ES256", kid="k1"))
    for _ in range(2):
        assert verifier.verify(forged, POLICY, CONTEXT, NOW).reason is Reason.BAD_SIGNATURE
    assert verifier.verify(mint(key), POLICY, CONTEXT, NOW + 10_000).reason is Reason.EXPIRED
    assert len(verifier.cache) == 0


def test_cache_keys_are_digests_of_the_whole_token(key: KeyPair) -> None:
    import hashlib

    verifier, _ = verifier_for([key.verification_key()], {"ES256"})
    token = mint(key)
    assert verifier.verify(token, POLICY, CONTEXT, NOW).ok
    (stored,) = list(verifier.cache._entries)
    assert stored == hashlib.sha256(token.encode()).digest()  # not the ~600-byte token
    # A token differing anywhere (here: inside the signature) is another entry. Not the last
    # character: it carries only 2 bits, so most substitutes are non-canonical (MALFORMED).
    flipped = "A" if token[-5] != "A" else "B"
    other = token[:-5] + flipped + token[-4:]
    assert verifier.verify(other, POLICY, CONTEXT, NOW).reason is Reason.BAD_SIGNATURE
    assert len(verifier.cache) == 1


def test_oversized_tokens_are_refused_before_hashing(key: KeyPair) -> None:
    verifier, _ = verifier_for([key.verification_key()], {"ES256"})
    huge = "a" * (verifier.max_token_bytes + 1)
    assert verifier.verify(huge, POLICY, CONTEXT, NOW).reason is Reason.TOKEN_TOO_LARGE


def test_entries_share_repeated_values(key: KeyPair) -> None:
    verifier, _ = verifier_for([key.verification_key()], {"ES256"})
    first = verifier.verify(mint(key, default_claims(sub="a")), POLICY, CONTEXT, NOW)
    second = verifier.verify(mint(key, default_claims(sub="b")), POLICY, CONTEXT, NOW)
    assert first.claims["iss"] is second.claims["iss"]
    assert first.claims["sub"] != second.claims["sub"]


def test_the_table_of_shared_values_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from spoa.verifier import cache

    monkeypatch.setattr(cache, "_SHARED", {})
    monkeypatch.setattr(cache, "_SHARED_MAX", 50)
    sizes = []
    for index in range(40):
        payload = {"iss": "https://issuer.test/", "sub": f"user-{index}", "n": index, "t": True}
        compacted = cache.compact_claims(payload)
        assert compacted == payload
        assert [type(value) for value in compacted.values()] == [str, str, int, bool]
        sizes.append(len(cache._SHARED))
        assert sizes[-1] <= 50
    assert max(sizes) > 40  # it filled up, and was emptied when full
    assert sizes[-1] < max(sizes)
    for index in range(100):
        late = cache.compact_claims({"iss": "https://issuer.test/", "sub": f"late-{index}"})
        assert late["iss"] is cache._SHARED["https://issuer.test/"]
        assert cache.shared(frozenset({f"scope-{index}"})) == {f"scope-{index}"}
        assert len(cache._SHARED) <= 50


def test_values_first_seen_after_the_table_filled_are_shared_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression: once the unique values of the first tokens (sub, jti) had filled the
    table, it only looked values up. An issuer added by a later reload, or a scope first
    used later, was never shared: each of its entries kept copies of them (a few hundred
    bytes more per cached token). A full table is emptied and takes new values again."""
    from spoa.verifier import cache

    monkeypatch.setattr(cache, "_SHARED", {})
    monkeypatch.setattr(cache, "_SHARED_MAX", 50)
    for index in range(60):
        cache.compact_claims(json.loads(f'{{"iss": "https://old.test/", "sub": "u{index}"}}'))
    late = [
        cache.compact_claims(json.loads(f'{{"iss": "https://new.test/", "sub": "n{index}"}}'))
        for index in range(3)
    ]
    assert late[0]["iss"] == "https://new.test/"
    assert late[1]["iss"] is late[0]["iss"]
    assert late[2]["iss"] is late[0]["iss"]
    assert len(cache._SHARED) <= 50


# --- replay_window: how long an accepted verdict stays exactly the same ---------------------


def _same_verdict_through(verifier: Verifier, token: str, window: tuple[float, float]) -> None:
    """Inside the window the verdict is the accepted one; just outside it is not."""
    valid_from, valid_until = window
    inside = [valid_until - 1e-3]
    if valid_from != float("-inf"):
        inside.append(valid_from)
    for now in inside:
        assert verifier.verify(token, POLICY, CONTEXT, now).ok
    assert not verifier.verify(token, POLICY, CONTEXT, valid_until).ok


@pytest.mark.parametrize(
    ("overrides", "floor_claim"),
    [
        ({}, "iat"),
        ({"iat": None}, None),
        ({"nbf": int(NOW) + 20, "iat": None}, "nbf"),
        ({"iat": int(NOW) + 20}, "iat"),
    ],
)
def test_replay_window_is_where_the_verdict_holds(
    key: KeyPair, overrides: dict[str, int | None], floor_claim: str | None
) -> None:
    verifier, _ = verifier_for([key.verification_key()], {"ES256"}, leeway=30.0)
    claims = default_claims(**overrides)
    token = mint(key, claims)
    assert verifier.verify(token, POLICY, CONTEXT, NOW).ok
    window = verifier.replay_window(token, NOW)
    assert window is not None
    valid_from, valid_until = window
    assert valid_until == claims["exp"] + 30.0
    if floor_claim is None:
        assert valid_from == float("-inf")
    else:
        assert valid_from == pytest.approx(claims[floor_claim] - 30.0, abs=2e-3)
        assert valid_from > claims[floor_claim] - 30.0  # the margin is on the safe side
        later = default_claims(**overrides, jti="before")
        early = verifier.verify(mint(key, later), POLICY, CONTEXT, valid_from - 2e-3)
        assert not early.ok
    _same_verdict_through(verifier, token, window)


def test_replay_window_of_a_lifetime_counted_from_now(key: KeyPair) -> None:
    verifier, _ = verifier_for([key.verification_key()], {"ES256"}, leeway=0.0, max_lifetime=900.0)
    claims = default_claims(iat=None)
    token = mint(key, claims)
    assert verifier.verify(token, POLICY, CONTEXT, NOW).ok
    window = verifier.replay_window(token, NOW)
    assert window is not None
    assert window[0] == claims["exp"] - 900.0
    assert not verifier.verify(token, POLICY, CONTEXT, window[0] - 1).ok


def test_replay_window_ends_before_the_keys_go_stale(key: KeyPair) -> None:
    store = MemoryKeyStore()
    store.replace("main", KeySet((key.verification_key(),)), NOW, max_stale=60.0)
    verifier = Verifier([rules({"ES256"})], store)
    token = mint(key)
    assert verifier.verify(token, POLICY, CONTEXT, NOW).ok
    window = verifier.replay_window(token, NOW)
    assert window is not None
    assert NOW + 59 < window[1] < NOW + 60
    assert store.usable_until("main") == NOW + 60
    assert verifier.verify(token, POLICY, CONTEXT, NOW + 60.5).reason is Reason.KEYS_UNAVAILABLE


def test_no_replay_window_without_a_current_entry(key: KeyPair) -> None:
    verifier, store = verifier_for([key.verification_key()], {"ES256"})
    token = mint(key)
    assert verifier.replay_window(token, NOW) is None  # never verified
    assert not verifier.verify(mint(key, default_claims(aud="other")), POLICY, CONTEXT, NOW).ok
    assert verifier.verify(token, POLICY, CONTEXT, NOW).ok
    assert verifier.replay_window(token, NOW) is not None
    assert verifier.replay_window(token, NOW + 600 + 31) is None  # past exp and leeway
    store.replace("main", KeySet((key.verification_key(),)), NOW)  # a new generation
    assert verifier.replay_window(token, NOW) is None
    assert verifier.replay_window("é" + token, NOW) is None


def test_key_store_listeners_hear_replacements_and_removals_only(key: KeyPair) -> None:
    store = MemoryKeyStore()
    heard: list[str] = []
    store.subscribe(lambda: heard.append("changed"))
    store.replace("main", KeySet((key.verification_key(),)), NOW)
    store.confirm("main", NOW + 1)
    assert heard == ["changed"]
    assert store.usable_until("main") == float("inf")
    store.remove("main")
    assert heard == ["changed", "changed"]
    assert store.usable_until("main") is None


def test_a_cached_token_follows_its_keys_kid_and_pinned_alg() -> None:
    """Regression: a cached verdict survived a key set whose only change was the key's
    pinned alg or kid (same material), where a fresh check refuses the token."""
    key = make_key("RS256", kid="k")
    token = mint(key, default_claims(), alg="PS256")
    verifier, store = verifier_for([key.verification_key()], {"PS256"})
    for _ in range(2):  # the second is a cache hit
        assert verifier.verify(token, POLICY, CONTEXT, NOW).ok
    store.replace("main", KeySet((key.verification_key(alg="RS256"),)), NOW)
    assert verifier.verify(token, POLICY, CONTEXT, NOW).reason is Reason.UNSUPPORTED_ALG
    store.replace("main", KeySet((key.verification_key(),)), NOW)
    assert verifier.verify(token, POLICY, CONTEXT, NOW).ok
    assert verifier.verify(token, POLICY, CONTEXT, NOW).cache_hit
    store.replace("main", KeySet((key.verification_key(kid="renamed"),)), NOW)
    assert verifier.verify(token, POLICY, CONTEXT, NOW).reason is Reason.UNKNOWN_KID


def test_cached_rejections_before_the_signature_carry_no_claims() -> None:
    """Regression: a cached token refused for its issuer (a policy that does not trust
    it) or for stale keys came with its claims, which a report-only policy forwards as
    X-JWT-* headers; a fresh check refuses both before the signature, with none."""
    key = make_key("ES256", kid="k")
    token = mint(key, default_claims())
    verifier, store = verifier_for([key.verification_key()], {"ES256"})
    assert verifier.verify(token, POLICY, CONTEXT, NOW).ok
    elsewhere = Policy(name="elsewhere", issuers=("another",))
    for fresh in (True, False):
        if fresh:
            verifier.cache.clear()
        verdict = verifier.verify(token, elsewhere, CONTEXT, NOW)
        assert verdict.reason is Reason.BAD_ISSUER
        assert verdict.cache_hit is not fresh
        assert not verdict.claims
        assert verdict.expires_at is None
        assert verifier.verify(token, POLICY, CONTEXT, NOW).ok
    store.expire("main")
    verdict = verifier.verify(token, POLICY, CONTEXT, NOW)
    assert (verdict.reason, verdict.cache_hit) == (Reason.KEYS_UNAVAILABLE, True)
    assert not verdict.claims


@pytest.mark.parametrize("token_kid", [None, "anything"])
def test_a_cached_token_follows_the_limit_on_keys_tried_without_a_kid(
    token_kid: str | None,
) -> None:
    """Regression (RFC review): a token that names no key of the set (no kid, or a kid
    only kid-less keys serve) stayed a cache hit after a rotation to more such keys than
    MAX_KIDLESS_CANDIDATES, where a fresh check refuses it: it must name its key."""
    from spoa.verifier.keys import MAX_KIDLESS_CANDIDATES

    key = make_key("ES256")  # no kid: serves a token with any kid, or none
    token = mint(key, header={"kid": token_kid} if token_kid else None)
    verifier, store = verifier_for([key.verification_key()], {"ES256"})
    for _ in range(2):  # the second is a cache hit
        assert verifier.verify(token, POLICY, CONTEXT, NOW).ok
    others = [make_key("ES256").verification_key() for _ in range(MAX_KIDLESS_CANDIDATES)]
    store.replace("main", KeySet((key.verification_key(), *others)), NOW)
    verdict = verifier.verify(token, POLICY, CONTEXT, NOW)
    assert (verdict.reason, verdict.cache_hit) == (Reason.UNKNOWN_KID, False)
    assert len(verifier.cache) == 0
    # Back to few enough keys: accepted again, and cached.
    store.replace("main", KeySet((key.verification_key(), *others[:2])), NOW)
    assert verifier.verify(token, POLICY, CONTEXT, NOW).ok
    assert verifier.verify(token, POLICY, CONTEXT, NOW).cache_hit
