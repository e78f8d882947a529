"""Helpers shared by the end-to-end tests: the agents' configuration and a raw HTTP client."""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass

from spoa.devkit.issuer import LocalIssuer
from spoa.devkit.stack import Stack

AUD = "orders-api"


def agent_config(issuer: LocalIssuer) -> str:
    return f"""
[log]
format = "json"

[[issuers]]
name = "local"
issuer = "{issuer.issuer}"
audiences = ["{AUD}"]
algorithms = ["RS256"]
jwks_uri = "{issuer.jwks_url}"
typ = ["at+jwt"]
refetch_interval = "0s"
leeway = "5s"

[policies.default]
issuers = ["local"]

[policies.admin]
issuers = ["local"]
require_scopes = ["admin"]
forward_claims = {{ email = "email" }}

[policies.shadow]
issuers = ["local"]
require_scopes = ["beta"]
report_only = true
"""


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> dict[str, object]:
        data: dict[str, object] = json.loads(self.body)
        return data


def request(
    stack: Stack,
    path: str = "/api/orders",
    token: str | None = None,
    headers: list[tuple[str, str]] | None = None,
) -> Reply:
    connection = http.client.HTTPConnection("127.0.0.1", stack.frontend_port, timeout=10)
    try:
        connection.putrequest("GET", path)
        if token is not None:
            connection.putheader("Authorization", f"Bearer {token}")
        for name, value in headers or []:
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return Reply(
            response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        )
    finally:
        connection.close()


def mint(issuer: LocalIssuer, **claims: object) -> str:
    return issuer.mint({"sub": "alice", "aud": AUD, "scope": "read", **claims})
