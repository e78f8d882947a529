"""The TOML configuration: every key validated, errors name the key, docs stay true."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from spoa.app import StartupError, build_engine, key_source
from spoa.config import (
    MAX_CONFIG_BYTES,
    AgentSettings,
    CacheSettings,
    ConfigError,
    IssuerSettings,
    LogSettings,
    MetricsSettings,
    PolicySettings,
    load_config,
    parse_config,
    parse_duration,
    read_config,
)

ROOT = Path(__file__).resolve().parents[1]

MINIMAL = """
[[issuers]]
name = "corp"
issuer = "https://id.example.com/"
audiences = ["api"]
algorithms = ["RS256"]
jwks_uri = "https://id.example.com/jwks.json"

[policies.default]
issuers = ["corp"]
"""


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('[agent]\nworkers = "2"\n', 'agent.workers: expected an integer from 1 to 64, got "2"'),
        ('[log]\naccess_log = "false"\n', 'log.access_log: expected true or false, got "false"'),
        ('[log]\nformat = "a\\tb"\n', 'log.format: expected "json" or "console", got "a\\tb"'),
    ],
)
def test_a_string_in_the_wrong_place_is_shown_quoted(line: str, expected: str) -> None:
    """Regression: `workers = "2"` gave "expected an integer ..., got 2", which reads
    as if the 2 were refused."""
    assert expected in problems(line + MINIMAL)


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    return caught.value.problems


def test_minimal_config_gets_safe_defaults() -> None:
    config = parse_config(MINIMAL)
    assert config.agent.listen == "127.0.0.1:12345"
    issuer = config.issuer("corp")
    assert issuer.leeway == 30.0
    assert issuer.require_exp is True
    assert issuer.source_kind == "jwks_uri"
    assert config.policies["default"].report_only is False


def test_one_string_stands_for_an_array_of_one() -> None:
    """As docs/configuration.md says, for every array of strings, not only audiences."""
    text = MINIMAL.replace('["api"]', '"api"').replace('["RS256"]', '"RS256"')
    text = text.replace('issuers = ["corp"]', 'issuers = "corp"\nrequire_scopes = "read"')
    config = parse_config(text)
    issuer = config.issuer("corp")
    assert (issuer.audiences, issuer.algorithms) == (("api",), ("RS256",))
    policy = config.policies["default"]
    assert (policy.issuers, policy.require_scopes) == (("corp",), ("read",))


def test_the_shipped_example_is_valid() -> None:
    config = load_config(ROOT / "haproxy" / "jwtgate.toml")
    assert set(config.policies) == {"default", "admin", "shadow"}


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ("[agent]\nworkers = 0\n", "agent.workers: expected an integer from 1 to 64, got 0"),
        (
            '[agent]\nlisten = "nowhere"\n',
            'agent.listen: expected an address like "127.0.0.1:12345", got "nowhere"',
        ),
        ('[agent]\nhello_timeout = "5x"\n', 'agent.hello_timeout: expected a duration like "30s"'),
        ("[agent]\nlisten_port = 1\n", "agent.listen_port: unknown key"),
        ('[log]\nformat = "xml"\n', 'log.format: expected "json" or "console", got "xml"'),
        ("[cache]\nmax_entries = -1\n", "cache.max_entries: expected an integer from 0"),
        ("[cache]\nreplay_entries = 2e3\n", "cache.replay_entries: expected an integer from 0"),
        ("[bogus]\n", "bogus: unknown key"),
    ],
)
def test_errors_name_the_key_value_and_expectation(snippet: str, expected: str) -> None:
    found = problems(snippet + MINIMAL)
    assert any(expected in problem for problem in found), found


def test_every_problem_is_reported_at_once() -> None:
    found = problems('[agent]\nworkers = 0\n[log]\nlevel = "loud"\n' + MINIMAL)
    assert len(found) == 2


def test_issuer_errors_carry_the_index() -> None:
    text = MINIMAL.replace('algorithms = ["RS256"]', 'algorithms = ["RS256"]\nleeway = "30x"')
    assert problems(text) == [
        'issuers[0].leeway: expected a duration like "30s" (units ms, s, m, h, d) from 0s to 1h,'
        ' got "30x"'
    ]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (('algorithms = ["RS256"]', 'algorithms = ["none"]'), "issuers[0].algorithms"),
        (
            ('algorithms = ["RS256"]', 'algorithms = ["HS256"]'),
            "need an explicitly configured secret",
        ),
        (
            ('algorithms = ["RS256"]', 'algorithms = ["RS1"]'),
            "issuers[0].algorithms: expected one of",
        ),
        (('jwks_uri = "https://id.example.com/jwks.json"', ""), "exactly one of jwks_uri"),
        (
            ('jwks_uri = "https://id.example.com/jwks.json"', 'jwks_uri = "file:///etc/x"'),
            "http:// or https://",
        ),
        (('audiences = ["api"]', ""), "policies.default.audiences: required"),
        (('issuers = ["corp"]', 'issuers = ["other"]'), "unknown issuer 'other'"),
        (('name = "corp"', 'name = "Corp Inc"'), "issuers[0].name"),
    ],
)
def test_unsafe_or_wrong_issuers_are_refused(change: tuple[str, str], expected: str) -> None:
    found = problems(MINIMAL.replace(*change))
    assert any(expected in problem for problem in found), found


@pytest.mark.parametrize("algorithms", ['["none"]', '["RS1"]', '"none"', "[]"])
def test_an_issuer_with_a_problem_is_not_also_unknown_to_its_policies(algorithms: str) -> None:
    """Regression (audit): `algorithms = ["none"]` gave its own problem plus an "unknown
    issuer 'corp'" for each policy naming the issuer, which sent readers looking for a
    typo in the name."""
    found = problems(MINIMAL.replace('algorithms = ["RS256"]', f"algorithms = {algorithms}"))
    assert found
    assert all(problem.startswith("issuers[0].algorithms") for problem in found), found


def test_hmac_needs_a_secret_that_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    text = MINIMAL.replace('algorithms = ["RS256"]', 'algorithms = ["HS256"]').replace(
        'jwks_uri = "https://id.example.com/jwks.json"',
        'keys = [{ secret_env = "JWTGATE_TEST_SECRET", kid = "h1", alg = "HS256" }]',
    )
    # The file names the variable; `run` reads it (check-config runs in another shell).
    monkeypatch.delenv("JWTGATE_TEST_SECRET", raising=False)
    issuer = parse_config(text).issuer("corp")
    assert issuer.keys[0].secret_env == "JWTGATE_TEST_SECRET"
    # Regression (config review): an unset variable was said to be empty.
    with pytest.raises(StartupError, match="JWTGATE_TEST_SECRET holding an HMAC secret is not set"):
        key_source(issuer)
    monkeypatch.setenv("JWTGATE_TEST_SECRET", "")
    with pytest.raises(StartupError, match="JWTGATE_TEST_SECRET holding an HMAC secret is empty"):
        key_source(issuer)
    monkeypatch.delenv("JWTGATE_TEST_SECRET")
    # `run` says which issuer wanted it, as check-config does for files.
    with pytest.raises(StartupError, match=r"^issuers\[0\] \(corp\): the environment variable"):
        asyncio.run(build_engine(parse_config(text), lambda event: None))
    monkeypatch.setenv("JWTGATE_TEST_SECRET", "x" * 32)
    key_source(issuer)
    # Regression: a secret pasted where its variable's name belongs was echoed back.
    pasted = text.replace("JWTGATE_TEST_SECRET", "s3cr3t-v@lue/with+chars")
    found = problems(pasted)
    assert any(p.startswith("issuers[0].keys[0].secret_env: expected the name of") for p in found)
    assert not any("s3cr3t" in p for p in found)


def test_a_key_pinned_to_an_algorithm_the_issuer_refuses_is_an_error() -> None:
    """Regression: an HS256 secret on an ES256-only issuer passed check-config, and every
    token for it was then unsupported_alg."""
    text = MINIMAL.replace('algorithms = ["RS256"]', 'algorithms = ["ES256"]').replace(
        'jwks_uri = "https://id.example.com/jwks.json"',
        'keys = [{ secret_env = "JWTGATE_TEST_SECRET", kid = "h1", alg = "HS256" }]',
    )
    assert any(
        p.startswith("issuers[0].keys[0].alg: HS256 is not in this issuer's algorithms")
        for p in problems(text)
    )


@pytest.mark.parametrize(("pinned", "allowed"), [("Ed25519", "EdDSA"), ("EdDSA", "Ed25519")])
def test_eddsa_names_are_one_signature_for_that_check(
    pinned: str, allowed: str, tmp_path: Path
) -> None:
    """Regression of the check above: it compared names exactly, refusing working configs
    the verifier accepts (EdDSA and the RFC 9864 names are the same signature)."""
    key_file = tmp_path / "ed.pem"
    key_file.write_text("checked when the keys load, not here")
    text = MINIMAL.replace('algorithms = ["RS256"]', f'algorithms = ["{allowed}"]').replace(
        'jwks_uri = "https://id.example.com/jwks.json"',
        f'keys = [{{ file = "{key_file}", alg = "{pinned}" }}]',
    )
    assert parse_config(text).issuer("corp").keys[0].alg == pinned


def test_forward_claims_names_are_checked() -> None:
    text = MINIMAL + 'forward_claims = { valid = "x", "Bad-Name" = "y", ok = "email" }\n'
    found = problems(text)
    assert any("forward_claims.valid: this variable name is set by jwtgate" in p for p in found)
    assert any("forward_claims.Bad-Name: variable names use" in p for p in found)
    long_name = "x" * 60
    found = problems(MINIMAL + f'forward_claims = {{ {long_name} = "email" }}\n')
    assert any("at most 55 characters" in p for p in found)


def test_names_with_a_trailing_newline_are_refused() -> None:
    """Regression: `$` also matched before a final newline, so "email\\n" passed as a
    forward_claims variable; HAProxy cannot take that name, and every accepted request
    whose token held the claim failed with 503."""
    found = problems(MINIMAL + 'forward_claims = { "email\\n" = "email" }\n')
    assert any("variable names use" in p for p in found), found
    text = MINIMAL.replace(
        "[policies.default]", '[policies."abc\\n"]\nissuers = ["corp"]\n\n[policies.default]'
    )
    found = problems(text)
    assert any("policy names use" in p for p in found), found
    found = problems(MINIMAL.replace('name = "corp"', 'name = "corp\\n"'))
    assert any(p.startswith("issuers[0].name") for p in found), found


@pytest.mark.parametrize("scope", ["read write", 'a"b', "a\\b", "caf\u00e9", "a\tb"])
def test_required_scopes_must_be_scope_tokens(scope: str) -> None:
    """A name no token scope could ever match (RFC 6749 section 3.3) is a config error; it
    would also break the `scope="..."` of the 403 challenge."""
    found = problems(MINIMAL + f'require_scopes = ["ok", {json.dumps(scope)}]\n')
    key = "policies.default.require_scopes"
    assert any(p.startswith(key) and "scope names" in p for p in found), found


def test_max_stale_leaves_room_for_refreshes() -> None:
    found = problems(
        MINIMAL.replace('algorithms = ["RS256"]', 'algorithms = ["RS256"]\nmax_stale = "90s"')
    )
    assert any(
        p.startswith("issuers[0].max_stale: must be at least twice refresh_min") for p in found
    )
    parse_config(
        MINIMAL.replace('algorithms = ["RS256"]', 'algorithms = ["RS256"]\nmax_stale = "2m"')
    )


def test_claim_rules() -> None:
    text = MINIMAL + (
        'claims = [ { claim = "tenant", equals = "acme" },'
        ' { claim = "roles", contains = "admin" },'
        ' { claim = "env", one_of = ["prod", "stage"] } ]\n'
    )
    rules = parse_config(text).policies["default"].claims
    assert [r.claim for r in rules] == ["tenant", "roles", "env"]
    assert rules[2].one_of == ("prod", "stage")
    found = problems(MINIMAL + 'claims = [ { claim = "a", equals = 1, contains = 2 } ]\n')
    assert any("exactly one of equals, one_of, contains" in p for p in found)


def test_discovery_true_derives_the_url() -> None:
    text = MINIMAL.replace('jwks_uri = "https://id.example.com/jwks.json"', "discovery = true")
    issuer = parse_config(text).issuer("corp")
    assert issuer.discovery == "https://id.example.com/.well-known/openid-configuration"


def test_invalid_toml_is_reported_with_its_position() -> None:
    assert "not valid TOML" in problems("[agent\n")[0]


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    """Regression: a Latin-1 byte escaped as UnicodeDecodeError (a traceback, a silent
    failed reload, a crashed supervisor)."""
    path = tmp_path / "latin1.toml"
    path.write_bytes(MINIMAL.encode() + b"# caf\xe9\n")
    result = check_config(path)
    assert result.returncode == 1
    line = MINIMAL.count("\n") + 1
    assert f"line {line}: not UTF-8 (byte 0xe9)" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_configuration_that_is_no_regular_file_or_too_big_is_refused_unread(
    tmp_path: Path,
) -> None:
    """Regression (config review): the file was read whole, on the agent's event loop
    for a reload: /dev/zero ran it out of memory, a FIFO blocked it for good, and 150 MB
    of comments froze SPOP for 1.6 s."""
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.toml"
    huge.write_bytes(MINIMAL.encode() + b"#" * (MAX_CONFIG_BYTES + 1))
    for path, problem in (  # the huge file first: the others hung the old code
        (huge, "larger than 1024 KiB"),
        (Path("/dev/zero"), "not a regular file"),
        (fifo, "not a regular file"),
    ):
        with pytest.raises(ConfigError) as caught:
            read_config(path)
        (found,) = caught.value.problems
        assert found.startswith(f"{path}: {problem}")


def test_a_key_path_it_may_not_look_at_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (config review): Path.is_file() raises on EACCES in Python 3.11, and a
    key file or keys_dir under a directory the agent's user cannot enter was an
    'internal error' naming no key. (The tests run as root: the error is simulated.)"""

    def denied(self: Path) -> bool:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "is_file", denied)
    monkeypatch.setattr(Path, "exists", denied)
    text = (
        MINIMAL.replace(
            'jwks_uri = "https://id.example.com/jwks.json"', 'jwks_file = "/root/jwks.json"'
        )
        + '[cache]\nkeys_dir = "/root/keys"\n'
    )
    found = problems(text)
    assert any(
        p.startswith("issuers[0].jwks_file: expected a readable file (permission denied)")
        for p in found
    ), found
    assert any(
        p.startswith("cache.keys_dir: expected a directory it can reach (permission denied)")
        for p in found
    ), found


def test_each_hmac_algorithm_needs_its_own_secret(tmp_path: Path) -> None:
    """Regression (config review): any `keys` table passed, so HS256 beside an RSA key
    file was accepted with no secret at all."""
    (tmp_path / "secret").write_text("s" * 64)
    keys = 'keys = [{ secret_file = "secret", kid = "h1", alg = "HS256" }]'
    text = MINIMAL.replace('algorithms = ["RS256"]', 'algorithms = ["HS256", "HS512"]').replace(
        'jwks_uri = "https://id.example.com/jwks.json"', keys
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(text, base_dir=tmp_path)
    assert caught.value.problems == [
        "issuers[0].algorithms: HS512 need an explicitly configured secret in `keys`; HMAC is"
        " never used with keys from a JWKS"
    ]
    parse_config(text.replace('"HS256", "HS512"', '"HS256"'), base_dir=tmp_path)
    # A secret entry with a problem of its own is still the one meant for its alg: only
    # that problem is reported (review).
    missing = text.replace('"HS256", "HS512"', '"HS256"').replace('"secret"', '"missing"')
    with pytest.raises(ConfigError) as caught:
        parse_config(missing, base_dir=tmp_path)
    (problem,) = caught.value.problems
    assert problem.startswith("issuers[0].keys[0].secret_file: expected a readable file")


def test_a_short_secret_is_named_by_its_key(tmp_path: Path) -> None:
    """Regression (config review): 'HS256 secret must be at least 32 bytes' named
    neither the key nor its file."""
    from spoa.app import static_key_problems

    (tmp_path / "short.secret").write_text("too short")
    text = MINIMAL.replace('algorithms = ["RS256"]', 'algorithms = ["HS256"]').replace(
        'jwks_uri = "https://id.example.com/jwks.json"',
        'keys = [{ secret_file = "short.secret", kid = "h1", alg = "HS256" }]',
    )
    assert static_key_problems(parse_config(text, base_dir=tmp_path)) == [
        f"issuers[0] (corp): keys[0] ({tmp_path / 'short.secret'}): HS256 secret must be at"
        " least 32 bytes"
    ]


@pytest.mark.parametrize("where", ["jwks_file", "keys"])
def test_max_keys_bounds_local_key_files_too(tmp_path: Path, where: str) -> None:
    """Regression (documentation review): a local JWKS file was held to the built-in 100
    keys whatever the issuer's max_keys said, as docs/configuration.md does not."""
    from spoa.app import key_source, load_static_keys, static_key_problems
    from spoa.devkit.keys import generate_signing_key, jwks_document

    keys = [generate_signing_key("ES256", kid=f"k{index}") for index in range(120)]
    (tmp_path / "jwks.json").write_text(json.dumps(jwks_document(keys)))
    source = (
        'jwks_file = "jwks.json"' if where == "jwks_file" else 'keys = [{ file = "jwks.json" }]'
    )
    text = MINIMAL.replace('algorithms = ["RS256"]', 'algorithms = ["ES256"]').replace(
        'jwks_uri = "https://id.example.com/jwks.json"', source
    )
    config = parse_config(text.replace(source, f"{source}\nmax_keys = 500"), base_dir=tmp_path)
    assert static_key_problems(config) == []
    source_object = key_source(config.issuer("corp"))
    assert len(load_static_keys(source_object).keys) == 120  # type: ignore[arg-type]
    config = parse_config(text.replace(source, f"{source}\nmax_keys = 50"), base_dir=tmp_path)
    (problem,) = static_key_problems(config)
    assert problem.endswith("JWKS has 120 keys, limit is 50"), problem


def test_a_secret_pasted_as_a_secret_file_is_not_echoed() -> None:
    pasted = "kT9#xQ2!vLm8$wR4zP7@nB5^cF1&hJ6*"
    text = MINIMAL.replace('algorithms = ["RS256"]', 'algorithms = ["HS256"]').replace(
        'jwks_uri = "https://id.example.com/jwks.json"',
        f'keys = [{{ secret_file = "{pasted}", kid = "h1", alg = "HS256" }}]',
    )
    found = problems(text)
    assert any(
        p.startswith("issuers[0].keys[0].secret_file: expected a readable file") for p in found
    )
    assert pasted not in " ".join(found)


@pytest.mark.parametrize(
    ("text", "seconds"), [("500ms", 0.5), ("30s", 30), ("10m", 600), ("1h", 3600), ("1d", 86400)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_reference_documents_every_key() -> None:
    """docs/configuration.md must list every key the loader accepts, and no other."""
    reference = (ROOT / "docs" / "configuration.md").read_text()
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", reference, flags=re.MULTILINE))
    accepted: set[str] = set()
    for settings in (AgentSettings, MetricsSettings, LogSettings, CacheSettings, IssuerSettings):
        accepted |= {f.name for f in fields(settings)}
    accepted |= {f.name for f in fields(PolicySettings)} - {"name", "claims"} | {"claims"}
    assert accepted - documented == set(), "keys missing from docs/configuration.md"
    assert documented - accepted == set(), "docs/configuration.md lists unknown keys"


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    """`jwtgate check-config PATH`, run as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "spoa", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _public_pem(private: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


TWO_RSA_ALGORITHMS = 'algorithms = ["RS256", "PS256"]'


@pytest.mark.parametrize(
    ("content", "algorithms", "expected"),
    [
        (b"not a key\n", None, "neither PEM nor a JSON object"),
        (b'{"keys": []}', None, "no usable key"),
        ("rsa1024", None, "1024 bits"),
        # Regression: a key that fits none of the issuer's algorithms passed.
        ("ec", None, "no key in it fits the issuer's algorithms (RS256)"),
        # RFC review: a key that names no alg verified RS256 and PS256 alike (RFC 8725 3.1).
        (
            "rsa2048",
            TWO_RSA_ALGORITHMS,
            "its keys name no alg, and each would serve several of the issuer's algorithms"
            " (PS256, RS256)",
        ),
    ],
)
def test_check_config_loads_the_key_files(
    tmp_path: Path, content: bytes | str, algorithms: str | None, expected: str
) -> None:
    """Regression: check-config said "valid" for key files `run` refuses."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if content in ("rsa1024", "rsa2048"):
        bits = int(str(content)[3:])
        content = _public_pem(rsa.generate_private_key(public_exponent=65537, key_size=bits))
    elif content == "ec":
        content = _public_pem(ec.generate_private_key(ec.SECP256R1()))
    assert isinstance(content, bytes)
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(content)
    text = MINIMAL if algorithms is None else MINIMAL.replace('algorithms = ["RS256"]', algorithms)
    path = tmp_path / "jwtgate.toml"
    path.write_text(
        text.replace('jwks_uri = "https://id.example.com/jwks.json"', f'jwks_file = "{key_file}"')
    )
    result = check_config(path)
    assert result.returncode == 1
    assert "issuers[0] (corp): key file" in result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def check_valid(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    """check-config on `text`, which it must find valid."""
    path = tmp_path / "valid.toml"
    path.write_text(text)
    result = check_config(path)
    assert result.returncode == 0, result.stderr
    assert "configuration is valid" in result.stderr
    return result


def test_check_config_cli_prints_the_effective_config(tmp_path: Path) -> None:
    result = check_valid(tmp_path, MINIMAL.replace("jwks.json", "jwks.json?api_key=hunter2"))
    assert '"listen": "127.0.0.1:12345"' in result.stdout
    # Regression: an API key in the JWKS URL's query was printed.
    assert '"jwks_uri": "https://id.example.com/jwks.json?[masked]"' in result.stdout
    assert "hunter2" not in result.stdout + result.stderr
    assert "warning" not in result.stderr


def test_check_config_warns_when_no_policy_is_the_default(tmp_path: Path) -> None:
    result = check_valid(tmp_path, MINIMAL.replace("[policies.default]", "[policies.api]"))
    assert "warning: no [policies.default]: a request for which haproxy.cfg sets" in result.stderr


@pytest.mark.parametrize(
    ("agent", "metrics"),
    [
        ("0.0.0.0:9999", "[::1]:9999"),  # IPv4's wildcard leaves IPv6 alone
        ("127.0.0.1:9999", "127.0.0.2:9999"),
        ("localhost:9999", "127.0.0.1:9999"),  # names resolve only at bind
        ("jwtgate_agent_1:9999", "127.0.0.1:9998"),  # an underscore, as compose names have
    ],
)
def test_listeners_that_can_share_a_port_are_accepted(agent: str, metrics: str) -> None:
    parse_config(f'[agent]\nlisten = "{agent}"\n[metrics]\nlisten = "{metrics}"\n' + MINIMAL)


def test_a_refused_agent_address_brings_no_second_problem() -> None:
    found = problems(
        '[agent]\nlisten = "nowhere"\n[metrics]\nlisten = "127.0.0.1:12345"\n' + MINIMAL
    )
    assert [p for p in found if "listen" in p] == [
        'agent.listen: expected an address like "127.0.0.1:12345", got "nowhere"'
    ]


def test_array_elements_are_reported_with_their_index() -> None:
    duplicate = MINIMAL.replace(
        "[policies.default]",
        MINIMAL.split("[policies.default]", maxsplit=1)[0] + "[policies.default]",
    )
    assert problems(duplicate) == [
        "issuers[1]: duplicate issuer name 'corp'",
        "issuers[1].issuer: 'https://id.example.com/' is configured by another entry too",
    ]
    found = problems(MINIMAL.replace('jwks_uri = "https://id.example.com/jwks.json"', "keys = [7]"))
    assert "issuers[0].keys[0]: expected a table, got 7" in found
    found = problems(MINIMAL + 'claims = [ { claim = "a", one_of = [] } ]\n')
    assert found == ["policies.default.claims[0].one_of: expected a non-empty array, got an array"]


def test_check_config_cli_counts_problems_in_plain_english(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("x = [\n")
    result = check_config(path)
    assert result.returncode == 1
    assert "invalid configuration (1 problem):" in result.stderr
    assert f"{path}: not valid TOML" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("source", "accepted"),
    [
        ('jwks_uri = "https://id.example.com/jwks.json"', True),
        ('jwks_uri = "http://127.0.0.1:8080/jwks.json"', True),
        ('jwks_uri = "http://[::1]:8080/jwks.json"', True),
        ('jwks_uri = "http://localhost/jwks.json"', True),
        ('jwks_uri = "http://id.example.com/jwks.json"', False),
        ('jwks_uri = "http://10.0.0.7/jwks.json"', False),
        ('discovery = "http://id.example.com/.well-known/openid-configuration"', False),
        ('jwks_uri = "http://id.example.com/jwks.json"\nallow_plain_http = true', True),
    ],
)
def test_keys_over_plain_http_need_loopback_or_an_explicit_opt_in(
    source: str, accepted: bool
) -> None:
    """Whoever sits on a plain-http path to the JWKS can swap the keys and mint tokens."""
    text = MINIMAL.replace('jwks_uri = "https://id.example.com/jwks.json"', source)
    if accepted:
        parse_config(text)
    else:
        (problem,) = problems(text)
        assert problem.startswith(("issuers[0].jwks_uri: plain http://", "issuers[0].discovery:"))
        assert "allow_plain_http" in problem


def test_an_empty_audience_list_is_refused() -> None:
    """Regression: `audiences = []` in a policy passed validation and then meant "aud is
    not checked", so tokens for any audience (or none) were accepted (RFC 8725 3.9)."""
    found = problems(MINIMAL + "audiences = []\n")
    assert any(p.startswith("policies.default.audiences: ") and "at least one" in p for p in found)
    found = problems(MINIMAL.replace('audiences = ["api"]', "audiences = []"))
    assert any(p.startswith("issuers[0].audiences: expected at least one") for p in found)


@pytest.mark.parametrize(
    "url",
    [
        "https://[::1/jwks",
        "http://[zz]/jwks",
        "https://",
        "https://idp.example:99999/jwks",
        "https://idp.example:0/jwks",
        "https://idp example/jwks",
        "https://idp.example/jwks\nx",
        "https://idp.example/jwks#frag",
        "https://user:hunter2@idp.example/jwks",
    ],
)
def test_a_bad_jwks_url_is_a_config_problem_and_is_not_echoed(url: str) -> None:
    """Regression: `https://[::1/jwks` raised a traceback from check-config and run (and
    killed a supervisor on reload); URLs without a host, with a bad port or with
    credentials passed, and were printed and logged in full."""
    text = MINIMAL.replace("https://id.example.com/jwks.json", url.replace("\n", "\\n"))
    found = problems(text)
    assert any(
        p.startswith("issuers[0].jwks_uri: expected an http:// or https:// URL") for p in found
    )
    assert not any("hunter2" in p for p in found)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            MINIMAL.replace('algorithms = ["RS256"]', "algorithms = []"),
            "issuers[0].algorithms: expected at least one",
        ),
        (
            MINIMAL.replace('issuers = ["corp"]', "issuers = []"),
            "policies.default.issuers: expected at least one",
        ),
        (
            MINIMAL.replace('[policies.default]\nissuers = ["corp"]', "[policies]"),
            "policies: at least one policy",
        ),
        ('[agent]\nlisten = "127.0.0.1:0"\n' + MINIMAL, "agent.listen: expected an address"),
        (
            '[agent]\nlisten = "127.0.0.1:\u0668\u0660"\n' + MINIMAL,
            "agent.listen: expected an address",
        ),
        ('[agent]\nhello_timeout = "\u0663s"\n' + MINIMAL, "agent.hello_timeout: expected a"),
        ("[log]\nrejections_per_second = 0\n" + MINIMAL, "log.rejections_per_second: expected"),
        ('[agent]\nlisten = " 127.0.0.1:9999"\n' + MINIMAL, "agent.listen: expected an address"),
        ('[metrics]\nlisten = "999.1.1.1:9999"\n' + MINIMAL, "metrics.listen: expected an"),
        ('[agent]\nlisten = "::1:9999"\n' + MINIMAL, "agent.listen: expected an address"),
        (
            '[agent]\nlisten = "127.0.0.1:9612"\n[metrics]\nlisten = "127.0.0.1:9612"\n' + MINIMAL,
            "metrics.listen: 127.0.0.1:9612 would take agent.listen's port",
        ),
        (
            '[agent]\nlisten = "127.0.0.1:9999"\n[metrics]\nlisten = "0.0.0.0:9999"\n' + MINIMAL,
            "metrics.listen: 0.0.0.0:9999 would take agent.listen's port",
        ),
        ('[agent]\ntoken_query_param = "a b"\n' + MINIMAL, "agent.token_query_param: expected"),
        (
            '[agent]\nlisten = "[::]:9999"\n[metrics]\nlisten = "127.0.0.1:9999"\n' + MINIMAL,
            "metrics.listen: 127.0.0.1:9999 would take agent.listen's port",
        ),
    ],
)
def test_configs_that_run_would_refuse_fail_the_check(text: str, problem: str) -> None:
    """Regression: these passed check-config, then crashed `run` with a traceback (no
    algorithm, a policy trusting no issuer), served nothing but 500s (no policy), bound
    a random port (port 0), or read non-ASCII digits as a port or a duration. A rejection
    rate of 0 made the log limiter raise, at start and half-way through a reload; a host
    with a space or a mistyped IPv4 address, and the metrics listener on the agent's port,
    failed only when `run` bound them. A query parameter name with a space could never
    match."""
    found = problems(text)
    assert any(p.startswith(problem) for p in found), found


def test_one_issuer_value_in_two_entries_is_refused() -> None:
    second = MINIMAL.split("[policies.default]", maxsplit=1)[0].replace(
        'name = "corp"', 'name = "other"'
    )
    found = problems(MINIMAL + second)
    assert (
        "issuers[1].issuer: 'https://id.example.com/' is configured by another entry too" in found
    )


def test_a_deeply_nested_file_is_a_config_problem() -> None:
    """Regression: the TOML parser's RecursionError came out as a traceback."""
    assert problems("x = " + "[" * 5000 + "]" * 5000) == [
        "<config>: not valid TOML: nested too deeply"
    ]


def test_problems_come_out_in_the_same_order_every_time() -> None:
    """Regression: a section's problems came out in set order, different from run to run."""
    text = '[agent]\nworkers = 0\nmax_inflight = 0\nhello_timeout = "x"\n' + MINIMAL
    script = f"import sys; from tests.test_config import problems; print(problems({text!r}))"
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
        ).stdout
        for seed in (1, 2, 3, 4)
    }
    assert len(outputs) == 1


@pytest.mark.parametrize("form", ["pem", "jwk", "jwks"])
def test_a_key_that_names_its_alg_serves_beside_another_rsa_algorithm(
    tmp_path: Path, form: str
) -> None:
    """The mend for a key check-config refuses as serving two algorithms: its alg in the
    key's table. Regression (diff review): the table's alg reached PEM keys only, so a JWK
    or JWKS file without alg stayed refused however it was configured."""
    from cryptography.hazmat.primitives.asymmetric import rsa
    from jwcrypto import jwk

    public_pem = _public_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    member = json.loads(jwk.JWK.from_pem(public_pem).export_public())
    content = {
        "pem": public_pem,
        "jwk": json.dumps(member).encode(),
        "jwks": json.dumps({"keys": [member]}).encode(),
    }[form]
    key_file = tmp_path / f"key.{form}"
    key_file.write_bytes(content)
    check_valid(
        tmp_path,
        MINIMAL.replace('algorithms = ["RS256"]', TWO_RSA_ALGORITHMS).replace(
            'jwks_uri = "https://id.example.com/jwks.json"',
            f'keys = [{{ file = "{key_file}", alg = "PS256" }}]',
        ),
    )
