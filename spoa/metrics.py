"""Prometheus metrics for jwtgate, and the small HTTP listener that serves them.

Everything lives in a private `CollectorRegistry` (never the global one), so tests and
reloads can build as many `Metrics` objects as they like. Label values that come from
configuration or from the wire are bounded: anything outside the configured sets is
exported as "other", so a hostile client cannot grow the number of series.

Several worker processes: the supervisor calls `prepare_multiprocess_dir()` before it
starts the workers; each worker builds its own `Metrics` (values go to per-process mmap
files) and the supervisor serves `multiprocess_registry()`, which merges those files at
scrape time. See docs/operations.md for the gauge merge modes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import sys
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Collection, Hashable, Iterable, Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final, cast

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from spoa import __version__

__all__ = [
    "JWKS_FETCH_RESULTS",
    "MULTIPROC_ENV",
    "OTHER",
    "VERIFY_BUCKETS",
    "Metrics",
    "MetricsServer",
    "ReadinessCheck",
    "mark_worker_dead",
    "multiprocess_registry",
    "prepare_multiprocess_dir",
]

_log = structlog.get_logger(__name__)

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
OTHER: Final = "other"
# Label for "no issuer was identified" (e.g. a malformed token), distinct from "other".
UNKNOWN: Final = "unknown"

# A cached verify is a few µs, a miss with RSA-4096 a few ms; 100 ms means trouble.
VERIFY_BUCKETS: Final = (
    5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4,
    1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 1e-1,
)  # fmt: skip

OUTCOMES: Final = frozenset({"accept", "reject", "report_only_reject"})
_REPLAY_KEYS_MAX: Final = 4096  # replay tags whose labels are kept, per label set
# What a fetch came to; the cause in words is in the `jwks_fetch_failed` log event.
JWKS_FETCH_RESULTS: Final = frozenset({"ok", "timeout", "http_error", "invalid", "error"})
_JWKS_SUCCESS: Final = frozenset({"ok"})
RELOAD_RESULTS: Final = frozenset({"ok", "error"})
# Frame types HAProxy sends (spop-notes §1) plus the agent's own, named as in SPOE.txt.
FRAME_KINDS: Final = frozenset(
    {"unset", "haproxy_hello", "haproxy_disconnect", "notify", "agent_hello",
     "agent_disconnect", "ack"}
)  # fmt: skip
# SPOP DISCONNECT status codes 0..13 and 99 (unknown error).
_STATUS_LABELS: Final = {code: str(code) for code in (*range(14), 99)}
# DISCONNECT statuses that count as protocol errors (0-2 are normal closes).
_PROTOCOL_ERROR_STATUSES: Final = (*range(3, 14), 99)

ReadinessCheck = Callable[[], tuple[bool, Any]]


def _bounded(allowed: Iterable[str]) -> dict[str, str]:
    # Map value -> label; a plain dict lookup on the hot path, "other" on a miss.
    return {str(value): str(value) for value in allowed}


def _status_label(status: int | None) -> str:
    if status is None:
        return "none"
    return _STATUS_LABELS.get(int(status), OTHER)


def _use_multiprocess_values() -> None:
    """Make new metric values mmap-backed when PROMETHEUS_MULTIPROC_DIR is set.

    prometheus_client picks its value class when it is first imported. A forked worker
    inherits the parent's choice, which was made before the directory existed; this
    redoes that choice, as the library itself would have, before any metric is built.
    """
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]


class Metrics:
    """All jwtgate metrics, and the calls that update them.

    The per-request methods (`record_verdict`, the SPOP observer methods) resolve the
    labelled child once and keep it in a dict, so a call is a few dict lookups and an
    increment. Not thread-safe for reconfiguration while other threads record; the agent
    records from one event loop per process.
    """

    def __init__(
        self,
        *,
        issuers: Iterable[str] = (),
        policies: Iterable[str] = (),
        reasons: Iterable[str] = (),
        version: str = __version__,
        clock: Callable[[], float] = time.time,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if os.environ.get(MULTIPROC_ENV):
            _use_multiprocess_values()
            self.multiprocess = True
        else:
            self.multiprocess = False
        self.registry = registry if registry is not None else CollectorRegistry()
        self._clock = clock
        reg = self.registry
        # Per-request counts are plain integers, written only by the event loop's thread,
        # and applied to the Prometheus objects by flush(): at every scrape (this collector
        # is registered first, so it runs before the others) and every second by the
        # worker, for the multi-worker files. A locked Prometheus update per request
        # cost a fifth of the agent's work on the cache-hit path.
        self._flush_lock = threading.Lock()
        self._verdict_totals: dict[tuple[str, str, str, str], int] = {}
        self._verdict_flushed: dict[tuple[str, str, str, str], int] = {}
        self._frame_totals: dict[str, int] = {}
        self._frame_flushed: dict[str, int] = {}
        self._inflight_now = 0
        self._bounds = (*VERIFY_BUCKETS, math.inf)
        self._bucket_totals = {True: [0] * len(self._bounds), False: [0] * len(self._bounds)}
        self._bucket_flushed = {True: [0] * len(self._bounds), False: [0] * len(self._bounds)}
        self._seconds_totals = {True: 0.0, False: 0.0}
        self._seconds_flushed = {True: 0.0, False: 0.0}
        self._replayed_total = 0
        self._replayed_flushed = 0
        self._replay_keys: dict[Hashable, tuple[str, str, str, str]] = {}
        reg.register(_FlushOnCollect(self.flush))

        self._verdicts = Counter(
            "jwtgate_verdicts_total",
            "Verdicts by outcome, reason code, issuer and policy.",
            ["outcome", "reason", "issuer", "policy"],
            registry=reg,
        )
        self._replayed = Counter(
            "jwtgate_replayed_answers_total",
            "Accepted answers replayed by the SPOP layer from the answer memo, without a "
            "verification (counted in jwtgate_verdicts_total too, not in the duration "
            "histogram nor the token cache counters).",
            registry=reg,
        )
        self._verify_seconds = Histogram(
            "jwtgate_verify_duration_seconds",
            "Time to verify one token, by verified-token cache result.",
            ["cache"],
            buckets=VERIFY_BUCKETS,
            registry=reg,
        )
        self._cache_hits = Counter(
            "jwtgate_token_cache_hits_total", "Verified-token cache hits.", registry=reg
        )
        self._cache_misses = Counter(
            "jwtgate_token_cache_misses_total", "Verified-token cache misses.", registry=reg
        )
        self._cache_evictions = Counter(
            "jwtgate_token_cache_evictions_total",
            "Verified-token cache evictions.",
            registry=reg,
        )
        self._cache_entries = Gauge(
            "jwtgate_token_cache_entries",
            "Entries in the verified-token caches (sum over workers).",
            multiprocess_mode="livesum",
            registry=reg,
        )
        self._connections_open = Gauge(
            # Not plain "jwtgate_spop_connections": that is the counter's family name.
            "jwtgate_spop_connections_open",
            "Open SPOP connections from HAProxy.",
            multiprocess_mode="livesum",
            registry=reg,
        )
        self._connections_total = Counter(
            "jwtgate_spop_connections_total", "SPOP connections accepted.", registry=reg
        )
        self._disconnects = Counter(
            "jwtgate_spop_disconnects_total",
            "SPOP connections closed, by DISCONNECT status ('none' if none was exchanged).",
            ["status"],
            registry=reg,
        )
        self._frames = Counter(
            "jwtgate_spop_frames_total",
            "SPOP frames received, by frame type.",
            ["type"],
            registry=reg,
        )
        self._inflight = Gauge(
            "jwtgate_spop_inflight_frames",
            "NOTIFY frames received and not yet acknowledged.",
            multiprocess_mode="livesum",
            registry=reg,
        )
        self._protocol_errors = Counter(
            "jwtgate_spop_protocol_errors_total",
            "SPOP protocol errors, by the DISCONNECT status sent or received (3 and above).",
            ["status"],
            registry=reg,
        )
        self._handler_failures = Counter(
            "jwtgate_spoe_handler_failures_total",
            "Checks answered with the fallback actions (fail closed) because the handler or"
            " its answer failed: an agent bug.",
            registry=reg,
        )
        self._jwks_fetches = Counter(
            "jwtgate_jwks_fetches_total",
            "JWKS fetches by issuer and result.",
            ["issuer", "result"],
            registry=reg,
        )
        # livemin: the worker with the fewest keys is the one that will reject traffic.
        self._jwks_keys = Gauge(
            "jwtgate_jwks_keys",
            "Keys held per issuer (minimum over workers).",
            ["issuer"],
            multiprocess_mode="livemin",
            registry=reg,
        )
        # livemin: the oldest key set over workers; jwtgate_jwks_age_seconds derives from it.
        self._keyset_fetched = Gauge(
            "jwtgate_jwks_keyset_timestamp_seconds",
            "Unix time the key set in use was fetched or confirmed (oldest over workers).",
            ["issuer"],
            multiprocess_mode="livemin",
            registry=reg,
        )
        # livemax: the alerts compare key age to this bound (jwtgate_jwks_age_seconds / it);
        # a dead worker's value from before a reload must not outlast it.
        self._jwks_max_stale = Gauge(
            "jwtgate_jwks_max_stale_seconds",
            "The issuer's configured max_stale: how long the last good keys may serve.",
            ["issuer"],
            multiprocess_mode="livemax",
            registry=reg,
        )
        self._jwks_last_success = Gauge(
            "jwtgate_jwks_last_success_timestamp_seconds",
            "Unix time of the last successful JWKS refresh (latest over workers).",
            ["issuer"],
            multiprocess_mode="max",
            registry=reg,
        )
        # livemin: one unready worker makes the agent unready for that issuer.
        self._issuer_ready = Gauge(
            "jwtgate_issuer_ready",
            "1 when the issuer has usable keys, else 0 (minimum over workers).",
            ["issuer"],
            multiprocess_mode="livemin",
            registry=reg,
        )
        self._reloads = Counter(
            "jwtgate_config_reloads_total",
            "Configuration reloads by result.",
            ["result"],
            registry=reg,
        )
        # Series present at 0 from the start: increase() in an alert cannot see the first
        # increment of a series that did not exist before it.
        for result in RELOAD_RESULTS:
            self._reloads.labels(result=result)
        for status in _PROTOCOL_ERROR_STATUSES:
            self._protocol_errors.labels(status=_status_label(status))
        self._build_info = Gauge(
            "jwtgate_build_info",
            "Always 1; the version label names the running build.",
            ["version"],
            multiprocess_mode="max",
            registry=reg,
        )
        reg.register(_KeySetAgeCollector(self._keyset_fetched.collect, clock))

        self._build_info.labels(version=version).set(1)
        self._verify_hit = self._verify_seconds.labels(cache="hit")
        self._verify_miss = self._verify_seconds.labels(cache="miss")
        self._last_cache_totals = (0, 0, 0)
        self._issuers: dict[str, str] = {}
        self._policies: dict[str, str] = {}
        self._reasons: dict[str, str] = {}
        self._verdict_children: dict[tuple[str, str, str, str], Any] = {}
        self._frame_labels: dict[str, str] = {}
        self._error_children: dict[int, Any] = {}
        self.set_label_sets(issuers=issuers, policies=policies, reasons=reasons)

    # -- configuration -------------------------------------------------------------------

    def set_label_sets(
        self, *, issuers: Iterable[str], policies: Iterable[str], reasons: Iterable[str]
    ) -> None:
        """Replace the allowed label values (at start-up and on reload).

        Series of issuers no longer configured are dropped from the per-issuer gauges in
        single-process mode (prometheus_client cannot remove series in multiprocess mode;
        there they go away when the worker restarts).
        """
        new_issuers = _bounded(issuers)
        removed = set(self._issuers) - set(new_issuers)
        # Whole dicts are swapped so a concurrent reader sees the old or the new set.
        self._issuers = new_issuers
        self._policies = _bounded(policies)
        self._reasons = _bounded(reasons)
        self._verdict_children = {}
        self._replay_keys = {}
        if not self.multiprocess:
            for issuer in removed:
                for gauge in (
                    self._jwks_keys,
                    self._jwks_max_stale,
                    self._keyset_fetched,
                    self._jwks_last_success,
                    self._issuer_ready,
                ):
                    # remove(), not remove_by_labels(): that one came to prometheus-client
                    # in 2025, after 0.20, which pyproject allows. Older releases raise
                    # KeyError for a series never set.
                    with contextlib.suppress(KeyError):
                        gauge.remove(issuer)
        # The internal_error series at 0 from the start: its alert uses increase(), which
        # cannot see the first increment of a series born with it. (The verifier's last
        # resort answers with no issuer.)
        for policy in [*self._policies, None]:
            self._verdicts.labels(*self._verdict_key("reject", "internal_error", None, policy))
        for issuer in new_issuers:
            # Present from the start, so "not ready yet" is visible before the first fetch.
            self._issuer_ready.labels(issuer=issuer)
            for result in JWKS_FETCH_RESULTS:
                self._jwks_fetches.labels(issuer=issuer, result=result)

    def _issuer_label(self, issuer: str | None) -> str:
        if issuer is None:
            return UNKNOWN
        return self._issuers.get(issuer, OTHER)

    # -- verdicts (per request) ----------------------------------------------------------

    def record_verdict(
        self,
        outcome: str,
        reason: str,
        issuer: str | None,
        policy: str | None,
        seconds: float | None,
        cache_hit: bool,
    ) -> None:
        """Count one verdict and observe how long the verification took (None: no token
        was verified, e.g. none was sent; counted, not timed)."""
        key = self._verdict_key(outcome, reason, issuer, policy)
        totals = self._verdict_totals
        totals[key] = totals.get(key, 0) + 1
        if seconds is not None:
            self._bucket_totals[cache_hit][bisect_left(self._bounds, seconds)] += 1
            self._seconds_totals[cache_hit] += seconds

    def _verdict_key(
        self, outcome: str, reason: str, issuer: str | None, policy: str | None
    ) -> tuple[str, str, str, str]:
        """The verdict counter's labels, each bounded to the configured values."""
        return (
            outcome if outcome in OUTCOMES else OTHER,
            self._reasons.get(reason, OTHER),
            UNKNOWN if issuer is None else self._issuers.get(issuer, OTHER),
            UNKNOWN if policy is None else self._policies.get(policy, OTHER),
        )

    def record_replayed(self, tags: list[Hashable]) -> None:
        """Count accepted answers the SPOP layer replayed; each tag is (issuer, policy)."""
        keys = self._replay_keys
        totals = self._verdict_totals
        for tag in tags:
            key = keys.get(tag)
            if key is None:
                issuer, policy = cast(tuple[str, str], tag)
                key = self._verdict_key("accept", "ok", issuer, policy)
                if len(keys) < _REPLAY_KEYS_MAX:
                    keys[tag] = key
            totals[key] = totals.get(key, 0) + 1
        self._replayed_total += len(tags)

    def flush(self) -> None:
        """Apply the per-request counts gathered since the last flush. Any thread."""
        with self._flush_lock:
            for key, total in list(self._verdict_totals.items()):
                delta = total - self._verdict_flushed.get(key, 0)
                if delta:
                    child = self._verdict_children.get(key)
                    if child is None:
                        child = self._verdicts.labels(*key)
                        self._verdict_children[key] = child
                    child.inc(delta)
                    self._verdict_flushed[key] = total
            for kind, total in list(self._frame_totals.items()):
                delta = total - self._frame_flushed.get(kind, 0)
                if delta:
                    self._frames.labels(type=kind).inc(delta)
                    self._frame_flushed[kind] = total
            self._inflight.set(self._inflight_now)
            replayed = self._replayed_total
            if replayed != self._replayed_flushed:
                self._replayed.inc(replayed - self._replayed_flushed)
                self._replayed_flushed = replayed
            for hit, child in ((True, self._verify_hit), (False, self._verify_miss)):
                # Read once: the event loop may add to it while this thread flushes.
                # Regression: it was read twice, and what came between was never exported.
                seconds = self._seconds_totals[hit]
                _add_observations(
                    child,
                    self._bucket_totals[hit],
                    self._bucket_flushed[hit],
                    seconds - self._seconds_flushed[hit],
                )
                self._seconds_flushed[hit] = seconds

    def cache_stats(self, entries: int, hits: int, misses: int, evictions: int) -> None:
        """Report the verified-token cache's cumulative totals and current size.

        Counters advance by the difference from the previous report, or since
        `cache_replaced`.
        """
        self._cache_entries.set(entries)
        last_hits, last_misses, last_evictions = self._last_cache_totals
        for counter, now_total, last_total in (
            (self._cache_hits, hits, last_hits),
            (self._cache_misses, misses, last_misses),
            (self._cache_evictions, evictions, last_evictions),
        ):
            delta = now_total - last_total
            if delta > 0:
                counter.inc(delta)
        self._last_cache_totals = (hits, misses, evictions)

    def cache_replaced(self) -> None:
        """A reload built a new cache, whose totals start from zero (called once the old
        one's last totals are reported)."""
        self._last_cache_totals = (0, 0, 0)

    # -- SPOP server observer ------------------------------------------------------------

    def connection_opened(self) -> None:
        self._connections_total.inc()
        self._connections_open.inc()

    def connection_closed(self, status: int | None) -> None:
        self._connections_open.dec()
        self._disconnects.labels(status=_status_label(status)).inc()

    def frame_received(self, kind: str, count: int = 1) -> None:
        label = self._frame_labels.get(kind)
        if label is None:
            label = kind.lower().replace("-", "_")
            label = label if label in FRAME_KINDS else OTHER
            if label != OTHER:
                # Only known spellings are kept, so the dict cannot grow without bound.
                self._frame_labels[kind] = label
        totals = self._frame_totals
        totals[label] = totals.get(label, 0) + count

    def protocol_error(self, status: int) -> None:
        child = self._error_children.get(status)
        if child is None:
            label = _status_label(status)
            child = self._protocol_errors.labels(status=label)
            if label != OTHER:
                self._error_children[status] = child
        child.inc()

    def handler_failed(self) -> None:
        self._handler_failures.inc()

    def inflight_changed(self, delta: int) -> None:
        self._inflight_now += delta

    # -- keys ----------------------------------------------------------------------------

    def jwks_fetch(self, issuer: str, result: str) -> None:
        label = self._issuer_label(issuer)
        self._jwks_fetches.labels(
            issuer=label, result=result if result in JWKS_FETCH_RESULTS else OTHER
        ).inc()
        if result in _JWKS_SUCCESS:
            self._jwks_last_success.labels(issuer=label).set(self._clock())

    def jwks_keys(self, issuer: str, count: int, fetched_at: float) -> None:
        """The issuer now holds `count` keys, fetched (or confirmed) at Unix time `fetched_at`."""
        self.jwks_keys_held(issuer, count)
        self._keyset_fetched.labels(issuer=self._issuer_label(issuer)).set(fetched_at)

    def jwks_keys_held(self, issuer: str, count: int) -> None:
        """The issuer's keys that may verify tokens now: 0 once they outlived max_stale.
        The key set's timestamp stays, so its age goes on growing."""
        self._jwks_keys.labels(issuer=self._issuer_label(issuer)).set(count)

    def jwks_max_stale(self, issuer: str, seconds: float) -> None:
        self._jwks_max_stale.labels(issuer=self._issuer_label(issuer)).set(seconds)

    def issuer_ready(self, issuer: str, ready: bool) -> None:
        self._issuer_ready.labels(issuer=self._issuer_label(issuer)).set(1 if ready else 0)

    # -- process -------------------------------------------------------------------------

    def config_reload(self, result: str) -> None:
        self._reloads.labels(result=result if result in RELOAD_RESULTS else OTHER).inc()


def _add_observations(
    child: Any, bucket_totals: list[int], bucket_flushed: list[int], seconds: float
) -> None:
    """Add counted observations to a histogram child in bulk.

    prometheus_client has no public bulk-observe; its `_buckets` (one value per upper
    bound, not cumulative) and `_sum` have been stable for years, and
    tests/test_metrics.py checks the exported histogram exactly, so a change there fails
    the suite rather than a scrape."""
    for index, total in enumerate(bucket_totals):
        delta = total - bucket_flushed[index]
        if delta:
            child._buckets[index].inc(delta)
            bucket_flushed[index] = total
    if seconds:
        child._sum.inc(seconds)


class _FlushOnCollect:
    """Registered first in a registry: makes every scrape see up-to-date counts."""

    def __init__(self, flush: Callable[[], None]) -> None:
        self._flush = flush

    def collect(self) -> Iterator[Metric]:
        self._flush()
        return iter(())


class _KeySetAgeCollector:
    """Exports jwtgate_jwks_age_seconds, computed at scrape time from the key-set times.

    A stored age would be stale the moment it is written; the time the key set was fetched
    is stored instead, and the age follows from the clock when Prometheus asks.
    """

    def __init__(self, source: Callable[[], Iterable[Metric]], clock: Callable[[], float]):
        self._source = source
        self._clock = clock

    def describe(self) -> list[Metric]:
        return [_age_family([], 0.0)]

    def collect(self) -> Iterator[Metric]:
        now = self._clock()
        for family in self._source():
            yield _age_family([family], now)


class _MultiProcessCollector:
    """The merged worker files, plus the age derived from the merged key-set times. With
    `issuers`, the per-issuer gauges of issuers no longer configured are left out (their
    readiness and key age would keep alerts firing for an issuer that is gone). A worker
    cannot remove a series in multiprocess mode, so they linger until it restarts; every
    gauge with an issuer label describes that issuer now, and counters keep history."""

    def __init__(
        self,
        path: str,
        clock: Callable[[], float],
        issuers: Callable[[], Collection[str]] | None = None,
    ) -> None:
        self._inner = MultiProcessCollector(None, path=path)  # type: ignore[no-untyped-call]
        self._clock = clock
        self._issuers = issuers

    def collect(self) -> Iterator[Metric]:
        families = list(self._inner.collect())  # type: ignore[no-untyped-call]
        if self._issuers is not None:
            configured = self._issuers()
            for family in families:
                if family.type == "gauge":
                    family.samples = [
                        sample
                        for sample in family.samples
                        if "issuer" not in sample.labels or sample.labels["issuer"] in configured
                    ]
        yield from families
        yield _age_family(families, self._clock())


def _age_family(families: Iterable[Metric], now: float) -> GaugeMetricFamily:
    age = GaugeMetricFamily(
        "jwtgate_jwks_age_seconds",
        "Seconds since the key set in use was fetched or confirmed (oldest over workers).",
        labels=["issuer"],
    )
    for family in families:
        if family.name != "jwtgate_jwks_keyset_timestamp_seconds":
            continue
        for sample in family.samples:
            if sample.value > 0:  # 0 means "never fetched", not "fetched in 1970"
                age.add_metric([sample.labels["issuer"]], max(0.0, now - sample.value))
    return age


# -- multiprocess helpers --------------------------------------------------------------


def prepare_multiprocess_dir(path: str | os.PathLike[str]) -> Path:
    """Create (or empty) the directory the workers write to, and point the environment at it.

    Call once in the supervisor before any worker starts; workers inherit the variable.
    Files left by a previous run are removed, or their counters would be counted again.
    """
    directory = Path(path)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink(missing_ok=True)
    os.environ[MULTIPROC_ENV] = str(directory)
    return directory


def multiprocess_registry(
    path: str | os.PathLike[str] | None = None,
    *,
    clock: Callable[[], float] = time.time,
    issuers: Callable[[], Collection[str]] | None = None,
) -> CollectorRegistry:
    """A registry that merges every worker's metrics at scrape time, for the supervisor;
    `issuers` gives the issuers configured now (see _MultiProcessCollector)."""
    directory = str(path) if path is not None else os.environ.get(MULTIPROC_ENV, "")
    if not directory or not os.path.isdir(directory):
        raise ValueError(f"{MULTIPROC_ENV} is not set or is not a directory")
    registry = CollectorRegistry()
    registry.register(_MultiProcessCollector(directory, clock, issuers))
    return registry


def mark_worker_dead(pid: int, path: str | os.PathLike[str] | None = None) -> None:
    """Drop a dead worker's live gauges (connections, readiness, ...); its counters stay."""
    mark_process_dead(pid, None if path is None else str(path))  # type: ignore[no-untyped-call]


# -- HTTP listener -----------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    # Request threads are joined by server_close(), so stop() leaves nothing running.
    daemon_threads = False
    block_on_close = True

    def __init__(
        self,
        address: tuple[str, int],
        registry: CollectorRegistry,
        readiness: ReadinessCheck | None,
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.registry = registry
        self.readiness = readiness
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def cut_open_requests(self) -> None:
        """End the requests still in progress: a client that trickles its request, a byte
        within each read timeout, would otherwise hold the process's exit for as long as
        it likes."""
        with self._open_lock:
            for request in self._open:
                with contextlib.suppress(OSError):
                    request.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The stdlib prints a traceback to stderr; log one line instead. A client that
        # hung up or stalled (a probe's own timeout) is no error of ours: a debug line,
        # or anyone who reaches the port could fill the log.
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError | TimeoutError):
            _log.debug("metrics_client_gone", error_type=type(error).__name__)
            return
        _log.error("metrics_http_error", error_type=type(error).__name__, error=str(error))


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 5.0  # a stalled scraper must not hold stop() forever
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        self._dispatch(send_body=True)

    def do_HEAD(self) -> None:
        self._dispatch(send_body=False)

    def _dispatch(self, *, send_body: bool) -> None:
        path = self.path.partition("?")[0]
        try:
            if path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                status, body = HTTPStatus.OK, encoder(self.server.registry)
            elif path == "/healthz":
                status, body, content_type = HTTPStatus.OK, b"ok\n", "text/plain; charset=utf-8"
            elif path == "/readyz":
                status, body = self._readiness()
                content_type = "application/json"
            else:
                status, body = HTTPStatus.NOT_FOUND, b"not found\n"
                content_type = "text/plain; charset=utf-8"
        except Exception as exc:
            _log.error(
                "metrics_endpoint_failed", path=path, error_type=type(exc).__name__, error=str(exc)
            )
            status, body = HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error\n"
            content_type = "text/plain; charset=utf-8"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _readiness(self) -> tuple[HTTPStatus, bytes]:
        check = self.server.readiness
        if check is None:
            ready, detail = True, "no readiness check configured"
        else:
            try:
                ready, detail = check()
            except Exception as exc:
                _log.error("readiness_check_failed", error_type=type(exc).__name__, error=str(exc))
                ready, detail = False, "readiness check failed"
        document = {"ready": bool(ready), "detail": detail}
        body = json.dumps(document, default=str, sort_keys=True).encode() + b"\n"
        return (HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE), body

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # Malformed requests: a short plain answer, never the stdlib's HTML page.
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and code >= 200 and code not in (204, 304):
            self.wfile.write(f"{code}\n".encode())

    def log_message(self, format: str, *args: Any) -> None:
        # Scrapes every few seconds would drown the log; keep them at debug.
        _log.debug("metrics_http_request", client=self.client_address[0], line=format % args)


class MetricsServer:
    """Serves /metrics, /healthz and /readyz from a thread of its own.

    A thread rather than the event loop: rendering the exposition is synchronous CPU work
    that would stall SPOP traffic on the loop, the supervisor that serves the merged
    metrics of several workers has no event loop, and a wedged loop must not take the
    health endpoint with it.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        readiness: ReadinessCheck | None = None,
    ) -> None:
        self._address = (host, port)
        self._registry = registry
        self._readiness = readiness
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("metrics server is not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("metrics server is already started")
        server = _Server(self._address, self._registry, self._readiness)
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="jwtgate-metrics",
            daemon=True,
        )
        thread.start()
        self._server, self._thread = server, thread
        _log.info("metrics_listening", host=self._address[0], port=self.port)

    def stop(self) -> None:
        """Stop serving, close the socket and join every thread; safe to call twice."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.shutdown()
        thread.join()
        server.cut_open_requests()  # no request starts after shutdown(): none is missed
        server.server_close()
        self._server = self._thread = None

    def __enter__(self) -> MetricsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
