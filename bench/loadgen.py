"""A SPOP load generator that talks to a jwtgate agent the way HAProxy 2.6 does.

Each connection sends HAPROXY-HELLO (pipelining), waits for AGENT-HELLO, then keeps
`depth` NOTIFY frames in flight, each carrying the `check-jwt` message of
haproxy/spoe-jwt.conf. Frames are built with the `spoa.protocol` codec. Every ACK is
checked for `txn.jwt.valid = true`, so a broken agent shows up as errors, not speed.

    python -m bench.loadgen --port 12345 --alg RS256 --mix hits --duration 5

or `python -m bench.loadgen --spawn` to start `jwtgate run` itself (pinned to CPU 0,
this client to CPU 1 when there are two).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    agent_config,
    check_jwt_message,
    cpu_seconds,
    haproxy_hello,
    make_keys,
    mint,
    mint_many,
    process_tree,
    write_public_keys,
)
from spoa.devkit.stack import ManagedProcess, free_port, run_main, wait_for_port
from spoa.protocol import FrameType, encode_messages, encode_varint

MIXES = ("hits", "unique", "mix95")
_ACK = FrameType.ACK.value
_AGENT_HELLO = FrameType.AGENT_HELLO.value
_AGENT_DISCONNECT = FrameType.AGENT_DISCONNECT.value
# SET-VAR txn "valid" BOOL true, as encoded in every accepting ACK.
_VALID_TRUE = b"\x01\x03\x02\x05valid\x11"
# NOTIFY, FIN, stream-id 1: every frame of a connection is on one stream, ids counting up.
_NOTIFY_HEAD = bytes((FrameType.NOTIFY.value, 0, 0, 0, 1, 1))


class LoadError(Exception):
    """The agent refused the connection or broke the protocol."""


@dataclass(frozen=True, slots=True)
class LoadResult:
    label: str
    verdicts: int
    rejected: int
    seconds: float
    verdicts_per_second: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    connections: int
    depth: int
    unique_tokens: int
    agent_cpu_us_per_verdict: float = float("nan")
    agent_cpu_share: float = float("nan")  # of one core, over the timed part


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


class TokenSource:
    """Hands out tokens by mix: `hits` repeats one token, `unique` never repeats (the run
    ends when the supply does), `mix95` is 95% one hot token and 5% fresh ones."""

    def __init__(self, mix: str, hot: str, fresh: Sequence[str], seed: int = 6) -> None:
        if mix not in MIXES:
            raise ValueError(f"unknown mix {mix!r}")
        self.mix = mix
        self._hot = hot
        self._fresh: Iterator[str] = iter(fresh)
        self._random = random.Random(seed)
        self.exhausted = False
        self.fresh_used = 0

    def next(self) -> str | None:
        if self.mix == "hits" or (self.mix == "mix95" and self._random.random() < 0.95):
            return self._hot
        token = next(self._fresh, None)
        if token is None:
            self.exhausted = True
            return None
        self.fresh_used += 1
        return token


async def _connection(
    host: str,
    port: int,
    source: TokenSource,
    depth: int,
    stop_at: float,
    latencies: list[float],
    counts: list[int],
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(haproxy_hello())
        header = await reader.readexactly(4)
        body = await reader.readexactly(int.from_bytes(header, "big"))
        if body[0] != _AGENT_HELLO:
            raise LoadError(f"expected AGENT-HELLO, got frame type {body[0]}")
        sent_at: dict[int, float] = {}
        clock = time.perf_counter
        frame_ids = iter(range(1, 1 << 62))
        # The message of the last token, encoded once: a repeated token costs this client
        # no re-encoding (HAProxy's own encoding is C), so the agent, not the client, is
        # what saturates. Every new token is encoded in full.
        last_token: str | None = None
        last_message = b""

        def send_more(count: int) -> None:
            nonlocal last_token, last_message
            frames = []
            now = clock()
            for _ in range(count):
                if now >= stop_at:
                    break
                token = source.next()
                if token is None:
                    break
                if token is not last_token:
                    last_token, last_message = token, encode_messages([check_jwt_message(token)])
                frame_id = next(frame_ids)
                sent_at[frame_id] = now
                body = _NOTIFY_HEAD + encode_varint(frame_id) + last_message
                frames.append(len(body).to_bytes(4, "big") + body)
            if frames:
                writer.write(b"".join(frames))  # one write per batch, like HAProxy

        send_more(depth)
        buffer = b""
        while sent_at:
            data = await reader.read(65536)
            if not data:
                raise LoadError("agent closed the connection")
            buffer += data
            received = clock()
            pos, done = 0, 0
            while len(buffer) - pos >= 4:
                end = pos + 4 + int.from_bytes(buffer[pos : pos + 4], "big")
                if end > len(buffer):
                    break
                frame_type = buffer[pos + 4]
                if frame_type == _AGENT_DISCONNECT:
                    raise LoadError("agent sent DISCONNECT")
                if frame_type != _ACK:
                    raise LoadError(f"unexpected frame type {frame_type}")
                # Ids are one-byte varints below 240; decode the general form otherwise.
                frame_id, ids_end = _frame_id(buffer, pos + 9)
                latencies.append(received - sent_at.pop(frame_id))
                if _VALID_TRUE not in buffer[ids_end:end]:
                    counts[1] += 1
                counts[0] += 1
                done += 1
                pos = end
            buffer = buffer[pos:]
            send_more(done)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _frame_id(buf: bytes, pos: int) -> tuple[int, int]:
    """Skip the stream-id varint at `pos`, return (frame-id, offset after it)."""
    for _ in range(2):
        value = buf[pos]
        pos += 1
        if value >= 240:
            shift = 4
            while True:
                byte = buf[pos]
                pos += 1
                value += byte << shift
                shift += 7
                if byte < 128:
                    break
    return value, pos


async def run_load(
    host: str,
    port: int,
    source: TokenSource,
    *,
    label: str,
    connections: int = 8,
    depth: int = 16,
    duration: float = 5.0,
    warmup: float = 0.5,
    agent_pids: Sequence[int] = (),
) -> LoadResult:
    """Drive the agent for `duration` seconds after `warmup`; latencies are from the
    timed part only. With `agent_pids`, the agent's CPU time is measured too."""
    if warmup > 0:
        await asyncio.gather(
            *(
                _connection(host, port, source, depth, time.perf_counter() + warmup, [], [0, 0])
                for _ in range(connections)
            )
        )
    latencies: list[float] = []
    counts = [0, 0]
    cpu_before = cpu_seconds(agent_pids)
    started = time.perf_counter()
    await asyncio.gather(
        *(
            _connection(host, port, source, depth, started + duration, latencies, counts)
            for _ in range(connections)
        )
    )
    seconds = time.perf_counter() - started
    agent_cpu = cpu_seconds(agent_pids) - cpu_before
    latencies.sort()
    return LoadResult(
        label=label,
        verdicts=counts[0],
        rejected=counts[1],
        seconds=seconds,
        verdicts_per_second=counts[0] / seconds if seconds else 0.0,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        p999_ms=percentile(latencies, 0.999) * 1000,
        connections=connections,
        depth=depth,
        unique_tokens=source.fresh_used,
        agent_cpu_us_per_verdict=agent_cpu / counts[0] * 1e6 if counts[0] else float("nan"),
        agent_cpu_share=agent_cpu / seconds if agent_pids and seconds else float("nan"),
    )


# --- an agent under test ----------------------------------------------------------------------


# The CPUs this process may use when it starts, before run_suites moves it to CPU 1: the
# agent it starts then must not inherit CPU 1 (and share it with the client).
_CPUS = frozenset(os.sched_getaffinity(0))


def pin_argv(argv: list[str], cpu: int | None) -> list[str]:
    """Prefix with taskset when the CPU exists; unpinned otherwise."""
    if cpu is None or cpu not in _CPUS:
        return argv
    return ["taskset", "-c", str(cpu), *argv]


class AgentUnderTest:
    """`jwtgate run` with the bench keys on a loopback port; a context manager."""

    def __init__(self, workdir: Path, config_text: str, *, workers: int = 1, cpu: int | None = 0):
        self.workdir = workdir
        self.port = free_port()
        self.metrics_port = free_port()
        config = workdir / f"agent-{self.port}.toml"
        config.write_text(
            f'[agent]\nlisten = "127.0.0.1:{self.port}"\nworkers = {workers}\n'
            f'[metrics]\nlisten = "127.0.0.1:{self.metrics_port}"\n' + config_text
        )
        self.process = ManagedProcess(
            "jwtgate",
            pin_argv([sys.executable, "-m", "spoa", "run", "--config", str(config)], cpu),
            log_path=workdir / f"agent-{self.port}.log",
        )

    def __enter__(self) -> AgentUnderTest:
        self.process.start()
        try:
            wait_for_port(self.port, timeout=30, process=self.process)
        except BaseException:
            self.process.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.process.stop()


# --- command line --------------------------------------------------------------------------------


def _suites(args: argparse.Namespace) -> list[tuple[str, str]]:
    algs = args.alg or ["RS256", "ES256", "EdDSA"]
    mixes = args.mix or list(MIXES)
    return [(alg, mix) for alg in algs for mix in mixes]


def fresh_supply(rate_guess: float, duration: float, warmup: float) -> int:
    return int(rate_guess * (duration + warmup) * 1.2) + 100


# Rough upper bounds of cache-miss rates on one core, to size the pre-minted supply.
MISS_RATE_GUESS = {"RS256": 20000.0, "ES256": 12000.0, "EdDSA": 12000.0}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, help="an agent already running with bench keys")
    parser.add_argument("--spawn", action="store_true", help="start `jwtgate run` here")
    parser.add_argument("--alg", action="append", choices=["RS256", "ES256", "EdDSA"])
    parser.add_argument("--mix", action="append", choices=MIXES)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if not args.spawn:
        parser.error("only --spawn is supported from the command line (the keys are fresh)")
    results = run_suites(
        _suites(args),
        connections=args.connections,
        depth=args.depth,
        duration=args.duration,
        warmup=args.warmup,
    )
    for result in results:
        print(format_result(result))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


def format_result(result: LoadResult) -> str:
    return (
        f"{result.label:<18} {result.verdicts_per_second:>9.0f} verdicts/s  "
        f"p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms  "
        f"p99.9 {result.p999_ms:6.2f} ms  "
        f"agent {result.agent_cpu_us_per_verdict:5.1f} µs CPU/verdict "
        f"({result.agent_cpu_share:.0%} of a core)  rejected {result.rejected}"
    )


def _run_fast(coroutine: Coroutine[Any, Any, LoadResult]) -> LoadResult:
    """Run on uvloop when it is installed: the client should cost as little as it can."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


@contextlib.contextmanager
def client_on_cpu_1() -> Iterator[None]:
    """This process on CPU 1 while it drives the agent (on CPU 0), and back where it was
    after: what it starts later, such as bench/run.py's end-to-end agents, must not
    inherit CPU 1. (Regression: it did, so every full pass from then on ran its agents on
    wrk's core, and two workers shared it.)"""
    before = os.sched_getaffinity(0)
    if 1 in before:
        os.sched_setaffinity(0, {1})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def run_suites(
    suites: Sequence[tuple[str, str]],
    *,
    connections: int = 8,
    depth: int = 16,
    duration: float = 5.0,
    warmup: float = 0.5,
    progress: bool = True,
) -> list[LoadResult]:
    """Start one agent (pinned to CPU 0; this process moves to CPU 1), run each
    (alg, mix) suite against it, and stop it."""
    keys = make_keys(sorted({alg for alg, _ in suites}))
    results = []
    with client_on_cpu_1(), tempfile.TemporaryDirectory(prefix="jwtgate-loadgen-") as tmp:
        workdir = Path(tmp)
        key_files = write_public_keys(keys, workdir)
        with AgentUnderTest(workdir, agent_config(key_files)) as agent:
            offset = 1_000_000
            for alg, mix in suites:
                supply = 0
                if mix != "hits":
                    supply = fresh_supply(MISS_RATE_GUESS[alg], duration, warmup)
                    if mix == "mix95":
                        supply = supply // 4
                if progress:
                    print(f"  loadgen {alg} {mix}: minting {supply} tokens", flush=True)
                fresh = mint_many(keys[alg], supply, start=offset)
                offset += supply
                source = TokenSource(mix, mint(keys[alg], 0), fresh)
                result = _run_fast(
                    run_load(
                        "127.0.0.1",
                        agent.port,
                        source,
                        label=f"{alg} {mix}",
                        connections=connections,
                        depth=depth,
                        duration=duration,
                        warmup=warmup,
                        agent_pids=process_tree(agent.process.pid),
                    )
                )
                if source.exhausted and progress:
                    print("  (token supply ran out: the run ended early)", flush=True)
                if progress:
                    print("  " + format_result(result), flush=True)
                results.append(result)
    return results


if __name__ == "__main__":
    run_main(main)
