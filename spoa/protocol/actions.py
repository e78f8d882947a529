"""ACK actions: set-var and unset-var, in every variable scope."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum

from .errors import InvalidFrame, InvalidValue, ResourceLimit
from .payloads import SPEEDUPS
from .types import (
    SHORT_STRING_HEADS,
    Value,
    decode_string,
    decode_value,
    encode_string,
    encode_value,
)
from .varint import Buffer


class Scope(IntEnum):
    PROC = 0
    SESS = 1
    TXN = 2
    REQ = 3
    RES = 4


class ActionType(IntEnum):
    SET_VAR = 1
    UNSET_VAR = 2


@dataclass(frozen=True, slots=True)
class SetVar:
    scope: Scope
    name: str
    value: Value


@dataclass(frozen=True, slots=True)
class UnsetVar:
    scope: Scope
    name: str


@dataclass(frozen=True, slots=True)
class EncodedActions:
    """Actions already encoded by `encode_actions`. An answer that repeats (the same
    variables for the same verified token) is encoded once and its bytes reused."""

    payload: bytes

    @classmethod
    def of(cls, actions: Iterable[SetVar | UnsetVar]) -> EncodedActions:
        return cls(encode_actions(actions))


Action = SetVar | UnsetVar | EncodedActions

# HAProxy accepts these characters in variable names.
_VALID_NAME = re.compile(r"[A-Za-z0-9._]{1,63}")
# (type, scope, name) -> "action type, nb-args, scope, name": the constant head of an
# action. Bounded so a caller inventing names per request cannot grow it without end. The
# scope in the key is a plain int: an IntEnum hashes through Python code, and not like
# its int, so one key form must be used throughout.
_HEAD_CACHE: dict[tuple[int, int, str], bytes] = {}
_HEAD_CACHE_LIMIT = 4096


def _action_head(action_type: int, scope: int, name: str) -> bytes:
    scope = int(scope)
    key = (action_type, scope, name)
    head = _HEAD_CACHE.get(key)
    if head is not None:
        return head
    if not _VALID_NAME.fullmatch(name):
        raise InvalidValue("variable names are 1-63 characters of [A-Za-z0-9._]")
    if scope not in Scope._value2member_map_:
        raise InvalidValue("unknown variable scope")
    nb_args = 3 if action_type == ActionType.SET_VAR else 2
    head = bytes((action_type, nb_args, scope)) + encode_string(name)
    if len(_HEAD_CACHE) < _HEAD_CACHE_LIMIT:
        _HEAD_CACHE[key] = head
    return head


def _append_set_var(append: Callable[[bytes], None], code: int, name: str, value: Value) -> None:
    """One set-var action; `code` is the scope as a plain int (see _HEAD_CACHE)."""
    append(_HEAD_CACHE.get((1, code, name)) or _action_head(1, code, name))
    # The common case inline: ASCII text is its own UTF-8, one byte per character
    # (isascii is O(1)).
    if type(value) is str and value.isascii() and len(value) < 240:
        append(SHORT_STRING_HEADS[len(value)])
        append(value.encode("ascii"))
    else:
        append(encode_value(value))


def encode_set_vars(scope: Scope, variables: Sequence[tuple[str, Value]]) -> bytes:
    """set-var actions for (name, value) pairs in one scope, encoded as the SetVar
    actions would be, without building them (an answer's variables on a cache miss)."""
    if _encode_set_vars_c is not None and (type(variables) is list or type(variables) is tuple):
        encoded = _encode_set_vars_c(int(scope), variables)
        if encoded is not None:  # None: a value the C encoder leaves to this one
            return encoded
    return encode_set_vars_python(scope, variables)


def encode_set_vars_python(scope: Scope, variables: Iterable[tuple[str, Value]]) -> bytes:
    """The reference for the C encoder, and what encodes the values it leaves alone."""
    code = int(scope)
    parts: list[bytes] = []
    append = parts.append
    for name, value in variables:
        _append_set_var(append, code, name, value)
    return b"".join(parts)


SetVars = list[tuple[str, Value]] | tuple[tuple[str, Value], ...]


def _c_encoder() -> Callable[[int, SetVars], bytes | None] | None:
    """The C encoder, when payloads found the extension built and allowed (SPEEDUPS)."""
    if not SPEEDUPS:
        return None
    from ._speedups import encode_set_vars as encoder

    return encoder


_encode_set_vars_c = _c_encoder()


def encode_actions(actions: Iterable[Action]) -> bytes:
    """The LIST-OF-ACTIONS payload of an ACK."""
    parts: list[bytes] = []
    append = parts.append
    for action in actions:
        if isinstance(action, SetVar):
            _append_set_var(append, int(action.scope), action.name, action.value)
        elif isinstance(action, EncodedActions):
            append(action.payload)
        elif isinstance(action, UnsetVar):
            head = _HEAD_CACHE.get((2, int(action.scope), action.name))
            append(head or _action_head(2, action.scope, action.name))
        else:
            raise InvalidValue(f"not an action: {type(action).__name__}")
    return b"".join(parts)


def decode_actions(buf: Buffer, pos: int, end: int, max_items: int = 256) -> list[Action]:
    """Decode a LIST-OF-ACTIONS (HAProxy's side; used by tests and tools)."""
    actions: list[Action] = []
    while pos < end:
        if len(actions) >= max_items:
            raise ResourceLimit("too many actions")
        if end - pos < 3:
            raise InvalidFrame("truncated action")
        action_type, nb_args, scope_code = buf[pos], buf[pos + 1], buf[pos + 2]
        pos += 3
        if scope_code not in Scope._value2member_map_:
            raise InvalidFrame("unknown variable scope")
        scope = Scope(scope_code)
        name, pos = decode_string(buf, pos, end)
        if action_type == ActionType.SET_VAR and nb_args == 3:
            value, pos = decode_value(buf, pos, end)
            actions.append(SetVar(scope, name, value))
        elif action_type == ActionType.UNSET_VAR and nb_args == 2:
            actions.append(UnsetVar(scope, name))
        else:
            raise InvalidFrame("unknown action or wrong argument count")
    return actions
