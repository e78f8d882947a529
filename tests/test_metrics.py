"""Metrics, scraped over real HTTP from MetricsServer on 127.0.0.1 and parsed back."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import spoa.metrics as metrics_module
from spoa import __version__
from spoa.metrics import (
    MULTIPROC_ENV,
    Metrics,
    MetricsServer,
    _Handler,
    mark_worker_dead,
    multiprocess_registry,
    prepare_multiprocess_dir,
)
from tests.support.polling import wait_until

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

ISSUERS = ["corp", "partner"]
POLICIES = ["api", "admin"]
REASONS = ["ok", "expired", "bad_signature", "internal_error"]


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def fetch(port: int, path: str, accept: str = "") -> tuple[int, str, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if accept:
        request.add_header("Accept", accept)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers["Content-Type"], error.read().decode()


def scrape(port: int) -> Samples:
    status, _, body = fetch(port, "/metrics")
    assert status == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def label_values(samples: Samples, name: str, label: str) -> set[str]:
    return {dict(labels)[label] for sample_name, labels in samples if sample_name == name}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(10_000.0)


@pytest.fixture
def metrics(clock: FakeClock) -> Metrics:
    return Metrics(issuers=ISSUERS, policies=POLICIES, reasons=REASONS, clock=clock)


@pytest.fixture
def server(metrics: Metrics) -> Iterator[MetricsServer]:
    with MetricsServer(metrics.registry) as running:
        yield running


def test_verdicts_are_counted_by_outcome_reason_issuer_and_policy(
    metrics: Metrics, server: MetricsServer
) -> None:
    name = "jwtgate_verdicts_total"
    accept = {"outcome": "accept", "reason": "ok", "issuer": "corp", "policy": "api"}
    reject = {"outcome": "reject", "reason": "expired", "issuer": "corp", "policy": "api"}

    before = scrape(server.port)
    assert value(before, name, **accept) is None

    for _ in range(3):
        metrics.record_verdict("accept", "ok", "corp", "api", 2e-5, True)
    metrics.record_verdict("reject", "expired", "corp", "api", 3e-3, False)
    after = scrape(server.port)
    assert value(after, name, **accept) == 3
    assert value(after, name, **reject) == 1

    metrics.record_verdict("reject", "expired", "corp", "api", 3e-3, False)
    assert value(scrape(server.port), name, **reject) == 2


def test_replayed_answers_count_as_accepts_but_not_as_verifications(
    metrics: Metrics, server: MetricsServer
) -> None:
    metrics.record_verdict("accept", "ok", "corp", "api", 4e-6, True)
    metrics.record_replayed([("corp", "api"), ("corp", "api"), ("gone", "api")])
    metrics.record_replayed([("corp", "admin")])
    samples = scrape(server.port)
    name = "jwtgate_verdicts_total"
    accept = {"outcome": "accept", "reason": "ok", "policy": "api"}
    assert value(samples, name, issuer="corp", **accept) == 3
    assert value(samples, name, issuer="other", **accept) == 1
    assert value(samples, name, outcome="accept", reason="ok", issuer="corp", policy="admin") == 1
    assert value(samples, "jwtgate_replayed_answers_total") == 4
    assert value(samples, "jwtgate_verify_duration_seconds_count", cache="hit") == 1
    metrics.set_label_sets(issuers=["corp"], policies=["admin"], reasons=["ok"])
    metrics.record_replayed([("corp", "api")])
    samples = scrape(server.port)
    assert value(samples, name, outcome="accept", reason="ok", issuer="corp", policy="other") == 1
    assert value(samples, "jwtgate_replayed_answers_total") == 5


def test_verify_latency_histogram_separates_cache_hits_from_misses(
    metrics: Metrics, server: MetricsServer
) -> None:
    metrics.record_verdict("accept", "ok", "corp", "api", 4e-6, True)
    metrics.record_verdict("accept", "ok", "corp", "api", 7e-6, True)
    metrics.record_verdict("accept", "ok", "corp", "api", 0.004, False)
    samples = scrape(server.port)
    name = "jwtgate_verify_duration_seconds"
    assert value(samples, name + "_count", cache="hit") == 2
    assert value(samples, name + "_count", cache="miss") == 1
    assert value(samples, name + "_bucket", cache="hit", le="5e-06") == 1
    assert value(samples, name + "_bucket", cache="hit", le="1e-05") == 2
    assert value(samples, name + "_bucket", cache="miss", le="0.0025") == 0
    assert value(samples, name + "_bucket", cache="miss", le="0.005") == 1
    buckets = {float(dict(labels)["le"]) for n, labels in samples if n == name + "_bucket"}
    assert min(buckets) == 5e-6
    assert max(buckets - {float("inf")}) == 0.1


def test_unknown_label_values_become_other(metrics: Metrics, server: MetricsServer) -> None:
    for attempt in range(50):  # an attacker-controlled value must not create 50 series
        metrics.record_verdict(
            "reject", f"reason-{attempt}", f"issuer-{attempt}", f"policy-{attempt}", 1e-4, False
        )
    metrics.record_verdict("whatever", "expired", None, None, 1e-4, False)
    metrics.jwks_fetch("not-configured", "exploded")

    samples = scrape(server.port)
    name = "jwtgate_verdicts_total"
    assert value(samples, name, outcome="reject", reason="other", issuer="other", policy="other")
    assert value(
        samples, name, outcome="other", reason="expired", issuer="unknown", policy="unknown"
    )
    assert label_values(samples, name, "issuer") == {"other", "unknown"}
    assert value(samples, "jwtgate_jwks_fetches_total", issuer="other", result="other") == 1


def test_reload_replaces_the_allowed_label_sets(metrics: Metrics, server: MetricsServer) -> None:
    metrics.record_verdict("accept", "ok", "newcomer", "api", 1e-5, True)
    metrics.issuer_ready("partner", True)
    metrics.set_label_sets(issuers=["corp", "newcomer"], policies=POLICIES, reasons=REASONS)
    metrics.record_verdict("accept", "ok", "newcomer", "api", 1e-5, True)
    metrics.record_verdict("accept", "ok", "partner", "api", 1e-5, True)

    samples = scrape(server.port)
    name = "jwtgate_verdicts_total"
    assert value(samples, name, outcome="accept", reason="ok", issuer="newcomer", policy="api")
    # The "partner" verdict after the reload is bounded, the earlier "newcomer" one was too.
    assert value(samples, name, outcome="accept", reason="ok", issuer="other", policy="api") == 2
    # A removed issuer's readiness no longer shows; a new one starts unready.
    assert label_values(samples, "jwtgate_issuer_ready", "issuer") == {"corp", "newcomer"}
    assert value(samples, "jwtgate_issuer_ready", issuer="newcomer") == 0


def test_spop_observer_interface(metrics: Metrics, server: MetricsServer) -> None:
    metrics.connection_opened()
    metrics.connection_opened()
    metrics.connection_closed(0)
    for kind in ("haproxy_hello", "notify", "NOTIFY", "notify", "haproxy-disconnect", "bogus"):
        metrics.frame_received(kind)
    metrics.inflight_changed(+3)
    metrics.inflight_changed(-1)
    metrics.protocol_error(3)
    metrics.protocol_error(3)
    metrics.protocol_error(4242)

    samples = scrape(server.port)
    assert value(samples, "jwtgate_spop_connections_open") == 1
    assert value(samples, "jwtgate_spop_connections_total") == 2
    assert value(samples, "jwtgate_spop_disconnects_total", status="0") == 1
    assert value(samples, "jwtgate_spop_frames_total", type="notify") == 3
    assert value(samples, "jwtgate_spop_frames_total", type="haproxy_hello") == 1
    assert value(samples, "jwtgate_spop_frames_total", type="haproxy_disconnect") == 1
    assert value(samples, "jwtgate_spop_frames_total", type="other") == 1
    assert value(samples, "jwtgate_spop_inflight_frames") == 2
    assert value(samples, "jwtgate_spop_protocol_errors_total", status="3") == 2
    assert value(samples, "jwtgate_spop_protocol_errors_total", status="other") == 1


def test_jwks_gauges_and_key_set_age(
    metrics: Metrics, server: MetricsServer, clock: FakeClock
) -> None:
    assert value(scrape(server.port), "jwtgate_jwks_age_seconds", issuer="corp") is None

    metrics.jwks_fetch("corp", "ok")
    metrics.jwks_keys("corp", 3, fetched_at=clock.now)
    metrics.issuer_ready("corp", True)
    clock.now += 90
    metrics.jwks_fetch("corp", "error")

    samples = scrape(server.port)
    assert value(samples, "jwtgate_jwks_fetches_total", issuer="corp", result="ok") == 1
    assert value(samples, "jwtgate_jwks_fetches_total", issuer="corp", result="error") == 1
    assert value(samples, "jwtgate_jwks_keys", issuer="corp") == 3
    assert value(samples, "jwtgate_jwks_last_success_timestamp_seconds", issuer="corp") == 10_000
    assert value(samples, "jwtgate_jwks_age_seconds", issuer="corp") == 90
    assert value(samples, "jwtgate_issuer_ready", issuer="corp") == 1
    assert value(samples, "jwtgate_issuer_ready", issuer="partner") == 0

    clock.now += 10  # the age is computed at scrape time, not when it was last written
    assert value(scrape(server.port), "jwtgate_jwks_age_seconds", issuer="corp") == 100


def test_cache_stats_turn_cumulative_totals_into_counter_increments(
    metrics: Metrics, server: MetricsServer
) -> None:
    metrics.cache_stats(entries=10, hits=100, misses=20, evictions=0)
    metrics.cache_stats(entries=12, hits=150, misses=25, evictions=2)
    # A reload: the old cache's last totals, then a new cache counting from zero. Before,
    # the new cache's counts up to the old totals were lost (it looked like no change).
    metrics.cache_stats(entries=12, hits=160, misses=26, evictions=2)
    metrics.cache_replaced()
    metrics.cache_stats(entries=200, hits=170, misses=30, evictions=0)
    samples = scrape(server.port)
    assert value(samples, "jwtgate_token_cache_hits_total") == 330
    assert value(samples, "jwtgate_token_cache_misses_total") == 56
    assert value(samples, "jwtgate_token_cache_evictions_total") == 2
    assert value(samples, "jwtgate_token_cache_entries") == 200


def test_alerted_counters_exist_at_zero_from_the_start(
    metrics: Metrics, server: MetricsServer
) -> None:
    """Regression: a series born at its first increment is invisible to increase(), so
    the reload-failed and protocol-error alerts missed each process's first one."""
    samples = scrape(server.port)
    assert value(samples, "jwtgate_config_reloads_total", result="error") == 0
    assert value(samples, "jwtgate_spop_protocol_errors_total", status="4") == 0
    for policy in POLICIES:
        labels = {"outcome": "reject", "reason": "internal_error", "issuer": "unknown"}
        assert value(samples, "jwtgate_verdicts_total", **labels, policy=policy) == 0
    for result in ("ok", "timeout", "http_error", "invalid", "error"):
        issuer = sorted(ISSUERS)[0]
        assert value(samples, "jwtgate_jwks_fetches_total", issuer=issuer, result=result) == 0


def test_config_reloads_and_build_info(metrics: Metrics, server: MetricsServer) -> None:
    metrics.config_reload("ok")
    metrics.config_reload("error")
    metrics.config_reload("error")
    samples = scrape(server.port)
    assert value(samples, "jwtgate_config_reloads_total", result="ok") == 1
    assert value(samples, "jwtgate_config_reloads_total", result="error") == 2
    assert value(samples, "jwtgate_build_info", version=__version__) == 1


def test_two_metrics_objects_do_not_share_state() -> None:
    first, second = Metrics(issuers=ISSUERS), Metrics(issuers=ISSUERS)
    first.connection_opened()
    assert first.registry.get_sample_value("jwtgate_spop_connections_total") == 1
    assert second.registry.get_sample_value("jwtgate_spop_connections_total") == 0


# -- the HTTP listener -------------------------------------------------------------------


def test_healthz_readyz_and_unknown_paths() -> None:
    state: dict[str, Any] = {"ready": False, "detail": {"corp": "no keys yet"}}
    with MetricsServer(
        Metrics().registry, readiness=lambda: (state["ready"], state["detail"])
    ) as server:
        assert fetch(server.port, "/healthz")[::2] == (200, "ok\n")

        status, content_type, body = fetch(server.port, "/readyz")
        assert (status, content_type) == (503, "application/json")
        assert json.loads(body) == {"ready": False, "detail": {"corp": "no keys yet"}}

        state.update(ready=True, detail={"corp": "ok"})
        status, _, body = fetch(server.port, "/readyz")
        assert status == 200
        assert json.loads(body) == {"ready": True, "detail": {"corp": "ok"}}

        assert fetch(server.port, "/nope")[0] == 404
        assert fetch(server.port, "/metrics/extra")[0] == 404


def test_failures_answer_without_a_traceback() -> None:
    secret = "detail-that-must-stay-inside"

    def broken_readiness() -> tuple[bool, Any]:
        raise RuntimeError(secret)

    class BrokenCollector:
        def describe(self) -> list[Any]:
            return []

        def collect(self) -> list[Any]:
            raise RuntimeError(secret)

    registry = CollectorRegistry()
    registry.register(BrokenCollector())
    with MetricsServer(registry, readiness=broken_readiness) as server:
        status, _, body = fetch(server.port, "/readyz")
        assert status == 503
        assert json.loads(body)["ready"] is False
        assert secret not in body

        status, _, body = fetch(server.port, "/metrics")
        assert status == 500
        assert secret not in body
        assert "Traceback" not in body

        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            raw.sendall(b"\x00\x01garbage that is not http\r\n\r\n")
            answer = raw.recv(4096).decode(errors="replace")
        assert answer.startswith("400")  # no version was given, so HTTP/0.9 style
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            raw.sendall(b"BREW /metrics HTTP/1.1\r\n\r\n")
            answer += raw.recv(4096).decode(errors="replace")
        assert "HTTP/1.0 501" in answer
        assert "Traceback" not in answer
        assert "<html" not in answer.lower()


def test_openmetrics_is_served_when_asked_for(metrics: Metrics, server: MetricsServer) -> None:
    status, content_type, body = fetch(server.port, "/metrics", "application/openmetrics-text")
    assert status == 200
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith("# EOF\n")


def test_stop_joins_every_thread_and_closes_the_port() -> None:
    server = MetricsServer(Metrics().registry)
    server.start()
    port = server.port
    assert fetch(port, "/healthz")[0] == 200
    server.stop()
    server.stop()  # idempotent
    assert not [t for t in threading.enumerate() if t.name == "jwtgate-metrics"]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    with pytest.raises(RuntimeError):
        _ = server.port


def test_stop_does_not_wait_for_a_client_that_never_finishes_its_request() -> None:
    """Regression: stop() joined every request thread, and a request thread waited out its
    read timeout (5 s) per byte: a client trickling its request line held the agent's
    exit for as long as it kept sending."""
    server = MetricsServer(Metrics().registry)
    server.start()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:
        client.sendall(b"GET /metrics HTTP/1.1\r\n")  # and no more
        wait_until(
            lambda: any("process_request" in t.name for t in threading.enumerate()),
            5,
            "a thread to read the request",
        )
        started = time.monotonic()
        server.stop()
        # Well within one read timeout, which the old stop() waited out at least once.
        assert time.monotonic() - started < _Handler.timeout / 2
        assert client.recv(100) == b""  # the server closed it
    assert not [t for t in threading.enumerate() if t.name == "jwtgate-metrics"]


# -- several worker processes ------------------------------------------------------------


def _worker(
    ready: bool, connections: int, keys: int, fetched_at: float, success_at: float, stale: float
) -> None:
    # Runs in a forked child: prometheus_client was imported by the parent before the
    # directory was set, which is exactly the case Metrics must correct.
    metrics = Metrics(issuers=ISSUERS, policies=POLICIES, reasons=REASONS, clock=lambda: success_at)
    assert metrics.multiprocess
    for _ in range(connections):
        metrics.connection_opened()
    metrics.record_verdict("accept", "ok", "corp", "api", 2e-5, True)
    metrics.record_verdict("reject", "expired", "corp", "api", 2e-3, False)
    metrics.jwks_fetch("corp", "ok")
    metrics.jwks_keys("corp", keys, fetched_at)
    metrics.issuer_ready("corp", ready)
    metrics.jwks_max_stale("corp", stale)
    metrics.flush()  # a worker flushes every second and when it stops


def test_multiprocess_mode_merges_two_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "prom"
    directory.mkdir()
    (directory / "counter_99999.db").write_bytes(b"stale file from an earlier run")
    monkeypatch.setenv(MULTIPROC_ENV, "placeholder")  # restored after the test
    prepare_multiprocess_dir(directory)
    assert os.environ[MULTIPROC_ENV] == str(directory)
    assert not (directory / "counter_99999.db").exists()

    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(target=_worker, args=(True, 2, 3, 1_000.0, 5_000.0, 43_200.0)),
        context.Process(target=_worker, args=(False, 1, 2, 2_000.0, 6_000.0, 86_400.0)),
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=30)
    assert [worker.exitcode for worker in workers] == [0, 0]
    monkeypatch.delenv(MULTIPROC_ENV)  # the parent only reads the files

    registry = multiprocess_registry(directory, clock=FakeClock(10_000.0))
    with MetricsServer(registry) as server:
        samples = scrape(server.port)
        name = "jwtgate_verdicts_total"
        assert value(samples, name, outcome="accept", reason="ok", issuer="corp", policy="api") == 2
        assert value(samples, "jwtgate_verify_duration_seconds_count", cache="miss") == 2
        assert value(samples, "jwtgate_spop_connections_total") == 3
        assert value(samples, "jwtgate_spop_connections_open") == 3  # livesum
        assert value(samples, "jwtgate_issuer_ready", issuer="corp") == 0  # livemin
        assert value(samples, "jwtgate_jwks_keys", issuer="corp") == 2  # livemin
        assert value(samples, "jwtgate_jwks_last_success_timestamp_seconds", issuer="corp") == 6_000
        assert value(samples, "jwtgate_jwks_age_seconds", issuer="corp") == 9_000  # the oldest
        assert value(samples, "jwtgate_jwks_fetches_total", issuer="corp", result="ok") == 2
        assert value(samples, "jwtgate_jwks_max_stale_seconds", issuer="corp") == 86_400

        # Regression (observability review): after a reload that dropped an issuer, the
        # workers' gauges for it (they cannot remove series) kept /readyz at 503 and the
        # key alerts firing. The supervisor leaves out what is no longer configured.
        dropped = multiprocess_registry(
            directory, clock=FakeClock(10_000.0), issuers=lambda: {"partner"}
        )
        with MetricsServer(dropped) as after_reload:
            left = scrape(after_reload.port)
        for gauge in (
            "jwtgate_issuer_ready",
            "jwtgate_jwks_keys",
            "jwtgate_jwks_age_seconds",
            "jwtgate_jwks_max_stale_seconds",
            "jwtgate_jwks_last_success_timestamp_seconds",
        ):
            assert value(left, gauge, issuer="corp") is None, gauge
        assert value(left, "jwtgate_jwks_fetches_total", issuer="corp", result="ok") == 2

        # The unready worker exits: its live gauges go, its counters stay.
        pid = workers[1].pid
        assert pid is not None
        mark_worker_dead(pid, directory)
        samples = scrape(server.port)
        assert value(samples, "jwtgate_issuer_ready", issuer="corp") == 1
        assert value(samples, "jwtgate_spop_connections_open") == 2
        assert value(samples, "jwtgate_spop_connections_total") == 3
        # Regression: a dead worker's max_stale (from before a reload lowered it) stayed
        # the merged value, which silenced the key-age alerts.
        assert value(samples, "jwtgate_jwks_max_stale_seconds", issuer="corp") == 43_200
    for worker in workers:
        worker.close()


def test_multiprocess_registry_needs_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=MULTIPROC_ENV):
        multiprocess_registry(tmp_path / "missing")


def test_per_request_counts_are_exact_after_a_flush() -> None:
    # The per-request path keeps plain counts and flushes them in bulk, the histogram
    # through prometheus_client internals: this pins the exported result exactly.
    metrics = Metrics(issuers=ISSUERS, policies=POLICIES, reasons=REASONS)
    for seconds in (4e-6, 5e-6, 3e-5, 3e-5, 2.0):
        metrics.record_verdict("accept", "ok", "corp", "api", seconds, True)
    metrics.frame_received("notify")
    metrics.frame_received("NOTIFY")
    metrics.inflight_changed(+2)
    metrics.inflight_changed(-1)
    metrics.flush()
    metrics.flush()  # idempotent: nothing is counted twice
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in metrics.registry.collect()
        for s in family.samples
    }
    hit = (("cache", "hit"),)

    def bucket(le: str) -> float:
        return samples[("jwtgate_verify_duration_seconds_bucket", (("cache", "hit"), ("le", le)))]

    assert bucket("5e-06") == 2
    assert bucket("2.5e-05") == 2
    assert bucket("5e-05") == 4
    assert bucket("0.1") == 4
    assert bucket("+Inf") == 5
    assert samples[("jwtgate_verify_duration_seconds_count", hit)] == 5
    assert samples[("jwtgate_verify_duration_seconds_sum", hit)] == pytest.approx(2.000069)
    assert samples[("jwtgate_spop_frames_total", (("type", "notify"),))] == 2
    assert samples[("jwtgate_spop_inflight_frames", ())] == 1
    verdicts = (
        "jwtgate_verdicts_total",
        (("issuer", "corp"), ("outcome", "accept"), ("policy", "api"), ("reason", "ok")),
    )
    assert samples[verdicts] == 5


def test_a_verdict_without_a_verification_is_counted_not_timed() -> None:
    metrics = Metrics(issuers=ISSUERS, policies=POLICIES, reasons=REASONS)
    metrics.record_verdict("reject", "missing_token", None, "api", None, False)
    metrics.flush()
    sample = metrics.registry.get_sample_value
    # missing_token is no reason this instance knows: "other".
    labels = {"outcome": "reject", "reason": "other", "issuer": "unknown", "policy": "api"}
    assert sample("jwtgate_verdicts_total", labels) == 1
    assert sample("jwtgate_verify_duration_seconds_count", {"cache": "miss"}) == 0


def test_a_verdict_recorded_during_a_flush_is_not_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression (observability review): flush read the histogram's running sum twice,
    and what the event loop added between the reads (the scrape thread flushes) was never
    exported."""
    metrics = Metrics(issuers=ISSUERS, policies=POLICIES, reasons=REASONS)
    metrics.record_verdict("accept", "ok", "corp", "api", 1.0, False)
    bulk_add = metrics_module._add_observations
    raced: list[bool] = []

    def add_while_a_request_lands(child: Any, *args: Any) -> None:
        bulk_add(child, *args)
        if child is metrics._verify_miss and not raced:
            raced.append(True)
            metrics.record_verdict("accept", "ok", "corp", "api", 2.0, False)

    monkeypatch.setattr(metrics_module, "_add_observations", add_while_a_request_lands)
    metrics.flush()
    monkeypatch.undo()
    metrics.flush()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in metrics.registry.collect()
        for s in family.samples
    }
    miss = (("cache", "miss"),)
    assert samples[("jwtgate_verify_duration_seconds_count", miss)] == 2
    assert samples[("jwtgate_verify_duration_seconds_sum", miss)] == pytest.approx(3.0)


class _RecordingLog:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def debug(self, event: str, **fields: Any) -> None:
        self.events.append(("debug", event, fields))

    def error(self, event: str, **fields: Any) -> None:
        self.events.append(("error", event, fields))


def test_a_client_that_hangs_up_is_a_debug_line_not_an_error(
    server: MetricsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (audit): each client that reset its connection mid-request logged
    metrics_http_error with a traceback, so anyone who reached the port could flood the
    log with them."""
    import spoa.metrics as metrics_module

    recorded = _RecordingLog()
    monkeypatch.setattr(metrics_module, "_log", recorded)
    for _ in range(3):
        raw = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        raw.sendall(b"GET /metrics HTTP/1.0\r\n")  # headers never finished
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raw.close()  # a reset, not a FIN
    deadline = time.monotonic() + 5
    while len(recorded.events) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [(level, event) for level, event, _ in recorded.events] == [
        ("debug", "metrics_client_gone")
    ] * 3
    assert fetch(server.port, "/healthz")[0] == 200
