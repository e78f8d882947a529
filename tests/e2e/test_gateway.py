"""The whole product, end to end: a real HAProxy with the shipped haproxy/ files, two
real `jwtgate run` agents, echo backends and a loopback issuer; requests from a real
HTTP client. Nothing here is mocked."""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spoa.devkit.issuer import LocalIssuer
from spoa.devkit.stack import Stack, StackOptions, haproxy_binary, haproxy_config_dir
from spoa.devkit.tokens import alg_none_token, expired_token, forge_signature
from tests.support.gateway import AUD, agent_config, mint, request
from tests.support.haproxy import haproxy_binaries


@pytest.fixture(scope="module", params=haproxy_binaries(), ids=lambda b: b.version)
def gateway(request: pytest.FixtureRequest) -> Iterator[tuple[Stack, LocalIssuer]]:
    with (
        LocalIssuer() as issuer,
        Stack(
            StackOptions(agent_config=agent_config(issuer), haproxy=str(request.param.path))
        ) as stack,
    ):
        yield stack, issuer


# --- the accept and reject matrix -------------------------------------------------------


def test_valid_token_reaches_a_backend_with_verified_claims(
    gateway: tuple[Stack, LocalIssuer],
) -> None:
    stack, issuer = gateway
    token = mint(issuer, jti="order-1")
    reply = request(stack, token=token)
    assert reply.status == 200
    seen = reply.json["jwt_headers"]
    assert isinstance(seen, dict)
    assert seen["x-jwt-sub"] == "alice"
    assert seen["x-jwt-iss"] == issuer.issuer
    assert seen["x-jwt-aud"] == AUD
    assert seen["x-jwt-scope"] == "read"
    assert seen["x-jwt-jti"] == "order-1"
    claims = json.loads(base64.urlsafe_b64decode(seen["x-jwt-claims"] + "=="))
    assert claims["sub"] == "alice"
    assert claims["aud"] == AUD
    assert reply.headers["x-backend"] in {"app1", "app2"}


def challenge(reason: str, error: str = "invalid_token") -> str:
    return f'Bearer realm="jwtgate", error="{error}", error_description="{reason}"'


@pytest.mark.parametrize(
    ("case", "path", "status", "www_authenticate"),
    [
        ("missing", "/api/orders", 401, 'Bearer realm="jwtgate"'),
        ("expired", "/api/orders", 401, challenge("expired")),
        ("forged", "/api/orders", 401, challenge("bad_signature")),
        ("wrong_audience", "/api/orders", 401, challenge("bad_audience")),
        ("alg_none", "/api/orders", 401, challenge("unsupported_alg")),
        ("garbage", "/api/orders", 401, challenge("malformed")),
        ("id_token", "/api/orders", 401, challenge("bad_type")),
        # Signed but not valid JSON text or dates: once 200, or 503 where forwarded.
        ("lone_surrogate", "/api/orders", 401, challenge("malformed")),
        ("exp_beyond_64_bits", "/api/orders", 401, challenge("malformed")),
        (
            "no_admin_scope",
            "/admin/users",
            403,
            'Bearer realm="jwtgate", error="insufficient_scope", '
            'error_description="insufficient_scope", scope="admin"',
        ),
    ],
)
def test_rejections_never_reach_a_backend(
    gateway: tuple[Stack, LocalIssuer], case: str, path: str, status: int, www_authenticate: str
) -> None:
    stack, issuer = gateway
    claims = {"iss": issuer.issuer, "sub": "mallory", "aud": AUD}
    tokens: dict[str, str | None] = {
        "missing": None,
        "expired": expired_token(issuer.current_key, claims, time.time(), expired_for=600),
        "forged": forge_signature(mint(issuer)),
        "wrong_audience": mint(issuer, aud="another-api"),
        "alg_none": alg_none_token(claims),
        "garbage": "not.a.jwt",
        "id_token": issuer.mint({**claims, "scope": "read"}, typ="JWT"),
        "lone_surrogate": mint(issuer, email="a\ud800b"),
        "exp_beyond_64_bits": mint(issuer, exp=2**64),
        "no_admin_scope": mint(issuer),
    }
    before = sum(backend.requests for backend in stack.backends)
    reply = request(stack, path, tokens[case])
    assert reply.status == status
    assert reply.headers["www-authenticate"] == www_authenticate
    assert "x-backend" not in reply.headers
    assert sum(backend.requests for backend in stack.backends) == before


def test_malformed_authorization_is_400(gateway: tuple[Stack, LocalIssuer]) -> None:
    stack, _ = gateway
    reply = request(stack, headers=[("Authorization", "Bearer two tokens")])
    assert reply.status == 400
    assert reply.headers["www-authenticate"] == challenge("invalid_request", "invalid_request")


def test_two_authorization_headers_are_refused_by_haproxy(
    gateway: tuple[Stack, LocalIssuer],
) -> None:
    """Regression: HAProxy's own 400 challenge had no error_description, the agent's has."""
    stack, issuer = gateway
    token = mint(issuer)
    reply = request(stack, token=token, headers=[("Authorization", f"Bearer {token}")])
    assert reply.status == 400
    assert reply.headers["www-authenticate"] == challenge("invalid_request", "invalid_request")


def test_non_bearer_scheme_counts_as_no_token(gateway: tuple[Stack, LocalIssuer]) -> None:
    stack, _ = gateway
    reply = request(stack, headers=[("Authorization", "Basic YWxpY2U6c2VjcmV0")])
    assert reply.status == 401
    assert reply.headers["www-authenticate"] == 'Bearer realm="jwtgate"'


# --- headers, policies, report-only ------------------------------------------------------


@pytest.mark.parametrize(
    "spoofed",
    [
        [("X-JWT-Sub", "admin"), ("X-Jwt-Scope", "admin"), ("x-jwt-email", "ceo@corp")],
        # Regression: `^x-jwt-` left X_JWT_Email in place, which CGI-style servers read as
        # X-JWT-Email: an identity the agent never set.
        [("X_JWT_Email", "ceo@corp"), ("X_JWT_Sub", "root"), ("x-jwt_scope", "admin")],
        # Regression (HAProxy review): FastCGI maps every character but letters and
        # digits to `_`, so these read as X-JWT-* there, and they were forwarded.
        [("X.JWT.Email", "ceo@corp"), ("X~JWT~Sub", "root"), ("x.jwt-scope", "admin")],
    ],
    ids=["dashes", "underscores", "other separators"],
)
def test_spoofed_identity_headers_never_reach_a_backend(
    gateway: tuple[Stack, LocalIssuer], spoofed: list[tuple[str, str]]
) -> None:
    stack, issuer = gateway
    reply = request(stack, token=mint(issuer), headers=spoofed)
    assert reply.status == 200
    seen = reply.json["jwt_headers"]
    assert isinstance(seen, dict)
    assert seen["x-jwt-sub"] == "alice"
    assert seen["x-jwt-scope"] == "read"
    assert "x-jwt-email" not in seen
    # Only the agent's own, spelled with dashes: no client copy in another spelling.
    assert [name for name in seen if not re.fullmatch("x-jwt-[a-z0-9-]+", name)] == []


@pytest.mark.parametrize(
    "path",
    [
        "/shadow/../admin/users",
        "/shadow/..%2fadmin",
        "/%61dmin/users",
        "//admin/users",
        "/./admin/users",
        "/api/../admin",
        "/%2e/admin",
        "/admin\\users",
        "/api/%7Eme",
        "/api/..",
        # A second review: `;params` after a dot segment (servlet containers drop them),
        # trailing dots, encoded controls and trailing spaces.
        "/shadow/..;/admin",
        "/x/.;/admin",
        "/admin./users",
        "/admin%20",
        "/admin%00",
        "/admin%09/users",
        # A third: a segment of `;params` alone, which Tomcat drops, leaving `//admin`.
        "/;x/admin/users",
        "/;/admin/users",
        "/;jsessionid=1/admin/users",
        # A fourth: an encoded `;` (a service decoding before it drops `;params` sees
        # /admin) and an encoded `%` (a service decoding twice sees /admin).
        "/admin%3Bx/users",
        "/admin%3b",
        "/%2561dmin/users",
    ],
)
def test_ambiguous_paths_are_refused_before_any_policy(
    gateway: tuple[Stack, LocalIssuer], path: str
) -> None:
    """Regression: policies matched raw path prefixes, so `/shadow/../admin` (report-only)
    reached a backend that resolves dot-segments with no token at all, and `/%61dmin`
    ran under the default policy."""
    stack, _ = gateway
    before = sum(backend.requests for backend in stack.backends)
    assert request(stack, path).status == 400
    assert sum(backend.requests for backend in stack.backends) == before


def raw_status(stack: Stack, request_bytes: bytes) -> int:
    """The status HAProxy answers to a request sent exactly as given."""
    with socket.create_connection(("127.0.0.1", stack.frontend_port), timeout=10) as sock:
        sock.sendall(request_bytes)
        head = b""
        while b"\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
    return int(head.split(b" ", 2)[1])


@pytest.mark.parametrize(
    "target",
    ["admin/users", "admin", "http:/admin/users", "*", "%2Fadmin/users"],
)
def test_a_target_that_is_not_a_path_is_refused(
    gateway: tuple[Stack, LocalIssuer], target: str
) -> None:
    """Regression: HAProxy 2.8 passed `GET admin/users` on under the default policy (the
    path ACLs see no path in it), and a service such as Werkzeug routes it to
    /admin/users: a token without the admin scope reached the admin handler."""
    stack, issuer = gateway
    before = sum(backend.requests for backend in stack.backends)
    for method in ("GET", "OPTIONS"):
        request_bytes = (
            f"{method} {target} HTTP/1.1\r\nHost: api.example\r\n"
            f"Authorization: Bearer {mint(issuer)}\r\nConnection: close\r\n\r\n"
        )
        assert raw_status(stack, request_bytes.encode()) == 400, (method, target)
    assert sum(backend.requests for backend in stack.backends) == before


def test_an_absolute_form_target_gets_the_policy_of_its_path(
    gateway: tuple[Stack, LocalIssuer],
) -> None:
    stack, issuer = gateway
    head = "Host: api.example\r\nConnection: close\r\n"
    reader = f"Authorization: Bearer {mint(issuer)}\r\n"
    admin = f"Authorization: Bearer {mint(issuer, scope='read admin')}\r\n"
    target = "GET http://api.example/admin/users HTTP/1.1\r\n"
    assert raw_status(stack, f"{target}{head}{reader}\r\n".encode()) == 403
    assert raw_status(stack, f"{target}{head}{admin}\r\n".encode()) == 200


def test_http_1_1_without_host_is_refused(gateway: tuple[Stack, LocalIssuer]) -> None:
    """RFC 9112 3.2: a server MUST answer 400 to HTTP/1.1 without Host; HAProxy served it."""
    stack, issuer = gateway
    token = f"Authorization: Bearer {mint(issuer)}\r\nConnection: close\r\n"
    before = sum(backend.requests for backend in stack.backends)
    assert raw_status(stack, f"GET /api/orders HTTP/1.1\r\n{token}\r\n".encode()) == 400
    assert raw_status(stack, f"GET /api/orders HTTP/1.2\r\n{token}\r\n".encode()) == 400
    # Regression (HAProxy review): labelled 2.0 or 3.0, it was forwarded as HTTP/1.1,
    # still without Host; labelled 0.9, as HTTP/0.9 (and the client got a 502).
    for version in ("2.0", "3.0"):
        request_bytes = f"GET /api/orders HTTP/{version}\r\n{token}\r\n"
        assert raw_status(stack, request_bytes.encode()) == 400
    request_bytes = f"GET /api/orders HTTP/0.9\r\nHost: x\r\n{token}\r\n"
    assert raw_status(stack, request_bytes.encode()) == 505
    assert sum(backend.requests for backend in stack.backends) == before
    # HTTP/1.0 has no such rule.
    assert raw_status(stack, f"GET /api/orders HTTP/1.0\r\n{token}\r\n".encode()) == 200


@pytest.mark.parametrize(
    ("method", "target", "headers"),
    [
        ("GET", "/api/orders", [("Connection", "Upgrade"), ("Upgrade", "h2c")]),
        ("GET", "/api/orders", [("Upgrade", "h2c"), ("HTTP2-Settings", "AAMAAABkAAQAoAAA")]),
        ("GET", "/api/orders", [("Upgrade", "websocket, h2c")]),
        ("GET", "/api/orders", [("Upgrade", "websocket"), ("Upgrade", "h2c")]),
        ("CONNECT", "127.0.0.1:80", []),
    ],
)
def test_requests_that_would_open_a_tunnel_are_refused(
    gateway: tuple[Stack, LocalIssuer], method: str, target: str, headers: list[tuple[str, str]]
) -> None:
    """Regression: HAProxy 2.6 passes CONNECT and `Upgrade: h2c` on; a service that
    accepts them turns the rest of the connection into a tunnel, and every request sent
    in it reaches the service with no check at all, client X-JWT-* headers included.
    (2.8 drops an h2c upgrade itself: the service then gets a plain request.)"""
    stack, issuer = gateway
    before = sum(backend.requests for backend in stack.backends)
    connection = http.client.HTTPConnection("127.0.0.1", stack.frontend_port, timeout=10)
    try:
        connection.putrequest(method, target, skip_host=method == "CONNECT")
        if method == "CONNECT":
            connection.putheader("Host", target)
        connection.putheader("Authorization", f"Bearer {mint(issuer)}")
        for name, value in headers:
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    if response.status == 400:
        assert sum(backend.requests for backend in stack.backends) == before
    else:
        assert method != "CONNECT"
        assert response.status == 200
        seen = json.loads(body)["upgrade_headers"]
        assert not {"upgrade", "http2-settings"} & set(seen), seen


def test_a_websocket_handshake_is_checked_like_any_request(
    gateway: tuple[Stack, LocalIssuer],
) -> None:
    stack, issuer = gateway
    upgrade = [
        ("Connection", "Upgrade"),
        ("Upgrade", "WebSocket"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),  # HAProxy checks a handshake
        ("Sec-WebSocket-Version", "13"),
    ]
    assert request(stack, headers=upgrade).status == 401
    assert request(stack, token=mint(issuer), headers=upgrade).status == 200


def test_the_service_gets_the_client_address_from_haproxy_only(
    gateway: tuple[Stack, LocalIssuer],
) -> None:
    """Regression: client-sent X-Forwarded-For, Forwarded and X-Real-IP reached the
    service as sent, and a service may use them for audit or fraud checks."""
    stack, issuer = gateway
    spoofed = [
        ("X-Forwarded-For", "6.6.6.6"),
        ("Forwarded", "for=6.6.6.6"),
        ("X-Real-IP", "6.6.6.6"),
        ("X_Forwarded_For", "6.6.6.6"),
        ("X.Forwarded.For", "6.6.6.6"),  # what FastCGI reads as X-Forwarded-For too
        ("X~Real~IP", "6.6.6.6"),
    ]
    reply = request(stack, token=mint(issuer), headers=spoofed)
    assert reply.status == 200
    assert reply.json["client_address_headers"] == {"x-forwarded-for": "127.0.0.1"}


def test_routing_override_headers_never_reach_the_service(
    gateway: tuple[Stack, LocalIssuer],
) -> None:
    """Regression (HAProxy review): X-Original-URL reached the service, and servers that
    route by it would serve /admin/users under the policy of the path HAProxy saw."""
    stack, issuer = gateway
    spoofed = [("X-Original-URL", "/admin/users"), ("X_Rewrite_URL", "/admin/users")]
    reply = request(stack, token=mint(issuer), headers=spoofed)
    assert reply.status == 200
    assert reply.json["routing_headers"] == {}


@pytest.mark.parametrize("named", ["X-JWT-Reason", "x_jwt_sub", "X-Forwarded-For", "Forwarded"])
def test_a_connection_header_naming_an_identity_header_is_refused(
    gateway: tuple[Stack, LocalIssuer], named: str
) -> None:
    """Regression (HAProxy review): `Connection: keep-alive, X-JWT-Reason` was passed on,
    and a proxy between HAProxy and the service drops the headers it names: a report-only
    rejection would have reached the service looking verified."""
    stack, issuer = gateway
    before = sum(backend.requests for backend in stack.backends)
    request_bytes = (
        f"GET /shadow/x HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, {named}\r\n"
        f"Authorization: Bearer {mint(issuer)}\r\n\r\n"
    )
    assert raw_status(stack, request_bytes.encode()) == 400
    assert sum(backend.requests for backend in stack.backends) == before
    fine = request_bytes.replace(f", {named}", "")
    assert raw_status(stack, fine.encode()) == 200


def test_policy_paths_match_whole_segments_in_any_case(gateway: tuple[Stack, LocalIssuer]) -> None:
    stack, issuer = gateway
    reader = mint(issuer)
    assert request(stack, "/ADMIN/users", reader).status == 403
    assert request(stack, "/Admin", reader).status == 403
    # Regression: Jetty and Tomcat serve /admin;x/users as /admin/users.
    assert request(stack, "/admin;x/users", reader).status == 403
    assert request(stack, "/admin;/users", reader).status == 403
    assert request(stack, "/adminx", reader).status == 200  # not under /admin
    assert request(stack, "/api/x;y=1/z", reader).status == 200  # params in a segment: fine
    assert request(stack, "/shadowx").status == 401  # not under the report-only /shadow


@pytest.mark.parametrize(
    "path",
    [
        "/files/report.v2.pdf",
        "/a-b_c~d",
        "/.well-known/x",
        "/a%20b",
        "/caf%C3%A9",
        "/p;jsessionid=1",
    ],
)
def test_ordinary_paths_are_not_refused(gateway: tuple[Stack, LocalIssuer], path: str) -> None:
    stack, issuer = gateway
    assert request(stack, path, mint(issuer)).status == 200


@pytest.mark.parametrize(
    "scheme",
    [
        'Digest username="u", realm="r", nonce="n", uri="/", response="x"',
        "AWS4-HMAC-SHA256 Credential=a/b, SignedHeaders=host, Signature=abc",
    ],
)
def test_one_authorization_header_with_commas_is_not_two(
    gateway: tuple[Stack, LocalIssuer], scheme: str
) -> None:
    """Regression: req.hdr_cnt counted the commas of one Digest or AWS header as several
    Authorization headers (400); it is one credential of another scheme (401, and let
    through under report-only)."""
    stack, _ = gateway
    reply = request(stack, headers=[("Authorization", scheme)])
    assert reply.status == 401
    assert request(stack, "/shadow/x", headers=[("Authorization", scheme)]).status == 200


def test_the_largest_identity_fits_beside_a_full_request(
    gateway: tuple[Stack, LocalIssuer],
) -> None:
    """Regression: a valid token within every limit, with 1 KiB sub, jti and email and a
    6 KiB payload, plus a few KiB of cookies, overflowed HAProxy's 16 KiB buffer when the
    X-JWT-* headers were added: 500. The shipped config now keeps 16 KiB for them."""
    stack, issuer = gateway
    big = mint(
        issuer,
        scope="read admin",
        sub="u" * 1000,
        jti="j" * 1000,
        email="e" * 988 + "@example.com",
        groups=[f"group-{i:04d}" for i in range(80)],
    )
    assert 6000 < len(big) < 8192
    reply = request(stack, "/admin/x", big, headers=[("Cookie", "c=" + "x" * 7000)])
    assert reply.status == 200
    seen = reply.json["jwt_headers"]
    assert isinstance(seen, dict)
    assert seen["x-jwt-sub"] == "u" * 1000
    assert len(seen["x-jwt-claims"]) == len(big.split(".")[1])


def test_policy_is_chosen_by_path(gateway: tuple[Stack, LocalIssuer]) -> None:
    stack, issuer = gateway
    admin = mint(issuer, scope="read admin", email="alice@example.com")
    assert request(stack, "/api/orders", mint(issuer)).status == 200
    assert request(stack, "/admin/users", mint(issuer)).status == 403
    reply = request(stack, "/admin/users", admin)
    assert reply.status == 200
    seen = reply.json["jwt_headers"]
    assert isinstance(seen, dict)
    assert seen["x-jwt-scope"] == "read admin"
    assert seen["x-jwt-email"] == "alice@example.com"  # the admin policy's forward_claims


def test_report_only_policy_lets_failures_through_and_says_why(
    gateway: tuple[Stack, LocalIssuer],
) -> None:
    stack, issuer = gateway
    reply = request(stack, "/shadow/beta", mint(issuer))
    assert reply.status == 200
    seen = reply.json["jwt_headers"]
    assert isinstance(seen, dict)
    assert seen["x-jwt-reason"] == "insufficient_scope"
    assert seen["x-jwt-sub"] == "alice"  # the signature did verify
    forged = request(stack, "/shadow/beta", forge_signature(mint(issuer)))
    assert forged.status == 200
    seen = forged.json["jwt_headers"]
    assert isinstance(seen, dict)
    assert seen["x-jwt-reason"] == "bad_signature"
    assert "x-jwt-sub" not in seen  # never forward claims that did not verify


# --- keys rotate, agents die ------------------------------------------------------------


def test_key_rotation_mid_traffic_causes_no_wrongful_401(
    gateway: tuple[Stack, LocalIssuer],
) -> None:
    stack, issuer = gateway
    statuses: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            statuses.append(request(stack, token=mint(issuer)).status)

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        for _ in range(3):
            issuer.rotate()
            for _ in range(5):
                statuses.append(request(stack, token=mint(issuer)).status)
    finally:
        stop.set()
        thread.join()
    assert statuses
    assert set(statuses) == {200}


def test_a_retired_key_stops_replayed_answers_at_once() -> None:
    # A token answered from the agent's answer memo must be refused as soon as its key
    # leaves the issuer's JWKS, exactly as a cache hit would be.
    with (
        LocalIssuer(keep=1) as issuer,
        Stack(StackOptions(agent_config=agent_config(issuer), agents=1)) as stack,
    ):
        old = mint(issuer)
        for _ in range(4):  # a miss, a cache hit (remembered), then replays
            assert request(stack, token=old).status == 200
        issuer.rotate()  # keep=1: the old key is no longer published
        assert request(stack, token=mint(issuer)).status == 200  # unknown kid: refetch
        refused = request(stack, token=old)
        assert refused.status == 401
        assert "unknown_kid" in refused.headers.get("www-authenticate", "")


def test_switches_in_the_environment_take_their_documented_values() -> None:
    """Regression: JWTGATE_STRIP_AUTHORIZATION=yes passed `haproxy -c` and left the token
    going to the service (only "1" counted). And the report-only /shadow example was on
    in every copy of haproxy.cfg; it now needs JWTGATE_SHADOW=1."""
    with LocalIssuer() as issuer:
        options = StackOptions(
            agent_config=agent_config(issuer),
            haproxy_env={"JWTGATE_STRIP_AUTHORIZATION": "yes", "JWTGATE_SHADOW": "0"},
        )
        with Stack(options) as stack:
            reply = request(stack, token=mint(issuer))
            assert reply.status == 200
            assert reply.json["authorization"] is False
            assert request(stack, "/shadow/x").status == 401  # the default policy's answer
    with LocalIssuer() as issuer, Stack(StackOptions(agent_config=agent_config(issuer))) as stack:
        reply = request(stack, token=mint(issuer))
        assert reply.json["authorization"] is True  # unset: the service sees the token
        assert request(stack, "/shadow/x").status == 200  # the devkit stack turns it on


@pytest.fixture
def fragile_gateway() -> Iterator[tuple[Stack, LocalIssuer]]:
    with (
        LocalIssuer() as issuer,
        Stack(StackOptions(agent_config=agent_config(issuer))) as stack,
    ):
        yield stack, issuer


def test_dead_agents_mean_503_never_200_and_traffic_recovers(
    fragile_gateway: tuple[Stack, LocalIssuer],
) -> None:
    stack, issuer = fragile_gateway
    token = mint(issuer)
    assert request(stack, token=token).status == 200
    for agent in stack.agents:
        agent.process.signal(signal.SIGKILL)
        agent.process.wait(5)
    statuses = {request(stack, token=token).status for _ in range(10)}
    assert statuses == {503}
    for agent in stack.agents:
        stack.restart_agent(agent)
    stack.wait_servers_up(timeout=15)
    assert request(stack, token=token).status == 200


# --- configuration errors and the demo --------------------------------------------------


def test_a_bad_config_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[agent]\nlisten = "127.0.0.1:1"\n[[issuers]]\nname = "x"\nissuer = "https://i"\n'
        'algorithms = ["RS256"]\njwks_uri = "https://i/jwks"\nleeway = "30x"\n'
        '[policies.default]\nissuers = ["x"]\naudiences = ["a"]\n'
    )
    for command in (["check-config", str(bad)], ["run", "--config", str(bad)]):
        result = subprocess.run(
            [sys.executable, "-m", "spoa", *command],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 1
        assert 'issuers[0].leeway: expected a duration like "30s"' in result.stderr
        assert 'got "30x"' in result.stderr
        assert "Traceback" not in result.stderr + result.stdout


def test_the_shipped_spoe_config_takes_max_waiting_frames_from_the_environment() -> None:
    # docs/operations.md tells several-worker deployments to lower it through this variable.
    config_dir = haproxy_config_dir()

    def check(value: str) -> subprocess.CompletedProcess[str]:
        env = dict(
            os.environ,
            JWTGATE_SPOE_CONF=str(config_dir / "spoe-jwt.conf"),
            JWTGATE_MAX_WAITING_FRAMES=value,
        )
        return subprocess.run(
            [haproxy_binary(), "-c", "-f", str(config_dir / "haproxy.cfg")],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    assert check("8").returncode == 0
    refused = check("0")
    assert refused.returncode != 0
    assert "max-waiting-frames" in refused.stderr


def test_the_agents_health_checks_give_up_after_a_second() -> None:
    """Regression (audit): with no `timeout check`, a check on a stopped agent waited
    `inter` (2 s), and the agent took about 7 s to be marked DOWN, not the 4-5 the docs
    gave; every check sent to it meanwhile was a 503."""
    text = (haproxy_config_dir() / "haproxy.cfg").read_text()
    backend = text.partition("\nbackend jwtgate-agents\n")[2].partition("\n\n")[0]
    settings = [line.split() for line in backend.splitlines() if not line.strip().startswith("#")]
    assert ["timeout", "check", "1s"] in settings
    servers = [words for words in settings if words[:1] == ["server"]]
    assert servers
    assert all(words[words.index("inter") + 1] == "2s" for words in servers)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["TERM", "HUP"])
def test_the_demo_stops_everything_it_started_on_sigterm_and_sighup(
    tmp_path: Path, signum: int
) -> None:
    """Regression: closing the demo's terminal (SIGHUP) or killing it (SIGTERM) left
    HAProxy and both agents running, in sessions of their own, on their ports."""
    demo = subprocess.Popen(
        [sys.executable, "-m", "spoa", "demo", "--short", "--no-live", "--exit"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert demo.stdout is not None
    try:
        for line in demo.stdout:  # the first progress line: traffic is flowing
            if line.startswith("["):
                break
        demo.send_signal(signum)
        rest = demo.stdout.read()
        assert demo.wait(60) == 130, rest
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert "everything it started is stopped" in rest
    assert "Traceback" not in rest
    assert processes_mentioning(str(tmp_path)) == []


def processes_mentioning(text: str) -> list[str]:
    """Live processes whose command line or environment holds `text` (HAProxy's command
    line names only the shipped config; its environment names the demo's directory)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and text.encode() in cmdline + environ:
            found.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found


def test_the_demo_runs_in_short_mode(tmp_path: Path) -> None:
    # The demo keeps its logs for the user in a fresh temporary directory: put that
    # under this test's own, so runs of the suite leave nothing in /tmp.
    result = subprocess.run(
        [sys.executable, "-m", "spoa", "demo", "--short", "--no-live", "--exit"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert [p.name[:13] for p in tmp_path.iterdir()] == ["jwtgate-demo-"]
    assert "Every request got the answer it should have" in result.stdout
    assert "curl -i -H 'Authorization: Bearer " in result.stdout
    assert "everything it started is stopped (logs kept in " in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
