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
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from spoa.config import Config, ConfigError, IssuerSettings, describe, load_config
from spoa.glue import FALLBACK_ACTIONS, MESSAGE_NAME, CheckJwtHandler, PolicyRuntime, Runtime
from spoa.keymanager import (
    FetchFailed,
    HmacSecret,
    JwksUrlSource,
    KeyEvent,
    KeyFile,
    KeyManager,
    KeysChanged,
    KeysFetched,
    KeySource,
    KeySourceError,
    KeysUnavailable,
    OidcDiscoverySource,
    StaleServingEnded,
    StaleServingStarted,
    StaticKeySource,
)
from spoa.logs import RejectionLogLimiter, configure_logging, mask_secrets, token_fingerprint
from spoa.metrics import (
    Metrics,
    MetricsServer,
    mark_worker_dead,
    multiprocess_registry,
    prepare_multiprocess_dir,
)
from spoa.server import ServerLimits, SpoaServer, install_uvloop
from spoa.verifier import (
    ClaimMatcher,
    IssuerRules,
    JwksTiming,
    KeyLoadError,
    MemoryKeyStore,
    Policy,
    Reason,
    Verdict,
    Verifier,
)

log = structlog.get_logger("jwtgate")

REFRESH_TICK = 1.0  # how often due JWKS refreshes are looked for
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


def key_source(issuer: IssuerSettings) -> KeySource:
    if issuer.jwks_uri:
        return JwksUrlSource(issuer.jwks_uri)
    if issuer.discovery:
        return OidcDiscoverySource(issuer.issuer, issuer.discovery)
    if issuer.jwks_file:
        return StaticKeySource(files=(KeyFile(issuer.jwks_file),))
    files, secrets = [], []
    for key in issuer.keys:
        if key.file:
            files.append(KeyFile(key.file, kid=key.kid, alg=key.alg))
            continue
        assert key.alg is not None  # the config loader demands it for secrets
        secret = _read_secret(key.secret_env, key.secret_file)
        secrets.append(HmacSecret(secret, key.alg, key.kid))
    return StaticKeySource(tuple(files), tuple(secrets))


def _read_secret(env: str | None, path: str | None) -> bytes:
    if env:
        value = os.environ.get(env, "")
        if not value:
            raise StartupError(f"the environment variable {env} holding an HMAC secret is empty")
        return value.encode()
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


async def build_engine(config: Config, on_key_event: Callable[[KeyEvent], None]) -> Engine:
    """Build and fetch keys; raises StartupError when the keys cannot be had in time."""
    store = MemoryKeyStore()
    sources = {issuer.name: key_source(issuer) for issuer in config.issuers}
    timing = {issuer.name: jwks_timing(issuer) for issuer in config.issuers}
    keys = KeyManager(sources, timing, store, on_event=on_key_event)
    verifier = Verifier(
        [issuer_rules(issuer) for issuer in config.issuers],
        store,
        max_token_bytes=config.agent.max_token_bytes,
        cache_size=config.cache.max_entries,
    )
    try:
        ready = await keys.start(config.agent.ready_timeout)
    except (KeySourceError, KeyLoadError) as exc:
        await keys.aclose()
        raise StartupError(f"cannot load keys: {exc}") from None
    if not ready:
        now = time.time()
        missing = [i.name for i in config.issuers if store.generation(i.name, now) is None]
        await keys.aclose()
        raise StartupError(
            f"no keys for issuer(s) {', '.join(missing)} after {config.agent.ready_timeout:g}s"
        )
    runtime = Runtime(
        verifier=verifier,
        policies=policy_runtimes(config),
        refetcher=keys,
        token_query_param=config.agent.token_query_param,
        unknown_kid_wait=config.agent.unknown_kid_wait,
    )
    return Engine(config, runtime, keys, verifier, store)


# --- observing verdicts and key events -----------------------------------------------------


class VerdictRecorder:
    """Counts every verdict and logs rejections (rate-limited, never the token)."""

    def __init__(self, metrics: Metrics, config: Config) -> None:
        self.metrics = metrics
        self.access_log = config.log.access_log
        self.limiter = RejectionLogLimiter(
            config.log.rejections_per_second, config.log.rejections_burst, time.monotonic
        )

    def on_verdict(
        self,
        verdict: Verdict,
        policy: str,
        seconds: float,
        token: str | None,
        report_only: bool,
    ) -> None:
        if verdict.ok:
            outcome = "accept"
        elif report_only:
            outcome = "report_only_reject"
        else:
            outcome = "reject"
        self.metrics.record_verdict(
            outcome, verdict.reason.value, verdict.issuer, policy, seconds, verdict.cache_hit
        )
        if verdict.ok:
            if self.access_log:
                log.info("accepted", policy=policy, issuer=verdict.issuer, sub=_sub(verdict))
            return
        fields: dict[str, Any] = {
            "reason": verdict.reason.value,
            "status": verdict.status,
            "policy": policy,
            "issuer": verdict.issuer,
            "kid": verdict.kid,
            "alg": verdict.alg,
            "report_only": report_only,
        }
        if verdict.claims:  # only when the signature verified
            fields["sub"] = _sub(verdict)
        if token:
            fields["token_hash"] = token_fingerprint(token)
        self.limiter.emit(log.warning, "rejected", **fields)


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
            metrics.jwks_fetch(event.issuer, "error")
            log.warning(
                "jwks_fetch_failed",
                issuer=event.issuer,
                cause=event.cause,
                retry_in=round(event.retry_in, 1),
            )
        elif isinstance(event, StaleServingStarted):
            log.warning("jwks_stale_serving_started", issuer=event.issuer)
        elif isinstance(event, StaleServingEnded):
            log.info("jwks_stale_serving_ended", issuer=event.issuer)
        elif isinstance(event, KeysUnavailable):
            metrics.issuer_ready(event.issuer, False)
            log.error("jwks_keys_unavailable", issuer=event.issuer)

    return on_event


# --- one worker ------------------------------------------------------------------------------


class Worker:
    """Serves SPOP on a listening socket until told to stop."""

    def __init__(self, config: Config, config_path: str | None, metrics: Metrics) -> None:
        self.config = config
        self.config_path = config_path
        self.metrics = metrics
        self.recorder = VerdictRecorder(metrics, config)
        self.engine: Engine | None = None
        self.handler: CheckJwtHandler | None = None
        self.server: SpoaServer | None = None
        self._stop = asyncio.Event()
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

    async def run(self, sock: socket.socket) -> None:
        self._reloading = asyncio.Lock()
        self.engine = await build_engine(self.config, key_event_logger(self.metrics))
        self._publish_readiness()
        self.handler = CheckJwtHandler(self.engine.runtime, observer=self.recorder)
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
        )
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._schedule_reload)
        await self.server.start_on_socket(sock)
        log.info(
            "agent_started",
            listen=agent.listen,
            pid=os.getpid(),
            issuers=[i.name for i in self.config.issuers],
            policies=sorted(self.config.policies),
        )
        self._tasks = [
            asyncio.create_task(self._refresh_keys()),
            asyncio.create_task(self._update_cache_stats()),
        ]
        await self._stop.wait()
        log.info("agent_stopping", pid=os.getpid())
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.server.shutdown()
        if self.engine is not None:
            await self.engine.aclose()
        log.info("agent_stopped", pid=os.getpid())

    def _publish_readiness(self) -> None:
        _, detail = self.ready()
        for name, ready in detail.get("issuers", {}).items():
            self.metrics.issuer_ready(name, bool(ready))

    async def _refresh_keys(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_TICK)
            engine = self.engine
            if engine is not None:
                try:
                    await engine.keys.run_due(time.time())
                except Exception:  # a refresh bug must not stop future refreshes
                    log.exception("jwks_refresh_error")
                self._publish_readiness()

    async def _update_cache_stats(self) -> None:
        while True:
            await asyncio.sleep(STATS_TICK)
            if self.engine is not None:
                stats = self.engine.verifier.cache.stats()
                self.metrics.cache_stats(stats.entries, stats.hits, stats.misses, stats.evictions)

    def _schedule_reload(self) -> None:
        self._tasks.append(asyncio.create_task(self.reload()))

    async def reload(self) -> bool:
        """Swap in the configuration file's current content; keep the old one on any error."""
        assert self._reloading is not None
        async with self._reloading:
            if self.config_path is None:
                return False
            try:
                config = load_config(self.config_path)
                _check_restart_only(self.config, config)
                engine = await build_engine(config, key_event_logger(self.metrics))
            except ConfigError as exc:
                self.metrics.config_reload("error")
                log.error("reload_rejected", problems=exc.problems)
                return False
            except StartupError as exc:
                self.metrics.config_reload("error")
                log.error("reload_rejected", problems=[str(exc)])
                return False
            old, self.engine = self.engine, engine
            self.config = config
            assert self.handler is not None
            self.handler.runtime = engine.runtime  # in-flight checks finish on the old one
            self.metrics.set_label_sets(
                issuers=[i.name for i in config.issuers],
                policies=list(config.policies),
                reasons=[r.value for r in Reason],
            )
            self._publish_readiness()
            if old is not None:
                await old.aclose()
            self.metrics.config_reload("ok")
            log.info(
                "reloaded",
                issuers=[i.name for i in config.issuers],
                policies=sorted(config.policies),
            )
            return True


def _check_restart_only(old: Config, new: Config) -> None:
    changed = [
        key for key in ("listen", "workers") if getattr(old.agent, key) != getattr(new.agent, key)
    ]
    if old.metrics.listen != new.metrics.listen:
        changed.append("metrics.listen")
    # Loggers are configured once per process, so their level and format stay put.
    changed += [
        f"log.{k}" for k in ("level", "format") if getattr(old.log, k) != getattr(new.log, k)
    ]
    if changed:
        raise ConfigError(
            [
                f"agent.{k}: changing it needs a restart, not a reload"
                if "." not in k
                else f"{k}: changing it needs a restart, not a reload"
                for k in changed
            ]
        )


def make_metrics(config: Config) -> Metrics:
    return Metrics(
        issuers=[i.name for i in config.issuers],
        policies=list(config.policies),
        reasons=[r.value for r in Reason],
    )


def bind_listener(config: Config) -> socket.socket:
    host, port = config.agent.address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {config.agent.listen}: {exc.strerror}") from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def _worker_main(config: Config, config_path: str | None, sock: socket.socket) -> int:
    """Run one worker to completion in this process."""
    metrics = make_metrics(config)
    worker = Worker(config, config_path, metrics)
    server: MetricsServer | None = None
    if config.metrics.address is not None and not metrics.multiprocess:
        host, port = config.metrics.address
        server = MetricsServer(metrics.registry, host, port, readiness=worker.ready)
        try:
            server.start()
        except OSError as exc:
            raise StartupError(
                f"cannot listen on {config.metrics.listen}: {exc.strerror}"
            ) from None
    install_uvloop()
    try:
        asyncio.run(worker.run(sock))
    finally:
        if server is not None:
            server.stop()
    return 0


# --- entry point -----------------------------------------------------------------------------


def run_agent(
    config: Config,
    *,
    config_path: str | None = None,
    pid_file: str | None = None,
    worker_fd: int | None = None,
) -> int:
    configure_logging(config.log.level, config.log.format)
    if worker_fd is not None:  # started by a supervisor, sharing its listener
        try:
            return _worker_main(config, config_path, socket.socket(fileno=worker_fd))
        except StartupError as exc:
            log.error("worker_startup_failed", error=str(exc))
            return 1
    log.info("config_loaded", source=config.source, config=mask_secrets(describe(config)))
    if config.agent.workers > 1 and config_path is None:
        raise StartupError("several workers need the configuration file's path")
    if pid_file:
        Path(pid_file).write_text(f"{os.getpid()}\n")
    try:
        sock = bind_listener(config)
        if config.agent.workers == 1:
            return _worker_main(config, config_path, sock)
        return Supervisor(config, config_path, sock).run()
    except StartupError as exc:
        log.error("startup_failed", error=str(exc))
        return 1
    finally:
        if pid_file:
            with contextlib.suppress(OSError):
                Path(pid_file).unlink()


class Supervisor:
    """Forks `workers` processes sharing one listener; restarts any that die."""

    RESTART_BACKOFF = 1.0

    def __init__(self, config: Config, config_path: str | None, sock: socket.socket) -> None:
        self.config = config
        self.config_path = config_path
        self.sock = sock
        self.children: dict[int, int] = {}  # pid -> slot
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        self.stopping = False
        self.reload_requested = False
        self.metrics_dir = Path(tempfile.mkdtemp(prefix="jwtgate-metrics-"))

    def run(self) -> int:
        prepare_multiprocess_dir(self.metrics_dir)
        server: MetricsServer | None = None
        if self.config.metrics.address is not None:
            host, port = self.config.metrics.address
            server = MetricsServer(
                multiprocess_registry(self.metrics_dir), host, port, readiness=self.ready
            )
            try:
                server.start()
            except OSError as exc:
                raise StartupError(
                    f"cannot listen on {self.config.metrics.listen}: {exc.strerror}"
                ) from None
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        try:
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
        return 0

    def ready(self) -> tuple[bool, Any]:
        """Ready when every worker is alive and each reports all its issuers ready."""
        alive = len(self.children)
        states = _issuer_ready_samples(self.metrics_dir)
        ok = alive == self.config.agent.workers and bool(states) and all(states.values())
        return ok, {"workers": alive, "issuers": states}

    def _spawn(self, slot: int) -> None:
        # A fresh interpreter per worker rather than fork(): the supervisor has a metrics
        # thread, and forking a threaded process can deadlock the child.
        argv = [sys.executable, "-m", "spoa", "run", "--config", str(self.config_path)]
        argv += ["--worker-fd", str(self.sock.fileno())]
        process = subprocess.Popen(argv, pass_fds=[self.sock.fileno()], stdin=subprocess.DEVNULL)
        self.children[process.pid] = slot
        self.processes[process.pid] = process
        log.info("worker_started", pid=process.pid, slot=slot)

    def _on_stop(self, signum: int, frame: Any) -> None:
        self.stopping = True

    def _on_hup(self, signum: int, frame: Any) -> None:
        self.reload_requested = True

    def _watch(self) -> None:
        while self.children:
            if self.stopping:
                for pid in list(self.children):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
                self._reap(block=True)
                return
            if self.reload_requested:
                self.reload_requested = False
                self._reload()
            self._reap(block=False)
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
            self.processes.pop(pid, None)
            mark_worker_dead(pid, self.metrics_dir)
            if slot is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            if self.stopping:
                log.info("worker_stopped", pid=pid, code=code)
                continue
            log.error("worker_died", pid=pid, code=code, restart_in=self.RESTART_BACKOFF)
            time.sleep(self.RESTART_BACKOFF)
            self._spawn(slot)

    def _reload(self) -> None:
        if self.config_path is None:
            return
        try:
            config = load_config(self.config_path)
            _check_restart_only(self.config, config)
        except ConfigError as exc:
            log.error("reload_rejected", problems=exc.problems)
            return
        self.config = config
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)
        log.info("reload_forwarded", workers=len(self.children))


def _issuer_ready_samples(metrics_dir: Path) -> dict[str, bool]:
    registry = multiprocess_registry(metrics_dir)
    states: dict[str, bool] = {}
    for family in registry.collect():
        if family.name == "jwtgate_issuer_ready":
            for sample in family.samples:
                states[sample.labels.get("issuer", "")] = sample.value >= 1
    return states
