"""The loopback issuer over real HTTP: discovery, JWKS, rotation, fault modes, clean shutdown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from jwcrypto import jwk

from spoa.devkit.errors import IssuerError
from spoa.devkit.issuer import FAULT_MODES, LocalIssuer, parse_duration
from spoa.devkit.keys import generate_signing_key, load_current_key
from spoa.devkit.tokens import mint_token

TIMEOUT = 5.0


@pytest.fixture(autouse=True)
def no_leftover_threads() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    leftovers = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert leftovers == []


@pytest.fixture
def issuer() -> Iterator[LocalIssuer]:
    with LocalIssuer(alg="ES256", max_age=17, slow_delay=0.3) as running:
        yield running


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), error.read()


def _published_kids(issuer: LocalIssuer) -> list[str]:
    status, _, body = _get(issuer.jwks_url)
    assert status == 200
    return [member["kid"] for member in json.loads(body)["keys"]]


def test_serves_discovery_and_jwks_over_http(issuer: LocalIssuer) -> None:
    assert issuer.url == f"http://127.0.0.1:{issuer.port}"
    status, headers, body = _get(issuer.discovery_url)
    assert status == 200
    discovery = json.loads(body)
    assert discovery["issuer"] == issuer.url
    assert discovery["jwks_uri"] == issuer.url + "/jwks.json"
    assert discovery["id_token_signing_alg_values_supported"] == ["ES256"]
    status, headers, body = _get(discovery["jwks_uri"])
    assert status == 200
    assert headers["Cache-Control"] == "public, max-age=17"
    assert headers["Content-Type"] == "application/json"
    key_set = jwk.JWKSet.from_json(body)
    assert key_set.get_key(issuer.current_key.kid) is not None
    assert issuer.request_counts() == {"/.well-known/openid-configuration": 1, "/jwks.json": 1}


def test_etag_allows_conditional_requests(issuer: LocalIssuer) -> None:
    _, headers, _ = _get(issuer.jwks_url)
    status, _, body = _get(issuer.jwks_url, {"If-None-Match": headers["ETag"]})
    assert (status, body) == (304, b"")
    issuer.rotate()
    status, _, _ = _get(issuer.jwks_url, {"If-None-Match": headers["ETag"]})
    assert status == 200


def test_unknown_paths_are_404_and_counted(issuer: LocalIssuer) -> None:
    status, _, _ = _get(issuer.url + "/nothing?x=1")
    assert status == 404
    assert issuer.request_count("/nothing") == 1
    issuer.reset_counts()
    assert issuer.request_counts() == {}


def test_minted_tokens_verify_through_the_published_jwks(issuer: LocalIssuer) -> None:
    token = issuer.mint({"sub": "alice", "aud": "orders"})
    client = jwt.PyJWKClient(issuer.jwks_url, cache_keys=False, cache_jwk_set=False)
    signing_key = client.get_signing_key_from_jwt(token)
    claims = jwt.decode(
        token, signing_key.key, algorithms=["ES256"], audience="orders", issuer=issuer.url
    )
    assert claims["sub"] == "alice"


def test_issuer_override_is_used_for_discovery_and_minting() -> None:
    with LocalIssuer(alg="EdDSA", issuer="https://login.example") as running:
        _, _, body = _get(running.discovery_url)
        assert json.loads(body)["issuer"] == "https://login.example"
        assert json.loads(body)["jwks_uri"].startswith(running.url)
        payload = jwt.decode(running.mint(), options={"verify_signature": False})
        assert payload["iss"] == "https://login.example"


def test_mint_uses_the_injected_clock() -> None:
    with LocalIssuer(alg="ES256", clock=lambda: 1_000.0) as running:
        payload = jwt.decode(running.mint(lifetime=60), options={"verify_signature": False})
        assert (payload["iat"], payload["exp"]) == (1_000, 1_060)


def test_rotation_keeps_a_grace_of_keep_keys(issuer: LocalIssuer) -> None:
    first = issuer.current_key
    token_before = issuer.mint({"sub": "alice"})
    second = issuer.rotate()
    assert issuer.current_key == second
    assert _published_kids(issuer) == [second.kid, first.kid]
    client = jwt.PyJWKClient(issuer.jwks_url, cache_keys=False, cache_jwk_set=False)
    old_key = client.get_signing_key_from_jwt(token_before)
    assert jwt.decode(token_before, old_key.key, algorithms=["ES256"])["sub"] == "alice"
    third = issuer.rotate()
    assert _published_kids(issuer) == [third.kid, second.kid]
    assert jwt.get_unverified_header(issuer.mint())["kid"] == third.kid


def test_rotate_to_a_given_key_and_refuse_duplicates(issuer: LocalIssuer) -> None:
    chosen = generate_signing_key("ES256", kid="chosen")
    assert issuer.rotate(chosen) is chosen
    assert _published_kids(issuer)[0] == "chosen"
    with pytest.raises(IssuerError):
        issuer.rotate(chosen)


def test_automatic_rotation_runs_on_its_own_thread() -> None:
    rotated: list[str] = []
    two_rotations = threading.Event()

    def on_rotate(key: Any) -> None:
        rotated.append(key.kid)
        if len(rotated) >= 2:
            two_rotations.set()

    with LocalIssuer(alg="ES256", rotate_every=0.02, keep=2, on_rotate=on_rotate) as running:
        assert two_rotations.wait(TIMEOUT)
        published = _published_kids(running)
        assert len(published) == 2
        assert running.current_key.kid in published
    assert running.rotation_errors == []


def test_stop_rotating_keeps_the_current_key_and_goes_on_serving() -> None:
    """The demo stops rotating once its traffic ends, so the token of the `curl` line it
    prints keeps working (regression: its key was withdrawn about a minute later)."""
    rotated = threading.Event()
    with LocalIssuer(alg="ES256", rotate_every=0.02, on_rotate=lambda key: rotated.set()) as it:
        assert rotated.wait(TIMEOUT)
        it.stop_rotating()
        assert not [t for t in threading.enumerate() if t.name.startswith("LocalIssuer-rot")]
        kept = it.current_key.kid
        assert kept in _published_kids(it)
        assert it.current_key.kid == kept
    assert it.rotation_errors == []


def test_keys_dir_follows_the_ring(tmp_path: Path) -> None:
    with LocalIssuer(alg="ES256", keys_dir=tmp_path) as running:
        assert load_current_key(tmp_path).public_jwk() == running.current_key.public_jwk()
        running.rotate()
        from_dir = load_current_key(tmp_path)
        assert from_dir.public_jwk() == running.current_key.public_jwk()
        token = mint_token(from_dir, {"sub": "bob", "iss": running.issuer})
        client = jwt.PyJWKClient(running.jwks_url, cache_keys=False, cache_jwk_set=False)
        key = client.get_signing_key_from_jwt(token)
        assert jwt.decode(token, key.key, algorithms=["ES256"])["sub"] == "bob"


# ---------------------------------------------------------------- fault modes


def test_mode_down_refuses_connections_then_comes_back_on_the_same_port(
    issuer: LocalIssuer,
) -> None:
    port = issuer.port
    issuer.mode = "down"
    with pytest.raises(urllib.error.URLError) as caught:
        _get(issuer.jwks_url)
    assert isinstance(caught.value.reason, ConnectionRefusedError)
    issuer.mode = "ok"
    assert issuer.port == port
    assert _published_kids(issuer) == [issuer.current_key.kid]


@pytest.mark.parametrize(("mode", "status"), [("unavailable", 503), ("error", 500)])
def test_http_error_modes(issuer: LocalIssuer, mode: Any, status: int) -> None:
    issuer.mode = mode
    assert _get(issuer.jwks_url)[0] == status
    assert _get(issuer.discovery_url)[0] == status
    assert issuer.request_count("/jwks.json") == 1


def test_mode_garbage_answers_200_with_non_json(issuer: LocalIssuer) -> None:
    issuer.mode = "garbage"
    status, _, body = _get(issuer.jwks_url)
    assert status == 200
    with pytest.raises(ValueError):
        json.loads(body)


def test_mode_huge_answers_more_than_a_mebibyte_of_valid_json(issuer: LocalIssuer) -> None:
    issuer.mode = "huge"
    status, headers, body = _get(issuer.jwks_url)
    assert status == 200
    assert len(body) > 1024 * 1024
    assert int(headers["Content-Length"]) == len(body)
    assert [member["kid"] for member in json.loads(body)["keys"]] == [issuer.current_key.kid]


def test_huge_client_that_hangs_up_early_does_not_break_the_issuer(issuer: LocalIssuer) -> None:
    issuer.mode = "huge"
    with urllib.request.urlopen(issuer.jwks_url, timeout=TIMEOUT) as response:
        assert len(response.read(1024)) == 1024
    issuer.mode = "ok"
    assert _published_kids(issuer) == [issuer.current_key.kid]


def test_mode_drop_current_publishes_only_older_keys(issuer: LocalIssuer) -> None:
    previous = issuer.current_key
    issuer.rotate()
    issuer.mode = "drop_current"
    assert _published_kids(issuer) == [previous.kid]
    status, _, body = _get(issuer.discovery_url)
    assert status == 200
    assert json.loads(body)["issuer"] == issuer.url


def test_mode_slow_delays_the_answer(issuer: LocalIssuer) -> None:
    issuer.mode = "slow"
    started = time.monotonic()
    assert _published_kids(issuer) == [issuer.current_key.kid]
    assert time.monotonic() - started >= issuer.slow_delay


def test_stop_does_not_wait_for_a_slow_answer() -> None:
    running = LocalIssuer(alg="ES256", slow_delay=60.0).start()
    running.mode = "slow"
    outcome: list[object] = []

    def fetch() -> None:
        try:
            _get(running.jwks_url)
            outcome.append("answered")
        except (urllib.error.URLError, ConnectionError, OSError) as exc:
            outcome.append(exc)

    client = threading.Thread(target=fetch)
    client.start()
    deadline = time.monotonic() + TIMEOUT
    while running.request_count() == 0 and time.monotonic() < deadline:
        time.sleep(0.01)  # waiting for the client thread's request to reach the server
    started = time.monotonic()
    running.stop()
    client.join(TIMEOUT)
    assert time.monotonic() - started < TIMEOUT
    assert outcome
    assert outcome[0] != "answered"


def test_unknown_mode_is_refused(issuer: LocalIssuer) -> None:
    with pytest.raises(IssuerError):
        issuer.mode = "sideways"  # type: ignore[assignment]
    assert issuer.mode == "ok"
    assert {"ok", "down", "error", "slow", "garbage", "huge", "drop_current"} <= FAULT_MODES


def test_invalid_settings_and_lifecycle_errors() -> None:
    with pytest.raises(IssuerError):
        LocalIssuer(keep=0)
    with pytest.raises(IssuerError):
        LocalIssuer(rotate_every=0)
    not_started = LocalIssuer(alg="ES256")
    with pytest.raises(IssuerError):
        _ = not_started.port
    not_started.stop()  # stopping an issuer that never started is harmless
    with not_started, pytest.raises(IssuerError):
        not_started.start()


def test_start_in_down_mode_reserves_a_port_but_refuses() -> None:
    running = LocalIssuer(alg="ES256")
    running.mode = "down"
    with running:
        with pytest.raises(urllib.error.URLError):
            _get(running.jwks_url)
        running.mode = "ok"
        assert _published_kids(running) == [running.current_key.kid]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10s", 10.0), ("250ms", 0.25), ("2m", 120.0), ("1h", 3600.0), ("1d", 86400.0)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


# ---------------------------------------------------------------- standalone process


def test_standalone_process_serves_rotates_and_stops_on_sigterm(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    command = [
        sys.executable,
        "-m",
        "spoa.devkit.issuer",
        "--port",
        "0",
        "--alg",
        "ES256",
        "--rotate-every",
        "100ms",
        "--keys-dir",
        str(keys_dir),
        "--max-age",
        "5",
    ]
    env = {**os.environ, "PYTHONWARNINGS": "error::RuntimeWarning"}
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
    ) as process:
        try:
            assert process.stdout is not None
            url = process.stdout.readline().strip()
            assert url.startswith("http://127.0.0.1:")
            status, headers, body = _get(url + "/jwks.json")
            assert status == 200
            assert headers["Cache-Control"] == "public, max-age=5"
            first_kid = json.loads(body)["keys"][0]["kid"]
            deadline = time.monotonic() + TIMEOUT
            current = load_current_key(keys_dir)
            while current.kid == first_kid and time.monotonic() < deadline:
                time.sleep(0.05)  # a separate process rotates on its own clock
                current = load_current_key(keys_dir)
            assert current.kid != first_kid
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=TIMEOUT)
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 0, stderr
    assert stderr == ""
