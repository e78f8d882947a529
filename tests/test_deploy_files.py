"""Keep docs/deploy/ true to the code.

- Every metric, label and label value the Grafana dashboard and the Prometheus alert rules
  use is one that `spoa.metrics.Metrics` really exports (rendered with prometheus_client).
- The dashboard is JSON with the panels operators need; the alert file keeps to a YAML
  subset checked here line by line (no YAML library is a dependency).
- The systemd unit has its hardening keys, runs `jwtgate run --config`, passes
  `systemd-analyze verify`, and its two riskiest promises hold: the real agent (two workers,
  RS256/ES256/EdDSA, a JWKS URL, reload, drain) runs under the unit's system-call allow-list
  and under MemoryDenyWriteExecute (the kernel's MDWE), killed on any other call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from spoa.cli import build_parser, cmd_run
from spoa.config import AgentSettings, parse_duration
from spoa.devkit.issuer import LocalIssuer
from spoa.devkit.keys import generate_signing_key, jwks_document
from spoa.devkit.stack import free_port, wait_for_port
from spoa.devkit.tokens import forge_signature, mint_token
from spoa.metrics import JWKS_FETCH_RESULTS, OUTCOMES, RELOAD_RESULTS, Metrics
from spoa.protocol import (
    FrameType,
    Message,
    SetVar,
    build_frame,
    decode_actions,
    encode_kv_list,
    encode_messages,
    parse_header,
)
from spoa.verifier import Reason

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "docs" / "deploy"
DASHBOARD = DEPLOY / "grafana-dashboard.json"
ALERTS = DEPLOY / "prometheus-alerts.yml"
UNIT = DEPLOY / "jwtgate.service"

# Labels Prometheus adds at scrape time, not the agent.
SCRAPE_LABELS = frozenset({"job", "instance"})
METRIC_NAME = re.compile(r"\b(jwtgate_[a-z0-9_]+)\b")
SELECTOR = re.compile(r"\b(jwtgate_[a-z0-9_]+)\{([^}]*)\}")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')


# --- what the agent exports --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Exported:
    """Sample names, and per sample name the label names and values seen."""

    names: frozenset[str]
    labels: dict[str, dict[str, set[str]]]


@pytest.fixture(scope="module")
def exported() -> Exported:
    """Drive every recording method of a real Metrics, then read its exposition."""
    metrics = Metrics(
        issuers=["corp"], policies=["default"], reasons=[r.value for r in Reason], clock=time.time
    )
    for outcome in sorted(OUTCOMES):
        for reason in Reason:
            metrics.record_verdict(outcome, reason.value, "corp", "default", 1e-4, cache_hit=True)
    metrics.record_verdict("reject", "malformed", None, "default", 2e-3, cache_hit=False)
    metrics.cache_stats(entries=3, hits=5, misses=2, evictions=1)
    metrics.connection_opened()
    metrics.frame_received("haproxy-hello")
    metrics.frame_received("notify")
    metrics.inflight_changed(1)
    metrics.protocol_error(4)
    metrics.connection_closed(4)
    for result in sorted(JWKS_FETCH_RESULTS):
        metrics.jwks_fetch("corp", result)
    metrics.jwks_keys("corp", 2, time.time() - 30)
    metrics.issuer_ready("corp", True)
    metrics.jwks_max_stale("corp", 86400.0)
    for result in sorted(RELOAD_RESULTS):
        metrics.config_reload(result)

    names: set[str] = set()
    labels: dict[str, dict[str, set[str]]] = {}
    sample = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? ")
    pair = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line.startswith("#") or not line:
            continue
        match = sample.match(line)
        assert match, line
        name = match.group(1)
        names.add(name)
        seen = labels.setdefault(name, {})
        for label, value in pair.findall(match.group(2) or ""):
            seen.setdefault(label, set()).add(value)
    return Exported(frozenset(names), labels)


def test_the_exposition_has_what_the_deploy_files_are_built_on(exported: Exported) -> None:
    # Guards the fixture itself: were these missing, the checks below would prove little.
    for name in (
        "jwtgate_verdicts_total",
        "jwtgate_verify_duration_seconds_bucket",
        "jwtgate_jwks_age_seconds",
        "jwtgate_spop_protocol_errors_total",
    ):
        assert name in exported.names
    assert exported.labels["jwtgate_verdicts_total"]["outcome"] == set(OUTCOMES)


# --- PromQL checks shared by the dashboard and the alerts ---------------------------------


def check_promql(expr: str, exported: Exported, where: str) -> set[str]:
    """Check one expression against the exposition; return the metric names it uses."""
    pairs = {"(": ")", "[": "]", "{": "}"}
    stack: list[str] = []
    for char in re.sub(r'"[^"]*"', '""', expr):
        if char in pairs:
            stack.append(pairs[char])
        elif char in pairs.values():
            closing = stack.pop() if stack else None
            assert closing == char, f"{where}: unbalanced brackets in {expr!r}"
    assert not stack, f"{where}: unbalanced brackets in {expr!r}"

    used = set(METRIC_NAME.findall(expr))
    for name in used:
        assert name in exported.names, f"{where}: {name} is not exported by spoa.metrics"
    for name, body in SELECTOR.findall(expr):
        for label, op, value in MATCHER.findall(body):
            if label in SCRAPE_LABELS:
                continue
            known = exported.labels.get(name, {})
            assert label in known, f"{where}: {name} has no label {label!r}"
            if "$" in value:
                continue
            values = value.split("|") if op in ("=~", "!~") else [value]
            for item in values:
                assert re.fullmatch(r"[\w.]+", item), f"{where}: regex too clever: {value!r}"
                assert item in known[label], f"{where}: {name}{{{label}}} never has {item!r}"
    for call in re.finditer(r"histogram_quantile\(", expr):
        inner = expr[call.end() :]
        assert re.match(r"\s*0?\.\d+\s*,", inner), f"{where}: quantile must be in (0, 1)"
        head = inner[: inner.find("))") + 2]
        assert "_bucket" in head, f"{where}: histogram_quantile needs a _bucket series"
        assert re.search(r"by \([^)]*\ble\b", head), f"{where}: histogram_quantile needs le"
    return used


# --- the Grafana dashboard -----------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return document


def graph_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p.get("type") != "row"]


def test_dashboard_is_a_grafana_dashboard_with_panels(dashboard: dict[str, Any]) -> None:
    assert dashboard["title"] == "jwtgate"
    assert dashboard["uid"]
    panels = graph_panels(dashboard)
    assert len(panels) >= 15
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["expr"].strip()
            assert target["refId"]


def test_every_dashboard_query_uses_exported_metrics(
    dashboard: dict[str, Any], exported: Exported
) -> None:
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    used: set[str] = set()
    for panel in graph_panels(dashboard):
        for target in panel["targets"]:
            expr = target["expr"]
            used |= check_promql(expr, exported, f"panel {panel['title']!r}")
            for variable in re.findall(r"\$(\w+)", expr):
                assert variable in variables or variable.startswith("__"), variable
    for variable in dashboard["templating"]["list"]:
        query = variable.get("definition", "")
        used |= check_promql(query, exported, f"variable {variable['name']}")
    assert used >= {
        "jwtgate_verdicts_total",
        "jwtgate_verify_duration_seconds_bucket",
        "jwtgate_token_cache_hits_total",
        "jwtgate_token_cache_misses_total",
        "jwtgate_spop_connections_open",
        "jwtgate_spop_inflight_frames",
        "jwtgate_spop_protocol_errors_total",
        "jwtgate_jwks_fetches_total",
        "jwtgate_jwks_keys",
        "jwtgate_jwks_age_seconds",
        "jwtgate_issuer_ready",
    }


def test_dashboard_shows_what_operators_asked_for(dashboard: dict[str, Any]) -> None:
    exprs = [t["expr"] for p in graph_panels(dashboard) for t in p["targets"]]

    def some(pattern: str) -> bool:
        return any(re.search(pattern, e) for e in exprs)

    assert some(r"sum by \(outcome\) \(rate\(jwtgate_verdicts_total")
    assert some(r"sum by \(reason\) \(rate\(jwtgate_verdicts_total")
    assert some(r"sum by \(reason, issuer, policy\) \(rate\(jwtgate_verdicts_total\{outcome!=")
    for quantile in ("0.5", "0.99"):
        assert some(
            rf"histogram_quantile\({quantile}, sum by \(le, cache\) "
            r"\(rate\(jwtgate_verify_duration_seconds_bucket"
        )
    assert some(r"jwtgate_token_cache_hits_total.*/.*jwtgate_token_cache_misses_total")
    assert some(r"jwtgate_jwks_age_seconds")
    assert some(r"vector\(\$max_stale\)")


# --- the Prometheus alert rules --------------------------------------------------------------


class YamlSubsetError(ValueError):
    pass


def parse_yaml_subset(text: str) -> Any:
    """Mappings, lists of mappings, double-quoted or plain scalars and `|` block scalars.

    Anything else (flow style, anchors, tags, tabs, single quotes) is refused, so a file
    that passes here means the same to this parser as to Prometheus's YAML parser.
    """
    lines: list[tuple[int, str, int]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        if "\t" in raw:
            raise YamlSubsetError(f"line {number}: tab")
        if raw.strip() and not raw.lstrip().startswith("#"):
            lines.append((len(raw) - len(raw.lstrip(" ")), raw.strip(), number))
    raw_lines = text.splitlines()
    value, end = _block(lines, raw_lines, 0, lines[0][0] if lines else 0)
    if end != len(lines):
        raise YamlSubsetError(f"line {lines[end][2]}: unexpected indentation")
    return value


def _scalar(text: str, number: int) -> Any:
    if text.startswith('"'):
        if not text.endswith('"') or len(text) < 2:
            raise YamlSubsetError(f"line {number}: unterminated string")
        return json.loads(text)
    if not re.fullmatch(r"[A-Za-z0-9_./-]+", text):
        raise YamlSubsetError(f"line {number}: quote this value: {text!r}")
    return text


def _block(
    lines: list[tuple[int, str, int]], raw: list[str], index: int, indent: int
) -> tuple[Any, int]:
    is_list = lines[index][1].startswith("- ")
    result: Any = [] if is_list else {}
    while index < len(lines):
        column, content, number = lines[index]
        if column < indent:
            break
        if column > indent:
            raise YamlSubsetError(f"line {number}: unexpected indentation")
        if is_list:
            if not content.startswith("- "):
                raise YamlSubsetError(f"line {number}: expected a list item")
            # "- key: value" opens a mapping whose keys sit two columns further in.
            lines[index] = (column + 2, content[2:], number)
            item, index = _block(lines, raw, index, column + 2)
            result.append(item)
            continue
        match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*):(?: (.*))?", content)
        if match is None:
            raise YamlSubsetError(f"line {number}: expected `key: value`")
        key, rest = match.group(1), match.group(2)
        if key in result:
            raise YamlSubsetError(f"line {number}: duplicate key {key}")
        if rest == "|":
            body: list[str] = []
            index += 1
            while index < len(lines) and lines[index][0] > column:
                body.append(raw[lines[index][2] - 1])
                index += 1
            if not body:
                raise YamlSubsetError(f"line {number}: empty block scalar")
            cut = min(len(b) - len(b.lstrip(" ")) for b in body)
            result[key] = "\n".join(b[cut:] for b in body) + "\n"
        elif rest is None:
            if index + 1 >= len(lines) or lines[index + 1][0] <= column:
                raise YamlSubsetError(f"line {number}: {key} has no value")
            result[key], index = _block(lines, raw, index + 1, lines[index + 1][0])
        else:
            result[key] = _scalar(rest, number)
            index += 1
    return result, index


def test_yaml_subset_parser_refuses_what_it_does_not_understand() -> None:
    assert parse_yaml_subset('a:\n  - b: "x"\n    c: |\n      l1\n      l2\n') == {
        "a": [{"b": "x", "c": "l1\nl2\n"}]
    }
    for bad in ("a: {b: 1}\n", "a: &x 1\n", "a: 'x'\n", "a:\n\tb: 1\n", "a: 1\na: 2\n"):
        with pytest.raises(YamlSubsetError):
            parse_yaml_subset(bad)


@pytest.fixture(scope="module")
def alert_rules() -> list[dict[str, Any]]:
    document = parse_yaml_subset(ALERTS.read_text())
    assert set(document) == {"groups"}
    rules: list[dict[str, Any]] = []
    for group in document["groups"]:
        assert set(group) == {"name", "rules"}
        rules.extend(group["rules"])
    return rules


def test_alert_rules_have_the_prometheus_rule_shape(alert_rules: list[dict[str, Any]]) -> None:
    names = [rule["alert"] for rule in alert_rules]
    assert len(names) == len(set(names))
    for rule in alert_rules:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert re.fullmatch(r"Jwtgate[A-Z][A-Za-z]+", rule["alert"])
        assert re.fullmatch(r"\d+[smh]", rule["for"])
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert set(rule["annotations"]) == {"summary", "description"}
        for text in rule["annotations"].values():
            for template in re.findall(r"\{\{(.*?)\}\}", text):
                assert re.fullmatch(
                    r" \$labels\.\w+ | \$value( \| humanize(Duration|Percentage))? ", template
                ), template


def test_alert_expressions_use_exported_metrics(
    alert_rules: list[dict[str, Any]], exported: Exported
) -> None:
    for rule in alert_rules:
        check_promql(rule["expr"], exported, rule["alert"])


def test_alerts_cover_rejections_stale_keys_fetch_errors_down_and_protocol_errors(
    alert_rules: list[dict[str, Any]],
) -> None:
    exprs = {rule["alert"]: " ".join(rule["expr"].split()) for rule in alert_rules}

    def find(*patterns: str) -> bool:
        return any(all(re.search(p, e) for p in patterns) for e in exprs.values())

    assert find(r'outcome="reject"\}\[5m\]\)\) / sum by \(job\) \(rate\(jwtgate_verdicts_total')
    assert find(r'outcome="reject"', r"offset")  # sudden increase against the past
    assert find(r"jwtgate_jwks_age_seconds")
    assert find(r"jwtgate_issuer_ready\) == 0")
    assert find(r'jwtgate_jwks_fetches_total\{result!="ok"\}')
    assert find(r'^up\{job="jwtgate"\} == 0$')
    assert find(r"jwtgate_spop_protocol_errors_total")
    # The key-age thresholds are fractions of each issuer's own max_stale.
    fractions = [
        float(m)
        for e in exprs.values()
        for m in re.findall(
            r"jwtgate_jwks_age_seconds / jwtgate_jwks_max_stale_seconds\) > ([0-9.]+)", e
        )
    ]
    assert sorted(fractions) == [0.5, 0.8]


# --- the systemd unit ------------------------------------------------------------------------


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections to keys to every value given (systemd allows a key to repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert current is not None, line
        key, sep, value = line.partition("=")
        assert sep, line
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT.read_text())


def test_unit_has_the_required_hardening(unit: dict[str, dict[str, list[str]]]) -> None:
    service = unit["Service"]

    def one(key: str) -> str:
        assert len(service.get(key, [])) == 1, f"{key} must be set once"
        return service[key][0]

    for key in (
        "DynamicUser",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "NoNewPrivileges",
        "MemoryDenyWriteExecute",
    ):
        assert one(key) == "yes", key
    assert one("ProtectSystem") == "strict"
    assert one("CapabilityBoundingSet") == ""
    assert set(one("RestrictAddressFamilies").split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert service["SystemCallFilter"][0] == "@system-service"
    assert "/etc/jwtgate" in one("ReadOnlyPaths").split()
    assert one("RuntimeDirectory") == "jwtgate"
    assert one("ExecReload").split() == ["/bin/kill", "-HUP", "$MAINPID"]
    assert one("Restart") == "on-failure"
    assert one("KillSignal") == "SIGTERM"
    # SIGTERM drains for shutdown_grace; systemd must not SIGKILL before that is over.
    assert parse_duration(one("TimeoutStopSec")) > AgentSettings().shutdown_grace + 5


def test_unit_runs_jwtgate_run_with_a_config_under_etc_jwtgate(
    unit: dict[str, dict[str, list[str]]],
) -> None:
    (exec_start,) = unit["Service"]["ExecStart"]
    argv = exec_start.split()
    assert argv[0].startswith("/")
    assert argv[0].endswith("/jwtgate")
    assert argv[1:3] == ["run", "--config"]
    # The real CLI accepts the line and would run the agent with it.
    args = build_parser().parse_args(argv[1:])
    assert args.handler is cmd_run
    assert args.config == "/etc/jwtgate/jwtgate.toml"
    assert args.config.startswith(unit["Service"]["ReadOnlyPaths"][0].split()[0] + "/")


def installed_unit(directory: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's jwtgate, so verify can run it."""
    jwtgate = Path(sys.executable).parent / "jwtgate"
    if not jwtgate.exists():
        pytest.skip(f"{jwtgate} is not installed")
    text = UNIT.read_text()
    exec_line = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    target = directory / UNIT.name
    target.write_text(
        text.replace(exec_line, exec_line.replace(exec_line.split()[0][10:], str(jwtgate)))
    )
    return target


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", str(installed_unit(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "jwtgate.service" not in result.stderr, result.stderr


# --- the agent under the unit's sandbox --------------------------------------------------------

# Runs in a fresh interpreter: install NO_NEW_PRIVS, MDWE and a seccomp allow-list that
# kills the process on any other system call, then exec the agent. Both are inherited by
# the supervisor's workers.
_SANDBOX = r"""
import ctypes, json, os, sys
allowed, argv = json.loads(sys.argv[1]), sys.argv[2:]
seccomp = ctypes.CDLL(os.environ["SANDBOX_LIBSECCOMP"])
seccomp.seccomp_init.restype = ctypes.c_void_p
seccomp.seccomp_init.argtypes = [ctypes.c_uint32]
seccomp.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
seccomp.seccomp_load.argtypes = [ctypes.c_void_p]
seccomp.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
KILL_PROCESS, ALLOW = 0x80000000, 0x7FFF0000
filter = seccomp.seccomp_init(KILL_PROCESS)
for name in allowed:
    number = seccomp.seccomp_syscall_resolve_name(name.encode())
    if number >= 0:
        assert seccomp.seccomp_rule_add(filter, ALLOW, number, 0) == 0, name
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
assert libc.prctl(65, 1, 0, 0, 0) == 0  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
assert seccomp.seccomp_load(filter) == 0
os.execv(argv[0], argv)
"""


def syscall_set(group: str, seen: set[str] | None = None) -> set[str]:
    """A systemd syscall group, expanded the way systemd-analyze lists it."""
    seen = set() if seen is None else seen
    seen.add(group)
    listing = subprocess.run(
        ["systemd-analyze", "syscall-filter", group],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    names: set[str] = set()
    for line in listing.splitlines()[1:]:
        item = line.strip()
        if item.startswith("@") and item not in seen:
            names |= syscall_set(item, seen)
        elif item and not item.startswith(("#", "@")):
            names.add(item)
    return names


def unit_syscall_allow_list(unit: dict[str, dict[str, list[str]]]) -> set[str]:
    allowed: set[str] = set()
    denied: set[str] = set()
    for value in unit["Service"]["SystemCallFilter"]:
        target, groups = (denied, value[1:]) if value.startswith("~") else (allowed, value)
        for group in groups.split():
            target |= syscall_set(group) if group.startswith("@") else {group}
    return allowed - denied


def sandbox_available() -> str | None:
    """Why the sandbox cannot be built here, or None when it can."""
    if shutil.which("systemd-analyze") is None:
        return "systemd-analyze is not installed"
    if ctypes.util.find_library("seccomp") is None:
        return "libseccomp is not installed"
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import ctypes,sys; sys.exit(ctypes.CDLL(None).prctl(65, 1, 0, 0, 0) != 0)",
        ],
        check=False,
        timeout=30,
    )
    if probe.returncode != 0:
        return "the kernel has no PR_SET_MDWE (Linux 6.3+)"
    return None


class SpopClient:
    """HAProxy's side of SPOP, just enough for check-jwt over one connection."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        hello = encode_kv_list(
            (
                ("supported-versions", "2.0"),
                ("max-frame-size", 16380),
                ("capabilities", "pipelining"),
                ("engine-id", "deploy-test"),
            )
        )
        self.sock.sendall(build_frame(FrameType.HAPROXY_HELLO, 0, 0, hello))
        kind, _ = self._frame()
        assert kind == FrameType.AGENT_HELLO
        self.stream = 0

    def _frame(self) -> tuple[int, bytes]:
        length = int.from_bytes(self._exactly(4), "big")
        body = self._exactly(length)
        header, offset = parse_header(body, 0, len(body))
        return header.type, body[offset:]

    def _exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            assert chunk, "agent closed the connection"
            data += chunk
        return data

    def check(self, token: str) -> dict[str, object]:
        self.stream += 1
        message = Message(
            "check-jwt",
            (("authorization", f"Bearer {token}"), ("method", "GET"), ("path", "/")),
        )
        frame = build_frame(FrameType.NOTIFY, self.stream, 1, encode_messages([message]))
        self.sock.sendall(frame)
        kind, payload = self._frame()
        assert kind == FrameType.ACK
        return {
            a.name: a.value
            for a in decode_actions(payload, 0, len(payload))
            if isinstance(a, SetVar)
        }

    def close(self) -> None:
        self.sock.close()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text: str = reply.read().decode()
        return text


def wait_ready(port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"agent exited with {process.returncode}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError("agent not ready in time")


def counter_value(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{"):
            body = line[len(name) + 1 : line.index("}")]
            if ",".join(sorted(body.split(","))) == want:
                total += float(line.rsplit(" ", 1)[1])
    return total


@dataclass
class SandboxedAgent:
    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    tokens: dict[str, str]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def sandboxed_agent(
    tmp_path: Path, unit: dict[str, dict[str, list[str]]]
) -> Iterator[SandboxedAgent]:
    reason = sandbox_available()
    if reason is not None:
        pytest.skip(reason)
    allowed = sorted(unit_syscall_allow_list(unit))
    assert "execve" in allowed
    assert "mount" not in allowed  # @privileged is denied
    assert "setrlimit" not in allowed  # @resources is denied

    es_key, ed_key = generate_signing_key("ES256"), generate_signing_key("EdDSA")
    with LocalIssuer(alg="RS256") as issuer:
        (tmp_path / "es.json").write_text(json.dumps(jwks_document([es_key])))
        (tmp_path / "ed.json").write_text(json.dumps(jwks_document([ed_key])))
        port, metrics_port = free_port(), free_port()
        config = tmp_path / "jwtgate.toml"
        config.write_text(
            f'[agent]\nlisten = "127.0.0.1:{port}"\nworkers = 2\nshutdown_grace = "2s"\n'
            f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
            f'[[issuers]]\nname = "rs"\nissuer = "{issuer.issuer}"\naudiences = ["api"]\n'
            f'algorithms = ["RS256"]\njwks_uri = "{issuer.jwks_url}"\n'
            '[[issuers]]\nname = "es"\nissuer = "https://es.test/"\naudiences = ["api"]\n'
            'algorithms = ["ES256"]\njwks_file = "es.json"\n'
            '[[issuers]]\nname = "ed"\nissuer = "https://ed.test/"\naudiences = ["api"]\n'
            'algorithms = ["EdDSA"]\njwks_file = "ed.json"\n'
            '[policies.default]\nissuers = ["rs", "es", "ed"]\n'
        )
        tokens = {
            "rs": issuer.mint({"sub": "alice", "aud": "api"}),
            "es": mint_token(es_key, {"iss": "https://es.test/", "sub": "bob", "aud": "api"}),
            "ed": mint_token(ed_key, {"iss": "https://ed.test/", "sub": "carol", "aud": "api"}),
        }
        env = dict(os.environ, SANDBOX_LIBSECCOMP=str(ctypes.util.find_library("seccomp")))
        argv = [sys.executable, "-m", "spoa", "run", "--config", str(config)]
        log_path = tmp_path / "agent.log"
        log_file = log_path.open("wb")
        process = subprocess.Popen(
            [sys.executable, "-c", _SANDBOX, json.dumps(allowed), *argv],
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
        try:
            wait_ready(metrics_port, process, timeout=60)
            wait_for_port(port, timeout=10)
            yield SandboxedAgent(process, port, metrics_port, tokens, log_path)
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            log_file.close()


@pytest.mark.timeout(120)
def test_agent_runs_under_the_units_syscall_filter_and_mdwe(
    sandboxed_agent: SandboxedAgent,
) -> None:
    agent = sandboxed_agent
    process, port, metrics_port, tokens = (
        agent.process,
        agent.port,
        agent.metrics_port,
        agent.tokens,
    )
    client = SpopClient(port)
    try:
        for token in tokens.values():
            answer = client.check(token)
            assert answer["valid"] is True, answer
            assert answer["status"] == 200
        rejected = client.check(forge_signature(tokens["es"]))
        assert rejected["valid"] is False
        assert rejected["reason"] == "bad_signature"
    finally:
        client.close()

    # Several workers flush their per-request counts to the shared files every second.
    def accepted(issuer: str) -> float:
        return counter_value(
            scrape(metrics_port),
            "jwtgate_verdicts_total",
            outcome="accept",
            reason="ok",
            issuer=issuer,
            policy="default",
        )

    for issuer in ("rs", "es", "ed"):
        deadline = time.monotonic() + 10
        while accepted(issuer) != 1.0:
            assert time.monotonic() < deadline, f"no accepted verdict counted for {issuer}"
            time.sleep(0.1)

    # Reload (what `systemctl reload` sends) goes through the supervisor to both workers.
    process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while counter_value(scrape(metrics_port), "jwtgate_config_reloads_total", result="ok") < 2:
        assert time.monotonic() < deadline, agent.log()[-3000:]
        assert process.poll() is None
        time.sleep(0.1)

    # Stop (KillSignal=SIGTERM): a clean drain, not a seccomp kill (SIGSYS) on the way out.
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) == 0
    log = agent.log()
    assert '"worker_died"' not in log, log[-3000:]
