"""Structured logs: the JSON format, the token guard, the rejection limiter, config masking."""

from __future__ import annotations

import io
import json
import logging
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import jwt
import pytest
import structlog
from jwcrypto import jwk
from jwcrypto import jwt as jwcrypto_jwt

from spoa.logs import (
    REDACTED,
    RejectionLogLimiter,
    configure_logging,
    mask_secrets,
    token_fingerprint,
)


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def stream() -> io.StringIO:
    return io.StringIO()


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.fixture(scope="module")
def tokens() -> list[str]:
    hs256 = jwt.encode(
        {"sub": "alice", "iss": "https://idp.example", "exp": int(time.time()) + 600},
        "a-test-hmac-secret-of-at-least-32-bytes",
        algorithm="HS256",
        headers={"kid": "k1"},
    )
    key = jwk.JWK.generate(kty="EC", crv="P-256")
    es256 = jwcrypto_jwt.JWT(header={"alg": "ES256", "typ": "JWT"}, claims={"sub": "bob"})
    es256.make_signed_token(key)
    return [hs256, es256.serialize()]


class CountingRepr:
    def __init__(self) -> None:
        self.calls = 0

    def __repr__(self) -> str:
        self.calls += 1
        return "CountingRepr()"


# -- format ------------------------------------------------------------------------------


def test_json_lines_carry_timestamp_level_event_and_fields(stream: io.StringIO) -> None:
    configure_logging("info", "json", stream)
    log = structlog.get_logger()
    log.info("keys_loaded", issuer="corp", count=3)
    log.warning("jwks_stale", issuer="corp", age_seconds=42.5)

    first, second = lines(stream)
    assert list(first)[:3] == ["timestamp", "level", "event"]
    assert first["level"] == "info"
    assert first["event"] == "keys_loaded"
    assert (first["issuer"], first["count"]) == ("corp", 3)
    stamp = datetime.fromisoformat(first["timestamp"])
    assert stamp.utcoffset() is not None
    assert stamp.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert abs((datetime.now(UTC) - stamp).total_seconds()) < 60
    assert second["level"] == "warning"
    assert second["age_seconds"] == 42.5


def test_disabled_levels_skip_every_processor(stream: io.StringIO) -> None:
    configure_logging("info", "json", stream)
    log = structlog.get_logger()
    probe = CountingRepr()
    log.debug("hot_path_detail", probe=probe)
    assert probe.calls == 0  # not even the guard looked at it
    assert stream.getvalue() == ""
    log.info("visible", probe=probe)
    assert probe.calls == 1

    configure_logging("debug", "json", stream)
    structlog.get_logger().debug("now_visible")
    assert lines(stream)[-1]["event"] == "now_visible"


def test_console_format_is_for_humans(stream: io.StringIO) -> None:
    configure_logging("info", "console", stream)
    structlog.get_logger().info("agent_started", workers=2)
    output = stream.getvalue()
    assert "agent_started" in output
    assert "workers=2" in output
    assert not output.lstrip().startswith("{")
    assert "\x1b[" not in output  # a StringIO is not a terminal: no colours


def test_standard_library_records_share_the_format(stream: io.StringIO) -> None:
    configure_logging("info", "json", stream)
    logging.getLogger("asyncio").warning("loop is slow: %s ms", 250)
    logging.getLogger("asyncio").debug("below the level")
    (record,) = lines(stream)
    assert record["event"] == "loop is slow: 250 ms"
    assert (record["level"], record["logger"]) == ("warning", "asyncio")


def test_standard_library_extra_fields_are_kept(stream: io.StringIO) -> None:
    """Regression: `extra={...}` was dropped, so "spop_connection_error"
    lines said neither the SPOP status nor the reason."""
    configure_logging("info", "json", stream)
    logging.getLogger("spoa.server").info(
        "spop_connection_error", extra={"spop_status": 4, "reason": "bad frame"}
    )
    (record,) = lines(stream)
    assert (record["spop_status"], record["reason"]) == (4, "bad frame")


def test_console_lines_escape_control_characters(stream: io.StringIO) -> None:
    """Regression: a client's `alg` of "RS256\\x1b[31m" reached the terminal as a raw ESC."""
    configure_logging("info", "console", stream)
    structlog.get_logger().info("token_rejected", alg="RS256\x1b[31m", kid="a\nforged line")
    output = stream.getvalue()
    assert "\x1b" not in output
    assert output.count("\n") == 1
    assert "alg=RS256\\x1b[31m" in output
    assert "x0aforged line" in output


def test_console_lines_escape_unicode_separators_and_bidi_marks(stream: io.StringIO) -> None:
    """Regression (observability review): only C0/C1 controls were escaped, so a kid of
    "\\u2028<timestamp> [critical] admin_login_ok" showed as a second, forged line in
    viewers that split on U+2028, and U+202E reordered what followed it."""
    configure_logging("info", "console", stream)
    forged = "\u20282026-11-30T06:59:18Z\u2000[critical\u2000]\u2000admin_login_ok"
    structlog.get_logger().info("token_rejected", kid=forged, sub="x\u202etxt.exe")
    output = stream.getvalue()
    assert len(output.splitlines()) == 1
    for raw in ("\u2028", "\u202e"):
        assert raw not in output
    assert "kid=\\u20282026-11-30" in output
    assert "sub=x\\u202etxt.exe" in output
    assert "\\u2000[critical" in output  # other spaces than SP are not printable either


def test_configure_replaces_its_own_root_handler(stream: io.StringIO) -> None:
    before = len(logging.getLogger().handlers)
    configure_logging("info", "json", stream)
    configure_logging("info", "json", stream)
    assert len(logging.getLogger().handlers) == before + 1


def test_bad_level_or_format_is_refused(stream: io.StringIO) -> None:
    with pytest.raises(ValueError, match="level"):
        configure_logging("chatty", "json", stream)
    with pytest.raises(ValueError, match="format"):
        configure_logging("info", "xml", stream)  # type: ignore[arg-type]


# -- no token ever reaches the log -------------------------------------------------------


def test_tokens_are_redacted_wherever_they_hide(stream: io.StringIO, tokens: list[str]) -> None:
    configure_logging("debug", "json", stream)
    log = structlog.get_logger()
    hs256, es256 = tokens

    class Holder:
        def __repr__(self) -> str:
            return f"Holder({hs256})"

    log.info("as_a_field", note=hs256, fingerprint=token_fingerprint(hs256))
    log.info(f"in the event itself {hs256}")
    log.info("embedded", header_value=f"Bearer {es256}")
    log.info("nested", claims={"act": {"token_copy": [es256, ("x", hs256)]}})
    log.info("as_bytes", raw=hs256.encode())
    log.info("in_a_repr", thing=Holder())
    log.info("named_fields", authorization="Basic dXNlcjpwYXNz", token="opaque-abc", Token="x")
    try:
        raise ValueError(f"could not parse {es256}")
    except ValueError:
        log.exception("with_traceback")
    logging.getLogger("somelib").error("stdlib saw %s", hs256)

    output = stream.getvalue()
    for token in tokens:
        header, payload, signature = token.split(".")
        assert token not in output
        assert signature not in output
        assert f"{header}.{payload}" not in output
    assert "dXNlcjpwYXNz" not in output
    assert "opaque-abc" not in output

    records = {record["event"]: record for record in lines(stream)}
    assert records["as_a_field"]["note"] == REDACTED
    assert records["as_a_field"]["fingerprint"] == token_fingerprint(hs256)  # kept
    assert records["embedded"]["header_value"] == f"Bearer {REDACTED}"
    assert records["nested"]["claims"]["act"]["token_copy"] == [REDACTED, ["x", REDACTED]]
    assert records["as_bytes"]["raw"] == REDACTED
    assert records["named_fields"]["authorization"] == REDACTED
    assert records["named_fields"]["Token"] == REDACTED
    assert f"in the event itself {REDACTED}" in records
    assert "ValueError: could not parse [redacted]" in records["with_traceback"]["exception"]
    assert f"stdlib saw {REDACTED}" in records


def test_ordinary_values_pass_the_guard_untouched(stream: io.StringIO) -> None:
    configure_logging("info", "json", stream)
    structlog.get_logger().info(
        "rejected", reason="expired", kid="eyJ-looking-kid-without-dots", sub="alice", n=3
    )
    (record,) = lines(stream)
    assert record["kid"] == "eyJ-looking-kid-without-dots"
    assert (record["reason"], record["sub"], record["n"]) == ("expired", "alice", 3)


def test_token_fingerprint_is_short_stable_and_not_the_token(tokens: list[str]) -> None:
    first, second = tokens
    fingerprint = token_fingerprint(first)
    assert re.fullmatch(r"[0-9a-f]{12}", fingerprint)
    assert token_fingerprint(first) == fingerprint
    assert token_fingerprint(first.encode()) == fingerprint
    assert token_fingerprint(second) != fingerprint
    assert fingerprint not in first


# -- rejection log limiter ---------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_limiter_allows_a_burst_then_the_rate() -> None:
    clock = FakeClock()
    limiter = RejectionLogLimiter(rate_per_s=2.0, burst=3, clock=clock)
    assert [limiter.allow() for _ in range(10)] == [True] * 3 + [False] * 7
    assert limiter.suppressed_total == 7

    clock.now += 0.5  # one token at 2/s
    assert [limiter.allow() for _ in range(3)] == [True, False, False]
    clock.now += 3600  # a long quiet spell refills to the burst, no further
    assert [limiter.allow() for _ in range(5)] == [True] * 3 + [False] * 2
    assert limiter.take_suppressed() == 11
    assert limiter.take_suppressed() == 0
    assert limiter.suppressed_total == 11


def test_limiter_ignores_a_clock_that_steps_back() -> None:
    clock = FakeClock()
    limiter = RejectionLogLimiter(rate_per_s=1.0, burst=1, clock=clock)
    assert limiter.allow()
    clock.now -= 100
    assert not limiter.allow()
    clock.now += 1
    assert limiter.allow()


def test_limiter_reports_the_suppressed_count_on_the_next_logged_event(
    stream: io.StringIO,
) -> None:
    configure_logging("info", "json", stream)
    log = structlog.get_logger()
    clock = FakeClock()
    limiter = RejectionLogLimiter(rate_per_s=1.0, burst=2, clock=clock)

    logged = [limiter.emit(log.warning, "token_rejected", reason="expired") for _ in range(50)]
    assert logged.count(True) == 2
    clock.now += 1
    assert limiter.emit(log.warning, "token_rejected", reason="bad_signature")

    records = lines(stream)
    assert len(records) == 3
    assert "suppressed" not in records[0]
    assert "suppressed" not in records[1]
    assert records[2]["suppressed"] == 48
    assert records[2]["reason"] == "bad_signature"


def test_limiter_refuses_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        RejectionLogLimiter(rate_per_s=0, burst=1)
    with pytest.raises(ValueError):
        RejectionLogLimiter(rate_per_s=1, burst=0)


# -- config summary ----------------------------------------------------------------------


def test_mask_secrets_hides_secrets_and_keeps_the_shape() -> None:
    config = {
        "agent": {"listen": "127.0.0.1:12345", "workers": 2, "max_token_bytes": 8192},
        "log": {"level": "info"},
        "issuers": [
            {
                "name": "corp",
                "jwks_uri": "https://idp.example/jwks",
                "client_secret": "s3cr3t",
                "keys": [
                    {"secret_env": "CORP_HMAC", "secret_file": "/etc/jwtgate/hmac", "kid": "k1"},
                    {"hmac": "aGVsbG8", "alg": "HS256"},
                    {"jwk": {"kty": "oct", "k": "c2VjcmV0"}},
                    {"kty": "RSA", "n": "modulus", "e": "AQAB", "d": "private-exponent"},
                ],
                "private_key": "-----BEGIN PRIVATE KEY-----",
                "private_key_file": "/etc/jwtgate/key.pem",
                "public_key": "-----BEGIN PUBLIC KEY-----",
                "api_key": "abc",
                "token_header": "authorization",
                "token_query_param": "access_token",
                "password": None,
            }
        ],
    }
    masked = mask_secrets(config)
    issuer = masked["issuers"][0]
    assert issuer["client_secret"] == "[masked]"
    assert issuer["keys"][0] == {
        "secret_env": "CORP_HMAC",
        "secret_file": "/etc/jwtgate/hmac",
        "kid": "k1",
    }
    assert issuer["keys"][1] == {"hmac": "[masked]", "alg": "HS256"}
    assert issuer["keys"][2] == {"jwk": "[masked]"}
    assert issuer["keys"][3] == {"kty": "RSA", "n": "modulus", "e": "AQAB", "d": "[masked]"}
    assert issuer["private_key"] == "[masked]"
    assert issuer["api_key"] == "[masked]"
    assert issuer["private_key_file"] == "/etc/jwtgate/key.pem"
    assert issuer["public_key"] == "-----BEGIN PUBLIC KEY-----"
    assert issuer["token_header"] == "authorization"
    assert issuer["token_query_param"] == "access_token"  # a parameter's name, not a token
    assert issuer["password"] is None
    assert masked["agent"] == config["agent"]
    assert masked["log"] == {"level": "info"}
    assert issuer["jwks_uri"] == "https://idp.example/jwks"
    # Regression: an API key in a JWKS URL's query was printed by check-config and logged.
    urls = mask_secrets(
        {"jwks_uri": "https://idp.example/jwks?api_key=hunter2", "discovery_url": "https://a/#x"}
    )
    assert urls == {
        "jwks_uri": "https://idp.example/jwks?[masked]",
        "discovery_url": "https://a/?[masked]",
    }
    # Regression: check-config printed a policy named like a secret as "[masked]".
    policies = mask_secrets({"policies": {"partner-auth": {"issuers": ["corp"], "api_key": "x"}}})
    assert policies == {"policies": {"partner-auth": {"issuers": ["corp"], "api_key": "[masked]"}}}
    # The input is left alone.
    assert config["issuers"][0]["client_secret"] == "s3cr3t"  # type: ignore[index]


def test_mask_secrets_output_is_safe_to_log(stream: io.StringIO) -> None:
    configure_logging("info", "json", stream)
    structlog.get_logger().info(
        "config_loaded", config=mask_secrets({"hmac_secret": "do-not-print-me", "workers": 4})
    )
    (record,) = lines(stream)
    assert record["config"] == {"hmac_secret": "[masked]", "workers": 4}
    assert "do-not-print-me" not in stream.getvalue()
