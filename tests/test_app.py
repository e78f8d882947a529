"""Configuration to runtime: the mapping the agent applies at start and on reload."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from spoa.app import (
    Engine,
    StartupError,
    Supervisor,
    VerdictRecorder,
    Worker,
    _check_restart_only,
    build_engine,
    carried_keys,
    config_digest,
    configure_replay,
    issuer_rules,
    jwks_timing,
    key_event_logger,
    key_source,
    policy_runtimes,
)
from spoa.config import ConfigError, parse_config
from spoa.keymanager import (
    JwksUrlSource,
    KeyManager,
    KeysFetched,
    KeysUnavailable,
    OidcDiscoverySource,
    StaticKeySource,
)
from spoa.metrics import Metrics
from spoa.protocol import AnswerMemo
from spoa.verifier import MemoryKeyStore, Reason, Verdict
from tests.support.polling import wait_until
from tests.test_config import MINIMAL


@contextlib.contextmanager
def supervisor_of(config_path: Path | None = None) -> Iterator[Supervisor]:
    """A Supervisor that starts no worker; its private directory and table go after."""
    if config_path is None:
        supervisor = Supervisor(parse_config(MINIMAL), None, socket.socket())
    else:
        text = config_path.read_text()
        supervisor = Supervisor(parse_config(text), str(config_path), socket.socket(), text)
    try:
        if supervisor.config_text is not None:
            supervisor._write_snapshot(supervisor.config_text)  # as _spawn does first
        yield supervisor
    finally:
        shutil.rmtree(supervisor.metrics_dir, ignore_errors=True)
        supervisor.sock.close()
        supervisor.connections.close()


@contextlib.contextmanager
def stand_ins(argvs: list[list[str]]) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes that stand in for workers (the supervisor signals real pids)."""
    started = [subprocess.Popen(argv) for argv in argvs]
    try:
        yield started
    finally:
        for process in started:
            process.kill()
            process.wait(5)


def test_issuer_settings_become_rules_and_timing() -> None:
    text = MINIMAL.replace(
        'algorithms = ["RS256"]',
        'algorithms = ["RS256", "ES256"]\ntyp = ["at+jwt"]\nleeway = "10s"\nmax_lifetime = "1h"\n'
        'refresh_min = "2m"\nrefresh_max = "1h"\ndefault_refresh = "10s"\nmax_stale = "6h"',
    )
    issuer = parse_config(text).issuer("corp")
    rules = issuer_rules(issuer)
    assert rules.algorithms == frozenset({"RS256", "ES256"})
    assert rules.allowed_types == frozenset({"at+jwt"})
    assert rules.leeway == 10.0
    assert rules.max_lifetime == 3600.0
    timing = jwks_timing(issuer)
    assert (timing.refresh_min, timing.refresh_max, timing.max_stale) == (120.0, 3600.0, 21600.0)
    assert timing.default_max_age == 120.0  # clamped into [refresh_min, refresh_max]
    # Regression: after an outage keys came back only after up to 300s of backoff, and a
    # kid missing from a fetch (IdP or CDN lag) was not asked for again for 300s.
    assert timing.backoff_max == 120.0
    assert timing.negative_ttl == timing.refetch_interval == 30.0
    assert isinstance(key_source(issuer), JwksUrlSource)


def test_key_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    discovery = parse_config(
        MINIMAL.replace('jwks_uri = "https://id.example.com/jwks.json"', "discovery = true")
    )
    source = key_source(discovery.issuer("corp"))
    assert isinstance(source, OidcDiscoverySource)
    assert source.url == "https://id.example.com/.well-known/openid-configuration"
    (tmp_path / "pub.pem").write_text("placeholder")
    monkeypatch.setenv("JWTGATE_TEST_HS", "s" * 32)
    text = MINIMAL.replace(
        'jwks_uri = "https://id.example.com/jwks.json"',
        'keys = [{ file = "pub.pem", kid = "k1", alg = "RS256" },'
        ' { secret_env = "JWTGATE_TEST_HS", kid = "h1", alg = "HS256" }]',
    ).replace('algorithms = ["RS256"]', 'algorithms = ["RS256", "HS256"]')
    static = key_source(parse_config(text, base_dir=tmp_path).issuer("corp"))
    assert isinstance(static, StaticKeySource)
    assert [f.kid for f in static.files] == ["k1"]
    assert static.secrets[0].secret == b"s" * 32
    assert static.secrets[0].alg == "HS256"
    # Regression (config review): a value that is not UTF-8 raised UnicodeEncodeError,
    # whose text showed one byte of the secret. Its raw bytes are the secret.
    monkeypatch.setitem(os.environb, b"JWTGATE_TEST_HS", b"s" * 32 + b"\xff")
    static = key_source(parse_config(text, base_dir=tmp_path).issuer("corp"))
    assert isinstance(static, StaticKeySource)
    assert static.secrets[0].secret == b"s" * 32 + b"\xff"


def test_policies_become_verifier_policies() -> None:
    text = MINIMAL + (
        'require_scopes = ["read"]\nreport_only = true\nrealm = "corp"\n'
        'claims = [ { claim = "tenant", one_of = ["a", "b"] } ]\n'
        'forward_claims = { email = "email" }\n'
    )
    runtime = policy_runtimes(parse_config(text))["default"]
    assert runtime.policy.require_scopes == frozenset({"read"})
    assert runtime.policy.audiences is None  # the issuers' audiences apply
    assert runtime.policy.claim_matchers[0].one_of == ("a", "b")
    assert runtime.report_only is True
    assert runtime.realm == "corp"
    assert runtime.forward_claims == (("email", "email"),)


@pytest.mark.parametrize(
    ("section", "change", "key"),
    [
        ("[agent]\n", 'listen = "127.0.0.1:1"\n', "agent.listen"),
        ("[agent]\n", "workers = 2\n", "agent.workers"),
        ("[agent]\n", "max_inflight = 5\n", "agent.max_inflight"),
        ("[agent]\n", 'frame_timeout = "1s"\n', "agent.frame_timeout"),
        ("[metrics]\n", 'listen = ""\n', "metrics.listen"),
        ("[log]\n", 'level = "debug"\n', "log.level"),
    ],
)
def test_restart_only_changes_are_refused_by_a_reload(section: str, change: str, key: str) -> None:
    old = parse_config(MINIMAL)
    new = parse_config(section + change + MINIMAL)
    with pytest.raises(ConfigError) as caught:
        _check_restart_only(old, new)
    assert caught.value.problems == [f"{key}: changing it needs a restart, not a reload"]


def test_reloadable_changes_pass() -> None:
    old = parse_config(MINIMAL)
    new = parse_config(
        "[log]\nrejections_per_second = 5.0\n[cache]\nmax_entries = 7\n"
        '[agent]\nunknown_kid_wait = "100ms"\n' + MINIMAL + 'require_scopes = ["x"]\n'
    )
    _check_restart_only(old, new)


def test_replay_follows_replay_entries_and_the_access_log() -> None:
    memo = AnswerMemo("check-jwt", ("authorization",), clock=lambda: 0.0)
    store = MemoryKeyStore()
    configure_replay(memo, parse_config(MINIMAL), store)
    assert (memo.enabled, memo.max_entries) == (True, 4096)
    configure_replay(memo, parse_config("[cache]\nreplay_entries = 10\n" + MINIMAL), store)
    assert (memo.enabled, memo.max_entries) == (True, 10)
    configure_replay(memo, parse_config("[cache]\nreplay_entries = 0\n" + MINIMAL), store)
    assert not memo.enabled
    configure_replay(memo, parse_config("[log]\naccess_log = true\n" + MINIMAL), store)
    assert not memo.enabled
    for size in (3, 2):  # a smaller memo drops its oldest answers on the next one
        memo = AnswerMemo("check-jwt", ("authorization",), clock=lambda: 0.0, max_entries=size)
        for key in (b"a", b"b", b"c"):
            assert memo.remember(
                key, b"", valid_from=0, valid_until=1, countdown_to=None, tag="t", epoch=0
            )
        assert len(memo.table) == size


class CapturedRejections:
    """Stands in for the rate limiter at the point where the log fields are final."""

    def __init__(self) -> None:
        self.fields: list[dict[str, Any]] = []

    def emit(self, log_method: Callable[..., Any], event: str, **fields: Any) -> bool:
        self.fields.append(fields)
        return True


def test_unverified_kid_and_alg_are_clipped_in_rejection_logs() -> None:
    """An attacker picks a rejected token's header: 8 KiB of `kid` must not become a log line."""
    recorder = VerdictRecorder(Metrics(reasons=[r.value for r in Reason]), parse_config(MINIMAL))
    captured = CapturedRejections()
    recorder.limiter = captured  # type: ignore[assignment]
    forged = Verdict.rejected(Reason.UNKNOWN_KID, kid="k" * 8000, alg="A" * 300)
    recorder.on_verdict(forged, "default", 0.001, "a.b.c", report_only=False)
    short = Verdict.rejected(Reason.UNKNOWN_KID, kid="2024-rotation-b", alg="RS256")
    recorder.on_verdict(short, "default", 0.001, "a.b.c", report_only=False)
    # A policy name haproxy.cfg took from a request header: unknown, and as long as it is.
    recorder.on_verdict(
        Verdict.rejected(Reason.UNKNOWN_POLICY), "p" * 5000, 0.001, None, report_only=False
    )
    (first, second, third) = captured.fields
    assert first["reason"] == "unknown_kid"
    assert (first["kid"], first["alg"]) == ("k" * 128 + "…", "A" * 128 + "…")
    assert (second["kid"], second["alg"]) == ("2024-rotation-b", "RS256")
    assert third["policy"] == "p" * 128 + "…"
    # Regression (DoS review): 128 emoji took 12 bytes each in a JSON line, 3.3 KB a line.
    emoji = Verdict.rejected(Reason.UNKNOWN_KID, kid="\U0001f600" * 128, alg="é" * 40)
    recorder.on_verdict(emoji, "default", 0.001, "a.b.c", report_only=False)
    assert (captured.fields[3]["kid"], captured.fields[3]["alg"]) == (
        "\U0001f600" * 32 + "…",
        "é" * 32 + "…",
    )


def test_a_verifier_failure_is_logged_by_type_only() -> None:
    """The verifier's fail-closed errors reach the log, without their text."""
    from structlog.testing import capture_logs

    from spoa.app import log_verifier_error

    with capture_logs() as logs:
        log_verifier_error(RuntimeError("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"))
    assert logs == [
        {"event": "verifier_internal_error", "error_type": "RuntimeError", "log_level": "error"}
    ]


def test_a_key_directory_the_agent_cannot_use_refuses_the_start(tmp_path: Path) -> None:
    """Regression: an unusable cache.keys_dir passed, then every refresh logged
    `jwks_not_saved` with an exception type and no path. It is now made and tried when
    the engine is built (start and reload), and a failure names the key."""
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    config = parse_config(f'[cache]\nkeys_dir = "{blocked / "keys"}"\n' + MINIMAL)
    with pytest.raises(StartupError, match=r"^cache\.keys_dir: cannot use .*: Not a directory"):
        asyncio.run(build_engine(config, lambda event: None))


def test_the_rejection_limiter_takes_every_rate_the_configuration_takes() -> None:
    """Regression: `rejections_per_second = 0` passed check-config, then the limiter
    refused it: `run` failed with an internal error, and a reload raised after it had
    swapped in the new keys but not the policies, logging nothing. The configuration
    now refuses 0, and a reload builds the limiter before it swaps anything in."""
    smallest = parse_config("[log]\nrejections_per_second = 1e-9\n" + MINIMAL)
    assert VerdictRecorder.limiter_for(smallest).allow()  # the burst is there at once
    with pytest.raises(ConfigError, match=r"log\.rejections_per_second"):
        parse_config("[log]\nrejections_per_second = 0\n" + MINIMAL)


def test_the_supervisor_kills_silent_or_never_serving_workers() -> None:
    """A serving worker silent for STALL_AFTER, or one that has not served within
    ready_timeout plus that margin (regression: one stopped before it served stayed
    forever, and the agent's /readyz with it), is killed; others are left alone."""
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    with supervisor_of() as supervisor, stand_ins([sleep] * 4) as sleepers:
        now = time.monotonic()
        long_ago = now - supervisor.config.agent.ready_timeout - Supervisor.STALL_AFTER - 1
        silent, starting_too_long, fresh, starting = (p.pid for p in sleepers)
        for pid in (silent, starting_too_long, fresh, starting):
            supervisor.children[pid] = 0
        supervisor.started_at.update({silent: long_ago, fresh: long_ago})
        supervisor.started_at.update({starting_too_long: long_ago, starting: now})
        supervisor.serving.update({silent, fresh})
        supervisor.last_beat.update({silent: now - Supervisor.STALL_AFTER - 1, fresh: now})
        supervisor._kill_hung()
        assert sleepers[0].wait(5) == -signal.SIGKILL
        assert sleepers[1].wait(5) == -signal.SIGKILL
        assert sleepers[2].poll() is None
        assert sleepers[3].poll() is None


def test_a_reload_carries_keys_with_their_monotonic_age() -> None:
    """Keys carried by a reload are dated by the key manager's monotonic clock: a wall
    clock stepped back (which makes the store's stamp look recent) must not make stale
    keys young again through a reload."""
    import json

    from spoa.devkit.keys import generate_signing_key, jwks_document
    from spoa.verifier import load_jwks

    config = parse_config(MINIMAL)
    source = key_source(config.issuer("corp"))
    store = MemoryKeyStore()
    key_set, _ = load_jwks(json.dumps(jwks_document([generate_signing_key("RS256")])).encode())
    store.replace("corp", key_set, time.time() - 10.0)  # the wall clock says 10 s old
    ticks = [1000.0]
    keys = KeyManager({"corp": source}, {}, store, monotonic=lambda: ticks[0])
    keys._issuers["corp"].schedule.last_success = 500.0  # the schedule says 500 s old
    previous = Engine(config, None, keys, None, store)  # type: ignore[arg-type]
    (carried,) = carried_keys(previous, {"corp": source}).values()
    assert carried.key_set is key_set
    assert abs((time.time() - carried.refreshed_at) - 500.0) < 5.0


def test_a_reload_that_changes_algorithms_keeps_the_keys_that_still_fit() -> None:
    """Regression (diff review): the issuer's algorithms became part of its key source,
    so a reload that only added PS256 (or reordered the list) carried no keys: during an
    IdP outage it failed. Keys are carried when one of them fits the new list."""
    import json

    from spoa.devkit.keys import generate_signing_key, jwks_document
    from spoa.verifier import load_jwks

    config = parse_config(MINIMAL)
    store = MemoryKeyStore()
    key_set, _ = load_jwks(json.dumps(jwks_document([generate_signing_key("RS256")])).encode())
    store.replace("corp", key_set, time.time())
    keys = KeyManager({"corp": key_source(config.issuer("corp"))}, {}, store)
    previous = Engine(config, None, keys, None, store)  # type: ignore[arg-type]

    def carried_for(algorithms: str) -> bool:
        changed = parse_config(MINIMAL.replace('["RS256"]', algorithms))
        source = key_source(changed.issuer("corp"))
        return "corp" in carried_keys(previous, {"corp": source})

    assert carried_for('["RS256"]')
    assert carried_for('["PS256", "RS256"]')
    assert not carried_for('["ES256"]')  # the RS256 key fits none: fetch anew
    moved = MINIMAL.replace("id.example.com/jwks.json", "id.example.com/other.json")
    assert "corp" not in carried_keys(
        previous, {"corp": key_source(parse_config(moved).issuer("corp"))}
    )


_HUP_COUNTER = """
import pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
signal.signal(signal.SIGHUP, lambda *_: out.write_text(out.read_text() + "H"))
signal.signal(signal.SIGUSR1, lambda *_: out.write_text(out.read_text() + "U"))
out.write_text("")
time.sleep(60)
"""


def hups_so_far(pid: int, path: Path) -> str:
    """The SIGHUPs a stand-in counted, once every signal sent to it before now is handled.
    A SIGUSR1 marks the point: Python runs pending handlers lowest signal first, so a
    SIGHUP sent before it is written before its U (no sleep-and-hope)."""
    marks = path.read_text().count("U")
    os.kill(pid, signal.SIGUSR1)
    wait_until(lambda: path.read_text().count("U") > marks, 10, "the stand-in's mark")
    return path.read_text().replace("U", "")


@contextlib.contextmanager
def reload_of_two_workers(
    tmp_path: Path, edited: str
) -> Iterator[tuple[Supervisor, list[int], list[Path]]]:
    """A supervisor on a MINIMAL file, with two stand-in workers serving it (each writes
    an H to its file per SIGHUP), right after a reload to `edited`. Yields the
    supervisor, the pids and their files."""
    config_file = tmp_path / "jwtgate.toml"
    config_file.write_text(MINIMAL)
    huped = [tmp_path / f"hup-{n}" for n in range(2)]
    counters = [[sys.executable, "-c", _HUP_COUNTER, str(path)] for path in huped]
    with supervisor_of(config_file) as supervisor, stand_ins(counters) as workers:
        wait_until(lambda: all(p.exists() for p in huped), 10, "the workers' start")
        for worker in workers:
            supervisor.children[worker.pid] = 0
            supervisor.serving.add(worker.pid)
            supervisor._reported(worker.pid, config_digest(MINIMAL), config_digest(MINIMAL))
        config_file.write_text(edited)
        supervisor._reload()
        # Handled before a test sends more: signals do not queue, two would merge.
        wait_until(lambda: [p.read_text() for p in huped] == ["H", "H"], 10, "both SIGHUPs")
        yield supervisor, [w.pid for w in workers], huped


def test_workers_that_disagree_on_a_reload_all_go_back_to_the_previous_configuration(
    tmp_path: Path,
) -> None:
    """One worker applied a reload, the other refused it: the supervisor puts its copy of
    the configuration back and tells the worker that applied it to reload, so no two run
    different ones. If that fails too, /readyz says so."""
    edited = MINIMAL.replace('audiences = ["api"]', 'audiences = ["api", "other"]')
    old, new = config_digest(MINIMAL), config_digest(edited)
    with reload_of_two_workers(tmp_path, edited) as (supervisor, pids, huped):
        applied, refused = pids
        assert supervisor.snapshot.read_text() == edited
        supervisor._reported(applied, new, new)
        supervisor._settle_round()
        assert supervisor.round is not None
        assert not supervisor.round.reverting  # one answer to go
        supervisor._reported(refused, old, new)
        supervisor._settle_round()

        assert supervisor.snapshot.read_text() == MINIMAL
        assert supervisor.config.issuers[0].audiences == ("api",)
        assert supervisor.round is not None
        assert supervisor.round.reverting
        # Only the worker that took the new copy reloads again.
        wait_until(lambda: [p.read_text() for p in huped] == ["HH", "H"], 10, "one SIGHUP")
        supervisor._reported(applied, new, old)  # it read the old copy, and kept the new
        supervisor._settle_round()
        assert supervisor.round is None
        assert supervisor.diverged
        assert "different" in str(supervisor.ready()[1])


def test_a_reload_every_worker_refuses_changes_nothing(tmp_path: Path) -> None:
    old, new = config_digest(MINIMAL), config_digest(MINIMAL.replace("api", "other"))
    with reload_of_two_workers(tmp_path, MINIMAL.replace("api", "other")) as (
        supervisor,
        pids,
        huped,
    ):
        for pid in pids:
            supervisor._reported(pid, old, new)
        supervisor._settle_round()
        assert supervisor.round is None
        assert supervisor.snapshot.read_text() == MINIMAL
        assert not supervisor.diverged
        # Regression (test review): a 0.2 s sleep stood for "no second SIGHUP was sent".
        assert [hups_so_far(pid, p) for pid, p in zip(pids, huped, strict=True)] == ["H", "H"]


def test_a_silent_worker_is_told_to_go_back_and_its_late_answer_does_not_count(
    tmp_path: Path,
) -> None:
    """Regression (review): the answer of a worker that applied a reload after the round
    had given up on it was dropped, or counted for the wrong round, and it could stay on
    the new configuration unnoticed. A silent worker is now told to go back, and only a
    report on the current copy answers for it."""
    edited = MINIMAL.replace("api", "other")
    old, new = config_digest(MINIMAL), config_digest(edited)
    with reload_of_two_workers(tmp_path, edited) as (supervisor, pids, huped):
        prompt, late = pids
        supervisor._reported(prompt, old, new)  # refused
        assert supervisor.round is not None
        supervisor.round.deadline = 0.0  # `late` stays silent past it
        supervisor._settle_round()
        assert supervisor.snapshot.read_text() == MINIMAL
        assert supervisor.round is not None
        assert supervisor.round.reverting
        wait_until(lambda: huped[1].read_text() == "HH", 10, "the silent worker's SIGHUP")
        assert hups_so_far(prompt, huped[0]) == "H"
        supervisor._reported(late, new, new)  # its answer to the first SIGHUP, at last
        supervisor._settle_round()
        assert supervisor.round is not None  # not an answer to this copy
        supervisor._reported(late, old, old)
        supervisor._settle_round()
        assert supervisor.round is None
        assert not supervisor.diverged
        assert supervisor._off_copy() == []


def test_reports_on_an_older_copy_do_not_answer_a_reload(tmp_path: Path) -> None:
    """Regression (review): a SIGHUP sent to the whole process group (systemctl kill)
    made each worker reload the old copy at once; those answers were taken for the new
    copy's, and a valid reload was undone."""
    edited = MINIMAL.replace("api", "other")
    old, new = config_digest(MINIMAL), config_digest(edited)
    with reload_of_two_workers(tmp_path, edited) as (supervisor, pids, _huped):
        for pid in pids:
            supervisor._reported(pid, old, old)  # the group SIGHUP's own reloads
        supervisor._settle_round()
        assert supervisor.round is not None
        for pid in pids:  # one report for two SIGHUPs is enough, too
            supervisor._reported(pid, new, new)
        supervisor._settle_round()
        assert supervisor.round is None
        assert supervisor.snapshot.read_text() == edited
        assert not supervisor.diverged


def test_a_worker_found_off_the_copy_is_told_once_then_reported(tmp_path: Path) -> None:
    """Outside a reload, a worker on another configuration (one started from a copy put
    back since) gets a SIGHUP; if it reads the copy and still runs another one, /readyz
    says so."""
    edited = MINIMAL.replace("api", "other")
    old, new = config_digest(MINIMAL), config_digest(edited)
    with reload_of_two_workers(tmp_path, edited) as (supervisor, pids, huped):
        for pid in pids:
            supervisor._reported(pid, new, new)
        supervisor._settle_round()
        assert supervisor.round is None
        odd = pids[0]
        supervisor._reported(odd, old, "")  # a start from an older copy, say
        supervisor._settle_round()
        wait_until(lambda: huped[0].read_text() == "HH", 10, "its SIGHUP")
        assert not supervisor.diverged
        supervisor._settle_round()  # told already: not again before its answer
        assert hups_so_far(odd, huped[0]) == "HH"
        supervisor._reported(odd, old, new)  # read the copy, kept the other
        supervisor._settle_round()
        assert supervisor.diverged
        supervisor._reported(odd, new, new)
        assert not supervisor.diverged


def test_keys_that_outlive_max_stale_count_as_none_held() -> None:
    """Regression (audit): jwtgate_jwks_keys stayed at the last fetch's count after the
    keys expired (issuer not ready, every token refused), so dashboards showed keys that
    could not be used."""
    metrics = Metrics(issuers=["corp"], reasons=[r.value for r in Reason])
    on_event = key_event_logger(metrics)
    on_event(KeysFetched("corp", key_count=2, lifetime=300.0))
    assert metrics.registry.get_sample_value("jwtgate_jwks_keys", {"issuer": "corp"}) == 2
    fetched = metrics.registry.get_sample_value(
        "jwtgate_jwks_keyset_timestamp_seconds", {"issuer": "corp"}
    )
    on_event(KeysUnavailable("corp", last_success=fetched))
    assert metrics.registry.get_sample_value("jwtgate_jwks_keys", {"issuer": "corp"}) == 0
    assert metrics.registry.get_sample_value("jwtgate_issuer_ready", {"issuer": "corp"}) == 0
    assert (
        metrics.registry.get_sample_value(
            "jwtgate_jwks_keyset_timestamp_seconds", {"issuer": "corp"}
        )
        == fetched
    )


def test_the_keys_gauge_follows_what_the_store_can_use() -> None:
    """Regression (review): after the keys expired (gauge 0), a reload that raised
    max_stale made them usable again, announced by no fetch, and the gauge stayed 0.
    Each readiness tick now publishes the count the store can use."""
    import json

    from spoa.devkit.keys import generate_signing_key, jwks_document
    from spoa.verifier import load_jwks

    config = parse_config(MINIMAL)
    metrics = Metrics(issuers=["corp"], reasons=[r.value for r in Reason])
    store = MemoryKeyStore()
    keys = [generate_signing_key("RS256") for _ in range(2)]
    key_set, _ = load_jwks(json.dumps(jwks_document(keys)).encode())
    worker = Worker(config, None, metrics)
    worker.engine = Engine(config, None, None, None, store)  # type: ignore[arg-type]

    def held() -> float | None:
        return metrics.registry.get_sample_value("jwtgate_jwks_keys", {"issuer": "corp"})

    store.replace("corp", key_set, time.time() - 100.0, max_stale=10.0)  # too old
    worker._publish_readiness()
    assert held() == 0
    store.replace("corp", key_set, time.time() - 100.0, max_stale=1000.0)  # usable again
    worker._publish_readiness()
    assert held() == 2


def test_a_worker_that_stops_reports_its_last_cache_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (observability review): a normal stop flushed the per-request counts
    but not the token cache's, so the misses and hits since the last 5 s tick were lost
    (docs/operations.md: a worker that stops normally writes its last counts)."""
    from spoa.app import bind_listener
    from spoa.devkit.keys import SigningKey
    from spoa.devkit.stack import free_port
    from spoa.devkit.tokens import mint_token
    from spoa.verifier import Policy, RequestContext

    secret = "s" * 32
    monkeypatch.setenv("JWTGATE_TEST_SECRET", secret)
    config = parse_config(
        f'[agent]\nlisten = "127.0.0.1:{free_port()}"\n[metrics]\nlisten = ""\n'
        '[[issuers]]\nname = "corp"\nissuer = "https://id.example.com/"\n'
        'audiences = ["api"]\nalgorithms = ["HS256"]\n'
        'keys = [{ secret_env = "JWTGATE_TEST_SECRET", kid = "h1", alg = "HS256" }]\n'
        '[policies.default]\nissuers = ["corp"]\n'
    )
    metrics = Metrics(issuers=["corp"], reasons=[r.value for r in Reason])
    worker = Worker(config, None, metrics)
    key = SigningKey("h1", "HS256", secret.encode())
    token = mint_token(key, {"iss": "https://id.example.com/", "aud": "api", "sub": "u"})

    async def scenario() -> None:
        serving = asyncio.Event()
        sock = bind_listener(config)
        running = asyncio.create_task(worker.run(sock, on_serving=serving.set))
        await asyncio.wait_for(serving.wait(), 10)
        assert worker.engine is not None
        verifier = worker.engine.verifier
        context = RequestContext("GET", "/", "h")
        for _ in range(2):  # a miss, then a hit
            assert verifier.verify(token, Policy("default", ("corp",)), context, time.time()).ok
        worker._stop.set()
        await asyncio.wait_for(running, 10)
        sock.close()

    thresholds = gc.get_threshold()
    try:
        asyncio.run(scenario())
    finally:  # a worker tunes the collector for its process: give this one its own back
        gc.unfreeze()
        gc.set_threshold(*thresholds)
    sample = metrics.registry.get_sample_value
    assert sample("jwtgate_token_cache_misses_total") == 1
    assert sample("jwtgate_token_cache_hits_total") == 1


def test_a_reload_keeps_the_count_of_rejections_not_yet_logged() -> None:
    """Regression (observability review): the reload's new rejection limiter started
    from zero, and the next logged rejection no longer said how many were dropped."""
    from spoa.logs import RejectionLogLimiter

    config = parse_config(MINIMAL)
    recorder = VerdictRecorder(Metrics(reasons=[r.value for r in Reason]), config)
    frozen = lambda: 0.0  # noqa: E731 - no refill: every event after the burst is dropped
    first = RejectionLogLimiter(1.0, 1, frozen)
    recorder.configure(config, first)
    logged: list[dict[str, Any]] = []
    for _ in range(4):
        first.emit(lambda _event, **fields: logged.append(fields), "rejected")
    assert len(logged) == 1
    second = RejectionLogLimiter(1.0, 1, frozen)
    recorder.configure(config, second)  # a reload
    second.emit(lambda _event, **fields: logged.append(fields), "rejected")
    assert logged[1] == {"suppressed": 3}
    assert recorder.unreported_suppressed() == 0
    second.emit(lambda _event, **fields: logged.append(fields), "rejected")
    assert recorder.unreported_suppressed() == 1  # what a stop reports
