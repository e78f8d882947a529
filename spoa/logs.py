"""Structured logging for jwtgate (structlog), and the guards that keep tokens out of it.

JSON lines by default, one object per event with `timestamp` (ISO 8601, UTC), `level`,
`event` and the event's fields. Disabled levels cost one method call that returns None
(structlog's filtering bound logger). Records from the standard `logging` module (asyncio,
libraries) go through the same processors, so they come out in the same format.

Tokens never reach the log: callers log `token_fingerprint(token)`, and the `redact_tokens`
processor runs last before rendering, replacing anything that still looks like a compact
JWS or JWE, and every field named like a credential, with "[redacted]".
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import IO, Any, Final, Literal, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = [
    "REDACTED",
    "RejectionLogLimiter",
    "configure_logging",
    "mask_secrets",
    "redact_tokens",
    "token_fingerprint",
]

REDACTED: Final = "[redacted]"
MASKED: Final = "[masked]"

_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

# Fields whose value is a credential whatever it looks like.
_CREDENTIAL_FIELDS: Final = frozenset(
    {
        "authorization",
        "proxy_authorization",
        "token",
        "access_token",
        "id_token",
        "refresh_token",
        "jwt",
        "bearer",
        "signature",
        "password",
        "secret",
        "client_secret",
        "cookie",
    }
)
# A JOSE header is a JSON object, so its base64url starts with "eyJ" ('{"'); a compact JWS
# has three dot-separated segments, a JWE five. The signature part may be empty (alg=none).
_JOSE_COMPACT: Final = re.compile(r"eyJ[A-Za-z0-9_-]*(?:\.[A-Za-z0-9_=-]*){2,4}")
_PRIMITIVES: Final = (int, float, bool, type(None))
_MAX_DEPTH: Final = 8


def token_fingerprint(token: str | bytes) -> str:
    """A short correlation id for a token: the first 12 hex digits of its SHA-256.

    48 bits of a hash of a high-entropy token cannot be turned back into the token, and a
    client that holds the token can compute the same id to find its requests in the log.
    """
    raw = token.encode("utf-8", "surrogateescape") if isinstance(token, str) else token
    return hashlib.sha256(raw).hexdigest()[:12]


def _scrub(value: Any, depth: int) -> Any:
    if isinstance(value, str):
        if "eyJ" in value:
            return _JOSE_COMPACT.sub(REDACTED, value)
        return value
    if isinstance(value, _PRIMITIVES):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return REDACTED if b"eyJ" in bytes(value) else value
    if depth >= _MAX_DEPTH:
        return REDACTED
    if isinstance(value, Mapping):
        return {
            key: REDACTED if str(key).lower() in _CREDENTIAL_FIELDS else _scrub(item, depth + 1)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_scrub(item, depth + 1) for item in value]
    # The renderer would fall back to repr(); scan exactly what it would write.
    return _scrub(repr(value), depth + 1)


def redact_tokens(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: no token reaches the log, even one passed by mistake."""
    for key, value in event_dict.items():
        if key.lower() in _CREDENTIAL_FIELDS:
            event_dict[key] = REDACTED
        elif not isinstance(value, _PRIMITIVES):
            event_dict[key] = _scrub(value, 0)
    return event_dict


def _leading_fields(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    # Readers scan the start of a line: timestamp, level, event, then the fields.
    ordered = {key: event_dict.pop(key) for key in _LEADING if key in event_dict}
    ordered.update(event_dict)
    return ordered


_LEADING: Final = ("timestamp", "level", "logger", "event")


def _visible(char: str) -> str:
    """A character that is not printable as an escape, e.g. ESC as "\\x1b", U+2028 as
    "\\u2028": controls, but also line and paragraph separators and bidi marks, which
    split or reorder a line in viewers that honour them (a forged line in the console
    format, where values are not quoted)."""
    if char.isprintable():
        return char
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _escape_controls(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    for key, value in event_dict.items():
        # A formatted traceback keeps its lines; it is our text, not a client's.
        if isinstance(value, str) and key != "exception" and not value.isprintable():
            event_dict[key] = "".join(map(_visible, value))
    return event_dict


def _level_number(level: str) -> int:
    try:
        return _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}; use one of {sorted(_LEVELS)}") from None


class _OurHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the root handler this module installed, so reconfiguring replaces it."""


def configure_logging(
    level: str = "info",
    fmt: Literal["json", "console"] = "json",
    stream: TextIO | IO[str] = sys.stderr,
) -> None:
    """Configure structlog (and the stdlib root logger) for the whole process.

    Loggers are cached on first use, which keeps disabled levels nearly free; a logger
    obtained before a later call keeps the earlier level and stream. On a hot path keep a
    bound logger (`structlog.get_logger().bind()` after this call): a disabled call then
    costs about 0.15 µs, against about 1 µs through the lazy module-level proxy.
    """
    threshold = _level_number(level)
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    renderer: Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    elif fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(
            colors=bool(getattr(stream, "isatty", lambda: False)()),
            exception_formatter=structlog.dev.plain_traceback,
        )
    else:
        raise ValueError(f"unknown log format {fmt!r}; use 'json' or 'console'")
    # JSON escapes control characters; a console line must not carry a client's ESC
    # (from an unverified `alg` or `kid`) to an operator's terminal.
    finishing: list[Processor] = [redact_tokens, _leading_fields]
    if fmt == "console":
        finishing.append(_escape_controls)

    # The order matters: exceptions are formatted into text before the guard scans them.
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        timestamper,
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    structlog.configure(
        processors=[*shared, *finishing, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=structlog.WriteLoggerFactory(file=stream),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )

    handler = _OurHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            # ExtraAdder: stdlib `extra={...}` fields (the SPOP status of a closed
            # connection, an error's type) are the point of those lines.
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                structlog.stdlib.ExtraAdder(),
                *shared,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *finishing,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _OurHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(threshold)


class RejectionLogLimiter:
    """Token bucket for rejection logs: `burst` at once, then `rate_per_s` on average.

    Under attack every request is a rejection; logging each one would turn the attack into
    a disk and CPU problem. Suppressed events are counted and the count is handed to the
    next event that gets through, so the log still says how much was dropped.
    """

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_s <= 0:
            raise ValueError("rate_per_s must be positive")
        if burst < 1:
            raise ValueError("burst must be at least 1")
        self._rate = float(rate_per_s)
        self._burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()
        self._pending = 0
        self._suppressed_total = 0
        self._lock = threading.Lock()

    @property
    def suppressed_total(self) -> int:
        """Events suppressed since creation (for a metric or a final summary)."""
        return self._suppressed_total

    def allow(self) -> bool:
        """Take one token; False (and count the event as suppressed) if none is left."""
        with self._lock:
            now = self._clock()
            elapsed = max(0.0, now - self._last)  # a clock stepping back refills nothing
            self._last = now
            self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            self._pending += 1
            self._suppressed_total += 1
            return False

    def take_suppressed(self) -> int:
        """The number suppressed since the last call; resets it."""
        with self._lock:
            pending, self._pending = self._pending, 0
            return pending

    def take_over(self, previous: RejectionLogLimiter) -> None:
        """Carry the suppressed events `previous` has not reported yet (a reload swaps
        limiters; the next logged rejection still tells how many were dropped)."""
        pending = previous.take_suppressed()
        with self._lock:
            self._pending += pending
            self._suppressed_total += pending

    def emit(self, log_method: Callable[..., Any], event: str, **fields: Any) -> bool:
        """Log `event` if the bucket allows it, adding `suppressed=N` when N > 0 were dropped.

        Returns whether the event was logged.
        """
        if not self.allow():
            return False
        suppressed = self.take_suppressed()
        if suppressed:
            fields["suppressed"] = suppressed
        log_method(event, **fields)
        return True


def _is_secret_key(key: str) -> bool:
    lowered = key.lower()
    words = [word for word in re.split(r"[^a-z0-9]+", lowered) if word]
    if not words:
        return False
    # A path, a size or the name of a header or variable is not the secret itself.
    if words[-1] in _NOT_SECRET_LAST_WORDS:
        return False
    if any(strong in lowered for strong in _STRONG_SECRET_PARTS):
        return True
    if "public" in words:
        return False
    return any(word in _SECRET_WORDS for word in words)


_STRONG_SECRET_PARTS: Final = (
    "secret",
    "password",
    "passwd",
    "passphrase",
    "hmac",
    "private",
    "credential",
    "apikey",
)
_SECRET_WORDS: Final = frozenset({"key", "token", "tokens", "pem", "jwk", "pass", "auth"})
_NOT_SECRET_LAST_WORDS: Final = frozenset(
    {
        "file",
        "files",
        "path",
        "paths",
        "dir",
        "url",
        "uri",
        "env",
        "size",
        "bytes",
        "length",
        "len",
        "header",
        "cookie",
        "param",
        "var",
        "name",
        "ttl",
        "id",
        "alg",
        "algs",
        "algorithms",
        "type",
        "claim",
        "leeway",
        "count",
    }
)
# Private members of a JWK (RFC 7518 §6); masked wherever a mapping carries "kty".
_JWK_PRIVATE_MEMBERS: Final = frozenset({"d", "p", "q", "dp", "dq", "qi", "k", "oth"})


def mask_secrets(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `config` with secret-looking values replaced by "[masked]".

    For the start-up summary. Keys such as `hmac_secret`, `password`, `key`, `client_token`
    are masked; `key_file`, `token_header`, `public_key` are not (they name a place or a
    public value). http(s) URLs keep all but their query and fragment. Unset
    (None) values stay None so the summary shows what is missing.
    """
    if not isinstance(config, Mapping):
        raise TypeError("mask_secrets() takes a mapping")
    return _mask_mapping(config, 0)


# Tables whose keys are names an operator chose, not settings: a policy called
# "partner-auth" or "api-key" is no secret, and what it holds is masked as usual.
_NAMED_ENTRIES: Final = frozenset({"policies"})


def _mask_mapping(mapping: Mapping[Any, Any], depth: int, named: bool = False) -> dict[str, Any]:
    is_jwk = "kty" in mapping
    masked: dict[str, Any] = {}
    for key, value in mapping.items():
        name = str(key)
        secret = not named and (_is_secret_key(name) or (is_jwk and name in _JWK_PRIVATE_MEMBERS))
        if secret and value is not None:
            masked[name] = MASKED
        elif name in _NAMED_ENTRIES and isinstance(value, Mapping) and depth < _MAX_DEPTH:
            masked[name] = _mask_mapping(value, depth + 1, named=True)
        else:
            masked[name] = _mask_value(value, depth + 1)
    return masked


def _mask_url_query(url: str) -> str:
    """The URL with its query and fragment masked: an IdP's API key travels there."""
    cut = min((i for i in (url.find("?"), url.find("#")) if i >= 0), default=-1)
    return url if cut < 0 else url[:cut] + "?" + MASKED


def _mask_value(value: Any, depth: int) -> Any:
    if depth > _MAX_DEPTH * 2:
        return MASKED
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return _mask_mapping(value, depth)
    if isinstance(value, list | tuple):
        return [_mask_value(item, depth + 1) for item in value]
    if isinstance(value, bytes | bytearray):
        return MASKED  # raw bytes in a config are key material more often than not
    if isinstance(value, str) and value.startswith(("https://", "http://")):
        return _mask_url_query(value)
    return value
