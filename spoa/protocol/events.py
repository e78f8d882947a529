"""What `AgentConnection.receive_data` and `handle_timeout` report."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import NamedTuple

from .errors import Status
from .payloads import Message


@dataclass(frozen=True, slots=True)
class HelloReceived:
    """HAProxy's HELLO was accepted and AGENT-HELLO is queued."""

    supported_versions: tuple[str, ...]
    max_frame_size: int
    capabilities: frozenset[str]
    healthcheck: bool
    engine_id: str | None
    negotiated_max_frame_size: int

    @property
    def pipelining(self) -> bool:
        """Both sides list pipelining (we always do)."""
        return "pipelining" in self.capabilities


class NotifyReceived(NamedTuple):
    """A NOTIFY to answer with exactly one `send_ack(stream_id, frame_id, ...)`.

    A NamedTuple, like Message: one is built per request."""

    stream_id: int
    frame_id: int
    messages: tuple[Message, ...]


class AnswersReplayed(NamedTuple):
    """NOTIFYs already acknowledged from the connection's `AnswerMemo`: one tag each."""

    tags: list[Hashable]


@dataclass(frozen=True, slots=True)
class DisconnectReceived:
    """HAPROXY-DISCONNECT; `status` is HAProxy's raw code (it may be private)."""

    status: int
    message: str


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The connection has ended, whoever ended it; emitted exactly once."""

    status: Status
    message: str


Event = HelloReceived | NotifyReceived | AnswersReplayed | DisconnectReceived | ConnectionClosed
