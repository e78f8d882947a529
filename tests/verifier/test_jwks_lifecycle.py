"""The pure per-issuer JWKS schedule, driven by a fake clock (plain numbers)."""

from __future__ import annotations

import pytest

from spoa.verifier import JwksSchedule, JwksTiming, PolicyError, RefetchDecision, parse_max_age

TIMING = JwksTiming(
    refresh_min=60.0,
    refresh_max=3600.0,
    default_max_age=600.0,
    refresh_ahead=0.1,
    backoff_initial=1.0,
    backoff_max=30.0,
    refetch_interval=10.0,
    negative_ttl=120.0,
    negative_cache_size=2,
    max_stale=1000.0,
)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("max-age=300", 300.0),
        ("public, max-age=120, must-revalidate", 120.0),
        ('MAX-AGE="45"', 45.0),
        ("no-store", 0.0),
        ("private, no-cache", 0.0),
        ("max-age=abc", None),
        ("max-age=-5", None),
        ("s-maxage=50", None),
    ],
)
def test_parse_max_age(header: str | None, expected: float | None) -> None:
    assert parse_max_age(header) == expected


@pytest.mark.parametrize(
    ("max_age", "lifetime"),
    [(None, 600.0), (5.0, 60.0), (300.0, 300.0), (10**9, 3600.0), (0.0, 60.0)],
)
def test_lifetime_is_clamped_and_refresh_comes_before_expiry(
    max_age: float | None, lifetime: float
) -> None:
    schedule = JwksSchedule(TIMING)
    assert schedule.due(0.0)
    assert schedule.record_success(1000.0, max_age) == lifetime
    assert schedule.expires_at == 1000.0 + lifetime
    refresh_at = 1000.0 + min(lifetime * 0.9, TIMING.max_stale / 3)
    assert not schedule.due(refresh_at - 0.001)
    assert schedule.due(refresh_at)


def test_refresh_comes_a_third_of_the_way_to_max_stale_at_the_latest() -> None:
    """Regression: the refresh followed max-age alone, so a day-long max-age with a 12h
    max_stale left the keys unusable (401 keys_unavailable) for hours of every day with
    the IdP healthy."""
    schedule = JwksSchedule(JwksTiming(refresh_max=86_400.0, max_stale=43_200.0))
    schedule.record_success(0.0, 86_400.0)
    assert not schedule.due(14_399.0)
    assert schedule.due(14_400.0)
    assert schedule.usable(43_200.0)  # a failed refresh leaves two thirds for retries


def test_failures_back_off_exponentially_up_to_the_cap() -> None:
    schedule = JwksSchedule(TIMING)
    delays = [schedule.record_failure(100.0) for _ in range(8)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert not schedule.due(129.9)
    assert schedule.due(130.0)
    schedule.record_success(131.0, 300.0)
    assert schedule.record_failure(400.0) == 1.0  # success resets the backoff


def test_staleness_bound() -> None:
    schedule = JwksSchedule(TIMING)
    assert not schedule.usable(0.0)
    schedule.record_success(0.0, 100.0)
    assert not schedule.serving_stale(99.0)
    assert schedule.serving_stale(100.0)
    assert schedule.usable(1000.0)
    assert not schedule.usable(1000.1)
    assert not schedule.serving_stale(1000.1)


def test_a_fetch_in_flight_is_not_due_twice() -> None:
    schedule = JwksSchedule(TIMING)
    schedule.begin_fetch()
    assert not schedule.due(0.0)
    schedule.record_failure(0.0)
    assert schedule.due(1.0)


def test_unknown_kid_refetch_gate() -> None:
    schedule = JwksSchedule(TIMING)
    schedule.record_success(0.0, 600.0)
    assert schedule.refetch_decision("new", 5.0) is RefetchDecision.FETCH
    schedule.begin_refetch(5.0)
    assert schedule.refetch_decision("other", 5.1) is RefetchDecision.JOIN  # single flight
    schedule.record_success(6.0, 600.0)
    schedule.remember_unknown_kid("new", 6.0)
    assert schedule.refetch_decision("new", 7.0) is RefetchDecision.KNOWN_UNKNOWN
    assert schedule.refetch_decision("other", 7.0) is RefetchDecision.RATE_LIMITED
    assert schedule.refetch_decision("other", 15.0) is RefetchDecision.FETCH
    assert schedule.refetch_decision("new", 125.9) is RefetchDecision.KNOWN_UNKNOWN
    assert (
        schedule.refetch_decision("new", 126.0) is RefetchDecision.FETCH
    )  # negative entry expired


def test_negative_cache_is_bounded() -> None:
    schedule = JwksSchedule(TIMING)
    for kid in ("a", "b", "c"):
        schedule.remember_unknown_kid(kid, 0.0)
    assert schedule.refetch_decision("a", 1.0) is RefetchDecision.FETCH  # evicted
    assert schedule.refetch_decision("c", 1.0) is RefetchDecision.KNOWN_UNKNOWN


def test_timing_is_validated() -> None:
    with pytest.raises(PolicyError):
        JwksTiming(refresh_min=100.0, refresh_max=10.0)
    with pytest.raises(PolicyError):
        JwksTiming(fetch_timeout=0.0)
    with pytest.raises(PolicyError):
        JwksTiming(refresh_ahead=1.0)
