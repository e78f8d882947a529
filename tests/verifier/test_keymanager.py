"""The key manager against a real JWKS server on loopback, scheduled by a fake clock."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import ipaddress
import json
import os
import socketserver
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from verifier_helpers import (
    CONTEXT,
    NOW,
    POLICY,
    KeyPair,
    default_claims,
    make_key,
    mint,
    rules,
)

from spoa.keymanager import (
    ArchiveFailed,
    FetchFailed,
    HmacSecret,
    JwksUrlSource,
    KeyArchive,
    KeyEvent,
    KeyFile,
    KeyManager,
    KeysChanged,
    KeysFetched,
    KeySource,
    KeySourceError,
    KeysRestored,
    KeysUnavailable,
    OidcDiscoverySource,
    StaleServingEnded,
    StaleServingStarted,
    StaticKeySource,
    UrllibFetch,
    load_static_keys,
    source_id,
)
from spoa.verifier import JwksTiming, MemoryKeyStore, Reason, Verifier, load_jwks
from tests.support.jwks_server import JwksServer

T = TypeVar("T")
TIMING = JwksTiming(
    refresh_min=60.0,
    refresh_max=3600.0,
    default_max_age=600.0,
    refresh_ahead=0.1,
    backoff_initial=5.0,
    backoff_max=60.0,
    refetch_interval=30.0,
    negative_ttl=300.0,
    max_stale=1800.0,
    fetch_timeout=2.0,
    max_response_bytes=64 * 1024,
    max_keys=20,
)


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def no_threads_left_behind() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    # A fetch thread that gave up on a slow server may still be unwinding (closing its
    # socket) when the test ends; on a loaded machine that takes a moment. It must end,
    # but it gets a few seconds to do so.
    deadline = time.monotonic() + 5.0
    for thread in [t for t in threading.enumerate() if t not in before]:
        thread.join(max(0.0, deadline - time.monotonic()))
    leftover = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert leftover == []


@pytest.fixture
def server() -> Iterator[JwksServer]:
    with JwksServer() as running:
        yield running


@pytest.fixture(scope="module")
def key_a() -> KeyPair:
    return make_key("ES256", kid="a")


@pytest.fixture(scope="module")
def key_b() -> KeyPair:
    return make_key("ES256", kid="b")


def jwks(*keys: KeyPair) -> dict[str, Any]:
    return {"keys": [k.public_jwk() for k in keys]}


def unpinned_rsa_jwk(kid: str) -> dict[str, Any]:
    """An RSA JWK that names no alg: with RS256 and PS256 both allowed it would serve both."""
    jwk = make_key("RS256", kid=kid).public_jwk()
    assert "alg" not in jwk
    return jwk


class Harness:
    def __init__(
        self,
        source: KeySource,
        timing: JwksTiming = TIMING,
        archive: KeyArchive | None = None,
        archive_held: bool = False,
    ) -> None:
        self.clock = FakeClock(NOW)
        self.store = MemoryKeyStore()
        self.events: list[KeyEvent] = []
        self.manager = KeyManager(
            {"main": source},
            {"main": timing},
            self.store,
            clock=self.clock,
            monotonic=self.clock,  # one fake clock for the store and the schedule
            on_event=self.events.append,
            archive=archive,
            archive_held=archive_held,
        )
        self.verifier = Verifier([rules({"ES256", "HS256"})], self.store, cache_size=0)

    def verify(self, key: KeyPair, **claims: Any) -> Reason:
        token = mint(key, default_claims(**claims))
        return self.verifier.verify(token, POLICY, CONTEXT, self.clock.now).reason

    async def advance(self, to: float) -> None:
        """Move the clock to `to` and run what the manager has due by then."""
        self.clock.now = to
        await self.manager.run_due(to)

    def of_type(self, kind: type[T]) -> list[T]:
        return [e for e in self.events if isinstance(e, kind)]

    def start_then_refresh(self, server: JwksServer, body: Any) -> None:
        """Start, then let the endpoint answer `body` to the refresh due 600 s later."""

        async def scenario() -> None:
            try:
                await self.manager.start(timeout=5.0)
                server.set("/jwks", body)
                self.clock.now = NOW + 600
                await self.manager.run_due(self.clock.now)
            finally:
                await self.manager.aclose()

        asyncio.run(scenario())

    def start_once(self, timeout: float = 5.0) -> bool:
        """The manager's start (fetches retried for up to `timeout`; a test expecting a
        failure keeps it short), then close it: whether it became ready."""

        async def scenario() -> bool:
            try:
                return await self.manager.start(timeout=timeout)
            finally:
                await self.manager.aclose()

        return asyncio.run(scenario())


def run(scenario: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(scenario())


def test_start_fetches_before_ready_and_tokens_verify(server: JwksServer, key_a: KeyPair) -> None:
    server.set("/jwks", jwks(key_a), cache_control="max-age=300")
    harness = Harness(JwksUrlSource(server.url("/jwks")))
    assert not harness.manager.ready(NOW)

    assert harness.start_once()
    assert harness.manager.ready(NOW)
    assert harness.verify(key_a) is Reason.OK
    fetched = harness.of_type(KeysFetched)
    assert [(e.key_count, e.lifetime) for e in fetched] == [(1, 300.0)]
    assert server.requests("/jwks") == 1


def test_oidc_discovery(server: JwksServer, key_a: KeyPair) -> None:
    issuer = server.url("")
    server.set(
        "/.well-known/openid-configuration", {"issuer": issuer, "jwks_uri": server.url("/k")}
    )
    server.set("/k", jwks(key_a))
    harness = Harness(OidcDiscoverySource(issuer))
    assert harness.start_once()
    assert harness.verify(key_a) is Reason.OK


def test_start_retries_until_the_idp_answers(server: JwksServer, key_a: KeyPair) -> None:
    """Regression: start waited for one attempt only, so an IdP that came up 2s after
    the agent (or one 500) failed the start at once, whatever ready_timeout said."""
    server.set("/jwks", "down", status=500)
    timing = JwksTiming(backoff_initial=0.05, backoff_max=0.05)
    harness = Harness(JwksUrlSource(server.url("/jwks")), timing)

    async def scenario() -> bool:
        try:
            starting = asyncio.ensure_future(harness.manager.start(timeout=10.0))
            while server.requests("/jwks") < 3:
                await asyncio.sleep(0.01)
            assert harness.manager.last_failure("main") == "JWKS answered HTTP 500"
            server.set("/jwks", jwks(key_a))
            return await starting
        finally:
            await harness.manager.aclose()

    assert run(scenario)
    assert harness.verify(key_a) is Reason.OK
    assert len(harness.of_type(FetchFailed)) >= 2


def test_start_tries_once_more_before_its_deadline(server: JwksServer, key_a: KeyPair) -> None:
    """Regression: attempts followed the back-off alone, so with attempts at 0, 1, 3, 7
    and 15 s of a 30 s ready_timeout, an IdP back at 16 s was never asked again and the
    agent exited. The same schedule here, five times faster and with room for one fetch
    (fetch_timeout) before the deadline: the IdP comes back after the fourth attempt."""
    server.set("/jwks", "down", status=500)
    timing = JwksTiming(backoff_initial=0.2, backoff_max=10.0, fetch_timeout=0.5)
    harness = Harness(JwksUrlSource(server.url("/jwks")), timing)

    async def scenario() -> bool:
        try:
            starting = asyncio.ensure_future(harness.manager.start(timeout=2.0))
            while len(harness.of_type(FetchFailed)) < 4:  # at about 0, 0.2, 0.6, 1.4 s
                await asyncio.sleep(0.01)
            server.set("/jwks", jwks(key_a))
            return await starting  # the next back-off step would be at 3.0 s
        finally:
            await harness.manager.aclose()

    assert run(scenario)
    assert server.requests("/jwks") == 5
    assert harness.verify(key_a) is Reason.OK


def test_the_last_try_leaves_room_for_discovery_and_then_the_jwks() -> None:
    """Review: an issuer still to read its discovery document makes two fetches per
    attempt, so the last try before the deadline must leave room for both."""
    from spoa.keymanager import _attempt_time

    timing = JwksTiming(fetch_timeout=2.0)
    discovery = Harness(OidcDiscoverySource("https://id.example.com/"), timing)
    direct = Harness(JwksUrlSource("https://id.example.com/jwks.json"), timing)
    state = discovery.manager._issuers["main"]
    assert _attempt_time(state) == 4.0
    state.jwks_url = "https://id.example.com/jwks.json"  # read once: one fetch from now
    assert _attempt_time(state) == 2.0
    assert _attempt_time(direct.manager._issuers["main"]) == 2.0


def test_a_refetch_whose_fetch_is_cancelled_by_aclose_finds_nothing(
    server: JwksServer, key_a: KeyPair, key_b: KeyPair
) -> None:
    """Regression: a reload closes the old key manager, which cancelled the fetch that
    checks with an unknown kid were waiting on; the CancelledError reached the SPOP layer
    and those checks got no answer. They now end as a refetch that found nothing."""
    server.set("/jwks", jwks(key_a))
    timing = JwksTiming(fetch_timeout=5.0, refetch_interval=0.0)
    harness = Harness(JwksUrlSource(server.url("/jwks")), timing)

    async def scenario() -> bool:
        assert await harness.manager.start(timeout=2.0)
        server.set("/jwks", jwks(key_a, key_b), delay=3.0)  # the refetch stalls
        waiting = asyncio.ensure_future(harness.manager.refetch_unknown_kid("main", "b"))
        while server.requests("/jwks") < 2:
            await asyncio.sleep(0.01)
        await harness.manager.aclose()
        return await waiting

    assert run(scenario) is False


def test_carried_keys_serve_at_once_and_keep_their_age(server: JwksServer, key_a: KeyPair) -> None:
    """A reload during an IdP outage: the previous keys of the same source serve at once,
    aging from their own fetch (so max_stale still counts from it)."""
    server.set("/jwks", "down", status=500)
    first = MemoryKeyStore()
    first.replace("main", load_jwks(json.dumps(jwks(key_a)).encode())[0], NOW - 100.0)
    carried = {"main": first.get("main")}
    harness = Harness(JwksUrlSource(server.url("/jwks")))

    async def scenario() -> bool:
        try:
            return await harness.manager.start(timeout=0.3, carried=carried)  # type: ignore[arg-type]
        finally:
            await harness.manager.aclose()

    assert run(scenario)
    assert server.requests("/jwks") == 0  # ready without waiting for the IdP
    assert harness.verify(key_a) is Reason.OK
    assert harness.store.usable_until("main") == NOW - 100.0 + TIMING.max_stale


def test_carried_keys_past_a_lower_max_stale_fail_closed_at_once(
    server: JwksServer, key_a: KeyPair
) -> None:
    """Regression: lowering max_stale by a reload during an IdP outage was rejected (the
    carried keys were too old to count, and no fetch could replace them), so the old,
    looser limit went on serving. The reload now takes: the keys are stale, so closed."""
    server.set("/jwks", "down", status=500)
    first = MemoryKeyStore()
    first.replace("main", load_jwks(json.dumps(jwks(key_a)).encode())[0], NOW - 100.0)
    carried = {"main": first.get("main")}
    harness = Harness(JwksUrlSource(server.url("/jwks")), JwksTiming(max_stale=60.0))

    async def scenario() -> bool:
        try:
            return await harness.manager.start(timeout=5.0, carried=carried)  # type: ignore[arg-type]
        finally:
            await harness.manager.aclose()

    assert run(scenario)  # holds keys: the reload is not refused
    assert not harness.manager.ready(NOW)
    assert harness.verify(key_a) is Reason.KEYS_UNAVAILABLE


def test_oidc_discovery_never_steps_down_to_plain_http_elsewhere(
    server: JwksServer, key_a: KeyPair
) -> None:
    issuer = server.url("")
    server.set(
        "/.well-known/openid-configuration",
        {"issuer": issuer, "jwks_uri": "http://192.0.2.1/jwks.json"},
    )
    harness = Harness(OidcDiscoverySource(issuer))
    assert not harness.start_once(timeout=0.3)
    assert "plain http off this host" in harness.of_type(FetchFailed)[0].cause


def test_oidc_discovery_refuses_a_different_issuer(server: JwksServer, key_a: KeyPair) -> None:
    issuer = server.url("")
    server.set(
        "/.well-known/openid-configuration",
        {"issuer": issuer + "/evil", "jwks_uri": server.url("/k")},
    )
    server.set("/k", jwks(key_a))
    harness = Harness(OidcDiscoverySource(issuer))
    assert not harness.start_once(timeout=0.3)
    assert server.requests("/k") == 0
    failures = harness.of_type(FetchFailed)
    assert len(failures) == 2  # the first, and the last try before the deadline
    assert all("discovered issuer differs" in failure.cause for failure in failures)
    assert harness.verify(key_a) is Reason.KEYS_UNAVAILABLE


def test_rotation_follows_cache_control(server: JwksServer, key_a: KeyPair, key_b: KeyPair) -> None:
    server.set("/jwks", jwks(key_a), cache_control="public, max-age=120")
    harness = Harness(JwksUrlSource(server.url("/jwks")))
    clock = harness.clock

    async def scenario() -> None:
        try:
            await harness.manager.start(timeout=5.0)
            server.set("/jwks", jwks(key_a, key_b), cache_control="max-age=120")
            await harness.advance(NOW + 100)  # not due before 0.9 * 120 s
            assert server.requests("/jwks") == 1
            assert harness.verify(key_b) is Reason.UNKNOWN_KID
            await harness.advance(NOW + 108)
            assert server.requests("/jwks") == 2
            assert harness.verify(key_b) is Reason.OK
            server.set("/jwks", jwks(key_b), cache_control="max-age=120")
            await harness.advance(NOW + 108 + 108)
            assert harness.verify(key_a, iat=int(clock.now)) is Reason.UNKNOWN_KID
            assert harness.verify(key_b, iat=int(clock.now)) is Reason.OK
        finally:
            await harness.manager.aclose()

    run(scenario)
    changes = [(e.added, e.removed) for e in harness.of_type(KeysChanged)]
    assert changes == [(("a",), ()), (("b",), ()), ((), ("a",))]


def test_a_key_set_that_only_renames_a_key_is_new(server: JwksServer, key_a: KeyPair) -> None:
    """Regression: a refresh with the same key material under another kid (or another
    pinned alg) was taken as unchanged, so the new kid stayed unknown_kid and the old
    one kept verifying until a restart."""
    server.set("/jwks", jwks(key_a), cache_control="max-age=120")
    harness = Harness(JwksUrlSource(server.url("/jwks")))
    clock = harness.clock
    renamed = dataclasses.replace(key_a, kid="a2")

    async def scenario() -> None:
        try:
            await harness.manager.start(timeout=5.0)
            assert harness.verify(key_a) is Reason.OK
            server.set("/jwks", jwks(renamed), cache_control="max-age=120")
            await harness.advance(NOW + 108)
            assert harness.verify(renamed, iat=int(clock.now)) is Reason.OK
            assert harness.verify(key_a, iat=int(clock.now)) is Reason.UNKNOWN_KID
        finally:
            await harness.manager.aclose()

    run(scenario)


def test_outage_serves_stale_keys_then_fails_closed(server: JwksServer, key_a: KeyPair) -> None:
    server.set("/jwks", jwks(key_a), cache_control="max-age=600")
    harness = Harness(JwksUrlSource(server.url("/jwks")))
    clock = harness.clock

    async def scenario() -> None:
        try:
            await harness.manager.start(timeout=5.0)
            server.set("/jwks", "upstream down", status=503)
            clock.now = NOW + 540
            await harness.manager.run_due(clock.now)
            assert harness.of_type(FetchFailed)[-1].retry_in == 5.0
            assert harness.of_type(FetchFailed)[-1].kind == "http_error"
            # What the agent sleeps until (regression: it looked only once a second, so
            # each retry ran up to a second late while the keys aged).
            assert harness.manager.next_due() == NOW + 540 + 5.0
            clock.now = NOW + 600
            await harness.manager.run_due(clock.now)  # retry after backoff; still failing
            assert harness.of_type(StaleServingStarted)
            token = mint(key_a, default_claims(iat=int(NOW), exp=int(NOW) + 7200))
            assert harness.verifier.verify(token, POLICY, CONTEXT, clock.now).ok
            clock.now = NOW + 1801  # past max_stale since the last success
            await harness.manager.run_due(clock.now)
            assert harness.of_type(KeysUnavailable)
            assert not harness.manager.ready(clock.now)
            verdict = harness.verifier.verify(token, POLICY, CONTEXT, clock.now)
            assert verdict.reason is Reason.KEYS_UNAVAILABLE
            server.set("/jwks", jwks(key_a), cache_control="max-age=600")
            clock.now += 60  # past any backoff
            await harness.manager.run_due(clock.now)
            assert harness.manager.ready(clock.now)
            assert harness.verifier.verify(token, POLICY, CONTEXT, clock.now).ok
        finally:
            await harness.manager.aclose()

    run(scenario)
    assert len(harness.of_type(StaleServingEnded)) == 1
    assert all("503" in e.cause for e in harness.of_type(FetchFailed))


def test_slow_server_never_holds_a_request_past_the_fetch_timeout(
    server: JwksServer, key_a: KeyPair
) -> None:
    timing = JwksTiming(fetch_timeout=0.2, refetch_interval=0.0)
    server.set("/jwks", jwks(key_a), delay=0.8)
    harness = Harness(JwksUrlSource(server.url("/jwks")), timing)

    async def scenario() -> tuple[bool, float, bool, float]:
        try:
            started = time.monotonic()
            ready = await harness.manager.start(timeout=0.3)
            start_took = time.monotonic() - started
            started = time.monotonic()
            found = await harness.manager.refetch_unknown_kid("main", "a")
            return ready, start_took, found, time.monotonic() - started
        finally:
            await harness.manager.aclose()

    ready, start_took, found, refetch_took = run(scenario)
    assert not ready
    assert not found
    assert start_took < 0.6
    assert refetch_took < 0.6
    assert harness.of_type(FetchFailed)[0].kind == "timeout"


def test_a_body_sent_a_byte_at_a_time_stops_at_the_fetch_timeout(server: JwksServer) -> None:
    """Regression: the deadline was checked only between 64 KiB reads, so a trickled body
    kept its fetch thread (and socket) long past the timeout, one more per retry."""
    server.set("/jwks", b"x" * 40, trickle=0.1)  # 4 s for the whole body
    fetch = UrllibFetch()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        fetch._get(server.url("/jwks"), 0.3, 1 << 20)
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize("slow", ["head", "continue", "chunk-line"])
def test_a_server_that_keeps_the_connection_busy_stops_at_the_fetch_timeout(
    slow: str, server: JwksServer
) -> None:
    """Headers a byte at a time, `100 Continue` after `100 Continue`, a chunk-size line
    that never ends: each read returns at once, so the socket timeout never fires, and
    only shutting the socket down at the deadline ends the fetch (a guard that refused new
    fetches of the URL meanwhile blocked its refreshes for as long as this went on)."""
    if slow == "head":
        server.set("/jwks", b"{}", trickle=0.05, trickle_head=True, headers={"X-Pad": "p" * 200})
    else:
        server.set("/jwks", b"{}", trickle=0.05, endless=slow)
    fetch = UrllibFetch()
    url = server.url("/jwks")
    for _ in range(2):  # the next fetch of the URL starts, and is cut off the same way
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            fetch._get(url, 0.3, 1 << 20)
        assert time.monotonic() - started < 2.0
    assert server.requests("/jwks") == 2


@pytest.mark.parametrize(
    ("body", "cause"),
    [
        ("<html>oops</html>", "JSON"),
        ('{"keys": "nope"}', "keys"),
        ('{"keys": []}', "no usable"),
        (
            json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"}]}),
            "no usable",
        ),
        (json.dumps({"keys": [{"kty": "EC"}] * 21}), "limit"),
        # Regression (architecture review): a cause of ours that names no document got
        # no "JWKS: " before it.
        ("x" * (64 * 1024 + 1), "JWKS: response is larger than 65536 bytes"),
    ],
)
def test_garbage_and_huge_responses_keep_the_last_good_keys(
    body: str, cause: str, server: JwksServer, key_a: KeyPair
) -> None:
    server.set("/jwks", jwks(key_a))
    harness = Harness(JwksUrlSource(server.url("/jwks")))
    harness.start_then_refresh(server, body)
    failure = harness.of_type(FetchFailed)[-1]
    assert cause in failure.cause
    assert failure.kind == "invalid"
    assert harness.verify(key_a, iat=int(NOW) + 500) is Reason.OK


def test_unknown_kid_flood_becomes_one_fetch(
    server: JwksServer, key_a: KeyPair, key_b: KeyPair
) -> None:
    server.set("/jwks", jwks(key_a))
    harness = Harness(JwksUrlSource(server.url("/jwks")))
    manager = harness.manager

    async def scenario() -> list[bool]:
        try:
            await manager.start(timeout=5.0)
            harness.clock.now = NOW + 31  # outside the refetch interval of the start-up fetch
            forged = [manager.refetch_unknown_kid("main", f"forged-{i}") for i in range(300)]
            results = await asyncio.gather(*forged)
            # Right after: rate limited, and the first forged kid is negatively cached.
            again = await asyncio.gather(
                *(manager.refetch_unknown_kid("main", f"x{i}") for i in range(50))
            )
            assert not any(again)
            assert not await manager.refetch_unknown_kid("main", "forged-0")
            # A real new kid after the interval is fetched and found.
            server.set("/jwks", jwks(key_a, key_b))
            harness.clock.now = NOW + 62
            assert await manager.refetch_unknown_kid("main", "b")
            return list(results)
        finally:
            await manager.aclose()

    results = run(scenario)
    assert not any(results)
    assert server.requests("/jwks") == 3  # start-up, one for the flood, one for "b"
    assert harness.verify(key_b) is Reason.OK


def test_static_sources(tmp_path: Path, rsa_key: KeyPair) -> None:
    pem = tmp_path / "key.pem"
    pem.write_bytes(rsa_key.public_pem())
    secret = b"s" * 32
    source = StaticKeySource(
        files=(KeyFile(str(pem), kid="pem-key"),),
        secrets=(HmacSecret(secret, alg="HS256", kid="h"),),
    )
    assert "sss" not in repr(source)
    store = MemoryKeyStore()
    manager = KeyManager({"main": source}, {}, store, clock=lambda: NOW)

    async def scenario() -> bool:
        try:
            return await manager.start(timeout=1.0)
        finally:
            await manager.aclose()

    assert run(scenario)
    verifier = Verifier([rules({"RS256", "HS256"})], store)
    rsa_token = mint(KeyPair("RS256", "pem-key", rsa_key.private))
    assert verifier.verify(rsa_token, POLICY, CONTEXT, NOW).ok
    assert verifier.verify(mint(KeyPair("HS256", "h", secret)), POLICY, CONTEXT, NOW).ok
    wrong_secret = mint(KeyPair("HS256", "h", b"t" * 32))
    assert verifier.verify(wrong_secret, POLICY, CONTEXT, NOW).reason is Reason.BAD_SIGNATURE


def test_static_source_errors_are_raised(tmp_path: Path) -> None:
    missing = StaticKeySource(files=(KeyFile(str(tmp_path / "absent.pem")),))
    manager = KeyManager({"main": missing}, {}, MemoryKeyStore(), clock=lambda: NOW)
    with pytest.raises(KeySourceError):
        run(lambda: manager.start(timeout=1.0))


@pytest.mark.parametrize(
    ("target", "follows"),
    [
        ("/real", True),
        ("file:///etc/passwd", False),
        ("ftp://127.0.0.1/k", False),
        # Regression: loopback http redirected to plain http elsewhere was followed.
        ("http://192.0.2.1/jwks.json", False),
    ],
)
def test_redirects_stay_on_http(
    target: str, follows: bool, server: JwksServer, key_a: KeyPair
) -> None:
    location = server.url(target) if target.startswith("/") else target
    server.set("/jwks", b"", status=302, headers={"Location": location})
    server.set("/real", jwks(key_a))
    harness = Harness(JwksUrlSource(server.url("/jwks")))
    assert harness.start_once(timeout=5.0 if follows else 0.3) is follows
    if not follows:
        # urllib itself refuses file: (leaving the 302); our handler refuses ftp:. Both
        # are refused redirects (regression: the first was counted as http_error).
        failure = harness.of_type(FetchFailed)[0]
        assert failure.cause.startswith("JWKS: ")
        assert "redirect" in failure.cause
        assert failure.kind == "error"


# --- HTTPS: certificates are verified ----------------------------------------------------------


def _tls_for_loopback(directory: Path) -> tuple[Path, ssl.SSLContext]:
    """A private CA (written to ca.pem) and a server context for 127.0.0.1 signed by it."""
    now = datetime.datetime.now(datetime.UTC)
    valid = {"not_valid_before": now - datetime.timedelta(hours=1)}
    valid["not_valid_after"] = now + datetime.timedelta(hours=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jwtgate test CA")])
    ca_cert = (
        x509.CertificateBuilder(subject_name=ca_name, issuer_name=ca_name, **valid)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder(
            subject_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]),
            issuer_name=ca_name,
            **valid,
        )
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem = directory / "ca.pem"
    ca_pem.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    chain = directory / "server.pem"
    chain.write_bytes(
        server_cert.public_bytes(serialization.Encoding.PEM)
        + server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(chain)
    return ca_pem, context


def test_https_keys_come_only_from_a_trusted_certificate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key_a: KeyPair
) -> None:
    """Verification is on by default; a private CA is trusted through SSL_CERT_FILE, as
    docs/configuration.md tells operators."""
    ca_pem, server_context = _tls_for_loopback(tmp_path)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    with JwksServer(tls=server_context) as https_server:
        https_server.set("/jwks", jwks(key_a))
        url = https_server.url("/jwks")
        assert url.startswith("https://127.0.0.1:")

        untrusted = Harness(JwksUrlSource(url))  # the system store does not know our CA
        assert untrusted.start_once(timeout=0.3) is False
        assert "SSLCertVerificationError" in untrusted.of_type(FetchFailed)[0].cause

        monkeypatch.setenv("SSL_CERT_FILE", str(ca_pem))
        trusted = Harness(JwksUrlSource(url))  # its fetcher's context is built after the env
        assert trusted.start_once() is True
        assert trusted.verify(key_a) is Reason.OK


# --- the wall clock steps; the schedule keeps monotonic time ---------------------------------


def _two_clock_manager(
    server: JwksServer, wall: FakeClock, ticks: FakeClock
) -> tuple[KeyManager, MemoryKeyStore, Verifier]:
    store = MemoryKeyStore()
    manager = KeyManager(
        {"main": JwksUrlSource(server.url("/jwks"))},
        {"main": TIMING},
        store,
        clock=wall,
        monotonic=ticks,
    )
    return manager, store, Verifier([rules({"ES256"})], store, cache_size=0)


def test_a_wall_clock_stepped_back_neither_pauses_refreshes_nor_stretches_max_stale(
    server: JwksServer, key_a: KeyPair
) -> None:
    """Regression: the schedule ran on the wall clock, so after a step back of an hour no
    refresh (nor unknown-kid refetch) happened for an hour, and keys the IdP withdrew
    stayed usable for max_stale plus the step."""
    server.set("/jwks", jwks(key_a), cache_control="max-age=600")
    wall, ticks = FakeClock(NOW), FakeClock(1000.0)
    manager, store, verifier = _two_clock_manager(server, wall, ticks)
    token = mint(key_a, default_claims(iat=int(NOW) - 7200, exp=int(NOW) + 7200))

    async def scenario() -> None:
        try:
            assert await manager.start(timeout=5.0)
            wall.now = NOW - 3600  # stepped back an hour
            ticks.now += 600  # while ten minutes pass
            await manager.run_due(ticks.now)
            assert server.requests("/jwks") == 2  # refreshed on time all the same
            server.set("/jwks", "down", status=500)
            ticks.now += TIMING.max_stale + 1  # the IdP stays down past max_stale
            await manager.run_due(ticks.now)
            # The wall clock (an hour behind) would still call the keys young.
            assert wall.now - store.get("main").refreshed_at < TIMING.max_stale  # type: ignore[union-attr]
            verdict = verifier.verify(token, POLICY, CONTEXT, wall.now)
            assert verdict.reason is Reason.KEYS_UNAVAILABLE
        finally:
            await manager.aclose()

    run(scenario)


def test_a_wall_clock_stepped_forward_fetches_again_at_once(
    server: JwksServer, key_a: KeyPair
) -> None:
    server.set("/jwks", jwks(key_a), cache_control="max-age=600")
    wall, ticks = FakeClock(NOW), FakeClock(1000.0)
    manager, store, _ = _two_clock_manager(server, wall, ticks)

    async def scenario() -> None:
        try:
            assert await manager.start(timeout=5.0)
            wall.now = NOW + TIMING.max_stale + 60  # the keys look stale to the store
            ticks.now += 1
            await manager.run_due(ticks.now)  # notices, and makes a refresh due
            await manager.run_due(ticks.now)
            assert server.requests("/jwks") == 2
            assert store.generation("main", wall.now) is not None
        finally:
            await manager.aclose()

    run(scenario)


def test_a_key_set_whose_keys_would_each_serve_two_algorithms_is_a_failed_fetch(
    server: JwksServer, key_a: KeyPair
) -> None:
    """RFC review: with RS256 and PS256 both allowed, RSA keys that name no alg would each
    verify both (RFC 8725 3.1 wants one algorithm per key). Such a set serves no token, so
    taking it would be taking none: the fetch fails, saying why, and the last good keys
    stay. The same keys naming their alg are a good fetch."""
    server.set("/jwks", jwks(key_a))
    source = JwksUrlSource(server.url("/jwks"), algorithms=("ES256", "PS256", "RS256"))
    unnamed = unpinned_rsa_jwk("r")
    harness = Harness(source)
    harness.start_then_refresh(server, {"keys": [unnamed]})
    failure = harness.of_type(FetchFailed)[-1]
    assert "its keys name no alg, and each would serve several" in failure.cause
    assert "(ES256, PS256, RS256)" in failure.cause
    assert failure.kind == "invalid"
    assert harness.verify(key_a, iat=int(NOW) + 500) is Reason.OK
    server.set("/jwks", jwks(key_a))
    named = Harness(source)
    named.start_then_refresh(server, {"keys": [{**unnamed, "alg": "PS256"}]})
    assert not named.of_type(FetchFailed)


def test_keys_that_would_serve_two_algorithms_are_left_out_and_said(
    server: JwksServer, key_a: KeyPair
) -> None:
    """Regression (diff review): in a set where other keys serve, a key without alg (with
    RS256 and PS256 allowed) stayed in the set and the key count, idle, and nothing said
    why its tokens failed. It is now left out, and the fetch names it among the skipped."""
    source = JwksUrlSource(server.url("/jwks"), algorithms=("ES256", "PS256", "RS256"))
    unnamed = unpinned_rsa_jwk("b")
    server.set("/jwks", {"keys": [key_a.public_jwk(), unnamed]})
    harness = Harness(source)
    assert harness.start_once()
    fetched = harness.of_type(KeysFetched)[-1]
    assert fetched.key_count == 1
    assert fetched.skipped == (
        "key 'b' names no alg, and several of the issuer's algorithms fit it",
    )
    held = harness.store.get("main")
    assert held is not None
    assert [key.kid for key in held.key_set.keys] == ["a"]


def test_a_restored_set_says_which_keys_it_left_out(
    server: JwksServer, key_a: KeyPair, tmp_path: Path
) -> None:
    """Regression (second diff review): keys left out of a set restored from keys_dir
    were dropped without a word, where a fetch names them."""
    archive = KeyArchive(tmp_path / "keys")
    source = JwksUrlSource(server.url("/jwks"), algorithms=("ES256", "PS256", "RS256"))
    unnamed = unpinned_rsa_jwk("b")
    saved = json.dumps({"keys": [key_a.public_jwk(), unnamed]}).encode()
    archive.prepare()
    archive.save("main", source_id(source), saved, NOW)
    server.set("/jwks", "upstream down", status=503)
    later = Harness(source, archive=archive)
    later.clock.now = NOW + 100
    assert later.start_once(timeout=0.3)
    (restored,) = later.of_type(KeysRestored)
    assert restored.key_count == 1
    assert restored.skipped == (
        "key 'b' names no alg, and several of the issuer's algorithms fit it",
    )


def test_a_key_file_with_a_key_that_would_serve_two_algorithms_is_refused(
    tmp_path: Path, key_a: KeyPair
) -> None:
    unnamed = unpinned_rsa_jwk("b")
    path = tmp_path / "keys.jwks"
    path.write_text(json.dumps({"keys": [key_a.public_jwk(), unnamed]}))
    source = StaticKeySource((KeyFile(str(path)),), algorithms=("ES256", "PS256", "RS256"))
    with pytest.raises(KeySourceError, match=r"key 'b' names no alg.*`alg` in its keys table"):
        load_static_keys(source)
    pinned = StaticKeySource((KeyFile(str(path), alg="RS256"),), algorithms=source.algorithms)
    assert len(load_static_keys(pinned).keys) == 2
    nameless = {k: v for k, v in unnamed.items() if k != "kid"}
    path.write_text(json.dumps({"keys": [key_a.public_jwk(), nameless]}))
    with pytest.raises(KeySourceError, match="a key without kid names no alg"):
        load_static_keys(source)


def test_a_key_set_with_no_key_for_the_allowed_algorithms_keeps_the_last_good_keys(
    server: JwksServer, key_a: KeyPair, tmp_path: Path
) -> None:
    """Regression (fault injection): a JWKS whose keys all name an alg outside the
    issuer's allow-list (here RS512 where only ES256 is) was taken as a good fetch:
    every valid token got 401 unsupported_alg until the next scheduled refresh, while
    the fetch counted `ok`."""
    server.set("/jwks", jwks(key_a))
    source = JwksUrlSource(server.url("/jwks"), algorithms=("ES256",))
    archive = KeyArchive(tmp_path / "keys")
    harness = Harness(source, archive=archive)
    relabelled = {"keys": [{**make_key("RS256", kid="a").public_jwk(), "alg": "RS512"}]}
    harness.start_then_refresh(server, relabelled)
    failure = harness.of_type(FetchFailed)[-1]
    assert "no key in it fits the issuer's algorithms (ES256)" in failure.cause
    assert failure.kind == "invalid"
    assert harness.verify(key_a, iat=int(NOW) + 500) is Reason.OK
    # Nor does a saved set of that kind serve a start during an outage.
    archive.save("main", source_id(source), json.dumps(relabelled).encode(), NOW + 600)
    server.set("/jwks", "upstream down", status=503)
    later = Harness(source, archive=archive)
    later.clock.now = NOW + 700
    assert not later.start_once(timeout=0.5)
    assert not later.of_type(KeysRestored)
    # One fitting key among others is enough.
    server.set("/jwks", {"keys": [*relabelled["keys"], {**key_a.public_jwk(), "kid": "c"}]})
    assert Harness(source).start_once()


def test_a_failed_connection_says_which_document_and_why() -> None:
    """Regression (walkthrough): an unreachable IdP was reported as `URLError:
    ConnectionRefusedError` only: not whether discovery or the JWKS failed, nor the
    operating system's reason."""
    import socket

    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    for source, document in (
        (JwksUrlSource(f"http://127.0.0.1:{port}/jwks"), "JWKS"),
        (OidcDiscoverySource(f"http://127.0.0.1:{port}"), "discovery document"),
    ):
        harness = Harness(source)
        assert not harness.start_once(timeout=0.2)
        cause = harness.of_type(FetchFailed)[0].cause
        assert cause == f"{document}: URLError: ConnectionRefusedError: Connection refused"


def test_a_cause_that_names_its_document_gets_no_second_name(server: JwksServer) -> None:
    """Regression (diff review): "discovery answered HTTP 503" was logged as "discovery
    document: discovery answered HTTP 503"."""
    server.set("/.well-known/openid-configuration", "down", status=503)
    harness = Harness(OidcDiscoverySource(server.url("")))
    assert not harness.start_once(timeout=0.2)
    assert harness.of_type(FetchFailed)[0].cause == "discovery answered HTTP 503"


def test_a_start_during_an_outage_serves_the_saved_keys_for_what_remains_of_max_stale(
    server: JwksServer, key_a: KeyPair, tmp_path: Path
) -> None:
    """Regression (fault injection): keys lived in memory only, so an agent restarted
    while the IdP was down had none and refused every token, although the one before it
    would have served them for the rest of max_stale. The last good set is saved now."""
    archive = KeyArchive(tmp_path / "keys")
    source = JwksUrlSource(server.url("/jwks"))
    server.set("/jwks", jwks(key_a), cache_control="max-age=600")
    assert Harness(source, archive=archive).start_once()
    saved = archive.load("main", source_id(source))
    assert saved is not None
    assert saved[1] == NOW
    assert oct((tmp_path / "keys" / "main.jwks.json").stat().st_mode & 0o777) == "0o600"

    server.set("/jwks", "upstream down", status=503)
    later = Harness(source, archive=archive)
    later.clock.now = NOW + 1000  # max_stale is 1800
    assert later.start_once()
    assert [(e.issuer, e.age) for e in later.of_type(KeysRestored)] == [("main", 1000.0)]
    fresh = {"iat": int(later.clock.now), "exp": int(later.clock.now) + 3600}
    assert later.verify(key_a, **fresh) is Reason.OK
    # They age from their own fetch: past max_stale they fail closed, as before.
    later.clock.now = NOW + 1801
    assert later.verify(key_a, **fresh) is Reason.KEYS_UNAVAILABLE

    for now, other_source in (
        (NOW + 1801, source),  # too old
        (NOW - 10, source),  # saved "in the future": the clock proves nothing
        (NOW + 10, JwksUrlSource(server.url("/other"))),  # another source
    ):
        harness = Harness(other_source, archive=archive)
        harness.clock.now = now
        assert not harness.start_once(timeout=0.5)
        assert not harness.of_type(KeysRestored)


def test_a_reload_saves_its_key_sets_only_once_it_is_accepted(
    server: JwksServer, key_a: KeyPair, key_b: KeyPair, tmp_path: Path
) -> None:
    """Regression: a reload that was then rejected had already replaced the running
    configuration's saved set, so a restart during an IdP outage found nothing to use."""
    archive = KeyArchive(tmp_path / "keys")
    running = JwksUrlSource(server.url("/jwks"))
    server.set("/jwks", jwks(key_a), cache_control="max-age=600")
    assert Harness(running, archive=archive).start_once()

    candidate = JwksUrlSource(server.url("/other"))  # the reload's new jwks_uri
    server.set("/other", jwks(key_b), cache_control="max-age=600")
    reload = Harness(candidate, archive=archive, archive_held=True)
    reload.clock.now = NOW + 60
    assert reload.start_once()
    assert archive.load("main", source_id(running)) is not None  # still the running one's
    assert archive.load("main", source_id(candidate)) is None

    reload.manager.release_archive()  # accepted
    saved = archive.load("main", source_id(candidate))
    assert saved is not None
    assert saved[1] == NOW + 60  # dated by its fetch, not by the acceptance


def test_an_unwritable_key_directory_is_reported_and_serving_goes_on(
    server: JwksServer, key_a: KeyPair, tmp_path: Path
) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    server.set("/jwks", jwks(key_a), cache_control="max-age=600")
    harness = Harness(JwksUrlSource(server.url("/jwks")), archive=KeyArchive(blocked / "keys"))
    assert harness.start_once()
    assert [e.issuer for e in harness.of_type(ArchiveFailed)] == ["main"]
    # Regression: the event said FileNotFoundError and nothing more.
    (failed,) = harness.of_type(ArchiveFailed)
    assert failed.directory == str(blocked / "keys")
    assert failed.cause == "NotADirectoryError: Not a directory"
    assert harness.verify(key_a) is Reason.OK
    with pytest.raises(NotADirectoryError):
        KeyArchive(blocked / "keys").prepare()


def _saved_archive(tmp_path: Path, key: KeyPair, source: JwksUrlSource) -> KeyArchive:
    archive = KeyArchive(tmp_path / "keys")
    archive.save("main", source_id(source), json.dumps(jwks(key)).encode(), NOW)
    return archive


def test_a_saved_set_anyone_else_could_have_written_is_not_used(
    key_a: KeyPair, tmp_path: Path
) -> None:
    """Regression (review): whoever could write to keys_dir could plant keys, since the
    files were trusted whatever their owner and mode; and a FIFO there blocked start-up."""
    source = JwksUrlSource("https://idp.example/jwks")
    archive = _saved_archive(tmp_path, key_a, source)
    saved = tmp_path / "keys" / "main.jwks.json"
    assert oct(saved.stat().st_mode & 0o777) == "0o600"
    assert archive.load("main", source_id(source)) is not None
    saved.chmod(0o666)
    assert archive.load("main", source_id(source)) is None
    saved.chmod(0o600)
    (tmp_path / "keys").chmod(0o777)
    assert archive.load("main", source_id(source)) is None
    (tmp_path / "keys").chmod(0o700)
    saved.unlink()
    os.mkfifo(saved)
    assert archive.load("main", source_id(source)) is None
    saved.unlink()
    saved.symlink_to(tmp_path / "elsewhere.json")
    assert archive.load("main", source_id(source)) is None


@pytest.mark.parametrize(
    "content",
    [
        '{"format": 1, "source": "S", "fetched_at": 1' + "0" * 400 + ', "jwks": "{}"}',
        "[" * 100_000,
        '{"format": 1, "source": "S", "fetched_at": NaN, "jwks": "{}"}',
        "\xff\xfe",
        '{"format": 1, "source": "S", "fetched_at": 1, "jwks": "[[[[["}',
    ],
)
def test_a_damaged_saved_set_is_ignored_not_fatal(
    content: str, server: JwksServer, tmp_path: Path
) -> None:
    """Regression (review): an overflowing date or deep nesting in the file escaped as
    an exception and stopped the start-up with an internal error."""
    source = JwksUrlSource(server.url("/jwks"))
    server.set("/jwks", "down", status=503)
    directory = tmp_path / "keys"
    directory.mkdir(mode=0o700)
    saved = directory / "main.jwks.json"
    saved.write_text(
        content.replace('"S"', json.dumps(source_id(source))), errors="surrogateescape"
    )
    saved.chmod(0o600)
    harness = Harness(source, archive=KeyArchive(directory))
    assert not harness.start_once(timeout=0.5)
    assert not harness.of_type(KeysRestored)


def test_restored_keys_are_reported_as_stale_and_used_when_the_idp_hangs(
    key_a: KeyPair, tmp_path: Path
) -> None:
    """Regression (review): restored keys set no key-age metric and were not reported as
    served stale, so the max_stale alerts stayed silent; and with an IdP that hangs
    (no failed fetch before the start-up's timeout) the saved set was never used."""
    hang = threading.Event()

    class Hanging(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            hang.wait(10)

    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), Hanging) as hanging:
        threading.Thread(target=hanging.serve_forever, daemon=True).start()
        try:
            source = JwksUrlSource(f"http://127.0.0.1:{hanging.server_address[1]}/jwks")
            archive = _saved_archive(tmp_path, key_a, source)
            harness = Harness(source, archive=archive)
            harness.clock.now = NOW + 100
            assert harness.start_once(timeout=0.5)  # below the 2 s fetch timeout
            (restored,) = harness.of_type(KeysRestored)
            assert (restored.age, restored.key_count, restored.fetched_at) == (100.0, 1, NOW)
            run(lambda: harness.manager.run_due(harness.clock.now))
            assert harness.of_type(StaleServingStarted)
        finally:
            hang.set()
            hanging.shutdown()


@pytest.mark.parametrize("length", ["\u00b2", "\u00b9\u00b2\u00b3", "-1", "12x"])
def test_a_content_length_that_is_no_ascii_number_is_ignored(key_a: KeyPair, length: str) -> None:
    """Regression: "²" passed str.isdigit() (HTTP headers are read as Latin-1), and
    int() then raised ValueError, which failed the fetch with a cause naming no document.
    A length that is no number is ignored, as http.client itself does: the body is read
    to its end, within max_jwks_bytes."""
    body = json.dumps(jwks(key_a)).encode()

    class OddLength(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            while self.rfile.readline() not in (b"\r\n", b""):
                pass
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
            self.wfile.write(head.encode("latin-1") + body)

    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), OddLength) as odd:
        threading.Thread(target=odd.serve_forever, daemon=True).start()
        try:
            response = UrllibFetch()._get(
                f"http://127.0.0.1:{odd.server_address[1]}/jwks", 2.0, 1 << 20
            )
        finally:
            odd.shutdown()
    assert response.status == 200
    assert response.body == body
