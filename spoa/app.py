"""Wiring: configuration to a running agent.

One worker is one process with one event loop: the SPOP server, the `check-jwt`
handler, the key manager's background refresh, and reload on SIGHUP. With
`workers > 1` a supervisor binds the listener, forks the workers (which share it),
serves the merged metrics, forwards SIGHUP after validating the new file, and
restarts a worker that dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import hashlib
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from spoa.balance import ConnectionTable, WorkerShare
from spoa.config import (
    Config,
    ConfigError,
    IssuerSettings,
    config_warnings,
    describe,
    read_config,
)
from spoa.glue import (
    FALLBACK_ACTIONS,
    MESSAGE_NAME,
    CheckJwtHandler,
    PolicyRuntime,
    Runtime,
    new_answer_memo,
)
from spoa.keymanager import (
    ArchiveFailed,
    FetchFailed,
    HmacSecret,
    JwksUrlSource,
    KeyArchive,
    KeyEvent,
    KeyFile,
    KeyManager,
    KeysChanged,
    KeysFetched,
    KeySource,
    KeysRestored,
    KeysUnavailable,
    OidcDiscoverySource,
    StaleServingEnded,
    StaleServingStarted,
    StaticKeySource,
    fits_any,
    load_static_keys,
)
from spoa.logs import RejectionLogLimiter, configure_logging, mask_secrets, token_fingerprint
from spoa.metrics import (
    MULTIPROC_ENV,
    Metrics,
    MetricsServer,
    mark_worker_dead,
    multiprocess_registry,
    prepare_multiprocess_dir,
)
from spoa.protocol import SPEEDUPS, AnswerMemo
from spoa.server import AcceptBalancer, ServerLimits, SpoaServer, install_uvloop
from spoa.verifier import (
    ClaimMatcher,
    IssuerKeys,
    IssuerRules,
    JwksTiming,
    KeyLoadError,
    MemoryKeyStore,
    Policy,
    PolicyError,
    Reason,
    Verdict,
    Verifier,
    hmac_key,
)
from spoa.verifier.parsing import SPEEDUPS as BASE64URL_SPEEDUPS

log = structlog.get_logger("jwtgate")

REFRESH_TICK = 1.0  # how often due JWKS refreshes are looked for, at the least
REFRESH_FLOOR = 0.01  # a due time just past: look again soon, never spin
STATS_TICK = 5.0  # how often the token-cache gauges are updated


class StartupError(Exception):
    """The agent cannot start; the message says why (no traceback for users)."""


# --- configuration to runtime ------------------------------------------------------------


def issuer_rules(issuer: IssuerSettings) -> IssuerRules:
    return IssuerRules(
        name=issuer.name,
        issuer=issuer.issuer,
        algorithms=frozenset(issuer.algorithms),
        audiences=frozenset(issuer.audiences),
        leeway=issuer.leeway,
        require_exp=issuer.require_exp,
        max_lifetime=issuer.max_lifetime,
        required_claims=issuer.required_claims,
        allowed_types=frozenset(issuer.typ),
    )


def key_source(issuer: IssuerSettings, *, environment: bool = True) -> KeySource:
    """Where the issuer's keys come from. `environment=False` leaves out secrets held in
    environment variables (check-config runs in a shell other than the agent's)."""
    if issuer.jwks_uri:
        return JwksUrlSource(issuer.jwks_uri, issuer.algorithms)
    if issuer.discovery:
        return OidcDiscoverySource(issuer.issuer, issuer.discovery, issuer.algorithms)
    if issuer.jwks_file:
        return StaticKeySource(
            files=(KeyFile(issuer.jwks_file),),
            algorithms=issuer.algorithms,
            max_keys=issuer.max_keys,
        )
    files, secrets = [], []
    for index, key in enumerate(issuer.keys):
        if key.file:
            files.append(KeyFile(key.file, kid=key.kid, alg=key.alg))
            continue
        assert key.alg is not None  # the config loader demands it for secrets
        if key.secret_env and not environment:
            continue
        secret = _read_secret(key.secret_env, key.secret_file)
        try:
            hmac_key(secret, alg=key.alg)  # its length, said with where it came from
        except KeyLoadError as exc:
            where = f"secret_env {key.secret_env}" if key.secret_env else key.secret_file
            raise StartupError(f"keys[{index}] ({where}): {exc}") from None
        secrets.append(HmacSecret(secret, key.alg, key.kid))
    return StaticKeySource(tuple(files), tuple(secrets), issuer.algorithms, issuer.max_keys)


def static_key_problems(config: Config) -> list[str]:
    """What `run` would refuse in the key files and secret files the configuration names
    (check-config). Secrets from the environment are left to `run`: the shell that checks
    a file is seldom the one that runs the agent."""
    problems = []
    for index, issuer in enumerate(config.issuers):
        try:
            source = key_source(issuer, environment=False)
            if isinstance(source, StaticKeySource) and (source.files or source.secrets):
                load_static_keys(source)
        except (StartupError, KeyLoadError) as exc:
            problems.append(f"issuers[{index}] ({issuer.name}): {exc}")
    return problems


def log_verifier_error(error: Exception) -> None:
    """A check the verifier failed closed on (internal_error): a bug to report. The type
    only, as for a handler failure: the text may quote the token."""
    log.error("verifier_internal_error", error_type=type(error).__name__)


def _read_secret(env: str | None, path: str | None) -> bytes:
    if env:
        # The raw bytes: a value that is not UTF-8 is still a secret (regression: encoding
        # os.environ's text raised, with a byte of the secret in the message).
        value = os.environb.get(os.fsencode(env))
        if value is None:
            raise StartupError(f"the environment variable {env} holding an HMAC secret is not set")
        if not value:
            raise StartupError(f"the environment variable {env} holding an HMAC secret is empty")
        return value
    assert path is not None
    try:
        return Path(path).read_bytes().strip()
    except OSError as exc:
        raise StartupError(f"cannot read the HMAC secret file {path}: {exc.strerror}") from None


def jwks_timing(issuer: IssuerSettings) -> JwksTiming:
    return JwksTiming(
        refresh_min=issuer.refresh_min,
        refresh_max=issuer.refresh_max,
        default_max_age=min(max(issuer.default_refresh, issuer.refresh_min), issuer.refresh_max),
        refetch_interval=issuer.refetch_interval,
        # A kid missing from a fetch may be published a moment later (IdP or CDN lag):
        # ask again after one refetch interval, which already bounds the fetch rate.
        negative_ttl=issuer.refetch_interval,
        # After an outage, keys come back within refresh_min (at most 5 min).
        backoff_max=min(JwksTiming().backoff_max, issuer.refresh_min),
        max_stale=issuer.max_stale,
        fetch_timeout=issuer.fetch_timeout,
        max_response_bytes=issuer.max_jwks_bytes,
        max_keys=issuer.max_keys,
    )


def policy_runtimes(config: Config) -> dict[str, PolicyRuntime]:
    policies: dict[str, PolicyRuntime] = {}
    for name, settings in config.policies.items():
        matchers = tuple(
            ClaimMatcher(rule.claim, rule.equals, rule.one_of, rule.contains)
            for rule in settings.claims
        )
        policy = Policy(
            name=name,
            issuers=settings.issuers,
            audiences=None if settings.audiences is None else frozenset(settings.audiences),
            require_scopes=frozenset(settings.require_scopes),
            claim_matchers=matchers,
        )
        policies[name] = PolicyRuntime(
            policy, settings.report_only, settings.forward_claims, settings.realm
        )
    return policies


@dataclass
class Engine:
    """One configuration made live: verifier, key manager and policies."""

    config: Config
    runtime: Runtime
    keys: KeyManager
    verifier: Verifier
    store: MemoryKeyStore

    async def aclose(self) -> None:
        await self.keys.aclose()


def carried_keys(previous: Engine, sources: Mapping[str, KeySource]) -> dict[str, IssuerKeys]:
    """The previous engine's keys for every remote issuer whose key source is unchanged."""
    before = {issuer.name: issuer for issuer in previous.config.issuers}
    carried = {}
    for name, source in sources.items():
        old = before.get(name)
        entry = previous.store.get(name)
        if old is None or entry is None or not (old.jwks_uri or old.discovery):
            continue
        # A remote issuer's source is its URL: key_source() reads no file for it. A new
        # algorithm list keeps the keys as long as one of them fits it (a reload must
        # work while the IdP is down); otherwise a fetch has to bring some.
        same_place = dataclasses.replace(key_source(old), algorithms=source.algorithms) == source
        if same_place and fits_any(entry.key_set, source.algorithms):
            # Dated by the key manager's monotonic age, not the store's wall-clock stamp:
            # a clock stepped back must not make stale keys young again through a reload.
            age = previous.keys.key_age(name)
            if age is not None:
                entry = dataclasses.replace(entry, refreshed_at=time.time() - age)
            carried[name] = entry
    return carried


async def build_engine(
    config: Config, on_key_event: Callable[[KeyEvent], None], previous: Engine | None = None
) -> Engine:
    """Build and fetch keys; raises StartupError when the keys cannot be had in time.
    With `previous` (a reload), keys of unchanged remote sources carry over."""
    store = MemoryKeyStore()
    sources = {}
    for index, issuer in enumerate(config.issuers):
        try:
            sources[issuer.name] = key_source(issuer)
        except StartupError as exc:  # a secret missing from the environment, say
            raise StartupError(f"issuers[{index}] ({issuer.name}): {exc}") from None
    try:
        # The configuration checks the same rules; this keeps a gap between the two a
        # clean refusal rather than a traceback.
        verifier = Verifier(
            [issuer_rules(issuer) for issuer in config.issuers],
            store,
            max_token_bytes=config.agent.max_token_bytes,
            cache_size=config.cache.max_entries,
            on_error=log_verifier_error,
        )
        policies = policy_runtimes(config)
    except (PolicyError, ValueError) as exc:
        raise StartupError(f"invalid configuration: {exc}") from None
    timing = {issuer.name: jwks_timing(issuer) for issuer in config.issuers}
    archive = KeyArchive(Path(config.cache.keys_dir)) if config.cache.keys_dir else None
    if archive is not None:
        try:
            archive.prepare()
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            where = archive.directory
            raise StartupError(f"cache.keys_dir: cannot use {where}: {reason}") from None
    keys = KeyManager(
        sources,
        timing,
        store,
        on_event=on_key_event,
        archive=archive,
        archive_held=previous is not None,  # a reload saves once it is accepted
    )
    try:
        carried = carried_keys(previous, sources) if previous is not None else None
        ready = await keys.start(config.agent.ready_timeout, carried)
    except KeyLoadError as exc:  # KeySourceError among them
        await keys.aclose()
        raise StartupError(f"cannot load keys: {exc}") from None
    except asyncio.CancelledError:  # stopped while starting
        await keys.aclose()
        raise
    if not ready:
        missing = []
        for issuer in config.issuers:
            if store.get(issuer.name) is None:
                cause = keys.last_failure(issuer.name)
                missing.append(issuer.name + (f" (last attempt: {cause})" if cause else ""))
        await keys.aclose()
        raise StartupError(
            f"no keys for issuer(s) {', '.join(missing)} after {config.agent.ready_timeout:g}s"
        )
    runtime = Runtime(
        verifier=verifier,
        policies=policies,
        refetcher=keys,
        token_query_param=config.agent.token_query_param,
        unknown_kid_wait=config.agent.unknown_kid_wait,
    )
    return Engine(config, runtime, keys, verifier, store)


def configure_replay(memo: AnswerMemo, config: Config, store: MemoryKeyStore) -> None:
    """Size the answer memo from [cache] replay_entries; 0 turns replay off, and so does
    the access log, which wants a line per request. A change in `store` clears it, as
    does a new runtime (CheckJwtHandler)."""
    entries = config.cache.replay_entries
    memo.enabled = entries > 0 and not config.log.access_log
    memo.max_entries = max(entries, 1)
    store.subscribe(memo.clear)


# --- observing verdicts and key events -----------------------------------------------------


class VerdictRecorder:
    """Counts every verdict and logs rejections (rate-limited, never the token)."""

    def __init__(self, metrics: Metrics, config: Config) -> None:
        self.metrics = metrics
        self.configure(config, self.limiter_for(config))

    @staticmethod
    def limiter_for(config: Config) -> RejectionLogLimiter:
        """The rejection log limit `config` asks for; a reload builds it before it swaps
        anything in, so that a setting it cannot take leaves the running one whole."""
        return RejectionLogLimiter(
            config.log.rejections_per_second, config.log.rejections_burst, time.monotonic
        )

    def configure(self, config: Config, limiter: RejectionLogLimiter) -> None:
        """Take the [log] settings (at start and on reload)."""
        self.access_log = config.log.access_log
        previous = getattr(self, "limiter", None)
        if previous is not None:
            # Regression: a reload dropped the count of rejections not yet reported.
            limiter.take_over(previous)
        self.limiter = limiter

    def unreported_suppressed(self) -> int:
        """Rejections suppressed since the last logged one (said once, at stop)."""
        return self.limiter.take_suppressed()

    def on_verdict(
        self,
        verdict: Verdict,
        policy: str,
        seconds: float | None,
        token: str | None,
        report_only: bool,
    ) -> None:
        if verdict.ok:
            outcome = "accept"
        elif report_only:
            outcome = "report_only_reject"
        else:
            outcome = "reject"
        # The reason itself: a StrEnum is its value, without the cost of `.value`.
        self.metrics.record_verdict(
            outcome, verdict.reason, verdict.issuer, policy, seconds, verdict.cache_hit
        )
        if verdict.ok:
            if self.access_log:
                log.info("accepted", policy=policy, issuer=verdict.issuer, sub=_sub(verdict))
            return
        fields: dict[str, Any] = {
            "reason": verdict.reason.value,
            "status": verdict.status,
            "policy": _clip(policy),  # an unknown one is whatever HAProxy sent
            "issuer": verdict.issuer,
            "kid": _clip(verdict.kid),
            "alg": _clip(verdict.alg),
            "report_only": report_only,
        }
        if verdict.claims:  # only when the signature verified
            fields["sub"] = _sub(verdict)
        if token:
            fields["token_hash"] = token_fingerprint(token)
        self.limiter.emit(log.warning, "rejected", **fields)


# `kid` and `alg` of a rejected token come from its unverified header: anyone can make them
# as long as the token limit allows, as the policy name when haproxy.cfg takes it from the
# request. Real ones are short, and ASCII. A non-ASCII character can take 12 bytes in a
# JSON log line (an escaped surrogate pair), so such text is clipped four times shorter:
# the limiter counts lines, and a line must stay about the same size (DoS review).
_LOGGED_HEADER_CHARS = 128


def _clip(value: str | None) -> str | None:
    if value is None:
        return None
    limit = _LOGGED_HEADER_CHARS if value.isascii() else _LOGGED_HEADER_CHARS // 4
    return value if len(value) <= limit else value[:limit] + "…"


def _sub(verdict: Verdict) -> str | None:
    sub = verdict.claims.get("sub")
    return sub if isinstance(sub, str) else None


def key_event_logger(metrics: Metrics) -> Callable[[KeyEvent], None]:
    def on_event(event: KeyEvent) -> None:
        if isinstance(event, KeysFetched):
            metrics.jwks_fetch(event.issuer, "ok")
            metrics.jwks_keys(event.issuer, event.key_count, time.time())
            log.info(
                "jwks_fetched",
                issuer=event.issuer,
                keys=event.key_count,
                refresh_in=round(event.lifetime, 1),
                skipped=list(event.skipped) or None,
            )
        elif isinstance(event, KeysChanged):
            log.info(
                "jwks_changed",
                issuer=event.issuer,
                added=list(event.added),
                removed=list(event.removed),
            )
        elif isinstance(event, FetchFailed):
            metrics.jwks_fetch(event.issuer, event.kind)
            log.warning(
                "jwks_fetch_failed",
                issuer=event.issuer,
                cause=event.cause,
                result=event.kind,
                retry_in=round(event.retry_in, 1),
            )
        elif isinstance(event, KeysRestored):
            metrics.jwks_keys(event.issuer, event.key_count, event.fetched_at)
            log.warning(
                "jwks_restored_from_disk",
                issuer=event.issuer,
                age=round(event.age, 1),
                skipped=list(event.skipped) or None,
            )
        elif isinstance(event, ArchiveFailed):
            log.warning(
                "jwks_not_saved", issuer=event.issuer, cause=event.cause, directory=event.directory
            )
        elif isinstance(event, StaleServingStarted):
            log.warning("jwks_stale_serving_started", issuer=event.issuer)
        elif isinstance(event, StaleServingEnded):
            log.info("jwks_stale_serving_ended", issuer=event.issuer)
        elif isinstance(event, KeysUnavailable):
            metrics.issuer_ready(event.issuer, False)
            metrics.jwks_keys_held(event.issuer, 0)
            log.error("jwks_keys_unavailable", issuer=event.issuer)

    return on_event


# --- one worker ------------------------------------------------------------------------------


class Worker:
    """Serves SPOP on a listening socket until told to stop."""

    def __init__(
        self,
        config: Config,
        config_path: str | None,
        metrics: Metrics,
        config_snapshot: str | None = None,
        config_text: str = "",
    ) -> None:
        """`config_text`: the text `config` was read from."""
        self.config = config
        self.config_path = config_path
        self.config_snapshot = config_snapshot  # a supervisor's copy of the file, read instead
        self.config_digest = config_digest(config_text)  # of the text it runs, for the supervisor
        self.read_digest = ""  # ... and of the text its last reload read ("": none)
        self.on_reloaded: Callable[[str, str], None] | None = None  # tells the supervisor
        self.metrics = metrics
        self.recorder = VerdictRecorder(metrics, config)
        self.engine: Engine | None = None
        self.handler: CheckJwtHandler | None = None
        self.server: SpoaServer | None = None
        self._stop = asyncio.Event()
        self._reload_pending = False
        self._reloading: asyncio.Lock | None = None
        self._tasks: list[asyncio.Task[Any]] = []

    def ready(self) -> tuple[bool, dict[str, Any]]:
        engine = self.engine
        if engine is None:
            return False, {"status": "starting"}
        now = time.time()
        issuers = {
            i.name: engine.store.generation(i.name, now) is not None for i in engine.config.issuers
        }
        return all(issuers.values()), {"issuers": issuers}

    async def run(
        self,
        sock: socket.socket,
        on_serving: Callable[[], None] | None = None,
        reload_requested: Callable[[], bool] = lambda: False,
        heartbeat: Callable[[], None] | None = None,
        balancer: AcceptBalancer | None = None,
    ) -> None:
        self._reloading = asyncio.Lock()
        self._reload_pending = reload_requested()
        # Signals first: a SIGHUP or SIGTERM while keys load must neither kill the worker
        # nor be lost. A reload asked for before serving runs right after start-up.
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._schedule_reload)
        building = asyncio.create_task(build_engine(self.config, key_event_logger(self.metrics)))
        stopping = asyncio.create_task(self._stop.wait())
        await asyncio.wait({building, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not building.done():
            building.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await building
            log.info("agent_stopped", pid=os.getpid(), during="start-up")
            return
        stopping.cancel()
        self.engine = building.result()
        self._publish_issuer_settings()
        self._publish_readiness()
        # Accepted answers are replayed by the SPOP layer while they stay the same.
        memo = new_answer_memo(self.engine.runtime)
        configure_replay(memo, self.config, self.engine.store)
        self.handler = CheckJwtHandler(self.engine.runtime, observer=self.recorder, memo=memo)
        agent = self.config.agent
        limits = ServerLimits(
            max_frame_size=agent.max_frame_size,
            max_inflight=agent.max_inflight,
            max_list_items=agent.max_list_items,
            max_connections=agent.max_connections,
            hello_timeout=agent.hello_timeout,
            idle_timeout=agent.idle_timeout,
            frame_timeout=agent.frame_timeout,
            shutdown_grace=agent.shutdown_grace,
        )
        self.server = SpoaServer(
            {MESSAGE_NAME: self.handler},
            fallback_actions=FALLBACK_ACTIONS,
            limits=limits,
            observer=self.metrics,
            answer_memo=memo,
            on_replayed=self.metrics.record_replayed,
        )
        await self.server.start_on_socket(sock, balancer)
        # What start-up built lives as long as the worker: keep it out of every garbage
        # collection (the cyclic collector showed in per-request profiles).
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        if on_serving is not None:
            on_serving()
        log.info(
            "agent_started",
            listen=agent.listen,
            pid=os.getpid(),
            notify_decoder="c" if SPEEDUPS else "python",
            base64url_decoder="c" if BASE64URL_SPEEDUPS else "python",
            issuers=[i.name for i in self.config.issuers],
            policies=sorted(self.config.policies),
        )
        self._tasks = [
            asyncio.create_task(self._refresh_keys()),
            asyncio.create_task(self._metrics_tick()),
        ]
        if heartbeat is not None:
            self._tasks.append(asyncio.create_task(_beat_every(HEARTBEAT_EVERY, heartbeat)))
        if self._reload_pending:
            self._schedule_reload()
        await self._stop.wait()
        log.info("agent_stopping", pid=os.getpid())
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.server.shutdown()
        if self.engine is not None:
            # The cache's counts since the last tick too (regression: only flush ran).
            self._report_cache(self.engine)
        self.metrics.flush()
        if self.engine is not None:
            await self.engine.aclose()
        suppressed = self.recorder.unreported_suppressed()
        log.info(
            "agent_stopped", pid=os.getpid(), **({"suppressed": suppressed} if suppressed else {})
        )

    def _publish_issuer_settings(self) -> None:
        if self.engine is not None:
            for issuer in self.engine.config.issuers:
                self.metrics.jwks_max_stale(issuer.name, issuer.max_stale)

    def _publish_readiness(self) -> None:
        _, detail = self.ready()
        engine = self.engine
        for name, ready in detail.get("issuers", {}).items():
            self.metrics.issuer_ready(name, bool(ready))
            # Also after a reload made expired keys usable again (a raised max_stale),
            # which no fetch announces.
            held = engine.store.get(name) if engine is not None and ready else None
            self.metrics.jwks_keys_held(name, len(held.key_set.keys) if held else 0)

    async def _refresh_keys(self) -> None:
        while True:
            # At every tick, and right when a refresh or retry falls due: a back-off step
            # must not stretch by a tick while the keys age towards max_stale.
            delay = REFRESH_TICK
            if self.engine is not None and (due := self.engine.keys.next_due()) is not None:
                delay = min(delay, max(REFRESH_FLOOR, due - time.monotonic()))
            await asyncio.sleep(delay)
            engine = self.engine
            if engine is not None:
                try:
                    await engine.keys.run_due(time.monotonic())
                except Exception as exc:  # a refresh bug must not stop future refreshes
                    log.error("jwks_refresh_error", error_type=type(exc).__name__, error=str(exc))
                self._publish_readiness()

    async def _metrics_tick(self) -> None:
        # Per-request counts reach the shared files once a second (a scrape of a single
        # worker flushes by itself); the cache gauges every STATS_TICK.
        ticks = 0
        while True:
            await asyncio.sleep(1.0)
            ticks += 1
            if self.engine is not None and ticks % int(STATS_TICK) == 0:
                self._report_cache(self.engine)
            self.metrics.flush()

    def _report_cache(self, engine: Engine) -> None:
        stats = engine.verifier.cache.stats()
        self.metrics.cache_stats(stats.entries, stats.hits, stats.misses, stats.evictions)

    def _schedule_reload(self) -> None:
        if self.handler is None:  # still starting: reload once serving
            self._reload_pending = True
            return
        self._reload_pending = False
        self._tasks.append(asyncio.create_task(self._reload_and_report()))

    async def _reload_and_report(self) -> None:
        await self.reload()
        if self.on_reloaded is not None:
            self.on_reloaded(self.config_digest, self.read_digest)

    async def reload(self) -> bool:
        """Swap in the configuration file's current content; keep the old one on any error."""
        assert self._reloading is not None
        async with self._reloading:
            if self.config_path is None:
                return False
            self.read_digest = ""
            try:
                text, config = read_config(self.config_path, text_from=self.config_snapshot)
                self.read_digest = config_digest(text)
                _check_restart_only(self.config, config)
                limiter = VerdictRecorder.limiter_for(config)
                engine = await build_engine(config, key_event_logger(self.metrics), self.engine)
            except Exception as exc:  # a reload must never take the running agent down
                _reject_reload(exc, self.metrics)
                return False
            old, self.engine = self.engine, engine
            engine.keys.release_archive()
            self.config = config
            self.config_digest = self.read_digest  # the text just read is the one it runs
            self.recorder.configure(config, limiter)
            assert self.handler is not None
            memo = self.handler.memo
            if memo is not None:
                configure_replay(memo, config, engine.store)
            self.handler.runtime = engine.runtime  # in-flight checks finish on the old one
            self.metrics.set_label_sets(
                issuers=[i.name for i in config.issuers],
                policies=list(config.policies),
                reasons=[r.value for r in Reason],
            )
            self._publish_issuer_settings()
            self._publish_readiness()
            if old is not None:
                # The new engine's cache counts from zero: first count what the old one did
                # since the last tick.
                self._report_cache(old)
                self.metrics.cache_replaced()
                await old.aclose()
            # The old engine was frozen with the rest of start-up; let the collector see
            # it again, or its cycles would outlive the reload. Full collections are rare
            # (GC_THRESHOLDS): run one now, while the new cache is still small.
            gc.unfreeze()
            gc.collect()
            self.metrics.config_reload("ok")
            log.info(
                "reloaded",
                issuers=[i.name for i in config.issuers],
                policies=sorted(config.policies),
            )
            for warning in config_warnings(config):
                log.warning("config_warning", warning=warning)
            return True


# What a reload cannot change: bound once per process at start.
_RESTART_ONLY_AGENT_KEYS = (
    "listen",
    "workers",
    # The SPOP server's limits apply to every connection it holds.
    "max_frame_size",
    "max_inflight",
    "max_list_items",
    "max_connections",
    "hello_timeout",
    "idle_timeout",
    "frame_timeout",
    "shutdown_grace",
)


def _reject_reload(exc: Exception, metrics: Metrics | None) -> None:
    """Count and log a refused reload; the running configuration stays."""
    if isinstance(exc, ConfigError):
        problems = exc.problems
    elif isinstance(exc, StartupError):
        problems = [str(exc)]
    else:
        problems = [f"unexpected {type(exc).__name__}: {exc}"]
    log.error("reload_rejected", problems=problems)
    if metrics is not None:
        metrics.config_reload("error")


def _check_restart_only(old: Config, new: Config) -> None:
    changed = [
        f"agent.{key}"
        for key in _RESTART_ONLY_AGENT_KEYS
        if getattr(old.agent, key) != getattr(new.agent, key)
    ]
    if old.metrics.listen != new.metrics.listen:
        changed.append("metrics.listen")
    # Loggers are configured once per process, so their level and format stay put.
    changed += [
        f"log.{k}" for k in ("level", "format") if getattr(old.log, k) != getattr(new.log, k)
    ]
    if changed:
        raise ConfigError([f"{key}: changing it needs a restart, not a reload" for key in changed])


def make_metrics(config: Config) -> Metrics:
    return Metrics(
        issuers=[i.name for i in config.issuers],
        policies=list(config.policies),
        reasons=[r.value for r in Reason],
    )


def cannot_listen(key: str, address: str, exc: OSError) -> StartupError:
    """A bind failure, named by the setting that asked for the address."""
    return StartupError(f"{key}: cannot listen on {address}: {exc.strerror}")


def bind_listener(config: Config) -> socket.socket:
    host, port = config.agent.address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise cannot_listen("agent.listen", config.agent.listen, exc) from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


# A worker under a supervisor proves its event loop turns by writing to its pipe this
# often; the supervisor kills one silent for Supervisor.STALL_AFTER and starts another.
HEARTBEAT_EVERY = 1.0

# CPython's default (700, 10, 10), with full collections 100 times rarer. A full
# collection walks every cached token (three tracked objects per entry) and stalls every
# check in flight: about 35 ms at 100 000 entries on 2 vCPU, which set the load
# generator's p99.9 (63-74 ms; 18-21 ms with these). Cache entries hold no cycles and
# are freed by reference counting; young cycles are still collected as often as before.
GC_THRESHOLDS = (700, 10, 1000)


async def _beat_every(seconds: float, beat: Callable[[], None]) -> None:
    while True:
        await asyncio.sleep(seconds)
        beat()


def _worker_main(
    config: Config,
    config_path: str | None,
    sock: socket.socket,
    ready_fd: int | None = None,
    reload_requested: Callable[[], bool] = lambda: False,
    balancer: AcceptBalancer | None = None,
    config_snapshot: str | None = None,
    config_text: str = "",
) -> int:
    """Run one worker to completion in this process. With `ready_fd` (a supervisor's
    pipe), "R" is written there once the worker serves, then "." every HEARTBEAT_EVERY;
    and "C<running>:<read>\n" (config_digest of the text it runs, and of the copy it last
    read) once it serves and after each reload.
    With a `balancer`, it takes its share of the connections on a shared listener."""

    def report_serving() -> None:
        if ready_fd is not None:
            with contextlib.suppress(OSError):
                os.set_blocking(ready_fd, False)
                digest = worker.config_digest.encode()
                os.write(ready_fd, b"C%s:%s\nR" % (digest, digest))

    orphaned: list[bool] = []

    def heartbeat() -> None:
        assert ready_fd is not None
        try:
            os.write(ready_fd, b".")
        except BlockingIOError:  # the supervisor is slow to read: never block the loop
            pass
        except OSError:
            # The supervisor is gone (EPIPE): a worker must not outlive it, holding the
            # port with no metrics, readiness or reloads. Drain and stop.
            if not orphaned:
                orphaned.append(True)
                log.error("supervisor_gone", pid=os.getpid())
                os.kill(os.getpid(), signal.SIGTERM)

    def report_reload(running: str, read: str) -> None:
        assert ready_fd is not None
        with contextlib.suppress(OSError):  # a full pipe or a gone supervisor: see heartbeat
            os.write(ready_fd, b"C%s:%s\n" % (running.encode(), read.encode()))

    metrics = make_metrics(config)
    worker = Worker(config, config_path, metrics, config_snapshot, config_text)
    if ready_fd is not None:
        worker.on_reloaded = report_reload
    server: MetricsServer | None = None
    if config.metrics.address is not None and not metrics.multiprocess:
        host, port = config.metrics.address
        server = MetricsServer(metrics.registry, host, port, readiness=worker.ready)
        try:
            server.start()
        except OSError as exc:
            raise cannot_listen("metrics.listen", config.metrics.listen, exc) from None
    install_uvloop()
    try:
        asyncio.run(
            worker.run(
                sock,
                report_serving,
                reload_requested,
                heartbeat if ready_fd is not None else None,
                balancer,
            )
        )
    finally:
        if server is not None:
            server.stop()
        if orphaned:  # nobody else will clear the shared metrics directory
            _leave_metrics_dir(os.getpid())
    return 0


def _worker_share(share: tuple[int, int]) -> WorkerShare:
    """The worker's slot in its supervisor's connection table. Sized by the table itself,
    not by `workers` in the file, which may have changed since the supervisor started."""
    table_fd, slot = share
    try:
        return WorkerShare(ConnectionTable(table_fd), slot)
    except (OSError, ValueError) as exc:
        raise StartupError(f"connection table: {exc}") from None


# The supervisor's copy of the configuration, in its private directory.
SNAPSHOT_NAME = "config.toml"


def _leave_metrics_dir(pid: int) -> None:
    """An orphaned worker's exit: remove its own files and those of processes gone (the
    supervisor's) from the multiprocess metrics directory, and the directory once the
    last worker has left."""
    directory = os.environ.get(MULTIPROC_ENV)
    if not directory:
        return
    for path in Path(directory).glob("*.db"):
        owner = path.stem.rpartition("_")[2]
        if owner.isascii() and owner.isdigit() and (int(owner) == pid or not _alive(int(owner))):
            path.unlink(missing_ok=True)
    if not any(Path(directory).glob("*.db")):  # the last worker out
        for name in (SNAPSHOT_NAME, SNAPSHOT_NAME + ".new"):
            (Path(directory) / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        Path(directory).rmdir()


def _alive(pid: int) -> bool:
    """Whether `pid` runs. A zombie (killed, not yet reaped by its parent) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True  # no /proc to ask: the signal test said it exists
    return state not in ("Z", "X")


# --- entry point -----------------------------------------------------------------------------


def run_agent(
    config: Config,
    *,
    config_path: str | None = None,
    pid_file: str | None = None,
    worker_fd: int | None = None,
    ready_fd: int | None = None,
    share: tuple[int, int] | None = None,
    reload_requested: Callable[[], bool] = lambda: False,
    config_snapshot: str | None = None,
    config_text: str = "",
) -> int:
    """Run the agent until stopped; `config_text` is the text `config` was read from. A
    supervisor starts each worker with `worker_fd` (the shared listener), `ready_fd` (its
    pipe), `share` (the connection table's file descriptor and the worker's slot in it)
    and `config_snapshot` (its copy of the file). `reload_requested` tells whether a
    SIGHUP came in before the agent's own handlers were installed (the CLI catches it
    that early)."""
    configure_logging(config.log.level, config.log.format)
    if worker_fd is not None:  # started by a supervisor, sharing its listener
        try:
            balancer = _worker_share(share) if share is not None else None
            return _worker_main(
                config,
                config_path,
                socket.socket(fileno=worker_fd),
                ready_fd,
                reload_requested,
                balancer,
                config_snapshot,
                config_text,
            )
        except StartupError as exc:
            log.error("worker_startup_failed", error=str(exc))
            return 1
    log.info("config_loaded", source=config.source, config=mask_secrets(describe(config)))
    for issuer in config.issuers:
        if issuer.allow_plain_http:
            log.warning("plain_http_keys_allowed", issuer=issuer.name)
    for warning in config_warnings(config):
        log.warning("config_warning", warning=warning)
    if config.agent.workers > 1 and config_path is None:
        raise StartupError("several workers need the configuration file's path")
    try:
        sock = bind_listener(config)
    except StartupError as exc:
        log.error("startup_failed", error=str(exc))
        return 1
    # Written once the port is ours: a second agent that cannot start must neither replace
    # the running one's pid file nor, leaving, remove it.
    if pid_file:
        try:
            Path(pid_file).write_text(f"{os.getpid()}\n")
        except OSError as exc:
            sock.close()
            raise StartupError(f"cannot write the pid file {pid_file}: {exc.strerror}") from None
    try:
        if config.agent.workers == 1:
            return _worker_main(config, config_path, sock, None, reload_requested)
        return Supervisor(config, config_path, sock, config_text).run(reload_requested)
    except StartupError as exc:
        log.error("startup_failed", error=str(exc))
        return 1
    finally:
        if pid_file:
            _remove_own_pid_file(Path(pid_file))


def _remove_own_pid_file(path: Path) -> None:
    """Remove the pid file unless another process has written its own there since."""
    with contextlib.suppress(OSError, ValueError):
        if int(path.read_text().strip()) == os.getpid():
            path.unlink()


class Supervisor:
    """Starts `workers` processes sharing one listener; restarts any that die.

    Restarts back off (0.5s, 1s, 2s, ... up to 30s) while a worker keeps dying young, so a
    worker that cannot start does not spin; one that ran for a while restarts at once.
    """

    RESTART_FIRST = 0.5
    RESTART_MAX = 30.0
    HEALTHY_AFTER = 30.0  # a worker that lived this long resets its slot's back-off
    # A serving worker whose heartbeat stopped this long is hung (a stuck event loop, a
    # SIGSTOP): HAProxy's checks may land on a sibling and keep the agent UP, so only
    # the supervisor can see it. It is killed, and restarted like a worker that died.
    STALL_AFTER = 10.0
    # With no worker ever serving, every slot failing this often in a row means the
    # configuration cannot start (keys, IdP): exit 1, as one worker would, for systemd.
    GIVE_UP_AFTER = 3

    def __init__(
        self,
        config: Config,
        config_path: str | None,
        sock: socket.socket,
        config_text: str | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        # The configuration the workers run, as text (what `config` was read from). They
        # read the supervisor's copy of it, never the file, so a worker started later (a
        # restart) runs what its siblings run, even when the file changed since or a
        # reload of it was refused. Key files are read where they are.
        self.config_text = config_text if config_path is not None else None
        self.round: _ReloadRound | None = None
        self.runs: dict[int, str] = {}  # pid -> digest of the configuration it reported
        self.healing: dict[int, float] = {}  # pid -> when its answer to _heal is due
        self.refusals: set[int] = set()  # read the current copy and kept another one
        self.diverged_pids: set[int] = set()  # told, and still on another configuration
        self.reports: dict[int, bytes] = {}  # pid -> the start of a report read in part
        self.sock = sock
        self.children: dict[int, int] = {}  # pid -> slot
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        self.started_at: dict[int, float] = {}  # pid -> monotonic start
        self.failures: dict[int, int] = {}  # slot -> deaths in a row
        self.restart_at: dict[int, float] = {}  # slot -> when to start it again
        self.ready_pipes: dict[int, int] = {}  # pid -> read end: "R" once serving, then beats
        self.last_beat: dict[int, float] = {}  # pid -> monotonic time of its last sign of life
        self.killed: set[int] = set()  # pids killed as hung, not yet reaped
        self.serving: set[int] = set()  # pids of workers that reported serving
        self.reload_owed: set[int] = set()  # still starting when a reload came: HUP on serving
        self.stopping = False
        self.exit_code = 0
        self.ever_served = False
        self.reload_requested = False
        # Private to the supervisor and its workers: their metric files, and the copy of
        # the configuration (SNAPSHOT_NAME, written before each worker starts).
        self.metrics_dir = Path(tempfile.mkdtemp(prefix="jwtgate-metrics-"))
        self.snapshot = self.metrics_dir / SNAPSHOT_NAME
        self.metrics: Metrics | None = None
        # Connections held per slot, published by the workers to spread them evenly.
        self.connections = ConnectionTable.create(config.agent.workers)

    def run(self, reload_requested: Callable[[], bool] = lambda: False) -> int:
        server: MetricsServer | None = None
        try:  # from here on, whatever fails, the private directory goes
            prepare_multiprocess_dir(self.metrics_dir)
            # The supervisor's own series (rejected reloads) merge with the workers'. It
            # names no issuers: its issuer_ready series would otherwise join the workers'
            # minimum.
            self.metrics = Metrics(reasons=[r.value for r in Reason])
            if self.config.metrics.address is not None:
                host, port = self.config.metrics.address
                listener = MetricsServer(
                    multiprocess_registry(self.metrics_dir, issuers=self._configured_issuers),
                    host,
                    port,
                    readiness=self.ready,
                )
                try:
                    listener.start()
                except OSError as exc:
                    raise cannot_listen("metrics.listen", self.config.metrics.listen, exc) from None
                server = listener
            signal.signal(signal.SIGTERM, self._on_stop)
            signal.signal(signal.SIGINT, self._on_stop)
            signal.signal(signal.SIGHUP, self._on_hup)
            self.reload_requested = self.reload_requested or reload_requested()
            for slot in range(self.config.agent.workers):
                self._spawn(slot)
            self._watch()
        finally:
            if server is not None:
                server.stop()
            for path in self.metrics_dir.glob("*"):
                path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.metrics_dir.rmdir()
            self.connections.close()
        return self.exit_code

    def ready(self) -> tuple[bool, Any]:
        """Ready when every worker serves, on one configuration, and none reports an
        issuer without usable keys."""
        serving = len(self.serving)
        try:
            states = _issuer_ready_samples(self.metrics_dir, self._configured_issuers)
        except (OSError, ValueError):  # a worker's file being created right now
            return False, {"workers": serving, "issuers": "unreadable, retry"}
        ok = serving == self.config.agent.workers and bool(states) and all(states.values())
        detail: dict[str, Any] = {"workers": serving, "issuers": states}
        if self.diverged:
            detail["configuration"] = "the workers run different ones: reload again"
        return ok and not self.diverged, detail

    def _configured_issuers(self) -> frozenset[str]:
        """The issuers of the configuration in force (a reload may have dropped some,
        whose gauges the workers cannot remove)."""
        return frozenset(issuer.name for issuer in self.config.issuers)

    def _write_snapshot(self, text: str) -> None:
        """Replace the workers' copy of the configuration in one step (no worker reads
        half of one)."""
        staging = self.snapshot.with_name(SNAPSHOT_NAME + ".new")
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(staging, self.snapshot)

    def _spawn(self, slot: int) -> None:
        # A fresh interpreter per worker rather than fork(): the supervisor has a metrics
        # thread, and forking a threaded process can deadlock the child. The pipe tells
        # the supervisor when the worker serves; until then it gets no SIGHUP (it reads
        # the current file as it starts anyway) and does not count as ready.
        ready_read, ready_write = os.pipe()
        os.set_blocking(ready_read, False)
        table = self.connections.fileno()
        argv = [sys.executable, "-m", "spoa", "run", "--config", str(self.config_path)]
        if self.config_text is not None:
            # Written again for each worker: a copy removed meanwhile (a /tmp cleaner)
            # must not keep every restart from starting.
            try:
                self._write_snapshot(self.config_text)
            except OSError as exc:
                log.error("config_copy_failed", cause=exc.strerror)
            argv += ["--config-snapshot", str(self.snapshot)]
        argv += ["--worker-fd", str(self.sock.fileno()), "--ready-fd", str(ready_write)]
        argv += ["--connection-table", f"{table}:{slot}"]
        try:
            process = subprocess.Popen(
                argv, pass_fds=[self.sock.fileno(), ready_write, table], stdin=subprocess.DEVNULL
            )
        finally:
            os.close(ready_write)
        self.children[process.pid] = slot
        self.processes[process.pid] = process
        self.started_at[process.pid] = time.monotonic()
        self.ready_pipes[process.pid] = ready_read
        log.info("worker_started", pid=process.pid, slot=slot)

    def _collect_serving(self) -> None:
        now = time.monotonic()
        for pid, fd in list(self.ready_pipes.items()):
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                continue
            if not data:  # the worker died (or closed its end)
                os.close(fd)
                del self.ready_pipes[pid]
                continue
            self.last_beat[pid] = now
            pending = self.reports.pop(pid, b"") + data
            for match in _REPORT.finditer(pending):
                self._reported(pid, match.group(1).decode(), match.group(2).decode())
            tail = pending[pending.rfind(b"\n") + 1 :]
            if b"C" in tail:
                self.reports[pid] = tail[tail.index(b"C") :]
            if pid not in self.serving and b"R" in data:
                self.serving.add(pid)
                self.ever_served = True
                if pid in self.reload_owed:  # it may have read the copy before the change
                    self.reload_owed.discard(pid)
                    self._tell_workers((pid,))

    def _kill_hung(self) -> None:
        now = time.monotonic()
        # A worker still starting has ready_timeout to load its keys, and a margin.
        start_limit = self.config.agent.ready_timeout + self.STALL_AFTER
        for pid in list(self.children):
            if pid in self.killed:
                continue
            if pid in self.serving:
                silent = now - self.last_beat.get(pid, now)
                if silent < self.STALL_AFTER:
                    continue
                log.error("worker_hung", pid=pid, silent_for=round(silent, 1))
            else:
                starting = now - self.started_at.get(pid, now)
                if starting < start_limit:
                    continue
                log.error("worker_hung", pid=pid, starting_for=round(starting, 1))
            self.killed.add(pid)  # killed once; the reaper restarts its slot
            self.serving.discard(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _on_stop(self, signum: int, frame: Any) -> None:
        self.stopping = True

    def _on_hup(self, signum: int, frame: Any) -> None:
        self.reload_requested = True

    def _watch(self) -> None:
        looped_at = time.monotonic()
        while self.children or self.restart_at:
            now = time.monotonic()
            if now - looped_at > self.STALL_AFTER / 2:
                # The supervisor itself was not running (the host paused): the workers'
                # silence is not theirs. Count their heartbeats from now.
                self.last_beat = dict.fromkeys(self.last_beat, now)
            looped_at = now
            if self.stopping:
                self.restart_at.clear()
                for pid in list(self.children):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
                self._reap(block=True)
                return
            if self.reload_requested and self.round is None:  # one reload at a time
                self.reload_requested = False
                self._reload()
            self._reap(block=False)
            self._collect_serving()
            self._settle_round()
            self._kill_hung()
            now = time.monotonic()
            for slot, due in list(self.restart_at.items()):
                if now >= due:
                    del self.restart_at[slot]
                    self._spawn(slot)
            time.sleep(0.1)

    def _reap(self, *, block: bool) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            slot = self.children.pop(pid, None)
            if self.round is not None:
                self.round.waiting.discard(pid)
            for table in (self.runs, self.healing, self.reports):
                table.pop(pid, None)
            self.refusals.discard(pid)
            self.diverged_pids.discard(pid)
            self.processes.pop(pid, None)
            self.serving.discard(pid)
            self.reload_owed.discard(pid)
            self.last_beat.pop(pid, None)
            self.killed.discard(pid)
            fd = self.ready_pipes.pop(pid, None)
            if fd is not None:
                os.close(fd)
            lived = time.monotonic() - self.started_at.pop(pid, time.monotonic())
            mark_worker_dead(pid, self.metrics_dir)
            if slot is None:
                continue
            self.connections.clear(slot)
            code = os.waitstatus_to_exitcode(status)
            if self.stopping:
                log.info("worker_stopped", pid=pid, code=code)
                continue
            failures = 1 if lived >= self.HEALTHY_AFTER else self.failures.get(slot, 0) + 1
            self.failures[slot] = failures
            delay = min(self.RESTART_MAX, self.RESTART_FIRST * 2 ** (failures - 1))
            if failures == 1 and lived >= self.HEALTHY_AFTER:
                delay = 0.0
            log.error("worker_died", pid=pid, code=code, lived=round(lived, 1), restart_in=delay)
            self.restart_at[slot] = time.monotonic() + delay
            workers = self.config.agent.workers
            if (
                not self.ever_served
                and len(self.failures) == workers
                and min(self.failures.values()) >= self.GIVE_UP_AFTER
            ):
                log.error("workers_cannot_start", attempts=self.GIVE_UP_AFTER * workers)
                self.exit_code = 1
                self.stopping = True

    def _reload(self) -> None:
        """Check the file, make it the workers' copy, and tell them. _settle_round ends
        the round once each worker said what it made of that copy."""
        if self.config_path is None or self.config_text is None:
            return
        try:
            text, config = read_config(self.config_path)
            _check_restart_only(self.config, config)
            self._write_snapshot(text)
        except Exception as exc:  # the supervisor must outlive any bad file
            _reject_reload(exc, self.metrics)
            return
        previous_text, previous_config = self.config_text, self.config
        self.config_text, self.config = text, config
        self.round = _ReloadRound(
            previous_text,
            previous_config,
            waiting=set(self.children),
            deadline=time.monotonic() + self._answer_within(config),
        )
        self._forget_answers()
        self._tell_workers(self.children)
        log.info("reload_forwarded", workers=len(self.children))

    def _forget_answers(self) -> None:
        """The copy changed: what workers said of the last one no longer counts."""
        self.healing.clear()
        self.refusals.clear()
        self.diverged_pids.clear()

    def _answer_within(self, config: Config) -> float:
        # A worker still starting serves within ready_timeout (then gets its SIGHUP), and
        # a reload may wait as long again for new keys before it is refused.
        return 2 * config.agent.ready_timeout + self.STALL_AFTER

    def _copy_digest(self) -> str:
        return config_digest(self.config_text or "")

    def _tell_workers(self, pids: Iterable[int]) -> None:
        """SIGHUP each of `pids` that serves; one still starting gets it once it serves
        (it may have read the copy before it changed)."""
        for pid in list(pids):
            if pid not in self.serving:
                self.reload_owed.add(pid)
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)

    def _reported(self, pid: int, running: str, attempted: str) -> None:
        """A worker says which configuration it runs, and which copy it last read: once
        it serves (the same one), and after each reload, applied or not. Only a report on
        the current copy answers for it: one from a reload of an older copy (a SIGHUP
        sent to the whole process group, say) says nothing about this one."""
        self.runs[pid] = running
        if attempted != self._copy_digest():
            return
        self.healing.pop(pid, None)
        if running != attempted:
            self.refusals.add(pid)
        else:
            self.refusals.discard(pid)
        current = self.round
        if current is not None and pid not in self.reload_owed:
            current.waiting.discard(pid)

    def _off_copy(self) -> list[int]:
        """Serving workers known to run something other than the copy. (Also called from
        the metrics thread, through ready(): it reads copies of the shared tables.)"""
        target = self._copy_digest()
        runs = dict(self.runs)
        return [pid for pid in tuple(self.serving) if runs.get(pid, target) != target]

    def _settle_round(self) -> None:
        """Once every worker answered (or the time is up): if any is not on the new copy,
        the previous copy comes back and the workers that may hold the new one (on it, or
        silent) reload again, so that no two run different configurations and a restarted
        worker runs what its siblings do. Outside a round, _heal looks after the rest."""
        current = self.round
        if current is None:
            self._heal()
            return
        if current.waiting and time.monotonic() < current.deadline:
            return
        self.round = None
        silent = {pid for pid in current.waiting if pid in self.children}
        off = set(self._off_copy())
        if current.reverting:
            # Told to go back and answered, yet not back: _heal will not try again.
            stuck = {pid for pid in current.told - silent if pid in off}
            if stuck:
                self.diverged_pids.update(stuck)
                self.healing.update(dict.fromkeys(stuck, math.inf))
                log.error("config_diverged", off_copy=len(stuck))
            else:
                log.warning("reload_reverted")
            return
        if not off and not silent:
            return
        if silent and self.metrics is not None:
            self.metrics.config_reload("error")  # a silent worker counts none itself
        new_digest = self._copy_digest()
        try:
            self._write_snapshot(current.previous_text)
        except OSError as exc:
            # The new copy stays; the workers that refused it are the ones off it now.
            self.diverged_pids.update(off | silent)
            log.error("config_diverged", cause=f"cannot restore the copy: {exc.strerror}")
            return
        self.config_text, self.config = current.previous_text, current.previous_config
        # Those that may hold the new text: on it, silent, or still starting (they may
        # have read either copy).
        told = {
            pid
            for pid in self.children
            if pid in silent or self.runs.get(pid) == new_digest or pid not in self.serving
        }
        log.error("reload_refused_by_workers", refused=len(off | silent), going_back=len(told))
        self._forget_answers()
        if told:
            self.round = _ReloadRound(
                current.previous_text,
                current.previous_config,
                waiting=set(told),
                deadline=time.monotonic() + self._answer_within(current.previous_config),
                reverting=True,
                told=set(told),
            )
            self._tell_workers(told)

    def _heal(self) -> None:
        """A worker found off the copy (a late answer, a worker that started from a copy
        since put back) is told to reload it; again if it does not answer in time."""
        now = time.monotonic()
        for pid in self._off_copy():
            if self.healing.get(pid, 0.0) > now:
                continue  # told, waiting for its answer (or given up: inf)
            if pid in self.refusals:
                self.diverged_pids.add(pid)
                self.healing[pid] = math.inf
                log.error("config_diverged", pid=pid)
                continue
            self.healing[pid] = now + self._answer_within(self.config)
            log.warning("worker_off_copy", pid=pid)
            self._tell_workers((pid,))

    @property
    def diverged(self) -> bool:
        """A worker runs another configuration than the copy, and reloading did not
        bring it back (outside a reload in progress)."""
        return self.round is None and bool(frozenset(self.diverged_pids) & set(self._off_copy()))


@dataclass
class _ReloadRound:
    """A reload the workers were told of, until each says what it made of the copy."""

    previous_text: str
    previous_config: Config
    waiting: set[int]  # workers yet to answer
    deadline: float  # monotonic; a worker silent past it counts as refusing
    reverting: bool = False  # this round takes workers back to previous_text
    told: set[int] = dataclasses.field(default_factory=set)  # a revert's workers


def config_digest(text: str) -> str:
    """What a worker reports of the configuration text it runs or read."""
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]


# "C<digest it runs>:<digest of the copy it last read>\n"; the second may be empty (the
# copy could not be read).
_REPORT = re.compile(rb"C([0-9a-f]{16}):([0-9a-f]{16}|)\n")


def _issuer_ready_samples(
    metrics_dir: Path, issuers: Callable[[], Collection[str]]
) -> dict[str, bool]:
    registry = multiprocess_registry(metrics_dir, issuers=issuers)
    states: dict[str, bool] = {}
    for family in registry.collect():
        if family.name == "jwtgate_issuer_ready":
            for sample in family.samples:
                states[sample.labels.get("issuer", "")] = sample.value >= 1
    return states
