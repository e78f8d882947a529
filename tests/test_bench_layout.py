"""The benchmark's HAProxy and the load generator's agent run where the layout says:
one thread of HAProxy on CPU 0; the agent alone on CPU 0 when the client takes CPU 1.

Regression: the layout once relied on `cpu-map`, which HAProxy 2.6 ignores in the
foreground (-db) mode the benchmark uses, so HAProxy floated over both cores.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.common import agent_config, make_keys, write_public_keys
from bench.e2e import bench_config, run_haproxy
from bench.loadgen import AgentUnderTest, run_suites
from spoa.devkit.stack import free_port, wait_for_port


@pytest.mark.skipif(0 not in os.sched_getaffinity(0), reason="CPU 0 is not ours to use")
def test_the_benchmark_pins_haproxy_to_cpu_0(tmp_path: Path) -> None:
    port = free_port()
    config = bench_config("noauth.cfg", tmp_path)
    env = dict(os.environ, BENCH_LISTEN=f"127.0.0.1:{port}")
    with run_haproxy(config, env, tmp_path, "haproxy-layout") as haproxy:
        wait_for_port(port, timeout=10, process=haproxy)
        threads = os.listdir(f"/proc/{haproxy.pid}/task")
        assert len(threads) == 1
        assert os.sched_getaffinity(haproxy.pid) == {0}


@pytest.mark.skipif(not {0, 1} <= os.sched_getaffinity(0), reason="needs CPUs 0 and 1")
def test_the_load_generators_agent_runs_on_cpu_0_after_the_client_moved_to_cpu_1(
    tmp_path: Path,
) -> None:
    """Regression: the client moved itself to CPU 1 first, and the agent it started then
    inherited CPU 1, so both shared one core and the other idled."""
    keys = make_keys(("RS256",))
    config = agent_config(write_public_keys(keys, tmp_path))
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {1})  # what run_suites does before it starts the agent
    try:
        with AgentUnderTest(tmp_path, config) as agent:
            assert os.sched_getaffinity(agent.process.pid) == {0}
    finally:
        os.sched_setaffinity(0, before)


@pytest.mark.skipif(not {0, 1} <= os.sched_getaffinity(0), reason="needs CPUs 0 and 1")
def test_the_load_generator_gives_back_the_cpus_it_found() -> None:
    """Regression: bench/run.py runs the load generator before the end-to-end scenarios,
    and the client stayed on CPU 1 after it, so every agent started later inherited
    wrk's core."""
    before = os.sched_getaffinity(0)
    (result,) = run_suites([("RS256", "hits")], duration=0.3, warmup=0.1, progress=False)
    assert result.verdicts > 0
    assert os.sched_getaffinity(0) == before
