"""`Verifier.verify_many`: the batch path gives each request the verdict `verify` gives."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from verifier_helpers import (
    AUDIENCE,
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

from spoa.verifier import Policy, Reason, Verdict, Verifier
from spoa.verifier.keystore import MemoryKeyStore
from tests.support.fuzz import fuzz_examples

SCOPED = Policy(name="scoped", issuers=("main",), require_scopes=frozenset({"orders:write"}))
OTHER_AUDIENCE = Policy(name="elsewhere", issuers=("main",), audiences=frozenset({"api://x"}))


@pytest.fixture(scope="module")
def key() -> KeyPair:
    return make_key("ES256", kid="k1")


@pytest.fixture(scope="module")
def stranger() -> KeyPair:
    return make_key("ES256", kid="k1")  # same kid, another key: a bad signature


def _fields(verdict: Verdict) -> tuple[Any, ...]:
    return (
        verdict.cache_hit,
        verdict.ok,
        verdict.status,
        verdict.reason,
        dict(verdict.claims),
        verdict.expires_at,
        verdict.issuer,
        verdict.kid,
        verdict.alg,
        verdict.required_scopes,
    )


def _requests(key: KeyPair, stranger: KeyPair) -> list[tuple[str | bytes, Policy]]:
    valid = mint(key)
    return [
        (valid, POLICY),
        (mint(key, default_claims(sub="someone-else")), POLICY),
        (mint(stranger), POLICY),  # bad signature
        (mint(key, default_claims(exp=int(NOW) - 3600)), POLICY),  # expired
        (mint(key, default_claims(iss="https://unknown.example")), POLICY),
        (mint(key, default_claims(exp="soon")), POLICY),  # malformed exp, signed
        (valid, SCOPED),  # insufficient scope, after a good signature
        (mint(key, default_claims(scope="orders:write")), SCOPED),
        (mint(key), OTHER_AUDIENCE),
        ("not.a.token", POLICY),
        ("", POLICY),
        ("é" * 10, POLICY),  # not ASCII
        ("x" * 9000, POLICY),  # over the size limit
        (mint(key, default_claims(aud=[AUDIENCE, "api://x"])), OTHER_AUDIENCE),
        (valid.encode(), POLICY),
    ]


def test_each_verdict_is_what_verify_gives(key: KeyPair, stranger: KeyPair) -> None:
    requests = _requests(key, stranger)
    one_by_one, _ = verifier_for([key.verification_key()], {"ES256"})
    batched, _ = verifier_for([key.verification_key()], {"ES256"})
    expected = [one_by_one.verify(token, policy, CONTEXT, NOW) for token, policy in requests]
    got = batched.verify_many([(token, policy, CONTEXT) for token, policy in requests], NOW)
    assert [_fields(verdict) for verdict in got] == [_fields(verdict) for verdict in expected]
    # A repeated token is verified once and then taken from the cache, as in turn.
    assert batched.cache.stats() == one_by_one.cache.stats()
    assert any(verdict.cache_hit for verdict in got)
    # Every reason the list was built for is there, so the comparison covers them.
    assert {verdict.reason for verdict in got} >= {
        Reason.OK,
        Reason.BAD_SIGNATURE,
        Reason.EXPIRED,
        Reason.BAD_ISSUER,
        Reason.MALFORMED,
        Reason.INSUFFICIENT_SCOPE,
        Reason.BAD_AUDIENCE,
        Reason.MISSING_TOKEN,
        Reason.TOKEN_TOO_LARGE,
    }


def test_a_second_batch_is_served_from_the_cache(key: KeyPair, stranger: KeyPair) -> None:
    requests = [(token, policy, CONTEXT) for token, policy in _requests(key, stranger)]
    verifier, _ = verifier_for([key.verification_key()], {"ES256"})
    first = verifier.verify_many(requests, NOW)
    second = verifier.verify_many(requests, NOW + 1)
    # The same verdicts, but for where each came from.
    assert [_fields(verdict)[1:] for verdict in second] == [
        _fields(verdict)[1:] for verdict in first
    ]
    accepted = [verdict for verdict in second if verdict.ok]
    assert accepted
    assert all(verdict.cache_hit for verdict in accepted)
    assert not first[0].cache_hit


def test_a_token_repeated_in_one_batch_is_verified_once(key: KeyPair, stranger: KeyPair) -> None:
    # Regression: each repeat of a new token in one read paid a signature check.
    token = mint(key)
    verifier, _ = verifier_for([key.verification_key()], {"ES256"})
    verdicts = verifier.verify_many([(token, POLICY, CONTEXT)] * 5, NOW)
    assert [(verdict.ok, verdict.cache_hit) for verdict in verdicts] == [(True, False)] + [
        (True, True)
    ] * 4
    assert (verifier.cache.misses, verifier.cache.hits) == (1, 4)
    # A rejected token is not cached: each repeat is verified again, as in turn.
    forged = mint(stranger)
    verdicts = verifier.verify_many([(forged, POLICY, CONTEXT)] * 3, NOW)
    assert [verdict.reason for verdict in verdicts] == [Reason.BAD_SIGNATURE] * 3


def test_an_empty_batch_has_no_verdicts(key: KeyPair) -> None:
    verifier, _ = verifier_for([key.verification_key()], {"ES256"})
    assert verifier.verify_many([], NOW) == []


class _FailingFor:
    """A key store that breaks (not a TokenRejected) for one kid."""

    def __init__(self, inner: MemoryKeyStore, broken_kid: str) -> None:
        self._inner = inner
        self._broken = broken_kid

    def candidates(self, issuer: str, kid: str | None, alg: str, now: float) -> Any:
        if kid == self._broken:
            raise RuntimeError("key store failure")
        return self._inner.candidates(issuer, kid, alg, now)

    def generation(self, issuer: str, now: float) -> int | None:
        return self._inner.generation(issuer, now)

    def usable_until(self, issuer: str) -> float | None:
        return self._inner.usable_until(issuer)


def test_an_unforeseen_failure_rejects_only_its_own_token(key: KeyPair) -> None:
    other = make_key("ES256", kid="broken")
    _, store = verifier_for([key.verification_key(), other.verification_key()], {"ES256"})
    verifier = Verifier([rules({"ES256"})], _FailingFor(store, "broken"))
    verdicts = verifier.verify_many(
        [
            (mint(key), POLICY, CONTEXT),
            (mint(other), POLICY, CONTEXT),
            (mint(key), POLICY, CONTEXT),
        ],
        NOW,
    )
    assert [verdict.reason for verdict in verdicts] == [
        Reason.OK,
        Reason.INTERNAL_ERROR,
        Reason.OK,
    ]


_POOL_SIZE = 15  # len(_requests(...))


@settings(max_examples=fuzz_examples(60), deadline=None)
@given(
    picks=st.lists(st.integers(0, _POOL_SIZE - 1), max_size=30),
    cuts=st.lists(st.integers(0, 30), max_size=4),
)
def test_any_mix_of_batches_matches_verify_in_turn(
    pool: list[tuple[str | bytes, Policy]], picks: list[int], cuts: list[int]
) -> None:
    """Random sequences of the pool (repeats, hits, rejections), cut into batches: each
    verdict, its cache_hit and the cache's counters are what verify in turn gives."""
    requests = [pool[pick] for pick in picks]
    one_by_one, _ = verifier_for([_POOL_KEY.verification_key()], {"ES256"})
    batched, _ = verifier_for([_POOL_KEY.verification_key()], {"ES256"})
    expected = [one_by_one.verify(token, policy, CONTEXT, NOW) for token, policy in requests]
    got: list[Verdict] = []
    bounds = [0, *sorted(cut for cut in cuts if cut < len(requests)), len(requests)]
    for start, stop in itertools.pairwise(bounds):
        chunk = requests[start:stop]
        got += batched.verify_many([(token, policy, CONTEXT) for token, policy in chunk], NOW)
    assert [_fields(verdict) for verdict in got] == [_fields(verdict) for verdict in expected]
    assert batched.cache.stats() == one_by_one.cache.stats()


_POOL_KEY = make_key("ES256", kid="k1")


@pytest.fixture(scope="module")
def pool() -> list[tuple[str | bytes, Policy]]:
    requests = _requests(_POOL_KEY, make_key("ES256", kid="k1"))
    assert len(requests) == _POOL_SIZE
    return requests


def test_a_check_that_fails_closed_is_told_to_the_edge(key: KeyPair) -> None:
    """Architecture review: an unforeseen exception became internal_error and was then
    forgotten, though a comment said the glue logged it; a verifier bug left no trace."""
    other = make_key("ES256", kid="broken")
    _, store = verifier_for([key.verification_key(), other.verification_key()], {"ES256"})
    heard: list[Exception] = []
    verifier = Verifier([rules({"ES256"})], _FailingFor(store, "broken"), on_error=heard.append)
    assert verifier.verify(mint(other), POLICY, CONTEXT, NOW).reason is Reason.INTERNAL_ERROR
    verdicts = verifier.verify_many(
        [(mint(other), POLICY, CONTEXT), (mint(key), POLICY, CONTEXT)], NOW
    )
    assert [v.reason for v in verdicts] == [Reason.INTERNAL_ERROR, Reason.OK]
    assert [type(error) for error in heard] == [RuntimeError, RuntimeError]

    def broken_listener(error: Exception) -> None:
        raise ValueError("the listener itself fails")

    # A listener that fails changes no verdict.
    failing = Verifier([rules({"ES256"})], _FailingFor(store, "broken"), on_error=broken_listener)
    assert failing.verify(mint(other), POLICY, CONTEXT, NOW).reason is Reason.INTERNAL_ERROR
