"""The benchmark's HAProxy runs where the layout says: one thread, on CPU 0.

Regression: the layout once relied on `cpu-map`, which HAProxy 2.6 ignores in the
foreground (-db) mode the benchmark uses, so HAProxy floated over both cores.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.e2e import bench_config, run_haproxy
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
