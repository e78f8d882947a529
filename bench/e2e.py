"""End-to-end through HAProxy 2.6, every scenario in one run, side by side.

Layout (as in issue 6): HAProxy `nbthread 1` pinned to CPU 0 (`sched_setaffinity` once it
runs), `wrk -t1 -c32` pinned to CPU 1 with `taskset`, `http-request return` in place of a
backend. The agents are not pinned (two cores are all there is). The jwtgate scenarios run
the shipped haproxy/haproxy.cfg and spoe-jwt.conf through `spoa.devkit.stack.Stack`; the
only edits are `nbthread 1`, the final `default_backend` turned into `http-request return`,
JWTGATE_MAX_WAITING_FRAMES=8 where two agent processes run (as docs/operations.md
advises), and JWTGATE_SHADOW=0, the shipped default (Stack turns it on for the demo). The
agent's configuration (bench.common.agent_config) has the shipped issuer rules and a
default policy, without the example's admin and shadow policies.

The no-auth and native `jwt_verify` configs (bench/haproxy/) take their global, defaults
and log-format from that same file, but not its front-end rules (header removal, request
checks, policy ACLs, X-JWT-* headers): they do less per request than the shipped file, so
their rates are upper bounds for an operator who adds those rules.

Each scenario gets a closed-loop saturation run (rps, p50/p99, CPU per request of HAProxy
and of the agent from /proc utime+stime), then a paced run offered about half that rate
(wrk's `delay()` hook with random pauses, see bench/haproxy/wrk.lua) for latency without
queueing; its table column gives the rate it achieved.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    AUDIENCE,
    ISSUER,
    agent_config,
    cpu_seconds,
    make_keys,
    mint,
    mint_many,
    process_tree,
    write_public_keys,
)
from spoa.devkit.keys import SigningKey
from spoa.devkit.stack import (
    ManagedProcess,
    Stack,
    StackOptions,
    free_port,
    haproxy_binary,
    run_main,
    wait_for_port,
)

BENCH_DIR = Path(__file__).resolve().parent
SHIPPED = BENCH_DIR.parent / "haproxy"
WRK_CONNECTIONS = 32
PACED_DELAY_MS = 10


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    kind: str  # noauth | native | ackmin | ackonly | jwtgate
    alg: str = "RS256"
    unique: bool = False
    workers: int = 1
    agents: int = 1  # separate agent processes, each a server line in the agent backend
    pool: int = 0  # > 0: this many tokens, taken in turn (many users, each repeating)
    # JWTGATE_MAX_WAITING_FRAMES for the shipped spoe-jwt.conf; None keeps its default
    # (20). Two agent processes run with the value docs/operations.md gives for them.
    max_waiting_frames: int | None = None


NATIVE_RS256 = Scenario("native jwt_verify RS256", "native", "RS256")
NATIVE_ES256 = Scenario("native jwt_verify ES256", "native", "ES256")
MINIMAL_AGENT = Scenario("minimal ACK-only agent (hand-written)", "ackmin")
JWTGATE_HITS = Scenario("jwtgate RS256 cache hits", "jwtgate", "RS256")
JWTGATE_RS256_UNIQUE = Scenario("jwtgate RS256 unique", "jwtgate", "RS256", unique=True)
JWTGATE_ES256_UNIQUE = Scenario("jwtgate ES256 unique", "jwtgate", "ES256", unique=True)
JWTGATE_ES256_UNIQUE_2_WORKERS = Scenario(
    "jwtgate ES256 unique, 2 workers",
    "jwtgate",
    "ES256",
    unique=True,
    workers=2,
    max_waiting_frames=8,
)

SCENARIOS = (
    Scenario("no auth", "noauth"),
    NATIVE_RS256,
    NATIVE_ES256,
    MINIMAL_AGENT,
    Scenario("ACK-only agent (jwtgate server, no JWT)", "ackonly"),
    JWTGATE_HITS,
    JWTGATE_RS256_UNIQUE,
    JWTGATE_ES256_UNIQUE,
    Scenario("jwtgate RS256, 2 000 tokens in turn", "jwtgate", "RS256", pool=2_000),
    Scenario("jwtgate RS256, 20 000 tokens in turn", "jwtgate", "RS256", pool=20_000),
    Scenario(
        "jwtgate RS256 cache hits, 2 workers", "jwtgate", "RS256", workers=2, max_waiting_frames=8
    ),
    Scenario(
        "jwtgate RS256 unique, 2 workers",
        "jwtgate",
        "RS256",
        unique=True,
        workers=2,
        max_waiting_frames=8,
    ),
    # The ES256 unique-token target does not say "one agent process": what a second
    # worker buys on this 2-core box, where HAProxy and wrk hold a core each.
    JWTGATE_ES256_UNIQUE_2_WORKERS,
    Scenario(
        "jwtgate RS256 unique, 2 agents",
        "jwtgate",
        "RS256",
        unique=True,
        agents=2,
        max_waiting_frames=8,
    ),
)


@dataclass
class WrkRun:
    requests: int = 0
    seconds: float = 0.0
    rps: float = 0.0
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    non_2xx: int = 0
    socket_errors: int = 0
    cdf: list[tuple[float, float]] = field(default_factory=list)  # (percentile, ms)
    haproxy_cpu_us: float = float("nan")  # per request
    agent_cpu_us: float = float("nan")
    # wrk's own CPU per request: on the core an unpinned agent mostly shares, it takes
    # what the agent does not get.
    wrk_cpu_us: float = float("nan")
    # The unique tokens ran out before the run's end: wrk stopped, and rps (over the whole
    # duration) is a lower bound.
    tokens_ran_out: bool = False


@dataclass
class ScenarioResult:
    scenario: Scenario
    saturated: WrkRun
    paced: WrkRun
    paced_rate: float
    error: str | None = None


# --- HAProxy configs ---


def _pin(global_text: str) -> str:
    # One thread, pinned by pin_haproxy once started: HAProxy 2.6 in the foreground
    # (-db, as here and in spoa.devkit.stack) ignores `cpu-map`.
    return global_text.replace("global\n", "global\n    nbthread 1\n", 1)


def pin_haproxy(pid: int) -> None:
    """Put HAProxy's one thread on CPU 0, as the layout says."""
    if 0 in os.sched_getaffinity(0):
        os.sched_setaffinity(pid, {0})


def shipped_parts() -> tuple[str, str]:
    """(global+defaults with pinning, the log-format line) from haproxy/haproxy.cfg."""
    text = (SHIPPED / "haproxy.cfg").read_text()
    head = text.split("\nfrontend ", 1)[0] + "\n"
    match = re.search(r"^\s*log-format .*$", text, re.MULTILINE)
    if match is None:
        raise RuntimeError("haproxy/haproxy.cfg has no log-format line")
    return _pin(head), match.group(0)


def bench_config(template: str, directory: Path) -> Path:
    head, log_format = shipped_parts()
    text = (BENCH_DIR / "haproxy" / template).read_text()
    text = text.replace("@GLOBAL_AND_DEFAULTS@", head).replace("@LOG_FORMAT@", log_format)
    path = directory / template
    path.write_text(text)
    return path


def jwtgate_haproxy_dir(directory: Path) -> Path:
    """The shipped files; haproxy.cfg with pinning and `http-request return` as backend."""
    target = directory / "haproxy-jwtgate"
    target.mkdir(exist_ok=True)
    text = (SHIPPED / "haproxy.cfg").read_text()
    if "    default_backend protected_service\n" not in text:
        raise RuntimeError("haproxy/haproxy.cfg changed shape: no default_backend line")
    text = text.replace(
        "    default_backend protected_service\n",
        '    http-request return status 200 content-type text/plain string "ok"\n',
    )
    head, rest = text.split("\ndefaults", 1)
    (target / "haproxy.cfg").write_text(_pin(head) + "\ndefaults" + rest)
    shutil.copy(SHIPPED / "spoe-jwt.conf", target / "spoe-jwt.conf")
    return target


# --- wrk ---


def parse_wrk(output: str) -> WrkRun:
    run = WrkRun()
    match = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", output)
    if match:
        run.requests = int(match.group(1))
        scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[match.group(3)]
        run.seconds = float(match.group(2)) * scale
    match = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if match:
        run.rps = float(match.group(1))
    match = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if match:
        run.non_2xx = int(match.group(1))
    match = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if match:
        run.socket_errors = sum(int(group) for group in match.groups())
    for pct, micros in re.findall(r"^PCT ([\d.]+) (\d+)$", output, re.MULTILINE):
        run.cdf.append((float(pct), int(micros) / 1000))
    by_pct = dict(run.cdf)
    run.p50_ms = by_pct.get(50.0, float("nan"))
    run.p99_ms = by_pct.get(99.0, float("nan"))
    return run


def run_wrk(
    url: str,
    seconds: float,
    *,
    token: str | None,
    token_file: Path | None,
    delay_ms: int | None = None,
    connections: int = WRK_CONNECTIONS,
    cycle: bool = False,
) -> WrkRun:
    script = BENCH_DIR / "haproxy" / "wrk.lua"
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", str(script)]
    if token is not None:
        argv += ["-H", f"Authorization: Bearer {token}"]
    argv += [f"{url}/api/orders", "--", str(delay_ms or 0), str(token_file or "-")]
    if cycle:
        argv.append("cycle")
    if 1 in os.sched_getaffinity(0):
        argv = ["taskset", "-c", "1", *argv]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"wrk failed: {result.stderr.strip()[:500]}")
    return parse_wrk(result.stdout)


def _children_cpu_seconds() -> float:
    """CPU of this process's children that ended and were waited for: wrk, once it is."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measured(
    url: str,
    seconds: float,
    haproxy_pid: int,
    agent_roots: Sequence[int],
    **wrk_args: Any,
) -> WrkRun:
    haproxy_pids = [haproxy_pid]
    agent_pids = [pid for root in agent_roots for pid in process_tree(root)]
    before = cpu_seconds(haproxy_pids), cpu_seconds(agent_pids), _children_cpu_seconds()
    run = run_wrk(url, seconds, **wrk_args)
    after = cpu_seconds(haproxy_pids), cpu_seconds(agent_pids), _children_cpu_seconds()
    if run.requests:
        run.haproxy_cpu_us = (after[0] - before[0]) / run.requests * 1e6
        run.wrk_cpu_us = (after[2] - before[2]) / run.requests * 1e6
        if agent_pids:
            run.agent_cpu_us = (after[1] - before[1]) / run.requests * 1e6
    return run


def wait_accepting(url: str, token: str | None, timeout: float = 20.0) -> None:
    """Until a request through HAProxy gets 200 (agent servers come UP after a check)."""
    deadline = time.monotonic() + timeout
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    last = "no answer"
    while time.monotonic() < deadline:
        request = urllib.request.Request(f"{url}/api/orders", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=2) as response:  # loopback only
                if response.status == 200:
                    return
        except OSError as exc:
            last = str(exc)
        time.sleep(0.2)
    raise RuntimeError(f"{url} does not accept requests: {last}")


# --- running the scenarios ---


@dataclass
class Target:
    url: str
    haproxy_pid: int
    agent_pids: tuple[int, ...]  # every agent's main process; their workers are added


@contextlib.contextmanager
def run_haproxy(
    config: Path, env: dict[str, str], workdir: Path, name: str
) -> Iterator[ManagedProcess]:
    check = subprocess.run(
        [haproxy_binary(), "-c", "-q", "-f", str(config)], env=env, capture_output=True, check=False
    )
    if check.returncode != 0:
        raise RuntimeError(f"haproxy rejects {config.name}: {check.stderr.decode()[-800:]}")
    process = ManagedProcess(
        name,
        [haproxy_binary(), "-db", "-f", str(config)],
        env=env,
        log_path=workdir / f"{name}.log",
    ).start()
    try:
        pin_haproxy(process.pid)
        yield process
    finally:
        process.stop()


class Bench:
    def __init__(self, workdir: Path, seconds: float, log: Callable[[str], None]) -> None:
        self.workdir = workdir
        self.seconds = seconds
        self.log = log
        self.keys: dict[str, SigningKey] = make_keys(("RS256", "ES256"))
        self.key_files = write_public_keys(self.keys, workdir / "keys")
        self.tokens = {alg: mint(key, 0) for alg, key in self.keys.items()}
        self._offset = 1_000_000
        self.haproxy_dir = jwtgate_haproxy_dir(workdir)

    def token_file(self, alg: str, count: int, tag: str) -> Path:
        """A file of `count` tokens no agent has seen before it starts. Every scenario
        starts its own agents with empty caches, so a file is minted once and reused."""
        path = self.workdir / f"tokens-{alg}-{tag}-{count}.txt"
        if not path.exists():
            self.log(f"    minting {count} {alg} tokens ({tag})")
            tokens = mint_many(self.keys[alg], count, start=self._offset)
            self._offset += count
            path.write_text("\n".join(tokens) + "\n")
        return path

    @contextlib.contextmanager
    def target(self, scenario: Scenario) -> Iterator[Target]:
        port = free_port()
        env = dict(os.environ)
        env["BENCH_LISTEN"] = f"127.0.0.1:{port}"
        url = f"http://127.0.0.1:{port}"
        if scenario.kind in ("noauth", "native"):
            template = "noauth.cfg" if scenario.kind == "noauth" else "native-jwt.cfg"
            env.update(
                BENCH_ALG=scenario.alg,
                BENCH_PUBKEY=str(self.key_files.path(scenario.alg)),
                BENCH_ISSUER=ISSUER,
                BENCH_AUDIENCE=AUDIENCE,
            )
            config = bench_config(template, self.workdir)
            with run_haproxy(config, env, self.workdir, f"haproxy-{scenario.kind}") as haproxy:
                wait_for_port(port, timeout=10, process=haproxy)
                yield Target(url, haproxy.pid, ())
        elif scenario.kind in ("ackmin", "ackonly"):
            agent_port = free_port()
            minimal = ["--minimal"] if scenario.kind == "ackmin" else []
            agent = ManagedProcess(
                "ack-agent",
                [sys.executable, "-m", "bench.ack_agent", "--port", str(agent_port), *minimal],
                log_path=self.workdir / "ack-agent.log",
                cwd=BENCH_DIR.parent,
            ).start()
            try:
                wait_for_port(agent_port, timeout=10, process=agent)
                env.update(
                    JWTGATE_LISTEN=f"127.0.0.1:{port}",
                    JWTGATE_STATS_LISTEN=f"127.0.0.1:{free_port()}",
                    JWTGATE_SPOE_CONF=str(self.haproxy_dir / "spoe-jwt.conf"),
                    JWTGATE_AGENT1=f"127.0.0.1:{agent_port}",
                    JWTGATE_AGENT2=f"127.0.0.1:{agent_port}",
                )
                config = self.haproxy_dir / "haproxy.cfg"
                with run_haproxy(config, env, self.workdir, f"haproxy-{scenario.kind}") as haproxy:
                    wait_for_port(port, timeout=10, process=haproxy)
                    yield Target(url, haproxy.pid, (agent.pid,))
            finally:
                agent.stop()
        else:
            os.environ["JWTGATE_HAPROXY_DIR"] = str(self.haproxy_dir)
            # The shipped default: no /shadow rules (Stack turns them on for the demo).
            haproxy_env = {"JWTGATE_SHADOW": "0"}
            if scenario.max_waiting_frames is not None:
                haproxy_env["JWTGATE_MAX_WAITING_FRAMES"] = str(scenario.max_waiting_frames)
            options = StackOptions(
                agent_config=agent_config(self.key_files),
                agents=scenario.agents,
                workers=scenario.workers,
                backends=1,
                haproxy_env=haproxy_env,
                workdir=self.workdir / f"stack-{scenario.alg}-{scenario.agents}x{scenario.workers}",
            )
            options.workdir.mkdir(exist_ok=True)  # type: ignore[union-attr]
            with Stack(options) as stack:
                assert stack.haproxy is not None
                pin_haproxy(stack.haproxy.pid)
                agent_pids = tuple(agent.process.pid for agent in stack.agents)
                yield Target(stack.url, stack.haproxy.pid, agent_pids)

    def run(self, scenario: Scenario, rate_guess: float, *, paced: bool = True) -> ScenarioResult:
        token = None if scenario.kind in ("noauth",) else self.tokens[scenario.alg]
        token_file = paced_file = None
        supply = 0
        cycle = scenario.pool > 0
        if cycle:
            token_file = paced_file = self.token_file(scenario.alg, scenario.pool, "pool")
        if scenario.unique:
            supply = int(rate_guess * self.seconds * 1.3) + 200
            token_file = self.token_file(scenario.alg, supply, "closed")
            if paced:
                paced_file = self.token_file(scenario.alg, supply // 2, "paced")
        with self.target(scenario) as target:
            wait_accepting(target.url, token if token else None)
            # A short warm-up: connections up, caches filled for the hit scenarios (a
            # pool goes round at least twice: its tokens verified, then remembered).
            warm_up = max(1.0, scenario.pool / 2500)
            warm_file = token_file if cycle else None  # never spend unique tokens here
            run_wrk(target.url, warm_up, token=token, token_file=warm_file, cycle=cycle)
            wrk_token = None if scenario.unique or cycle else token
            saturated = measured(
                target.url,
                self.seconds,
                target.haproxy_pid,
                target.agent_pids,
                token=wrk_token,
                token_file=token_file,
                cycle=cycle,
            )
            if scenario.unique and saturated.requests + WRK_CONNECTIONS >= supply:
                # wrk stopped sending when the tokens ran out: the rate is a lower bound.
                saturated.tokens_ran_out = True
                self.log(f"    WARNING: all {supply} tokens were used; raise RATE_GUESS")
            rate = max(saturated.rps / 2, 100.0)
            if not paced:
                return ScenarioResult(scenario, saturated, WrkRun(), 0.0)
            connections = max(1, round(rate * PACED_DELAY_MS / 1000))
            paced_run = measured(
                target.url,
                self.seconds,
                target.haproxy_pid,
                target.agent_pids,
                token=wrk_token,
                token_file=paced_file,
                delay_ms=PACED_DELAY_MS,
                connections=connections,
                cycle=cycle,
            )
        return ScenarioResult(scenario, saturated, paced_run, rate)


# Rough upper bounds of the unique-token rates by (alg, agent processes), to size the
# supply (RS256 signing costs 0.25-1 ms per token). Too small a supply ends the run early
# and its rate is then too low (the log warns): on a faster host, raise these. They were
# raised on 29 Nov, when 2 workers ran out at 13 017 requests/s.
RATE_GUESS = {
    ("RS256", 1): 14000.0,
    ("ES256", 1): 10000.0,
    ("RS256", 2): 18000.0,
    ("ES256", 2): 14000.0,
}


def rate_guess(scenario: Scenario) -> float:
    return RATE_GUESS.get((scenario.alg, scenario.workers * scenario.agents), 9000.0)


def _require_wrk() -> None:
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed (apt-get install wrk)")


def run_all(
    seconds: float,
    log: Callable[[str], None] = print,
    scenarios: tuple[Scenario, ...] = SCENARIOS,
    max_supply_rate: float | None = None,
) -> list[ScenarioResult]:
    _require_wrk()
    results = []
    with tempfile.TemporaryDirectory(prefix="jwtgate-e2e-") as tmp:
        bench = Bench(Path(tmp), seconds, log)
        for index, scenario in enumerate(scenarios, 1):
            log(f"  [{index}/{len(scenarios)}] {scenario.name}")
            guess = rate_guess(scenario)
            if max_supply_rate is not None:
                guess = min(guess, max_supply_rate)
            try:
                result = bench.run(scenario, guess)
            except Exception as exc:  # one broken scenario must not lose the others
                log(f"    failed: {exc}")
                result = ScenarioResult(scenario, WrkRun(), WrkRun(), 0.0, error=str(exc)[:300])
            else:
                s, p = result.saturated, result.paced
                log(
                    f"    {s.rps:8.0f} rps  p50 {s.p50_ms:.2f} ms  p99 {s.p99_ms:.2f} ms  "
                    f"HAProxy {s.haproxy_cpu_us:.1f} µs/req  agent {s.agent_cpu_us:.1f} µs/req  "
                    f"wrk {s.wrk_cpu_us:.1f} µs/req  "
                    f"non-2xx {s.non_2xx}  | paced {p.rps:.0f}/s: "
                    f"p50 {p.p50_ms:.2f} ms p99 {p.p99_ms:.2f} ms"
                )
            results.append(result)
    return results


# The headline comparison, run again in interleaved rounds: on a shared machine the speed
# drifts over a 10-minute pass, and scenarios run minutes apart see different machines.
HEADLINE = (NATIVE_RS256, MINIMAL_AGENT, JWTGATE_HITS)
# The full pass also puts the unique-token targets back to back with their native
# baselines; each native run comes right after its jwtgate run, with no minting between.
ROUNDS_FULL = (
    JWTGATE_ES256_UNIQUE,
    JWTGATE_ES256_UNIQUE_2_WORKERS,
    NATIVE_ES256,
    JWTGATE_RS256_UNIQUE,
    NATIVE_RS256,
    MINIMAL_AGENT,
    JWTGATE_HITS,
)
# (name of the ratio, numerator, denominator) for the rounds table.
ROUND_RATIOS = (
    ("hits vs native RS256", JWTGATE_HITS, NATIVE_RS256),
    ("hits vs minimal", JWTGATE_HITS, MINIMAL_AGENT),
    ("unique RS256 vs native RS256", JWTGATE_RS256_UNIQUE, NATIVE_RS256),
    ("unique ES256 vs native ES256", JWTGATE_ES256_UNIQUE, NATIVE_ES256),
    ("unique ES256, 2 workers, vs native ES256", JWTGATE_ES256_UNIQUE_2_WORKERS, NATIVE_ES256),
)


def run_rounds(
    seconds: float,
    rounds: int,
    log: Callable[[str], None] = print,
    scenarios: tuple[Scenario, ...] = HEADLINE,
) -> list[dict[str, float]]:
    """Saturated rps of each scenario per round, the scenarios back to back."""
    _require_wrk()
    results = []
    with tempfile.TemporaryDirectory(prefix="jwtgate-rounds-") as tmp:
        bench = Bench(Path(tmp), seconds, log)
        for index in range(rounds):
            row: dict[str, float] = {}
            for scenario in scenarios:
                row[scenario.name] = bench.run(
                    scenario, rate_guess(scenario), paced=False
                ).saturated.rps
            log(f"  round {index + 1}/{rounds}: " + ", ".join(f"{v:.0f}" for v in row.values()))
            results.append(row)
    return results


def as_dict(result: ScenarioResult) -> dict[str, Any]:
    return asdict(result)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run the end-to-end scenarios through HAProxy 2.6 and print each result "
        "(scripts/bench runs them all, with the tables)."
    )
    parser.add_argument(
        "--seconds", type=_whole_seconds, default=5, help="per saturated run (whole seconds)"
    )
    parser.add_argument(
        "--scenario",
        action="append",
        metavar="TEXT",
        help="only the scenarios whose name holds TEXT (repeatable; default: all)",
    )
    args = parser.parse_args(argv)
    chosen = tuple(
        s for s in SCENARIOS if not args.scenario or any(t in s.name for t in args.scenario)
    )
    if not chosen:
        names = ", ".join(s.name for s in SCENARIOS)
        parser.error(
            "no scenario name holds " + " or ".join(map(repr, args.scenario)) + f"; names: {names}"
        )
    results = run_all(args.seconds, scenarios=chosen)
    for item in results:
        print(as_dict(item))
    return 1 if any(item.error for item in results) else 0


def _whole_seconds(text: str) -> int:
    """wrk takes a duration in whole seconds."""
    try:
        seconds = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of seconds: {text!r}") from None
    if seconds < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return seconds


if __name__ == "__main__":
    run_main(main)
