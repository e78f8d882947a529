"""The jwtgate TOML file, validated into typed settings.

Every key is checked at load time. An error names the key's full path, the value
found and what was expected, and all errors are reported together, so an operator
fixes a file in one pass. Unknown keys are errors: a typo must never silently
weaken a check. The reference for every key is docs/configuration.md.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import stat
import tomllib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from spoa.keymanager import trusted_transport
from spoa.verifier.algorithms import HMAC_ALGORITHMS, SUPPORTED_ALGORITHMS, same_signature
from spoa.verifier.claims import SCOPE_TOKEN

DEFAULT_POLICY = "default"
# HAProxy drops (2.6: truncates) variables whose full name "txn.jwt.<name>" exceeds 63 chars.
VAR_PREFIX = "jwt"
MAX_VAR_NAME = 63 - len(f"txn.{VAR_PREFIX}.")
BUILTIN_VARS = frozenset(
    {
        "valid",
        "status",
        "reason",
        "www_authenticate",
        "sub",
        "iss",
        "aud",
        "scope",
        "exp",
        "expires_in",
        "jti",
        "claims",
        "error",
        "process_time",
    }
)

_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)\s*$", re.ASCII)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# Matched whole (fullmatch): `$` would also take a name ending in a newline.
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,47}")
_VAR_NAME = re.compile(r"[a-z0-9_]+")


class ConfigError(Exception):
    """The configuration is invalid; `problems` lists every problem found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


def parse_duration(text: str) -> float:
    """Parse "500ms", "30s", "10m", "1h" or "1d" into seconds."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(text)
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def format_duration(seconds: float) -> str:
    if seconds == 0:
        return "0s"
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{round(seconds * 1000)}ms"


# A host name: RFC 1123 labels, with `_` too (container and service names carry it, and
# the resolver takes it); an IP address is checked by ipaddress instead.
_HOST_NAME = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(?:\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?")


def parse_address(text: str) -> tuple[str, int]:
    """Parse "host:port" or "[v6]:port"; the host is an IP address or a host name."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not (port_text.isascii() and port_text.isdigit()) or not host:
        raise ValueError(text)
    port = int(port_text)
    if not 1 <= port <= 65535:  # port 0 would bind a random port no HAProxy can name
        raise ValueError(text)
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        # Not an address: a name, which must not look like a mistyped IPv4 address
        # (999.1.1.1) nor carry spaces. Both passed before and failed only at bind time.
        if bracketed or len(host) > 253 or not _HOST_NAME.fullmatch(host):
            raise ValueError(text) from None
        if host.replace(".", "").isdigit():
            raise ValueError(text) from None
    else:
        if (address.version == 6) != bracketed:  # IPv6 only in brackets, IPv4 never
            raise ValueError(text)
    return host, port


def listeners_overlap(first: tuple[str, int], second: tuple[str, int]) -> bool:
    """Whether two listen addresses surely compete for one port: the same host, or an
    unspecified address covering the other (`::` covers IPv4 too, `0.0.0.0` only IPv4).
    Host names are compared as written: what they resolve to is known only at bind."""
    if first[1] != second[1]:
        return False
    if first[0] == second[0]:
        return True
    addresses = []
    for host, _port in (first, second):
        try:
            addresses.append(ipaddress.ip_address(host))
        except ValueError:
            return False
    a, b = addresses
    for wide, other in ((a, b), (b, a)):
        if wide.is_unspecified and (wide.version == 6 or other.version == 4):
            return True
    return a == b


# --- settings ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentSettings:
    listen: str = "127.0.0.1:12345"
    workers: int = 1
    max_frame_size: int = 16380
    max_inflight: int = 64
    max_list_items: int = 256
    max_connections: int = 1024
    hello_timeout: float = 5.0
    idle_timeout: float = 300.0
    frame_timeout: float = 5.0
    shutdown_grace: float = 10.0
    max_token_bytes: int = 8192
    # RFC 6750 section 2.3 advises against tokens in the query string: off unless named.
    token_query_param: str = ""
    ready_timeout: float = 30.0
    # A request with an unknown kid waits at most this for a JWKS refetch (which goes on
    # in the background, bounded by the issuer's fetch_timeout). Below HAProxy's
    # `timeout processing` (1s in spoe-jwt.conf), so the agent answers before HAProxy
    # gives up with a 503.
    unknown_kid_wait: float = 0.5

    @property
    def address(self) -> tuple[str, int]:
        return parse_address(self.listen)


@dataclass(frozen=True)
class MetricsSettings:
    listen: str = "127.0.0.1:9612"  # "" turns the metrics listener off

    @property
    def address(self) -> tuple[str, int] | None:
        return parse_address(self.listen) if self.listen else None


@dataclass(frozen=True)
class LogSettings:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"
    rejections_per_second: float = 50.0
    rejections_burst: int = 100
    access_log: bool = False


@dataclass(frozen=True)
class CacheSettings:
    max_entries: int = 100_000
    replay_entries: int = 4096
    keys_dir: str = ""  # where the last good key sets are saved; "" saves none


@dataclass(frozen=True)
class StaticKey:
    """One key configured by hand: a PEM/JWK/JWKS file, or an HMAC secret."""

    file: str | None = None
    secret_env: str | None = None
    secret_file: str | None = None
    kid: str | None = None
    alg: str | None = None


@dataclass(frozen=True)
class IssuerSettings:
    name: str
    issuer: str
    algorithms: tuple[str, ...]
    audiences: tuple[str, ...] = ()
    jwks_uri: str | None = None
    jwks_file: str | None = None
    discovery: str | None = None  # the discovery document's URL
    keys: tuple[StaticKey, ...] = ()
    leeway: float = 30.0
    require_exp: bool = True
    max_lifetime: float | None = None
    required_claims: tuple[str, ...] = ()
    typ: tuple[str, ...] = ()
    refresh_min: float = 60.0
    refresh_max: float = 86400.0
    default_refresh: float = 600.0
    refetch_interval: float = 30.0
    max_stale: float = 86400.0
    fetch_timeout: float = 5.0
    max_jwks_bytes: int = 1024 * 1024
    max_keys: int = 100
    allow_plain_http: bool = False

    @property
    def source_kind(self) -> Literal["jwks_uri", "jwks_file", "discovery", "keys"]:
        if self.jwks_uri:
            return "jwks_uri"
        if self.jwks_file:
            return "jwks_file"
        if self.discovery:
            return "discovery"
        return "keys"


# Each issuer key's default, from the dataclass: the parser reads them here.
_ISSUER_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in fields(IssuerSettings) if f.default is not MISSING
}


@dataclass(frozen=True)
class ClaimRule:
    claim: str
    equals: Any = None
    one_of: tuple[Any, ...] | None = None
    contains: Any = None


@dataclass(frozen=True)
class PolicySettings:
    name: str
    issuers: tuple[str, ...]
    audiences: tuple[str, ...] | None = None
    require_scopes: tuple[str, ...] = ()
    claims: tuple[ClaimRule, ...] = ()
    forward_claims: tuple[tuple[str, str], ...] = ()  # (variable name, claim name)
    report_only: bool = False
    realm: str = "jwtgate"


@dataclass(frozen=True)
class Config:
    agent: AgentSettings = field(default_factory=AgentSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    log: LogSettings = field(default_factory=LogSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    issuers: tuple[IssuerSettings, ...] = ()
    policies: Mapping[str, PolicySettings] = field(default_factory=dict)
    source: str = ""  # the file it came from, for messages

    def issuer(self, name: str) -> IssuerSettings:
        for item in self.issuers:
            if item.name == name:
                return item
        raise KeyError(name)


# --- loading -------------------------------------------------------------------------------


def load_config(
    path: str | os.PathLike[str], *, text_from: str | os.PathLike[str] | None = None
) -> Config:
    """Read and validate a TOML file. Raises ConfigError listing every problem.

    `text_from`: read the text there instead (a supervisor's snapshot of `path`), still
    naming `path` in problems and resolving relative paths from its directory."""
    return read_config(path, text_from=text_from)[1]


def read_config(
    path: str | os.PathLike[str], *, text_from: str | os.PathLike[str] | None = None
) -> tuple[str, Config]:
    """`load_config`, and the text it read."""
    file = Path(path)
    try:
        data = _read_bounded(Path(text_from if text_from is not None else file))
    except OSError as exc:
        raise ConfigError([f"{file}: cannot read: {exc.strerror or exc}"]) from None
    except ValueError as exc:
        raise ConfigError([f"{file}: {exc}"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            [f"{file}: line {line}: not UTF-8 (byte 0x{data[exc.start]:02x}); TOML files are UTF-8"]
        ) from None
    return text, parse_config(text, source=str(file), base_dir=file.parent)


# Far above any real configuration. A bigger file (or /dev/zero, a FIFO) is refused before
# it is read: a reload reads on the agent's event loop and must not take it down.
MAX_CONFIG_BYTES = 1024 * 1024


def _read_bounded(path: Path) -> bytes:
    """A regular file's bytes, at most MAX_CONFIG_BYTES; ValueError says why not."""
    if not stat.S_ISREG(path.stat().st_mode):  # a device is not even opened
        raise ValueError("not a regular file")
    # Checked again once open (it may have been swapped). O_NONBLOCK: a FIFO put there
    # meanwhile must not block the open; O_NOCTTY: nor a terminal become ours.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    with os.fdopen(fd, "rb") as stream:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        data = stream.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ValueError(f"larger than {MAX_CONFIG_BYTES // 1024} KiB; not a configuration file?")
    return data


def _os_problem(exc: OSError) -> str:
    return (exc.strerror or type(exc).__name__).lower()


def parse_config(text: str, *, source: str = "<config>", base_dir: Path | None = None) -> Config:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: not valid TOML: {exc}"]) from None
    except RecursionError:
        raise ConfigError([f"{source}: not valid TOML: nested too deeply"]) from None
    reader = _Reader(base_dir or Path.cwd())
    config = reader.config(document, source)
    if reader.problems:
        raise ConfigError(reader.problems)
    return config


class _Invalid(Exception):
    """Internal: one value was wrong and has been reported."""


class _Reader:
    """Walks the TOML document, collecting every problem with its key path."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.problems: list[str] = []
        self.path: list[str] = []
        self.issuer_audiences: dict[str, tuple[str, ...]] = {}
        # Every issuer entry's name, valid or not: a policy naming one whose other keys
        # are wrong gets no "unknown issuer" on top of that entry's own problem.
        self.issuer_names: set[str] = set()

    # -- helpers --

    def where(self, key: str | int | None = None) -> str:
        parts = [*self.path, *([] if key is None else [key])]
        text = ""
        for part in parts:
            if isinstance(part, int) or part.startswith("["):
                text += f"[{part}]" if isinstance(part, int) else part
            else:
                text += f".{part}" if text else part
        return text or "<top level>"

    def fail(self, key: str | int | None, message: str) -> None:
        self.problems.append(f"{self.where(key)}: {message}")

    @contextmanager
    def at(self, key: str | int) -> Iterator[None]:
        self.path.append(key)  # type: ignore[arg-type]
        try:
            yield
        finally:
            self.path.pop()

    def table(self, value: Any, key: str | int) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(key, f"expected a table, got {_show(value)}")
            raise _Invalid
        return value

    def each_table(self, items: list[Any]) -> Iterator[dict[str, Any]]:
        """The tables of an array, each with its index pushed on the key path; an element
        that is not a table is reported and skipped."""
        for index, item in enumerate(items):
            try:
                table = self.table(item, index)
            except _Invalid:
                continue
            with self.at(index):
                yield table

    def only(self, table: Mapping[str, Any], allowed: set[str]) -> None:
        for key in table:
            if key not in allowed:
                self.fail(key, f"unknown key (expected one of: {', '.join(sorted(allowed))})")

    def get(
        self,
        table: Mapping[str, Any],
        key: str,
        convert: Callable[[Any], Any],
        default: Any,
    ) -> Any:
        if key not in table:
            return default
        try:
            return convert(table[key])
        except _Invalid:
            return default
        except _Expected as exc:
            got = _show(table[key]) if exc.echo else "a value not shown here"
            self.fail(key, f"expected {exc.what}, got {got}")
            return default

    # -- sections --

    def config(self, doc: dict[str, Any], source: str) -> Config:
        self.only(doc, {"agent", "metrics", "log", "cache", "issuers", "policies"})
        agent = self.section(doc, "agent", AgentSettings, self.agent_field)
        metrics = self.section(doc, "metrics", MetricsSettings, self.metrics_field)
        log = self.section(doc, "log", LogSettings, self.log_field)
        cache = self.section(doc, "cache", CacheSettings, self.cache_field)
        if (
            self.written_as_read(doc, "agent", "listen", agent.listen)
            and self.written_as_read(doc, "metrics", "listen", metrics.listen)
            and metrics.address is not None
            and listeners_overlap(agent.address, metrics.address)
        ):
            with self.at("metrics"):
                self.fail("listen", f"{metrics.listen} would take agent.listen's port")
        issuers = self.issuers(doc.get("issuers"))
        self.issuer_audiences = {i.name: i.audiences for i in issuers}
        policies = self.policies(doc.get("policies"), self.issuer_names)
        return Config(agent, metrics, log, cache, tuple(issuers), policies, source)

    @staticmethod
    def written_as_read(doc: Mapping[str, Any], section: str, key: str, value: Any) -> bool:
        """Whether `value` is what the file says (or its default, when unwritten), not the
        default put in place of a refused value: no second problem follows from one."""
        table = doc.get(section)
        if not isinstance(table, Mapping) or key not in table:
            return True
        return bool(table[key] == value)

    def section(
        self,
        doc: Mapping[str, Any],
        name: str,
        cls: type[Any],
        convert_field: Callable[[str], Callable[[Any], Any]],
    ) -> Any:
        defaults = cls()
        if name not in doc:
            return defaults
        try:
            table = self.table(doc[name], name)
        except _Invalid:
            return defaults
        with self.at(name):
            names = [f.name for f in fields(cls)]  # in order: problems come out the same
            self.only(table, set(names))
            values = {
                n: self.get(table, n, convert_field(n), getattr(defaults, n))
                for n in names
                if n in table
            }
        return cls(**values)

    def agent_field(self, name: str) -> Callable[[Any], Any]:
        return {
            "listen": _address,
            "workers": _int(1, 64),
            "max_frame_size": _int(256, 1024 * 1024),
            "max_inflight": _int(1, 10_000),
            "max_list_items": _int(8, 10_000),
            "max_connections": _int(1, 1_000_000),
            "hello_timeout": _duration(0.001),
            "idle_timeout": _duration(0.001),
            "frame_timeout": _duration(0.001),
            "shutdown_grace": _duration(0.0),
            "max_token_bytes": _int(256, 1024 * 1024),
            "token_query_param": _query_name,
            "ready_timeout": _duration(0.001),
            "unknown_kid_wait": _duration(0.0, 60.0),
        }[name]

    def metrics_field(self, name: str) -> Callable[[Any], Any]:
        return {"listen": _address_or_empty}[name]

    def log_field(self, name: str) -> Callable[[Any], Any]:
        return {
            "level": _choice("debug", "info", "warning", "error"),
            "format": _choice("json", "console"),
            "rejections_per_second": _positive_number,
            "rejections_burst": _int(1, 1_000_000),
            "access_log": _bool,
        }[name]

    def cache_field(self, name: str) -> Callable[[Any], Any]:
        return {
            "max_entries": _int(0, 100_000_000),
            "replay_entries": _int(0, 1_000_000),
            "keys_dir": self.directory_or_empty,
        }[name]

    def issuers(self, value: Any) -> list[IssuerSettings]:
        if value is None:
            self.fail("issuers", "at least one [[issuers]] entry is required")
            return []
        if not isinstance(value, list) or not value:
            self.fail("issuers", f"expected a non-empty array of tables, got {_show(value)}")
            return []
        result: list[IssuerSettings] = []
        seen: set[str] = set()
        seen_issuers: set[str] = set()
        with self.at("issuers"):
            for table in self.each_table(value):
                issuer = self.issuer(table)
                if issuer is None:
                    continue
                if issuer.name in seen:
                    self.fail(None, f"duplicate issuer name {issuer.name!r}")
                if issuer.issuer in seen_issuers:
                    # A token's `iss` must pick one set of rules and keys.
                    self.fail("issuer", f"{issuer.issuer!r} is configured by another entry too")
                seen.add(issuer.name)
                seen_issuers.add(issuer.issuer)
                result.append(issuer)
        return result

    def issuer(self, table: dict[str, Any]) -> IssuerSettings | None:
        allowed = {f.name for f in fields(IssuerSettings)}
        self.only(table, allowed)
        for required in ("name", "issuer", "algorithms"):
            if required not in table:
                self.fail(required, "required key is missing")
        name = self.get(table, "name", _name, None)
        if name is not None:
            self.issuer_names.add(name)
        issuer = self.get(table, "issuer", _string(), None)
        algorithms = self.get(table, "algorithms", _algorithms, None)
        sources = [k for k in ("jwks_uri", "jwks_file", "discovery", "keys") if k in table]
        if len(sources) != 1:
            found = ", ".join(sources) or "none"
            self.fail(
                None,
                f"exactly one of jwks_uri, jwks_file, discovery, keys is required (found: {found})",
            )
        converters: dict[str, Callable[[Any], Any]] = {
            "audiences": _audience_list,
            "jwks_uri": _url,
            "jwks_file": self.existing_file,
            "keys": self.static_keys,
            "leeway": _duration(0.0, 3600.0),
            "require_exp": _bool,
            "max_lifetime": _duration(1.0),
            "required_claims": _string_list,
            "typ": _string_list,
            "refresh_min": _duration(1.0),
            "refresh_max": _duration(1.0),
            "default_refresh": _duration(1.0),
            "refetch_interval": _duration(0.0),
            "max_stale": _duration(0.0),
            "fetch_timeout": _duration(0.01, 300.0),
            "max_jwks_bytes": _int(1024, 64 << 20),
            "max_keys": _int(1, 10_000),
            "allow_plain_http": _bool,
        }
        values: dict[str, Any] = {
            key: self.get(table, key, convert, _ISSUER_DEFAULTS[key])
            for key, convert in converters.items()
        }
        if "discovery" in table:
            values["discovery"] = self.get(table, "discovery", _discovery(issuer), None)
        for source in ("jwks_uri", "discovery"):
            url = values.get(source)
            if url and not values["allow_plain_http"] and not trusted_transport(url):
                self.fail(
                    source,
                    "plain http:// to a non-loopback host lets anyone on the path replace the"
                    " keys; use https://, or set allow_plain_http = true for a network you trust",
                )
        if values["refresh_min"] > values["refresh_max"]:
            self.fail("refresh_min", "must not be greater than refresh_max")
        if values["max_stale"] < 2 * values["refresh_min"]:
            # Keys are refreshed a third of the way to max_stale at the latest.
            self.fail(
                "max_stale",
                "must be at least twice refresh_min, so that keys are refreshed (and a"
                " failed refresh retried) before they go stale",
            )
        if algorithms:
            # Each HMAC algorithm needs a secret of its own among the keys. Regression:
            # any `keys` table passed, so HS256 beside an RSA key file had no secret.
            # Read from the tables as written: a secret entry with its own problem
            # (a missing file) is still the secret meant for its alg.
            raw_keys = table.get("keys")
            secrets = {
                entry.get("alg")
                for entry in (raw_keys if isinstance(raw_keys, list) else ())
                if isinstance(entry, dict) and ("secret_env" in entry or "secret_file" in entry)
            }
            hmac = (set(algorithms) & HMAC_ALGORITHMS) - secrets
            if hmac:
                self.fail(
                    "algorithms",
                    f"{', '.join(sorted(hmac))} need an explicitly configured secret in `keys`;"
                    " HMAC is never used with keys from a JWKS",
                )
            for index, key in enumerate(values["keys"]):
                if key.alg is not None and not any(same_signature(key.alg, a) for a in algorithms):
                    with self.at("keys"), self.at(index):
                        self.fail(
                            "alg",
                            f"{key.alg} is not in this issuer's algorithms, so no token could"
                            " use this key",
                        )
        if name is None or issuer is None or algorithms is None:
            return None
        return IssuerSettings(name=name, issuer=issuer, algorithms=algorithms, **values)

    def directory_or_empty(self, value: Any) -> str:
        """A directory path (made when first needed), relative to the file; or ""."""
        text = _string(empty=True)(value)
        if not text:
            return ""
        if not text.isprintable() or not text.strip():
            raise _Expected("a directory path of printable characters")
        path = Path(text)
        if not path.is_absolute():
            path = self.base_dir / path
        try:
            if path.exists() and not path.is_dir():
                raise _Expected("a directory")
        except OSError as exc:  # 3.11's exists() raises on EACCES
            raise _Expected(f"a directory it can reach ({_os_problem(exc)})") from None
        return str(path)

    def existing_file(self, value: Any) -> str:
        return self._readable_file(value, echo=True)

    def secret_file(self, value: Any) -> str:
        # A secret pasted here by mistake must not be echoed (as for secret_env).
        return self._readable_file(value, echo=False)

    def _readable_file(self, value: Any, *, echo: bool) -> str:
        text = _string()(value)
        path = Path(text)
        if not path.is_absolute():
            path = self.base_dir / path
        try:
            found = path.is_file()
        except OSError as exc:  # 3.11's is_file() raises on EACCES
            raise _Expected(f"a readable file ({_os_problem(exc)})", echo=echo) from None
        if not found:
            raise _Expected("a readable file", echo=echo)
        return str(path)

    def static_keys(self, value: Any) -> tuple[StaticKey, ...]:
        if not isinstance(value, list) or not value:
            raise _Expected("a non-empty array of key tables")
        keys = []
        with self.at("keys"):
            for table in self.each_table(value):
                key = self.static_key(table)
                if key is not None:
                    keys.append(key)
        if not keys:
            raise _Invalid
        return tuple(keys)

    def static_key(self, table: dict[str, Any]) -> StaticKey | None:
        self.only(table, {"file", "secret_env", "secret_file", "kid", "alg"})
        kinds = [k for k in ("file", "secret_env", "secret_file") if k in table]
        if len(kinds) != 1:
            self.fail(None, "exactly one of file, secret_env, secret_file is required")
            return None
        key = StaticKey(
            file=self.get(table, "file", self.existing_file, None),
            secret_env=self.get(table, "secret_env", _env_secret, None),
            secret_file=self.get(table, "secret_file", self.secret_file, None),
            kid=self.get(table, "kid", _string(), None),
            alg=self.get(table, "alg", _algorithm, None),
        )
        if (key.secret_env or key.secret_file) and key.alg not in HMAC_ALGORITHMS:
            self.fail("alg", "a secret needs alg = HS256, HS384 or HS512")
        return key

    def policies(self, value: Any, issuer_names: set[str]) -> dict[str, PolicySettings]:
        if value is None:
            self.fail(
                "policies", f"at least one policy is required, e.g. [policies.{DEFAULT_POLICY}]"
            )
            return {}
        try:
            tables = self.table(value, "policies")
        except _Invalid:
            return {}
        if not tables:
            self.fail(
                "policies", f"at least one policy is required, e.g. [policies.{DEFAULT_POLICY}]"
            )
        result: dict[str, PolicySettings] = {}
        with self.at("policies"):
            for name, item in tables.items():
                try:
                    table = self.table(item, name)
                except _Invalid:
                    continue
                with self.at(name):
                    if not _NAME.fullmatch(name):
                        self.fail(None, "policy names use a-z, 0-9, '_' and '-' (at most 48)")
                    policy = self.policy(name, table, issuer_names)
                if policy is not None:
                    result[name] = policy
        return result

    def policy(
        self, name: str, table: dict[str, Any], issuer_names: set[str]
    ) -> PolicySettings | None:
        self.only(
            table,
            {
                "issuers",
                "audiences",
                "require_scopes",
                "claims",
                "forward_claims",
                "report_only",
                "realm",
            },
        )
        issuers = self.get(table, "issuers", _non_empty_list("at least one of the issuers"), None)
        if issuers is None:
            if "issuers" not in table:
                self.fail("issuers", "required key is missing")
            return None
        for issuer in issuers:
            if issuer not in issuer_names:
                known = ", ".join(sorted(issuer_names)) or "none"
                self.fail("issuers", f"unknown issuer {issuer!r} (configured issuers: {known})")
        audiences = self.get(table, "audiences", _audience_list, None)
        # RFC 8725 section 3.9: always check `aud`. A policy must know what to accept.
        if audiences is None:
            for issuer in issuers:
                if issuer in self.issuer_audiences and not self.issuer_audiences[issuer]:
                    self.fail(
                        "audiences",
                        f"required: issuer {issuer!r} has no `audiences` either, and"
                        " tokens for any audience would pass",
                    )
        return PolicySettings(
            name=name,
            issuers=issuers,
            audiences=audiences,
            require_scopes=self.get(table, "require_scopes", _scope_list, ()),
            claims=self.get(table, "claims", self.claim_rules, ()),
            forward_claims=self.get(table, "forward_claims", self.forward_claims, ()),
            report_only=self.get(table, "report_only", _bool, False),
            realm=self.get(table, "realm", _realm, "jwtgate"),
        )

    def claim_rules(self, value: Any) -> tuple[ClaimRule, ...]:
        if not isinstance(value, list):
            raise _Expected('an array of tables like { claim = "tenant", equals = "acme" }')
        rules = []
        with self.at("claims"):
            for table in self.each_table(value):
                self.only(table, {"claim", "equals", "one_of", "contains"})
                claim = self.get(table, "claim", _string(), None)
                tests = [k for k in ("equals", "one_of", "contains") if k in table]
                if claim is None:
                    self.fail("claim", "required key is missing")
                if len(tests) != 1:
                    self.fail(None, "exactly one of equals, one_of, contains is required")
                    continue
                one_of = None
                if "one_of" in table:
                    if not isinstance(table["one_of"], list) or not table["one_of"]:
                        self.fail(
                            "one_of",
                            f"expected a non-empty array, got {_show(table['one_of'])}",
                        )
                        continue
                    one_of = tuple(table["one_of"])
                if claim is not None:
                    rules.append(
                        ClaimRule(claim, table.get("equals"), one_of, table.get("contains"))
                    )
        return tuple(rules)

    def forward_claims(self, value: Any) -> tuple[tuple[str, str], ...]:
        if not isinstance(value, dict):
            raise _Expected('a table of variable = "claim", e.g. { email = "email" }')
        pairs = []
        with self.at("forward_claims"):
            for var, claim in value.items():
                if not _VAR_NAME.fullmatch(var) or len(var) > MAX_VAR_NAME:
                    self.fail(
                        var,
                        f"variable names use a-z, 0-9 and '_', at most {MAX_VAR_NAME} characters",
                    )
                    continue
                if var in BUILTIN_VARS:
                    self.fail(var, "this variable name is set by jwtgate itself; pick another")
                    continue
                if not isinstance(claim, str) or not claim:
                    self.fail(var, f"expected a claim name, got {_show(claim)}")
                    continue
                pairs.append((var, claim))
        return tuple(pairs)


# --- value converters ----------------------------------------------------------------------


class _Expected(Exception):
    def __init__(self, what: str, *, echo: bool = True) -> None:
        self.what = what
        self.echo = echo  # False where the value may hold a secret


_SHOWN_CHARS = 120


def _show(value: Any) -> str:
    """A value as it was written in TOML: a string quoted, so that "2" or "false" never
    reads as the number or boolean the message asked for."""
    if isinstance(value, str):
        shown = json.dumps(value[:_SHOWN_CHARS], ensure_ascii=not value.isprintable())
        return shown + ("..." if len(value) > _SHOWN_CHARS else "")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Expected("true or false")
    return value


def _string(*, empty: bool = False) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if not isinstance(value, str) or (not empty and not value):
            raise _Expected("a non-empty string" if not empty else "a string")
        return value

    return convert


def _name(value: Any) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise _Expected("a name of a-z, 0-9, '_' and '-' (at most 48)")
    return value


def _choice(*choices: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if value not in choices:
            raise _Expected(" or ".join(f'"{c}"' for c in choices))
        return str(value)

    return convert


def _int(low: int, high: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise _Expected(f"an integer from {low} to {high}")
        return value

    return convert


_QUERY_NAME = re.compile(r"[A-Za-z0-9._~-]+")


def _query_name(value: Any) -> str:
    # Unreserved characters only (RFC 3986 §2.3): a name needing percent-encoding, or one
    # with a space, would never match the query HAProxy sends.
    if not isinstance(value, str) or not (value == "" or _QUERY_NAME.fullmatch(value)):
        raise _Expected('a query parameter name such as "access_token" (letters, digits, ._~-)')
    return value


def _positive_number(value: Any) -> float:
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise _Expected("a number above 0")
    return float(value)


def _duration(low: float, high: float = 365 * 86400.0) -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        hint = f'a duration like "30s" (units ms, s, m, h, d) from {format_duration(low)}'
        hint += f" to {format_duration(high)}"
        if not isinstance(value, str):
            raise _Expected(hint)
        try:
            seconds = parse_duration(value)
        except ValueError:
            raise _Expected(hint) from None
        if not low <= seconds <= high:
            raise _Expected(hint)
        return seconds

    return convert


def _address(value: Any) -> str:
    if not isinstance(value, str):
        raise _Expected('an address like "127.0.0.1:12345"')
    try:
        parse_address(value)
    except ValueError:
        raise _Expected('an address like "127.0.0.1:12345"') from None
    return value


def _address_or_empty(value: Any) -> str:
    if value == "":
        return ""
    return _address(value)


def _string_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, str) and value:
        return (value,)
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _Expected("an array of non-empty strings")
    return tuple(value)


def _non_empty_list(expected: str) -> Callable[[Any], tuple[str, ...]]:
    def convert(value: Any) -> tuple[str, ...]:
        items = _string_list(value)
        if not items:
            raise _Expected(expected)
        return items

    return convert


# An empty set of accepted audiences would check nothing (RFC 8725 section 3.9).
_audience_list = _non_empty_list("at least one audience (an empty array would accept any `aud`)")


def _scope_list(value: Any) -> tuple[str, ...]:
    scopes = _string_list(value)
    if not all(SCOPE_TOKEN.fullmatch(scope) for scope in scopes):
        # A token's scopes are matched as RFC 6749 scope-tokens; no other name could match.
        raise _Expected('scope names: printable ASCII without spaces, " or \\')
    return scopes


def _algorithm(value: Any) -> str:
    if value not in SUPPORTED_ALGORITHMS:
        raise _Expected(f"one of {', '.join(sorted(SUPPORTED_ALGORITHMS))}")
    return str(value)


def _algorithms(value: Any) -> tuple[str, ...]:
    if isinstance(value, list) and any(str(v).lower() == "none" for v in value):
        raise _Expected('signature algorithms ("none" is never accepted)')
    items = _non_empty_list("at least one of the signature algorithms")(value)
    for item in items:
        _algorithm(item)
    return items


_URL_HINT = (
    "an http:// or https:// URL with a host and a valid port, without a user name or"
    " password, a #fragment, white space or control characters"
)


def _url(value: Any) -> str:
    text = _string()(value)
    if not text.startswith(("https://", "http://")) or not text.isprintable() or " " in text:
        raise _Expected(_URL_HINT, echo=False)
    try:
        parts = urlsplit(text)
        port = parts.port  # ValueError when not a number in 0-65535
    except ValueError:
        raise _Expected(_URL_HINT, echo=False) from None
    if (
        not parts.hostname
        or port == 0
        or parts.username is not None
        or parts.password is not None
        or "#" in text  # also an empty fragment, which urlsplit drops
    ):
        # Credentials in a URL would be logged with the configuration; keys are public.
        raise _Expected(_URL_HINT, echo=False)
    return text


def _discovery(issuer: str | None) -> Callable[[Any], str]:
    """`discovery = true` derives the URL from `issuer` (OIDC Discovery section 4)."""

    def convert(value: Any) -> str:
        if value is True:
            if not issuer:
                raise _Expected("true only together with `issuer`")
            return issuer.rstrip("/") + "/.well-known/openid-configuration"
        if value is False:
            raise _Expected("true or a discovery URL")
        return _url(value)

    return convert


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)


def _env_secret(value: Any) -> str:
    # Only the name is checked here: `run` reads the variable (check-config runs in
    # another shell), and a value pasted here by mistake must not be echoed.
    if not isinstance(value, str) or not _ENV_NAME.fullmatch(value):
        raise _Expected("the name of an environment variable, like JWTGATE_HMAC_SECRET", echo=False)
    return value


def _realm(value: Any) -> str:
    text = _string()(value)
    if any(c in text for c in '"\\') or any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise _Expected("a realm without quotes, backslashes or control characters")
    return text


# --- presentation --------------------------------------------------------------------------


def config_warnings(config: Config) -> list[str]:
    """What is valid but likely not meant: said at start-up and by check-config."""
    warnings = []
    if DEFAULT_POLICY not in config.policies:
        warnings.append(
            f"no [policies.{DEFAULT_POLICY}]: a request for which haproxy.cfg sets no "
            "txn.jwt_policy is refused with 500 unknown_policy"
        )
    return warnings


def describe(config: Config) -> dict[str, Any]:
    """The effective configuration as plain data, with secrets masked."""

    def plain(value: Any) -> Any:
        if is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        return value

    # Secrets are never held here: only the names of their variables and files.
    result: dict[str, Any] = plain(config)
    return result
