"""`jwtgate demo`: the whole thing, live, on loopback.

HAProxy (with the shipped haproxy/ files), two jwtgate agents, two backends and a
local issuer whose signing key rotates. Mixed traffic, good and hostile, goes through
HAProxy; every answer is checked against what it should be.
"""

from __future__ import annotations

import contextlib
import http.client
import shutil
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import mkdtemp

from spoa.devkit.issuer import LocalIssuer
from spoa.devkit.stack import Stack, StackError, StackOptions, stopping_on_signals
from spoa.devkit.tokens import alg_none_token, expired_token, forge_signature

AUDIENCE = "demo-api"


@dataclass(frozen=True)
class DemoOptions:
    duration: float = 40.0
    rotate_every: float = 8.0
    rate: float = 50.0
    live: bool = True
    hold: bool = False  # keep the stack up after the summary until Ctrl-C


@dataclass(frozen=True)
class Scenario:
    name: str
    path: str
    expect: int
    weight: int
    token: Callable[[LocalIssuer], str | None]


def _mint(scope: str, aud: str = AUDIENCE) -> Callable[[LocalIssuer], str | None]:
    return lambda issuer: issuer.mint({"sub": "alice", "aud": aud, "scope": scope})


def _expired(issuer: LocalIssuer) -> str | None:
    claims = {"iss": issuer.issuer, "sub": "bob", "aud": AUDIENCE}
    return expired_token(issuer.current_key, claims, time.time(), expired_for=300)


def _forged(issuer: LocalIssuer) -> str | None:
    return forge_signature(issuer.mint({"sub": "mallory", "aud": AUDIENCE, "scope": "admin"}))


def _alg_none(issuer: LocalIssuer) -> str | None:
    return alg_none_token({"iss": issuer.issuer, "sub": "mallory", "aud": AUDIENCE})


SCENARIOS = (
    Scenario("valid", "/api/orders", 200, 30, _mint("read")),
    Scenario("admin", "/admin/users", 200, 6, _mint("read admin")),
    Scenario("insufficient_scope", "/admin/users", 403, 6, _mint("read")),
    Scenario("report_only", "/shadow/beta", 200, 4, _mint("read")),
    Scenario("expired", "/api/orders", 401, 6, _expired),
    Scenario("forged_signature", "/api/orders", 401, 6, _forged),
    Scenario("wrong_audience", "/api/orders", 401, 6, _mint("read", aud="other-api")),
    Scenario("missing_token", "/api/orders", 401, 6, lambda issuer: None),
    Scenario("alg_none", "/api/orders", 401, 6, _alg_none),
)


def agent_config(issuer: LocalIssuer) -> str:
    return f"""
[log]
format = "json"

[cache]
max_entries = 10000

[[issuers]]
name = "demo"
issuer = "{issuer.issuer}"
audiences = ["{AUDIENCE}"]
algorithms = ["RS256"]
jwks_uri = "{issuer.jwks_url}"
typ = ["at+jwt"]
refresh_min = "5s"
refetch_interval = "1s"
leeway = "5s"

[policies.default]
issuers = ["demo"]

[policies.admin]
issuers = ["demo"]
require_scopes = ["admin"]

[policies.shadow]
issuers = ["demo"]
require_scopes = ["beta"]
report_only = true
"""


@dataclass
class Tally:
    """What happened so far; updated from the client threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: int = 0
    by_scenario: Counter[str] = field(default_factory=Counter)
    as_expected: Counter[str] = field(default_factory=Counter)
    wrong: Counter[str] = field(default_factory=Counter)
    by_status: Counter[int] = field(default_factory=Counter)
    by_reason: Counter[str] = field(default_factory=Counter)
    by_backend: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    rotations: int = 0

    def record(self, scenario: Scenario, status: int, reason: str, backend: str, ms: float) -> None:
        with self.lock:
            self.sent += 1
            self.by_scenario[scenario.name] += 1
            if status == scenario.expect:
                self.as_expected[scenario.name] += 1
            else:
                self.wrong[f"{scenario.name}: got {status}, expected {scenario.expect}"] += 1
            self.by_status[status] += 1
            self.by_reason[reason] += 1
            if backend:
                self.by_backend[backend] += 1
            self.latencies.append(ms)

    def percentile(self, q: float) -> float:
        with self.lock:
            data = sorted(self.latencies)
        if not data:
            return 0.0
        return data[min(len(data) - 1, int(q * len(data)))]


def send(port: int, scenario: Scenario, token: str | None) -> tuple[int, str, str, float]:
    """One request through HAProxy: (status, reason, backend, milliseconds)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", scenario.path, headers=headers)
        response = connection.getresponse()
        response.read()
        elapsed = (time.perf_counter() - started) * 1000
        challenge = response.getheader("WWW-Authenticate") or ""
        reason = _description(challenge) or (response.getheader("X-JWT-Reason") or "")
        if response.status == 200:
            reason = "ok" if not reason else f"report_only:{reason}"
        elif not reason:
            reason = {401: "missing_token", 503: "agent_unavailable"}.get(response.status, "other")
        return response.status, reason, response.getheader("X-Backend") or "", elapsed
    finally:
        connection.close()


def _description(challenge: str) -> str:
    marker = 'error_description="'
    start = challenge.find(marker)
    if start < 0:
        return ""
    start += len(marker)
    return challenge[start : challenge.find('"', start)]


def run_demo(options: DemoOptions) -> int:
    with stopping_on_signals():
        return _run_demo(options)


def _run_demo(options: DemoOptions) -> int:
    logs = Path(mkdtemp(prefix="jwtgate-demo-"))
    tally = Tally()
    print(f"jwtgate demo: starting HAProxy, 2 agents, 2 backends, 1 issuer (logs in {logs})")
    try:
        with contextlib.ExitStack() as running:
            issuer = running.enter_context(
                LocalIssuer(
                    rotate_every=options.rotate_every,
                    on_rotate=lambda key: _count_rotation(tally),
                    max_age=60,
                )
            )
            stack = running.enter_context(
                Stack(StackOptions(agent_config=agent_config(issuer), workdir=logs))
            )
            _traffic(stack, issuer, options, tally)
            # The key stays from here on: the token of the `curl` line below keeps working
            # for as long as the stack runs (its key would be withdrawn a minute later).
            issuer.stop_rotating()
            _summary(stack, issuer, tally, logs, holding=options.hold)
            if options.hold:
                print("\nThe stack keeps running; press Ctrl-C to stop it.")
                with contextlib.suppress(KeyboardInterrupt):
                    while True:
                        time.sleep(1)
    except StackError as exc:
        print(f"jwtgate demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"\njwtgate demo: interrupted; everything it started is stopped (logs kept in {logs})."
        )
        return 130
    print(f"jwtgate demo: everything it started is stopped (logs kept in {logs}).")
    return 0 if not tally.wrong and tally.sent else 1


def _count_rotation(tally: Tally) -> None:
    with tally.lock:
        tally.rotations += 1


def _traffic(stack: Stack, issuer: LocalIssuer, options: DemoOptions, tally: Tally) -> None:
    plan = [s for s in SCENARIOS for _ in range(s.weight)]
    interval = 1.0 / options.rate
    deadline = time.monotonic() + options.duration
    next_view = 0.0
    index = 0
    tokens: dict[tuple[str, int], str | None] = {}
    with ThreadPoolExecutor(max_workers=16, thread_name_prefix="demo-client") as pool:
        started = time.monotonic()
        while (now := time.monotonic()) < deadline:
            scenario = plan[index % len(plan)]
            index += 1
            # Good tokens are reused until the key rotates (cache hits, like real clients);
            # each rotation brings tokens signed by a key the agents have not seen yet.
            cache_key = (scenario.name, tally.rotations)
            if cache_key not in tokens or scenario.name not in ("valid", "admin"):
                tokens[cache_key] = scenario.token(issuer)
            token = tokens[cache_key]
            pool.submit(_one, stack.frontend_port, scenario, token, tally)
            if now >= next_view:
                _view(tally, now - started, options, live=options.live)
                next_view = now + (0.5 if options.live else 5.0)
            time.sleep(max(0.0, started + index * interval - time.monotonic()))
    _view(tally, options.duration, options, live=options.live)


def _one(port: int, scenario: Scenario, token: str | None, tally: Tally) -> None:
    try:
        status, reason, backend, ms = send(port, scenario, token)
    except OSError as exc:
        status, reason, backend, ms = 0, f"client_error:{type(exc).__name__}", "", 0.0
    tally.record(scenario, status, reason, backend, ms)


def _view(tally: Tally, elapsed: float, options: DemoOptions, *, live: bool) -> None:
    with tally.lock:
        reasons = ", ".join(f"{r}={n}" for r, n in tally.by_reason.most_common())
        backends = ", ".join(f"{b}={n}" for b, n in sorted(tally.by_backend.items()))
        statuses = ", ".join(f"{s}={n}" for s, n in sorted(tally.by_status.items()))
        sent, wrong, rotations = tally.sent, sum(tally.wrong.values()), tally.rotations
    p50, p99 = tally.percentile(0.50), tally.percentile(0.99)
    lines = [
        f"[{elapsed:5.1f}s / {options.duration:g}s]  requests {sent}  key rotations {rotations}"
        f"  unexpected answers {wrong}",
        f"  status   {statuses}",
        f"  reasons  {reasons}",
        f"  backends {backends}",
        f"  latency  p50 {p50:.1f} ms  p99 {p99:.1f} ms",
    ]
    if live:
        sys.stdout.write("\x1b[2J\x1b[H" + "\n".join(lines) + "\n")
    else:
        sys.stdout.write(lines[0] + "\n")
    sys.stdout.flush()


def _summary(stack: Stack, issuer: LocalIssuer, tally: Tally, logs: Path, *, holding: bool) -> None:
    print("\n== Summary ==")
    print(f"{'scenario':<20} {'expected':>8} {'sent':>6} {'as expected':>12}")
    for scenario in SCENARIOS:
        name = scenario.name
        print(
            f"{name:<20} {scenario.expect:>8} {tally.by_scenario[name]:>6}"
            f" {tally.as_expected[name]:>12}"
        )
    print(f"\nby reason: {dict(tally.by_reason.most_common())}")
    print(f"by backend: {dict(sorted(tally.by_backend.items()))}")
    with tally.lock:
        latencies = list(tally.latencies)
    if latencies:
        print(
            f"latency: p50 {tally.percentile(0.5):.1f} ms, p99 {tally.percentile(0.99):.1f} ms,"
            f" mean {statistics.fmean(latencies):.1f} ms over {len(latencies)} requests"
        )
    print(f"key rotations during the run: {tally.rotations}")
    if tally.wrong:
        print("\nUNEXPECTED ANSWERS:")
        for what, count in tally.wrong.most_common():
            print(f"  {count} x {what}")
    else:
        print("\nEvery request got the answer it should have: forged, expired, wrong-audience,")
        print("alg:none and missing tokens never reached a backend.")
    print("\nWhere to look:")
    for agent in stack.agents:
        print(f"  {agent.name} metrics: {agent.metrics_url}/metrics  (and /readyz)")
    print(f"  HAProxy stats: http://127.0.0.1:{stack.stats_port}/stats")
    print(f"  logs: {logs} (haproxy.log, agent1.log, agent2.log)")
    token = issuer.mint({"sub": "you", "aud": AUDIENCE, "scope": "read"})
    if holding:
        print("\nTry it by hand while the stack runs:")
    else:
        print("\nThe stack stops now; run scripts/demo in a terminal to keep it up and try:")
    print(f"  curl -i -H 'Authorization: Bearer {token}' {stack.url}/api/orders")
    if shutil.which("curl") is None:
        print("  (curl is not installed: apt-get install curl)")
