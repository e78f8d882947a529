"""Replayed answers: the SPOP layer acknowledges a repeated check-jwt from the answer memo.

The oracle is the handler itself. Whatever the connection replays at a given instant must
be, byte for byte, what a handler without a memo answers for the same message at that
instant; and nothing that the handler would answer differently (a key change, a reload,
expiry, another policy) may be replayed.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spoa.devkit.keys import generate_signing_key, jwks_document
from spoa.devkit.tokens import mint_token
from spoa.glue import CheckJwtHandler, Runtime, new_answer_memo, replay_key_args
from spoa.protocol import (
    AgentConnection,
    AnswerMemo,
    AnswersReplayed,
    FrameType,
    Message,
    NotifyReceived,
    build_frame,
    encode_actions,
    encode_messages,
    split_frames,
)
from spoa.verifier import IssuerRules, MemoryKeyStore, RequestContext, Verifier, load_jwks
from tests.protocol.test_memo import HELLO
from tests.test_glue import AUD, ISS, KEY, NOW, make_runtime, message, token


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Agent:
    """One SPOP connection with the real handler behind it, driven by hand."""

    def __init__(self, runtime: Runtime, clock: Clock, *, memo: bool = True) -> None:
        self.memo: AnswerMemo | None = new_answer_memo(runtime, clock) if memo else None
        self.handler = CheckJwtHandler(runtime, clock=clock, memo=self.memo)
        self.conn = AgentConnection(answer_memo=self.memo, now=0.0)
        self.conn.receive_data(HELLO, 0.0)
        self.conn.data_to_send()
        self.replayed: list[Hashable] = []
        self._frame_id = 0

    def prime(self, msg: Message) -> bytes:
        """Ask twice: a verification, then a cache hit, which is remembered."""
        first, replayed = self.ask(msg)
        assert not replayed
        second, replayed = self.ask(msg)
        assert not replayed
        assert second == first
        return first

    def ask(self, msg: Message) -> tuple[bytes, bool]:
        """(the ACK's action payload, whether it was replayed)."""
        self._frame_id += 1
        notify = build_frame(FrameType.NOTIFY, 1, self._frame_id, encode_messages([msg]))
        replayed = False
        for event in self.conn.receive_data(notify, 0.0):
            if isinstance(event, AnswersReplayed):
                replayed = True
                self.replayed.extend(event.tags)
            elif isinstance(event, NotifyReceived):
                (only,) = event.messages
                result = self.handler(only)
                assert isinstance(result, Sequence)
                self.conn.send_ack(event.stream_id, event.frame_id, result)
        (ack,) = split_frames(self.conn.data_to_send())
        assert ack.header.type == FrameType.ACK
        assert (ack.header.stream_id, ack.header.frame_id) == (1, self._frame_id)
        return bytes(ack.payload), replayed


def fresh_answer(runtime: Runtime, msg: Message, now: float) -> bytes:
    """What a handler with no memo answers at `now`."""
    result = CheckJwtHandler(runtime, clock=lambda: now)(msg)
    assert isinstance(result, Sequence)
    return encode_actions(result)


def bearer(tok: str, **args: Any) -> Message:
    return message(authorization=f"Bearer {tok}", **args)


def test_a_repeated_accept_is_replayed_with_the_same_bytes() -> None:
    clock = Clock()
    runtime = make_runtime()
    agent = Agent(runtime, clock)
    msg = bearer(token(jti="r1"), method="GET", path="/a", host="h")
    agent.prime(msg)
    for step in (0.0, 0.3, 1.0, 2.7, 100.0):
        clock.now = NOW + step
        answer, replayed = agent.ask(msg)
        assert replayed
        assert answer == fresh_answer(runtime, msg, clock.now)  # expires_in follows too
    assert agent.replayed == [("test", "default")] * 5


def test_other_request_details_share_the_replay() -> None:
    agent = Agent(make_runtime(), Clock())
    tok = token()
    agent.prime(bearer(tok, method="GET", path="/a", host="x"))
    _, replayed = agent.ask(bearer(tok, method="POST", path="/b?c=d", host="y"))
    assert replayed


@settings(max_examples=40, deadline=None)
@given(
    method=st.sampled_from(["GET", "POST", "", None]),
    path=st.text(max_size=20),
    host=st.one_of(st.none(), st.text(max_size=10)),
)
def test_answers_do_not_depend_on_what_the_replay_key_leaves_out(
    method: str | None, path: str, host: str | None
) -> None:
    # replay_key_args leaves method, path and host out because no check reads them; a
    # check that starts to must add them there, and this test says so.
    runtime = make_runtime()
    tok = token(scope="read admin")
    for policy in ("default", "admin", "shadow"):
        base = fresh_answer(runtime, bearer(tok, policy=policy), NOW)
        varied = bearer(tok, policy=policy, method=method, path=path, host=host)
        assert fresh_answer(runtime, varied, NOW) == base
    verifier = runtime.verifier
    policy_obj = runtime.policies["default"].policy
    assert verifier.verify(tok, policy_obj, RequestContext(), NOW) == verifier.verify(
        tok, policy_obj, RequestContext(method or "", path, host or ""), NOW
    )
    assert replay_key_args(runtime) == ("authorization", "token", "policy")


def test_the_policy_is_part_of_the_key() -> None:
    agent = Agent(make_runtime(), Clock())
    tok = token(scope="read")
    agent.prime(bearer(tok))
    answer, replayed = agent.ask(bearer(tok, policy="admin"))
    assert not replayed
    assert b"insufficient_scope" in answer


@pytest.mark.parametrize(
    "claims",
    [
        {},  # exp only (plus iat)
        {"nbf": NOW + 40},  # not yet valid without the 30 s leeway
        {"iat": NOW + 20},
    ],
)
def test_replays_stop_exactly_where_the_handler_would_answer_differently(
    claims: dict[str, Any],
) -> None:
    runtime = make_runtime()
    tok = mint_token(
        KEY, {"iss": ISS, "aud": AUD, "sub": "a", **claims}, now=NOW - 10, lifetime=600
    )
    msg = bearer(tok)
    start = max([NOW, *(claims[c] - 30 + 0.01 for c in ("nbf", "iat") if c in claims)])
    clock = Clock(start)
    agent = Agent(runtime, clock)
    assert agent.prime(msg) == fresh_answer(runtime, msg, start)
    exp_edge = NOW - 10 + 600 + 30
    lower = start - 0.02
    probes = [lower, start, start + 0.5, exp_edge - 1.5, exp_edge - 1e-6, exp_edge, exp_edge + 1]
    replays = 0
    for now in probes:
        clock.now = now
        answer, replayed = agent.ask(msg)
        assert answer == fresh_answer(runtime, msg, now)
        replays += replayed
    assert replays >= 3
    clock.now = exp_edge
    assert b"expired" in agent.ask(msg)[0]


def test_a_key_change_stops_replays() -> None:
    runtime = make_runtime()
    store = runtime.verifier._keys
    assert isinstance(store, MemoryKeyStore)
    clock = Clock()
    agent = Agent(runtime, clock)
    assert agent.memo is not None
    store.subscribe(agent.memo.clear)
    msg = bearer(token())
    agent.prime(msg)
    assert agent.ask(msg)[1]
    other = generate_signing_key("ES256")
    key_set, _ = load_jwks(json.dumps(jwks_document([other])).encode())
    store.replace("test", key_set, NOW)  # the token's key is gone
    answer, replayed = agent.ask(msg)
    assert not replayed
    assert b"unknown_kid" in answer or b"bad_signature" in answer


def test_stale_keys_bound_the_replay_window() -> None:
    store = MemoryKeyStore()
    key_set, _ = load_jwks(json.dumps(jwks_document([KEY])).encode())
    store.replace("test", key_set, NOW, max_stale=60.0)
    rules = IssuerRules(name="test", issuer=ISS, algorithms=frozenset({"ES256"}))
    runtime = make_runtime()
    runtime = Runtime(Verifier([rules], store), runtime.policies)
    clock = Clock()
    agent = Agent(runtime, clock)
    msg = bearer(token())
    agent.prime(msg)
    clock.now = NOW + 59
    assert agent.ask(msg)[1]
    clock.now = NOW + 61
    answer, replayed = agent.ask(msg)
    assert not replayed
    assert b"keys_unavailable" in answer


def test_a_new_runtime_forgets_every_answer() -> None:
    clock = Clock()
    agent = Agent(make_runtime(), clock)
    msg = bearer(token())
    agent.prime(msg)
    assert agent.ask(msg)[1]
    agent.handler.runtime = make_runtime(query_param="access_token")
    assert agent.memo is not None
    assert agent.memo.key_args == ("authorization", "token", "policy", "query")
    agent.prime(msg)
    assert agent.ask(msg)[1]


@pytest.mark.parametrize(
    "msg",
    [
        message(authorization=None),
        message(authorization="Bearer not.a.token"),
        bearer(token(aud="elsewhere")),
        bearer(token(scope="read"), policy="admin"),
        bearer(token(scope="read"), policy="shadow"),  # report-only rejection
        bearer(token(), policy="nope"),
    ],
)
def test_only_accepted_answers_are_remembered(msg: Message) -> None:
    agent = Agent(make_runtime(), Clock())
    first, _ = agent.ask(msg)
    second, replayed = agent.ask(msg)
    assert not replayed
    assert second == first
    assert agent.memo is not None
    assert not agent.memo.table


def test_a_disabled_memo_replays_nothing() -> None:
    agent = Agent(make_runtime(), Clock())
    assert agent.memo is not None
    agent.memo.enabled = False
    msg = bearer(token())
    for _ in range(3):
        assert not agent.ask(msg)[1]


def test_an_answer_computed_before_a_clear_is_not_remembered() -> None:
    runtime = make_runtime()
    clock = Clock()
    agent = Agent(runtime, clock)
    memo = agent.memo
    assert memo is not None
    verifier = runtime.verifier
    real_verify_many = verifier.verify_many

    def verify_then_clear(*args: Any) -> Any:
        verdicts = real_verify_many(*args)
        memo.clear()  # keys changed while this request was being verified
        return verdicts

    verifier.verify_many = verify_then_clear  # type: ignore[method-assign]
    msg = bearer(token())
    agent.ask(msg)
    agent.ask(msg)
    assert not memo.table


def test_a_token_is_remembered_at_its_second_sighting_then_replayed() -> None:
    runtime = make_runtime()
    agent = Agent(runtime, Clock())
    assert agent.memo is not None
    msg = bearer(token())
    agent.ask(msg)
    assert not agent.memo.table  # seen once: it may never come back
    agent.ask(msg)
    assert len(agent.memo.table) == 1
    for _ in range(5):
        assert agent.ask(msg)[1]
    stats = runtime.verifier.cache.stats()
    assert (stats.hits, stats.misses) == (1, 1)
