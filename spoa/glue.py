"""From the `check-jwt` SPOE message to a verdict to `set-var` actions.

This is the stable interface users write into their HAProxy configs (docs/haproxy.md):
the message's named arguments are read here, and every variable jwtgate sets is
`txn.jwt.<name>`. Unknown arguments are ignored.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qsl

from spoa.protocol import (
    Action,
    AnswerMemo,
    EncodedActions,
    Message,
    Scope,
    SetVar,
    Value,
    encode_set_vars,
)
from spoa.verifier import (
    Policy,
    Reason,
    RequestContext,
    Verdict,
    Verifier,
    bearer_error,
    scope_tokens,
)

log = logging.getLogger(__name__)

MESSAGE_NAME = "check-jwt"
ARG_AUTHORIZATION = "authorization"
ARG_TOKEN = "token"
ARG_METHOD = "method"
ARG_PATH = "path"
ARG_HOST = "host"
ARG_POLICY = "policy"
ARG_QUERY = "query"
# With token_query_param on, a query of more fields than this is a malformed request.
MAX_QUERY_FIELDS = 64
DEFAULT_POLICY = "default"

_INT64_LIMIT = 2**63  # HAProxy integers are signed 64-bit
MAX_VAR_BYTES = 1024  # per forwarded value; HAProxy puts these into request headers
MAX_CLAIMS_BYTES = 6144  # the base64url payload; keeps every ACK well inside 16 KiB frames

_NOT_A_POLICY_NAME = "\x00"  # no [policies.NAME] can be called this
_OWS = " \t"  # RFC 9110 optional white space

# Verdicts the glue itself reaches (no token to verify); shared, as they are immutable.
_MISSING_TOKEN = Verdict.rejected(Reason.MISSING_TOKEN)
_UNKNOWN_POLICY = Verdict.rejected(Reason.UNKNOWN_POLICY)
# The request, not the token, is malformed (RFC 6750 invalid_request): 400, not 401.
_INVALID_REQUEST = Verdict.rejected(Reason.INVALID_REQUEST)

TXN = Scope.TXN
_VALID = SetVar(TXN, "valid", True)
_INVALID = SetVar(TXN, "valid", False)
# The head of every accepted answer, encoded once.
_ACCEPTED = EncodedActions.of((_VALID, SetVar(TXN, "status", 200), SetVar(TXN, "reason", "ok")))
# Every ACK carries at least one action (HAProxy 3.1.0 stalls on empty ACKs); this one
# also keeps the outcome fail-closed when a NOTIFY holds no check-jwt message.
FALLBACK_ACTIONS: tuple[Action, ...] = (_INVALID,)


@dataclass(frozen=True, slots=True)
class PolicyRuntime:
    """A verifier policy plus what the glue does with its verdicts."""

    policy: Policy
    report_only: bool = False
    forward_claims: tuple[tuple[str, str], ...] = ()
    realm: str = "jwtgate"


# A message on its way through CheckJwtHandler.many: (message, policy name, policy,
# token, request context, verdict when the glue itself decided it).
_Prepared = tuple[
    Message, str, PolicyRuntime | None, str | None, RequestContext | None, Verdict | None
]


class KidRefetcher(Protocol):
    async def refetch_unknown_kid(self, issuer_name: str, kid: str | None) -> bool: ...


class VerdictObserver(Protocol):
    def on_verdict(
        self,
        verdict: Verdict,
        policy: str,
        seconds: float | None,  # None: decided without verifying a token
        token: str | None,
        report_only: bool,
    ) -> None: ...


@dataclass(frozen=True)
class Runtime:
    """Everything a configuration reload swaps in one assignment."""

    verifier: Verifier
    policies: Mapping[str, PolicyRuntime]
    refetcher: KidRefetcher | None = None
    token_query_param: str = ""
    unknown_kid_wait: float = 0.5  # seconds a request may wait for a kid refetch


def replay_key_args(runtime: Runtime) -> tuple[str, ...]:
    """Every argument an answer depends on: the token's sources and the policy. Method,
    path and host are not among them because no check reads the request context; a
    check that does must add them here."""
    base = (ARG_AUTHORIZATION, ARG_TOKEN, ARG_POLICY)
    return (*base, ARG_QUERY) if runtime.token_query_param else base


def new_answer_memo(runtime: Runtime, clock: Callable[[], float] = time.time) -> AnswerMemo:
    """The memo through which the SPOP layer replays accepted answers (docs/architecture.md)."""
    return AnswerMemo(
        MESSAGE_NAME, replay_key_args(runtime), clock=clock, countdown_var=(TXN, "expires_in")
    )


class CheckJwtHandler:
    """The SPOE handler for `check-jwt`. Sync on the common path; async only when an
    unknown `kid` makes a (bounded, single-flight) JWKS refetch worth waiting for.

    With a `memo` (on the same clock), each accepted answer is remembered for as long as
    the verifier says it stays the same, so the SPOP layer can replay it; a new runtime
    clears it."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        clock: Callable[[], float] = time.time,
        observer: VerdictObserver | None = None,
        memo: AnswerMemo | None = None,
    ) -> None:
        self._clock = clock
        self._observer = observer
        self._timer = time.perf_counter
        self.memo = memo
        self.runtime = runtime
        self._told_no_query = False

    @property
    def runtime(self) -> Runtime:
        return self._runtime

    @runtime.setter
    def runtime(self, runtime: Runtime) -> None:
        self._runtime = runtime
        if self.memo is not None:
            self.memo.rekey(replay_key_args(runtime))

    def __call__(self, message: Message) -> Sequence[Action] | Awaitable[Sequence[Action]]:
        return self.many((message,))[0]

    def many(
        self, messages: Sequence[Message]
    ) -> list[Sequence[Action] | Awaitable[Sequence[Action]]]:
        """The answers to `check-jwt` messages read together, in order. Their tokens are
        verified as one batch (Verifier.verify_many). Each verdict's recorded duration is
        an equal share of reading the messages, plus, for a verified token, an equal share
        of the batch's verification: stages over the whole batch cannot be timed per token."""
        # The per-request path: kept flat (no helper call where a line does); one ending,
        # _finish, shared with the refetch path.
        if not messages:
            return []
        started = self._timer()
        runtime = self._runtime  # one reference for the whole batch, across a reload
        memo = self.memo
        epoch = memo.epoch if memo is not None else 0  # read before the verdicts are
        now = self._clock()
        prepared: list[_Prepared] = []
        requests: list[tuple[str, Policy, RequestContext]] = []
        for message in messages:
            args = dict(reversed(message.args))  # the first of a repeated name wins
            policy_name = args.get(ARG_POLICY)
            if type(policy_name) is not str or not policy_name:
                # Unset (NULL) or empty: the default policy. Any type but text (a wrong
                # fetch in haproxy.cfg) names no policy, never the default:
                # unknown_policy, 500.
                if policy_name is None or policy_name in ("", b""):
                    policy_name = DEFAULT_POLICY
                else:
                    policy_name = _text(policy_name) or _NOT_A_POLICY_NAME
            selected = runtime.policies.get(policy_name)
            if runtime.token_query_param and ARG_QUERY not in args:
                self._no_query_argument()
            token, problem = _extract_token(args, runtime.token_query_param)
            context = None
            if selected is None:
                verdict: Verdict | None = _UNKNOWN_POLICY
            elif problem is not None:
                verdict = problem
            else:
                assert token is not None
                method, path, host = args.get(ARG_METHOD), args.get(ARG_PATH), args.get(ARG_HOST)
                context = RequestContext(
                    method if type(method) is str else _text(method),
                    path if type(path) is str else _text(path),
                    host if type(host) is str else _text(host),
                )
                requests.append((token, selected.policy, context))
                verdict = None  # the batch's verdict, below
            prepared.append((message, policy_name, selected, token, context, verdict))
        verifying = self._timer()
        verdicts = iter(runtime.verifier.verify_many(requests, now) if requests else ())
        reading = (verifying - started) / len(messages)
        verified = reading
        if requests:
            verified += (self._timer() - verifying) / len(requests)
        results: list[Sequence[Action] | Awaitable[Sequence[Action]]] = []
        try:
            for message, policy_name, selected, token, context, decided in prepared:
                if decided is not None:
                    # No token was verified (none sent, two sent, no such policy): not a
                    # verification to time. Regression: they diluted the miss latencies.
                    results.append(self._finish(decided, policy_name, selected, token, now, None))
                    continue
                assert selected is not None
                assert token is not None
                assert context is not None
                verdict = next(verdicts)
                if (
                    verdict.reason is Reason.UNKNOWN_KID
                    and runtime.refetcher is not None
                    and verdict.issuer is not None
                ):
                    results.append(
                        self._after_refetch(runtime, selected, token, context, verdict, verified)
                    )
                    continue
                # Remembered from the second sighting on (a cache hit): a token seen once
                # may never come back, and remembering costs a miss a few microseconds.
                if verdict.cache_hit and verdict.ok and memo is not None and memo.admit():
                    _remember(memo, epoch, message, runtime, verdict, selected, token, now)
                results.append(self._finish(verdict, policy_name, selected, token, now, verified))
        except BaseException:
            # The caller asks each message again alone: the refetches begun here never run.
            for result in results:
                if inspect.iscoroutine(result):
                    result.close()
            raise
        return results

    def _no_query_argument(self) -> None:
        """token_query_param is on, but HAProxy sends no `query` (the shipped spoe-jwt.conf
        does not): every token in a query string reads as missing. Said once a process."""
        if self._told_no_query:
            return
        self._told_no_query = True
        log.warning(
            "token_query_param_without_query_arg",
            extra={"hint": "add query=query to the args of spoe-message check-jwt"},
        )

    async def _after_refetch(
        self,
        runtime: Runtime,
        selected: PolicyRuntime,
        token: str,
        context: RequestContext,
        verdict: Verdict,
        spent: float,
    ) -> Sequence[Action]:
        """`spent`: the request's time before the refetch, added to the time it waits."""
        started = self._timer()
        assert runtime.refetcher is not None
        assert verdict.issuer is not None
        try:
            found = await asyncio.wait_for(
                runtime.refetcher.refetch_unknown_kid(verdict.issuer, verdict.kid),
                runtime.unknown_kid_wait,
            )
        except TimeoutError:
            found = False  # the refetch goes on in the background for later requests
        if found:
            verdict = runtime.verifier.verify(token, selected.policy, context, self._clock())
        seconds = spent + self._timer() - started
        return self._finish(verdict, selected.policy.name, selected, token, self._clock(), seconds)

    def _finish(
        self,
        verdict: Verdict,
        policy_name: str,
        selected: PolicyRuntime | None,
        token: str | None,
        now: float,
        seconds: float | None,
    ) -> Sequence[Action]:
        """Count and log the verdict, then turn it into actions."""
        if self._observer is not None:
            report_only = selected is not None and selected.report_only
            self._observer.on_verdict(verdict, policy_name, seconds, token, report_only)
        return verdict_actions(verdict, selected, token, now)


def verdict_actions(
    verdict: Verdict, selected: PolicyRuntime | None, token: str | None, now: float
) -> list[Action]:
    """The set-var actions for one verdict (all in txn scope, prefix `jwt`)."""
    report_only = selected is not None and selected.report_only
    head = _ACCEPTED if verdict.ok else _rejection(verdict, selected, report_only)
    if verdict.claims and token is not None and (verdict.ok or report_only):
        # Claims are set only for requests that pass, and only when the signature verified
        # (the verifier leaves them empty otherwise).
        exp = verdict.expires_at
        expires_in = -1 if exp is None else max(0, int(exp - now))
        return [_identity_answer(verdict, selected, token, head, expires_in)]
    return [head]


# Rejections repeat (a flood of bad tokens gets the same answer), so their variables are
# encoded once per (reason, status, scopes, realm, report-only).
_REJECTIONS: dict[tuple[Reason, int, frozenset[str], str, bool], EncodedActions] = {}
_MEMO_MAX = 4096


def _rejection(
    verdict: Verdict, selected: PolicyRuntime | None, report_only: bool
) -> EncodedActions:
    realm = selected.realm if selected is not None else "jwtgate"
    key = (verdict.reason, verdict.status, verdict.required_scopes, realm, report_only)
    encoded = _REJECTIONS.get(key)
    if encoded is None:
        encoded = EncodedActions.of(
            (
                _VALID if report_only else _INVALID,
                SetVar(TXN, "status", 200 if report_only else verdict.status),
                SetVar(TXN, "reason", verdict.reason.value),
                SetVar(TXN, "www_authenticate", www_authenticate(verdict, realm)),
            )
        )
        if len(_REJECTIONS) >= _MEMO_MAX:
            _REJECTIONS.clear()
        _REJECTIONS[key] = encoded
    return encoded


def _remember(
    memo: AnswerMemo,
    epoch: int,
    message: Message,
    runtime: Runtime,
    verdict: Verdict,
    selected: PolicyRuntime,
    token: str,
    now: float,
) -> None:
    """Remember an accepted answer for replay, for as long as it stays the same."""
    window = runtime.verifier.replay_window(token, now)
    key = memo.key_for(message)
    if window is None or key is None or not verdict.claims:
        return
    answer = _answer(verdict, selected, token)
    memo.remember(
        key,
        _ACCEPTED.payload + answer.identity,
        valid_from=window[0],
        valid_until=window[1],
        countdown_to=verdict.expires_at,
        tag=(verdict.issuer, selected.policy.name),
        epoch=epoch,
    )


class _Answer:
    """The encoded answer for one verified token under one policy, kept while its
    `expires_in` second lasts. A cache hit returns the very Verdict object the verifier
    cached, so every request in that second reuses the same bytes."""

    __slots__ = ("encoded", "expires_in", "identity", "verdict")

    def __init__(self, verdict: Verdict, identity: bytes) -> None:
        self.verdict = verdict
        self.identity = identity
        self.expires_in = -2  # no second yet
        self.encoded = _ACCEPTED


_ANSWERS: dict[tuple[int, str], _Answer] = {}


def _identity_answer(
    verdict: Verdict,
    selected: PolicyRuntime | None,
    token: str,
    head: EncodedActions,
    expires_in: int,
) -> EncodedActions:
    """`head` (accepted, or a report-only rejection), token variables, then `expires_in`."""
    if not verdict.cache_hit:
        # A fresh check's Verdict is built for this request alone: keeping its answer
        # would only push out the ones that cache hits reuse.
        identity = _identity(verdict, selected, token)
        return EncodedActions(head.payload + identity + _expires_in(expires_in))
    answer = _answer(verdict, selected, token)
    if answer.expires_in != expires_in:
        answer.encoded = EncodedActions(head.payload + answer.identity + _expires_in(expires_in))
        answer.expires_in = expires_in
    return answer.encoded


def _answer(verdict: Verdict, selected: PolicyRuntime | None, token: str) -> _Answer:
    # The head follows from the verdict and the policy, both in the key.
    key = (id(verdict), selected.policy.name if selected is not None else "")
    answer = _ANSWERS.get(key)
    if answer is None or answer.verdict is not verdict:  # an id can be reused after collection
        answer = _Answer(verdict, _identity(verdict, selected, token))
        if len(_ANSWERS) >= _MEMO_MAX:
            _ANSWERS.clear()
        _ANSWERS[key] = answer
    return answer


def _identity(verdict: Verdict, selected: PolicyRuntime | None, token: str) -> bytes:
    """The encoded variables that depend only on the verified token and the policy."""
    return encode_set_vars(TXN, identity_variables(verdict, selected, token))


_EXPIRES_IN: dict[int, bytes] = {}


def _expires_in(seconds: int) -> bytes:
    """The `expires_in` variable; nothing for a token without exp (-1)."""
    if seconds < 0:
        return b""
    encoded = _EXPIRES_IN.get(seconds)
    if encoded is None:
        encoded = encode_set_vars(TXN, (("expires_in", seconds),))
        if len(_EXPIRES_IN) >= _MEMO_MAX:
            _EXPIRES_IN.clear()
        _EXPIRES_IN[seconds] = encoded
    return encoded


def identity_variables(
    verdict: Verdict, selected: PolicyRuntime | None, token: str
) -> list[tuple[str, Value]]:
    """The variables that depend only on the verified token (and the policy)."""
    claims = verdict.claims
    variables: list[tuple[str, Value]] = []
    append = variables.append
    for name in ("sub", "iss", "jti", "aud"):
        # Strings only (and aud's array of strings), as RFC 7519 defines them.
        value = claims.get(name)
        if type(value) is str or (name == "aud" and type(value) is list):
            text = claim_text(value)
            if text:
                append((name, text))
    scope_text = claim_text(" ".join(scope_tokens(claims)))
    # A scope-token may hold `,` (RFC 6749 3.3), and a service that reads the header as an
    # HTTP list would split "read,admin" into two scopes: withheld, as a list claim is.
    if scope_text and "," not in scope_text:
        append(("scope", scope_text))
    exp = claims.get("exp")
    # Within HAProxy's signed 64-bit integers only; a report-only verdict may carry any exp.
    if (
        isinstance(exp, int | float)
        and not isinstance(exp, bool)
        and -_INT64_LIMIT <= exp < _INT64_LIMIT
    ):
        append(("exp", int(exp)))
    payload = payload_segment(token)
    if payload is not None:
        append(("claims", payload))
    if selected is not None:
        for var, claim in selected.forward_claims:
            value = claim_text(claims.get(claim))
            if value:
                append((var, value))
    return variables


def payload_segment(token: str) -> str | None:
    """The verified payload as unpadded base64url JSON: the token's own payload segment,
    exactly what was signed. None when too large to send."""
    # Sliced between the dots: split() would also copy the header and the signature.
    start = token.index(".") + 1
    end = token.index(".", start)
    return token[start:end] if end - start <= MAX_CLAIMS_BYTES else None


def claim_text(value: Any) -> str:
    """A claim as a header value, exactly as signed, or "" when it cannot be one.

    Never altered: a value forwards as its signed text or not at all (a list as its items
    joined with `,`, which a string holding `,` can look like). A string with a
    character that is not printable (controls, U+2028, bidi marks, ...), with white space
    at either end (HTTP trims it) or over MAX_VAR_BYTES is not forwarded; nor is an
    object, or a list unless every item is a scalar that forwards and holds no `,`. The
    exact payload is always in `claims`.
    """
    if type(value) is str:
        if value.isascii():
            # The common case: one byte per character.
            if len(value) > MAX_VAR_BYTES or not value.isprintable():
                return ""
        elif not value.isprintable() or len(value.encode()) > MAX_VAR_BYTES:
            return ""
        if value[:1] == " " or value[-1:] == " ":
            return ""
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return claim_text(str(value))
    if isinstance(value, list):
        items = [claim_text(item) for item in value if not isinstance(item, list | dict)]
        if len(items) != len(value) or not all(items) or any("," in item for item in items):
            return ""
        return claim_text(",".join(items))
    return ""


def www_authenticate(verdict: Verdict, realm: str) -> str:
    """An RFC 6750 section 3 challenge. No error attribute when no token was sent, nor
    when the failure is the agent's (keys unavailable): the token is not known bad."""
    error = bearer_error(verdict.reason)
    if not error:
        return f'Bearer realm="{realm}"'
    challenge = (
        f'Bearer realm="{realm}", error="{error}", error_description="{verdict.reason.value}"'
    )
    if verdict.required_scopes:  # RFC 6750 3.1: MAY name the scope needed
        challenge += f', scope="{" ".join(sorted(verdict.required_scopes))}"'
    return challenge


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return ""


def _extract_token(args: Mapping[str, Any], query_param: str) -> tuple[str | None, Verdict | None]:
    """Find the one bearer token of a request (RFC 6750 section 2).

    Sending it in more than one place is a malformed request (400), as the RFC says
    clients MUST NOT use more than one method. A non-Bearer Authorization scheme is
    treated as no bearer token at all. `Bearer` followed by anything but one token is a
    400; the token's own characters are the verifier's to judge (401 `malformed`).
    """
    header = args.get(ARG_AUTHORIZATION)
    token = None
    if header:
        if type(header) is not str:
            header = _text(header)
        # HTTP's own white space only: str.strip() would also take NBSP, VT, FS, ...
        scheme, _, rest = header.strip(_OWS).partition(" ")
        if scheme.lower() == "bearer":
            token = rest.strip(" ")
            # Two tokens, split by either kind of HTTP white space, are not one.
            if not token or " " in token or "\t" in token or not token.isascii():
                return None, _INVALID_REQUEST
    other = args.get(ARG_TOKEN)
    if other:
        other = _text(other).strip(_OWS)
    if token and other:
        return None, _INVALID_REQUEST
    found = token or other
    if query_param:
        try:
            # Every field is decoded to find the one: a query of thousands of fields cost
            # milliseconds of a worker, before any token was read (DoS review).
            fields = parse_qsl(
                _text(args.get(ARG_QUERY)), keep_blank_values=False, max_num_fields=MAX_QUERY_FIELDS
            )
        except ValueError:
            return None, _INVALID_REQUEST
        for name, value in fields:
            if name == query_param:
                if found:
                    return None, _INVALID_REQUEST
                found = value
    return (found, None) if found else (None, _MISSING_TOKEN)
