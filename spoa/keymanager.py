"""The key manager: fills a `MemoryKeyStore` from static files, JWKS URLs and OIDC discovery.

All scheduling decisions live in the pure `JwksSchedule`; this module does the I/O. The
background loop only calls `run_due(now)` periodically, so tests drive it with a fake clock.
The schedule (refreshes, backoff, refetch limits, max_stale) runs on the monotonic clock, so
a wall clock stepped back can neither pause refreshes nor stretch max_stale; the key store's
timestamps, which the verifier reads, are wall-clock times.
Every fetch is single-flight per issuer and bounded by the issuer's fetch_timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import ipaddress
import json
import math
import os
import socket
import ssl
import stat
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from spoa.verifier import (
    DEFAULT_MAX_KEYS,
    IssuerKeys,
    JwksSchedule,
    JwksTiming,
    KeyLoadError,
    KeySet,
    MemoryKeyStore,
    RefetchDecision,
    TokenRejected,
    VerificationKey,
    hmac_key,
    load_jwks,
    load_key_file_bytes,
    parse_max_age,
    serving,
    shared_key_slots,
)
from spoa.verifier.parsing import parse_json_object

_T = TypeVar("_T")

_READ_CHUNK = 64 * 1024


class KeySourceError(KeyLoadError):
    """A key source could not be read, fetched or trusted."""


class HttpStatusError(KeySourceError):
    """The endpoint answered, with another status than 200."""


class TransportError(KeySourceError):
    """A URL, scheme or redirect the agent refuses to follow."""


# --- Key sources -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyFile:
    """A PEM public key or certificate, a JWK or a JWKS. kid and alg fill in what a PEM or
    JWK key leaves out, and must agree with what it names; in a JWKS, the alg goes to the
    keys that name none and that it fits."""

    path: str
    kid: str | None = None
    alg: str | None = None


@dataclass(frozen=True, slots=True)
class HmacSecret:
    secret: bytes = field(repr=False)
    alg: str
    kid: str | None = None


@dataclass(frozen=True, slots=True)
class StaticKeySource:
    files: tuple[KeyFile, ...] = ()
    secrets: tuple[HmacSecret, ...] = ()
    # The issuer's allow-list: a key file none of whose keys fits it is a mistake.
    algorithms: tuple[str, ...] = ()
    max_keys: int = DEFAULT_MAX_KEYS  # per file, as for a fetched set


@dataclass(frozen=True, slots=True)
class JwksUrlSource:
    url: str
    # The issuer's allow-list: a fetched set none of whose keys fits it is refused.
    algorithms: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class OidcDiscoverySource:
    """`<issuer>/.well-known/openid-configuration` names the jwks_uri; its `issuer` must match."""

    issuer: str
    discovery_url: str | None = None
    algorithms: tuple[str, ...] = ()  # as JwksUrlSource's

    @property
    def url(self) -> str:
        if self.discovery_url is not None:
            return self.discovery_url
        return self.issuer.rstrip("/") + "/.well-known/openid-configuration"


KeySource = StaticKeySource | JwksUrlSource | OidcDiscoverySource


def load_static_keys(source: StaticKeySource) -> KeySet:
    keys: list[VerificationKey] = []
    for key_file in source.files:
        try:
            data = Path(key_file.path).read_bytes()
        except OSError as exc:
            raise KeySourceError(f"cannot read key file {key_file.path}: {exc.strerror}") from exc
        try:
            loaded = load_key_file_bytes(
                data, kid=key_file.kid, alg=key_file.alg, max_keys=source.max_keys
            )
        except KeyLoadError as exc:
            raise KeySourceError(f"key file {key_file.path}: {exc}") from exc
        if not loaded.keys:
            raise KeySourceError(f"key file {key_file.path}: holds no usable keys")
        served, unserved = serving_keys(loaded, source.algorithms)
        if not any_fits(served, source.algorithms):
            raise KeySourceError(
                f"key file {key_file.path}: {no_fitting_key(loaded, source.algorithms)}"
            )
        if unserved:  # the operator's own file: say so rather than leave a key idle
            raise KeySourceError(
                f"key file {key_file.path}: {unserved[0]}: name its alg, in the file or with"
                " `alg` in its keys table (one algorithm per key, RFC 8725 3.1)"
            )
        keys.extend(loaded.keys)
    keys.extend(hmac_key(s.secret, alg=s.alg, kid=s.kid) for s in source.secrets)
    if not keys:
        raise KeySourceError("static key source holds no keys")
    return KeySet(tuple(keys))


def fits_any(key_set: KeySet, algorithms: tuple[str, ...]) -> bool:
    """Whether a token signed with one of `algorithms` could verify with a key of the set
    (an empty allow-list asks nothing). A set that fails this would reject every token
    with unsupported_alg, and a fetch that brought it would look like a good one. A key
    that names no alg counts only where it fits one of them (keys.serving)."""
    return any_fits(serving_keys(key_set, algorithms)[0], algorithms)


def any_fits(served: KeySet, algorithms: tuple[str, ...]) -> bool:
    """`fits_any` for a set `serving_keys` already gave."""
    return not algorithms or any(key.fits(alg) for key in served.keys for alg in algorithms)


def no_fitting_key(key_set: KeySet, algorithms: tuple[str, ...]) -> str:
    """Why `fits_any` said no."""
    allowed = ", ".join(sorted(algorithms))
    if any(key.fits(alg) for key in key_set.keys for alg in algorithms):
        return (
            f"its keys name no alg, and each would serve several of the issuer's algorithms "
            f"({allowed}): a key serves one (RFC 8725 3.1), so name its alg or allow one"
        )
    return f"no key in it fits the issuer's algorithms ({allowed})"


def serving_keys(key_set: KeySet, algorithms: tuple[str, ...]) -> tuple[KeySet, tuple[str, ...]]:
    """The set without the keys that would not serve the issuer (keys.serving: no alg,
    and several allowed algorithms fit them), and why each was left out."""
    kept = serving(key_set.keys, shared_key_slots(algorithms)) if algorithms else key_set.keys
    if len(kept) == len(key_set.keys):
        return key_set, ()
    kept_ids = {id(key) for key in kept}
    why = tuple(
        f"{_key_name(key)} names no alg, and several of the issuer's algorithms fit it"
        for key in key_set.keys
        if id(key) not in kept_ids
    )
    return KeySet(kept), why


def _key_name(key: VerificationKey) -> str:
    return "a key without kid" if key.kid is None else f"key {key.kid!r}"


# --- Events --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeysFetched:
    issuer: str
    key_count: int
    lifetime: float
    skipped: tuple[str, ...] = ()  # why keys were left out (enc, weak, unknown type)


@dataclass(frozen=True, slots=True)
class KeysChanged:
    issuer: str
    added: tuple[str, ...]  # kids (or thumbprints for keys without one)
    removed: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class FetchFailed:
    issuer: str
    cause: str
    retry_in: float
    kind: str = "error"  # timeout | http_error | invalid | error (metrics' `result`)


@dataclass(frozen=True, slots=True)
class StaleServingStarted:
    issuer: str
    last_success: float


@dataclass(frozen=True, slots=True)
class StaleServingEnded:
    issuer: str


@dataclass(frozen=True, slots=True)
class ArchiveFailed:
    """The key set could not be saved for the next start; serving goes on."""

    issuer: str
    cause: str
    directory: str = ""


@dataclass(frozen=True, slots=True)
class KeysRestored:
    """A start-up whose first fetch failed serves the keys saved by an earlier process."""

    issuer: str
    age: float  # seconds since that process fetched them
    key_count: int
    fetched_at: float  # Unix time
    skipped: tuple[str, ...] = ()  # keys of the saved set left out, and why


@dataclass(frozen=True, slots=True)
class KeysUnavailable:
    """The last good keys are older than max_stale: the issuer now fails closed."""

    issuer: str
    last_success: float | None


KeyEvent = (
    KeysFetched
    | KeysChanged
    | FetchFailed
    | StaleServingStarted
    | StaleServingEnded
    | KeysUnavailable
    | KeysRestored
    | ArchiveFailed
)


# --- The last good key sets on disk -----------------------------------------------------------


class KeyArchive:
    """The last good JWKS of each remote issuer, one file each, so that a process starting
    while the IdP is down can serve them for what remains of `max_stale`, as the process
    before it would have. Key sets are public, but whoever can write here can plant keys:
    a file is used only when it and its directory belong to the agent's user and nobody
    else may write to them."""

    FORMAT = 1
    MAX_BYTES = 64 << 20  # the largest max_jwks_bytes, plus the record around it

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, issuer: str) -> Path:
        return self.directory / f"{issuer}.jwks.json"  # issuer names are [a-z0-9_-]

    def prepare(self) -> None:
        """Make the directory and prove it writable; raises OSError. Start-up and reloads
        call it, so that a directory the agent cannot use is a refusal, not a warning at
        every refresh."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=self.directory, prefix=".", suffix=".probe")
        os.close(fd)
        os.unlink(probe)

    def save(self, issuer: str, source: str, body: bytes, fetched_at: float) -> None:
        """Write atomically through a fresh temporary file; raises OSError or ValueError
        (the caller reports it and goes on)."""
        record = json.dumps(
            {
                "format": self.FORMAT,
                "source": source,
                "fetched_at": fetched_at,
                "jwks": body.decode("utf-8"),
            }
        )
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=self.directory, prefix=".", suffix=".partial")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:  # mkstemp: 0600, O_EXCL
                out.write(record)
            os.replace(partial, self._path(issuer))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(partial)
            raise

    def load(self, issuer: str, source: str) -> tuple[bytes, float] | None:
        """(JWKS body, wall-clock time it was fetched) saved for this very source by this
        user, or None for anything else: missing, foreign, writable by others, not a
        regular file, too large, corrupt."""
        try:
            if not _private_to_us(os.stat(self.directory, follow_symlinks=False)):
                return None
            fd = os.open(self._path(issuer), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as file:
                if not _private_to_us(os.fstat(fd)):
                    return None
                data = file.read(self.MAX_BYTES + 1)
            if len(data) > self.MAX_BYTES:
                return None
            record = json.loads(data)
            fetched_at = record.get("fetched_at")
            if (
                record.get("format") == self.FORMAT
                and record.get("source") == source
                and isinstance(record.get("jwks"), str)
                and type(fetched_at) in (int, float)
                and math.isfinite(float(fetched_at))
            ):
                return record["jwks"].encode("utf-8"), float(fetched_at)
        except Exception:  # any damage to a file on disk means: not usable
            return None
        return None


def _private_to_us(status: os.stat_result) -> bool:
    """Owned by this process's user, writable by nobody else, a directory or a file."""
    kind_ok = stat.S_ISDIR(status.st_mode) or stat.S_ISREG(status.st_mode)
    return kind_ok and status.st_uid == os.geteuid() and not status.st_mode & 0o022


def source_id(source: KeySource) -> str:
    """What a saved key set must have come from to be used again."""
    if isinstance(source, JwksUrlSource):
        return f"jwks_uri {source.url}"
    if isinstance(source, OidcDiscoverySource):
        return f"discovery {source.url} for {source.issuer}"
    return "static"


# --- HTTP ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    body: bytes = field(repr=False)
    cache_control: str | None = None


class HttpFetch(Protocol):
    async def __call__(self, url: str, *, timeout: float, max_bytes: int) -> HttpResponse: ...


def trusted_transport(url: str) -> bool:
    """https, or plain http that never leaves the host."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        return True
    host = parts.hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_step(old_url: str, new_url: str) -> None:
    """A redirect, or a discovery document's jwks_uri, may not leave a trusted transport
    (https, loopback http) for plain http to another host: that would undo the config's
    rule and let anyone on the path serve keys."""
    _check_url(new_url)
    if trusted_transport(old_url) and not trusted_transport(new_url):
        raise TransportError(
            f"refusing a redirect or jwks_uri to plain http off this host: {new_url}"
        )


def _check_url(url: str) -> None:
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise TransportError(f"unsupported URL scheme {scheme!r}")


class _SafeRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to http(s), and never down from https or loopback to plain
    http elsewhere."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        old_scheme = urllib.parse.urlsplit(req.full_url).scheme
        new_scheme = urllib.parse.urlsplit(newurl).scheme
        if new_scheme not in ("http", "https") or (old_scheme == "https" and new_scheme != "https"):
            raise TransportError("refusing a redirect to another scheme")
        _check_step(req.full_url, newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _in_daemon_thread(func: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
    """Run blocking `func` in a daemon thread. Unlike asyncio.to_thread, a fetch stuck on
    a slow endpoint never holds up the agent's exit: stop is prompt, whatever the IdP does."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def settle(result: _T | None, error: BaseException | None) -> None:
        if future.done():  # the waiter gave up (timeout, shutdown)
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result, error = func(*args), None
        except BaseException as exc:  # handed to the awaiting coroutine
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="jwtgate-key-fetch", daemon=True).start()
    return future


class _Watch:
    """The sockets of one fetch, shut down when its deadline passes. A socket timeout
    bounds each read, not a peer that answers a byte at a time (headers, chunk lines,
    `100 Continue` after `100 Continue`), which would hold the fetch's thread for good."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.expired = False

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shut(sock)

    def expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shut(sock)


def _shut(sock: socket.socket) -> None:
    # A socket object already closed has no descriptor any more: never someone else's.
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


_fetch_watch = threading.local()  # the _Watch of the fetch running on this thread


def _watched(sock: socket.socket) -> None:
    watch = getattr(_fetch_watch, "current", None)
    if watch is not None:
        watch.add(sock)


class _WatchedHTTPConnection(http.client.HTTPConnection):
    def connect(self) -> None:
        super().connect()
        _watched(self.sock)


class _WatchedHTTPSConnection(http.client.HTTPSConnection):
    def connect(self) -> None:
        super().connect()  # the TLS handshake is bounded by the socket timeout only
        _watched(self.sock)


class _WatchedHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_WatchedHTTPConnection, req)


class _WatchedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__(context=context)
        self._tls = context

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_WatchedHTTPSConnection, req, context=self._tls)


class UrllibFetch:
    """Stdlib HTTP(S) GET in a worker thread, with a size cap and an overall deadline:
    at the deadline the fetch's sockets are shut down, whatever it is waiting for."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        context = ssl_context or ssl.create_default_context()
        self._opener = urllib.request.build_opener(
            _SafeRedirects(), _WatchedHTTPHandler(), _WatchedHTTPSHandler(context)
        )

    async def __call__(self, url: str, *, timeout: float, max_bytes: int) -> HttpResponse:
        _check_url(url)
        return await _in_daemon_thread(self._get, url, timeout, max_bytes)

    def _get(self, url: str, timeout: float, max_bytes: int) -> HttpResponse:
        watch = _Watch()
        timer = threading.Timer(timeout, watch.expire)
        timer.daemon = True
        _fetch_watch.current = watch
        timer.start()
        try:
            response = self._read(url, timeout, max_bytes)
        except Exception:
            if watch.expired:
                raise TimeoutError("response took longer than the fetch timeout") from None
            raise
        finally:
            timer.cancel()
            _fetch_watch.current = None
        if watch.expired:  # cut off: what was read may be short
            raise TimeoutError("response took longer than the fetch timeout")
        return response

    def _read(self, url: str, timeout: float, max_bytes: int) -> HttpResponse:
        request = urllib.request.Request(  # noqa: S310 - scheme checked above
            url, headers={"Accept": "application/json", "User-Agent": "jwtgate"}
        )
        try:
            response = self._opener.open(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            exc.close()
            if 300 <= exc.code < 400:
                # A redirect urllib would not follow (to file:, or without a Location).
                raise TransportError(f"refusing a redirect (HTTP {exc.code})") from None
            return HttpResponse(status=exc.code, body=b"")
        with response:
            length = response.headers.get("Content-Length")
            # ASCII digits only: isdigit() also takes "²", which int() refuses. A length
            # that is no number is ignored, as http.client does; the read below is bounded.
            if (
                length is not None
                and length.isascii()
                and length.isdigit()
                and int(length) > max_bytes
            ):
                raise KeySourceError(f"response is larger than {max_bytes} bytes")
            chunks: list[bytes] = []
            size = 0
            while True:  # _get's deadline timer ends a read that outlasts fetch_timeout
                chunk = response.read1(_READ_CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if size > max_bytes:
                    raise KeySourceError(f"response is larger than {max_bytes} bytes")
                chunks.append(chunk)
            return HttpResponse(
                status=response.status,
                body=b"".join(chunks),
                cache_control=response.headers.get("Cache-Control"),
            )


def _failure_kind(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, HttpStatusError):
        return "http_error"
    if isinstance(exc, TransportError):
        return "error"
    if isinstance(exc, KeyLoadError):
        return "invalid"  # an answer, but no usable key set in it
    return "error"  # connection refused, TLS, ...


# What a fetch fetches; a failure's cause that starts with one of them says which.
_DOCUMENTS = ("JWKS", "discovery")


def _describe(exc: BaseException) -> str:
    """A log-safe cause: our own messages, or the exception type and OS reason."""
    if isinstance(exc, KeyLoadError):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, urllib.error.URLError):
        reason = exc.reason
        # The OS's or TLS's own words ("Connection refused", "certificate has expired"):
        # they never hold the request or its answer.
        detail = getattr(reason, "verify_message", None) or getattr(reason, "strerror", None)
        name = f"URLError: {type(reason).__name__}"
        return f"{name}: {detail}" if isinstance(detail, str) and detail else name
    return type(exc).__name__


# --- The manager ---------------------------------------------------------------------------


@dataclass(slots=True)
class _IssuerState:
    name: str
    source: KeySource
    timing: JwksTiming
    schedule: JwksSchedule
    jwks_url: str | None = None
    task: asyncio.Task[bool] | None = None
    stale_reported: bool = False
    unavailable_reported: bool = False
    last_failure: str | None = None

    @property
    def discovering(self) -> bool:
        """Its next fetch reads the discovery document first (the JWKS URL is not known)."""
        return isinstance(self.source, OidcDiscoverySource) and self.jwks_url is None


def _labels(key_set: KeySet | None) -> dict[str, str]:
    if key_set is None:
        return {}
    return {key.key_id: key.kid if key.kid is not None else key.key_id for key in key_set.keys}


def _attempt_time(state: _IssuerState) -> float:
    """The longest one fetch attempt of `state` can take: two fetches when discovering."""
    return state.timing.fetch_timeout * (2 if state.discovering else 1)


class KeyManager:
    def __init__(
        self,
        sources: Mapping[str, KeySource],
        timing: Mapping[str, JwksTiming],
        store: MemoryKeyStore,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        fetch: HttpFetch | None = None,
        on_event: Callable[[KeyEvent], None] | None = None,
        archive: KeyArchive | None = None,
        archive_held: bool = False,
    ) -> None:
        self._store = store
        self._archive = archive
        # A reload's manager saves nothing until its configuration is accepted
        # (`release_archive`): a rejected reload must not replace the running one's sets.
        self._archive_held = archive_held
        self._unsaved: dict[str, tuple[str, bytes, float]] = {}
        self._clock = clock
        self._monotonic = monotonic
        self._fetch: HttpFetch = fetch if fetch is not None else UrllibFetch()
        self._on_event = on_event
        self._issuers: dict[str, _IssuerState] = {}
        for name, source in sources.items():
            issuer_timing = timing.get(name, JwksTiming())
            self._issuers[name] = _IssuerState(
                name, source, issuer_timing, JwksSchedule(issuer_timing)
            )

    def _emit(self, event: KeyEvent) -> None:
        if self._on_event is not None:
            self._on_event(event)

    async def start(self, timeout: float, carried: Mapping[str, IssuerKeys] | None = None) -> bool:
        """Load static keys and fetch every remote set, retrying failures after their
        backoff, for up to `timeout`; True when every issuer holds keys.

        `carried`: the keys a previous configuration held for the same remote sources (a
        reload). They are not fetched first, and still age from their own fetch: a
        reload works while an IdP is down, and a lower max_stale applies to them at once
        (stale keys fail closed; they are refreshed in the background).
        Static key errors are configuration errors and raise.
        """
        now = self._clock()
        remote: list[_IssuerState] = []
        for state in self._issuers.values():
            if isinstance(state.source, StaticKeySource):
                try:
                    key_set = load_static_keys(state.source)
                except KeyLoadError as exc:
                    raise KeySourceError(f"issuer {state.name!r}: {exc}") from exc
                self._store.replace(state.name, key_set, now)
                continue
            kept = carried.get(state.name) if carried else None
            if kept is not None:
                self._serve_dated(state, kept.key_set, kept.refreshed_at, now - kept.refreshed_at)
            else:
                remote.append(state)
        if remote:
            deadline = asyncio.get_running_loop().time() + timeout
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._until_keyed(remote, deadline), timeout)
            for state in remote:  # an IdP that hangs: its first fetch never even failed
                self._restore(state)
        return all(self._store.get(name) is not None for name in self._issuers)

    def key_age(self, issuer_name: str) -> float | None:
        """Seconds since the issuer's keys were last fetched or confirmed, on the
        monotonic clock (None before the first): what a reload carries them over with."""
        state = self._issuers.get(issuer_name)
        if state is None or state.schedule.last_success is None:
            return None
        return self._monotonic() - state.schedule.last_success

    def last_failure(self, issuer_name: str) -> str | None:
        """Why the issuer's last fetch failed, if it did (for start-up messages)."""
        state = self._issuers.get(issuer_name)
        return state.last_failure if state is not None else None

    async def _until_keyed(self, pending: list[_IssuerState], deadline: float) -> None:
        """Fetch until every issuer holds keys. `deadline` is on the event loop's clock,
        which start's timeout runs on."""
        last_try_made = False
        while pending:
            # Shielded: a start-up that gives up must not cancel a fetch half done.
            done = await asyncio.gather(*(asyncio.shield(self._fetch_task(s)) for s in pending))
            pending = [
                state
                for state, ok in zip(pending, done, strict=True)
                if not ok and not self._restore(state)
            ]
            if pending:
                retry_at = min(state.schedule.next_attempt_at for state in pending)
                delay = max(retry_at - self._monotonic(), 0.0)
                remaining = deadline - asyncio.get_running_loop().time()
                # Time for a fetch before the deadline (two for a discovery document not
                # yet read: it comes before the JWKS), or half of what is left.
                room = min(max(_attempt_time(s) for s in pending), remaining / 2)
                if not last_try_made and delay > remaining - room:
                    # The back-off would pass the deadline: one last try in time.
                    # Regression: an IdP back in the window's second half was never
                    # asked again, and start-up failed.
                    delay = max(remaining - room, 0.0)
                    last_try_made = True
                await asyncio.sleep(delay)

    def release_archive(self) -> None:
        """This manager's configuration was accepted: save the sets it fetched while held,
        and every later one."""
        self._archive_held = False
        unsaved, self._unsaved = self._unsaved, {}
        for name, (source, body, fetched_at) in unsaved.items():
            self._save(name, source, body, fetched_at)

    def _save(self, name: str, source: str, body: bytes, fetched_at: float) -> None:
        if self._archive is None:
            return
        if self._archive_held:
            self._unsaved[name] = (source, body, fetched_at)
            return
        try:  # after the store: saving is a convenience, never a reason to lose keys
            self._archive.save(name, source, body, fetched_at)
        except Exception as exc:
            cause = _describe(exc)
            if isinstance(exc, OSError) and exc.strerror:
                cause += f": {exc.strerror}"
            self._emit(ArchiveFailed(name, cause, str(self._archive.directory)))

    def _restore(self, state: _IssuerState) -> bool:
        """After a failed first fetch: serve the archived keys, if they are young enough."""
        if self._archive is None or self._store.get(state.name) is not None:
            return False
        saved = self._archive.load(state.name, source_id(state.source))
        if saved is None:
            return False
        body, fetched_at = saved
        age = self._clock() - fetched_at
        if not 0 <= age < state.timing.max_stale:  # a date ahead of the clock proves nothing
            return False
        try:
            key_set, _ = load_jwks(body, max_keys=state.timing.max_keys)
        except Exception:  # a damaged file is no reason to stop starting
            return False
        served, unserved = serving_keys(key_set, state.source.algorithms)
        if not key_set.keys or not any_fits(served, state.source.algorithms):
            return False
        key_set = served
        self._serve_dated(state, key_set, fetched_at, age)
        schedule = state.schedule
        schedule.expires_at = schedule.last_success  # its IdP is failing: serving stale now
        self._emit(KeysRestored(state.name, age, len(key_set.keys), fetched_at, unserved))
        return True

    def _serve_dated(
        self, state: _IssuerState, key_set: KeySet, fetched_at: float, age: float
    ) -> None:
        """Serve keys fetched `age` seconds ago (wall-clock `fetched_at`) by an earlier
        configuration or process: they age from that fetch, on the schedule's clock too."""
        self._store.replace(state.name, key_set, fetched_at, max_stale=state.timing.max_stale)
        state.schedule.last_success = self._monotonic() - age

    def ready(self, now: float) -> bool:
        return all(self._store.generation(name, now) is not None for name in self._issuers)

    def next_due(self) -> float | None:
        """When the earliest refresh or retry of a remote source is due (monotonic
        clock); None with only static sources."""
        times = [
            state.schedule.next_attempt_at
            for state in self._issuers.values()
            # A fetch in flight sets its own next attempt when it ends.
            if not isinstance(state.source, StaticKeySource) and not state.schedule.fetch_in_flight
        ]
        return min(times) if times else None

    async def run_due(self, now: float) -> None:
        """Start the refreshes that are due at `now` (the monotonic clock's) and wait for
        them (each bounded by its timeout)."""
        due = [
            state
            for state in self._issuers.values()
            if not isinstance(state.source, StaticKeySource) and state.schedule.due(now)
        ]
        for state in self._issuers.values():
            self._report_staleness(state, now)
        if due:
            await asyncio.gather(*(self._fetch_task(state) for state in due))

    async def refetch_unknown_kid(self, issuer_name: str, kid: str | None) -> bool:
        """Fetch again because a token named an unknown kid; True when the kid is now known.

        Single flight, at most once per refetch_interval, with a negative cache; never waits
        longer than the issuer's fetch_timeout.
        """
        state = self._issuers.get(issuer_name)
        if kid is None or state is None or isinstance(state.source, StaticKeySource):
            return False
        if self._has_kid(issuer_name, kid):
            return True
        now = self._monotonic()
        decision = state.schedule.refetch_decision(kid, now)
        if decision in (RefetchDecision.KNOWN_UNKNOWN, RefetchDecision.RATE_LIMITED):
            return False
        if decision is RefetchDecision.FETCH:
            state.schedule.begin_refetch(now)
        task = self._fetch_task(state)
        try:
            await asyncio.wait_for(asyncio.shield(task), state.timing.fetch_timeout)
        except TimeoutError:
            return False
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # this waiter itself was cancelled
            # aclose (a reload, a shutdown) cancelled the fetch: the kid stays unknown
            # here. Regression: the waiting checks got no answer at all.
            return False
        found = self._has_kid(issuer_name, kid)
        if not found and decision is RefetchDecision.FETCH:
            state.schedule.remember_unknown_kid(kid, self._monotonic())
        return found

    async def aclose(self) -> None:
        tasks = [s.task for s in self._issuers.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        close = getattr(self._fetch, "aclose", None)
        if close is not None:
            await close()

    def _has_kid(self, issuer_name: str, kid: str) -> bool:
        entry = self._store.get(issuer_name)
        return entry is not None and kid in entry.key_set.kids

    def _fetch_task(self, state: _IssuerState) -> asyncio.Task[bool]:
        """The issuer's in-flight fetch, started if there is none (single flight)."""
        if state.task is None or state.task.done():
            state.schedule.begin_fetch()
            state.task = asyncio.get_running_loop().create_task(self._refresh(state))
        return state.task

    async def _refresh(self, state: _IssuerState) -> bool:
        timing = state.timing
        # What failed, for a cause that does not say.
        fetching = "discovery document" if state.discovering else "JWKS"
        try:
            url = await self._resolve_jwks_url(state)
            fetching = "JWKS"
            response = await asyncio.wait_for(
                self._fetch(url, timeout=timing.fetch_timeout, max_bytes=timing.max_response_bytes),
                timing.fetch_timeout,
            )
            if response.status != 200:
                raise HttpStatusError(f"JWKS answered HTTP {response.status}")
            key_set, report = load_jwks(response.body, max_keys=timing.max_keys)
            if not key_set.keys:
                raise KeySourceError("JWKS holds no usable signing keys")
            algorithms = state.source.algorithms
            served, unserved = serving_keys(key_set, algorithms)
            if not any_fits(served, algorithms):
                raise KeySourceError(f"JWKS: {no_fitting_key(key_set, algorithms)}")
            key_set = served
        except Exception as exc:
            ticks = self._monotonic()
            state.jwks_url = None  # discover again next time
            delay = state.schedule.record_failure(ticks)
            state.last_failure = _describe(exc)
            if not state.last_failure.startswith(_DOCUMENTS):  # say which one failed
                state.last_failure = f"{fetching}: {state.last_failure}"
            self._emit(FetchFailed(state.name, state.last_failure, delay, _failure_kind(exc)))
            self._report_staleness(state, ticks)
            return False
        lifetime = state.schedule.record_success(
            self._monotonic(), parse_max_age(response.cache_control)
        )
        now = self._clock()
        previous = self._store.get(state.name)
        old = _labels(previous.key_set if previous else None)
        new = _labels(key_set)
        if (
            previous is not None
            and previous.key_set.identities == key_set.identities
            and previous.max_stale == timing.max_stale
        ):
            self._store.confirm(state.name, now)
        else:  # new keys, or keys the schedule had expired
            self._store.replace(state.name, key_set, now, max_stale=timing.max_stale)
        skipped = report.skipped + unserved
        self._emit(KeysFetched(state.name, len(key_set.keys), lifetime, skipped))
        self._save(state.name, source_id(state.source), response.body, now)
        added = tuple(sorted(label for kid, label in new.items() if kid not in old))
        removed = tuple(sorted(label for kid, label in old.items() if kid not in new))
        if added or removed:
            self._emit(KeysChanged(state.name, added, removed))
        if state.stale_reported or state.unavailable_reported:
            state.stale_reported = state.unavailable_reported = False
            self._emit(StaleServingEnded(state.name))
        return True

    async def _resolve_jwks_url(self, state: _IssuerState) -> str:
        source = state.source
        if isinstance(source, JwksUrlSource):
            _check_url(source.url)
            return source.url
        if state.jwks_url is not None:
            return state.jwks_url
        if not isinstance(source, OidcDiscoverySource):
            raise KeySourceError("source has no JWKS")
        discovery_url = source.url
        _check_url(discovery_url)
        timing = state.timing
        response = await asyncio.wait_for(
            self._fetch(
                discovery_url, timeout=timing.fetch_timeout, max_bytes=timing.max_response_bytes
            ),
            timing.fetch_timeout,
        )
        if response.status != 200:
            raise HttpStatusError(f"discovery answered HTTP {response.status}")
        try:
            # A discovery document holds a few dozen arrays; IdPs add objects of their own.
            document = parse_json_object(response.body, "discovery document", max_containers=1024)
        except TokenRejected as exc:  # its message says what is wrong, never the content
            raise KeySourceError(str(exc)) from exc
        if document.get("issuer") != source.issuer:
            raise KeySourceError("discovered issuer differs from the configured issuer")
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str):
            raise KeySourceError("discovery document has no jwks_uri")
        # Never step down from https to plain http on the discovery document's say-so.
        if (
            urllib.parse.urlsplit(discovery_url).scheme == "https"
            and urllib.parse.urlsplit(jwks_uri).scheme != "https"
        ):
            raise KeySourceError("jwks_uri must use https")
        _check_step(discovery_url, jwks_uri)
        state.jwks_url = jwks_uri
        return jwks_uri

    def _wall_time(self, ticks: float, now_ticks: float) -> float:
        """A monotonic instant as wall-clock time, for events and logs."""
        return self._clock() - (now_ticks - ticks)

    def _report_staleness(self, state: _IssuerState, now: float) -> None:
        """`now` is monotonic. The schedule's verdict on staleness is the one that holds:
        keys it finds too old are expired in the store even if the wall clock, stepped
        back, calls them young; keys the wall clock, stepped forward, calls too old while
        the schedule does not are fetched again at once."""
        schedule = state.schedule
        if schedule.last_success is None or isinstance(state.source, StaticKeySource):
            return
        if not schedule.usable(now):
            self._store.expire(state.name)
            if not state.unavailable_reported:
                state.unavailable_reported = True
                self._emit(KeysUnavailable(state.name, self._wall_time(schedule.last_success, now)))
            return
        if schedule.failures == 0 and self._store.generation(state.name, self._clock()) is None:
            schedule.next_attempt_at = min(schedule.next_attempt_at, now)
        if schedule.serving_stale(now) and not state.stale_reported:
            state.stale_reported = True
            self._emit(StaleServingStarted(state.name, self._wall_time(schedule.last_success, now)))
