"""The SPOE agent server: asyncio glue over `spoa.protocol.AgentConnection`.

One `asyncio.Protocol` per HAProxy connection feeds bytes to the core, runs the
handler registered for each message of a NOTIFY and writes back whatever the
core queued, once per read. Sync handlers answer inline; async ones run as
tasks whose ACKs go out as each finishes. Time is the loop's clock, and each
connection keeps a single timer for the core's deadline.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import socket
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeGuard, cast

from .protocol import (
    DEFAULT_FRAME_TIMEOUT,
    DEFAULT_HELLO_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_FRAME_SIZE,
    DEFAULT_MAX_INFLIGHT,
    DEFAULT_MAX_LIST_ITEMS,
    Action,
    AgentConnection,
    AnswerMemo,
    AnswersReplayed,
    ConnectionClosed,
    DisconnectReceived,
    Event,
    HelloReceived,
    Message,
    NotifyReceived,
    SpopError,
    Status,
    build_disconnect,
)

log = logging.getLogger(__name__)

HandlerResult = Sequence[Action] | Awaitable[Sequence[Action]]
Handler = Callable[[Message], HandlerResult]
# A handler may also answer every message of its name that one read brought, at once:
# `handler.many(messages)`, the results in order (see CheckJwtHandler.many).
BatchAnswer = Callable[[Sequence[Message]], Sequence[HandlerResult]]
ReplayObserver = Callable[[list[Hashable]], None]


# How long a closing connection may take to write its last frames before it is reset.
CLOSE_GRACE = 2.0
# A DISCONNECT's message is the peer's text, up to a whole frame: logged this many
# characters at most, so a peer cannot fill the log with a few frames.
LOGGED_MESSAGE_CHARS = 256
# Distinct unknown message names logged (once each) per process.
UNHANDLED_NAMES_LOGGED = 8


class AcceptBalancer(Protocol):
    """Decides, with the sibling workers on the same listener, who takes a connection."""

    def may_accept(self) -> bool: ...

    def publish(self, held: int) -> None: ...

    def leave(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Bounds of the server. `max_inflight` must be at least HAProxy's
    `max-waiting-frames` (20 by default); timeouts and grace are seconds."""

    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    max_list_items: int = DEFAULT_MAX_LIST_ITEMS
    max_inflight: int = DEFAULT_MAX_INFLIGHT
    max_connections: int = 1024
    hello_timeout: float = DEFAULT_HELLO_TIMEOUT
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT
    frame_timeout: float = DEFAULT_FRAME_TIMEOUT
    shutdown_grace: float = 5.0


class ServerObserver(Protocol):
    """What the server reports, for metrics. Every method must be cheap."""

    def connection_opened(self) -> None: ...
    def connection_closed(self, status: Status | None) -> None: ...
    def frame_received(self, kind: str, count: int = 1) -> None: ...
    def protocol_error(self, status: Status) -> None: ...
    def handler_failed(self) -> None: ...
    def inflight_changed(self, delta: int) -> None: ...


class NullObserver:
    """The default observer: reports nowhere."""

    def connection_opened(self) -> None:
        pass

    def connection_closed(self, status: Status | None) -> None:
        pass

    def frame_received(self, kind: str, count: int = 1) -> None:
        pass

    def protocol_error(self, status: Status) -> None:
        pass

    def handler_failed(self) -> None:
        pass

    def inflight_changed(self, delta: int) -> None:
        pass


def install_uvloop() -> bool:
    """Make uvloop the event loop policy when it is installed; say whether it is."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def _close_unstarted(pending: list[tuple[str, Awaitable[Sequence[Action]]]]) -> None:
    """Close handler coroutines that will never be awaited, so none leaks a warning."""
    for _, awaitable in pending:
        if inspect.iscoroutine(awaitable) and (
            inspect.getcoroutinestate(awaitable) == inspect.CORO_CREATED
        ):
            awaitable.close()


class _Failed:
    """A handler's exception, kept as its answer until its NOTIFY is acknowledged."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


_Answer = HandlerResult | _Failed | None


def _call(handler: Handler, message: Message) -> HandlerResult | _Failed:
    try:
        return handler(message)
    except Exception as error:
        return _Failed(error)


def _is_awaitable(answer: _Answer) -> TypeGuard[Awaitable[Sequence[Action]]]:
    return (
        answer is not None
        and type(answer) is not _Failed
        and type(answer) is not list
        and type(answer) is not tuple
        and inspect.isawaitable(answer)
    )


class SpoaServer:
    """Serves SPOP to HAProxy; handlers are looked up by message name.

    With an `answer_memo`, every connection replays its remembered answers, and
    `on_replayed` receives the tags of each batch so replays can be counted."""

    def __init__(
        self,
        handlers: Mapping[str, Handler],
        *,
        fallback_actions: Sequence[Action],
        limits: ServerLimits = ServerLimits(),
        observer: ServerObserver | None = None,
        answer_memo: AnswerMemo | None = None,
        on_replayed: ReplayObserver | None = None,
    ) -> None:
        if not fallback_actions:
            raise ValueError("fallback_actions must hold at least one action")
        self.handlers = dict(handlers)
        self.fallback_actions = tuple(fallback_actions)
        self.limits = limits
        self.observer: ServerObserver = observer or NullObserver()
        self.answer_memo = answer_memo
        self.on_replayed = on_replayed
        self._server: asyncio.Server | None = None
        self._acceptor: _BalancedAcceptor | None = None
        self._connections: set[_AgentProtocol] = set()
        self._closing = False
        self._unhandled_names: set[str] = set()

    @property
    def bound_port(self) -> int:
        if self._acceptor is not None:
            return self._acceptor.port
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the server is not listening")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._make_protocol, host, port, backlog=1024, reuse_address=True
        )

    async def start_on_socket(
        self, sock: socket.socket, balancer: AcceptBalancer | None = None
    ) -> None:
        """Serve on a socket that is already bound and listening, maybe shared with
        sibling workers; with a `balancer`, a connection is taken only when it agrees."""
        if balancer is not None:
            self._acceptor = _BalancedAcceptor(self, sock, balancer)
            self._acceptor.start()
            return
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._make_protocol, sock=sock)

    async def shutdown(self) -> None:
        """Stop accepting, let in-flight NOTIFYs finish within the grace period,
        then send AGENT-DISCONNECT (normal) and close every connection."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        if self._acceptor is not None:
            self._acceptor.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.shutdown_grace
        while any(c.busy for c in self._connections) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        for connection in list(self._connections):
            connection.close(Status.NORMAL, "agent shutting down")
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        # Let connection_lost callbacks run so no task outlives the server.
        while self._connections and loop.time() < deadline + 1.0:
            await asyncio.sleep(0.005)

    def unhandled_message(self, name: str) -> None:
        """A message no handler takes gets the fallback actions (fail closed). Said once
        per name (a few names at most): a name misspelled in the SPOE configuration
        would otherwise turn every request away with nothing in the log."""
        if name in self._unhandled_names or len(self._unhandled_names) >= UNHANDLED_NAMES_LOGGED:
            return
        self._unhandled_names.add(name)
        log.warning(
            "spoe_message_unhandled",
            extra={"spoe_message": name[:LOGGED_MESSAGE_CHARS], "handled": sorted(self.handlers)},
        )

    def _make_protocol(self) -> _AgentProtocol:
        return _AgentProtocol(self)


class _BalancedAcceptor:
    """Accepts on a listener shared with sibling workers, one connection at a time and
    only while the balancer agrees; otherwise it stops watching the socket (a sibling
    takes the connection) and asks again every RECHECK seconds, publishing what it holds.
    Right after declining a pending connection it asks every BURST_RECHECK seconds for a
    while instead, so a burst of connections is taken in turns without waiting on ticks."""

    RECHECK = 0.05
    BURST_RECHECK = 0.001
    BURST_LASTS = 0.1  # seconds of quick rechecks after the last declined connection
    RETRY_AFTER_ERROR = 1.0  # out of file descriptors or memory: as asyncio's own server
    # Published while backing off after such an error, so siblings take the connections.
    UNAVAILABLE = 2**31

    def __init__(self, server: SpoaServer, sock: socket.socket, balancer: AcceptBalancer) -> None:
        self._server = server
        self._sock = sock
        self._balancer = balancer
        self._loop = asyncio.get_running_loop()
        self.port: int = sock.getsockname()[1]
        self._watching = False
        self._closed = False
        self._timer: asyncio.TimerHandle | None = None
        self._resume_at = 0.0
        self._declined_at = -math.inf
        self._adopting: set[asyncio.Task[None]] = set()
        # Accepted, not yet a connection of the server: counted exactly once, so a
        # sibling never sees this worker hold more than it does.
        self._pending = 0

    def start(self) -> None:
        self._sock.setblocking(False)
        self._tick()

    def close(self) -> None:
        self._closed = True
        self._stop_watching()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._balancer.leave()
        self._sock.close()

    def _publish(self, now: float) -> None:
        held = len(self._server._connections) + self._pending
        self._balancer.publish(held if now >= self._resume_at else self.UNAVAILABLE)

    def _tick(self) -> None:
        self._timer = None
        if self._closed:
            return
        now = self._loop.time()
        self._publish(now)
        if now >= self._resume_at and self._balancer.may_accept():
            if not self._watching:
                self._loop.add_reader(self._sock.fileno(), self._on_readable)
                self._watching = True
        else:
            self._stop_watching()
        quick = now - self._declined_at < self.BURST_LASTS
        self._timer = self._loop.call_later(
            self.BURST_RECHECK if quick else self.RECHECK, self._tick
        )

    def _stop_watching(self) -> None:
        if self._watching:
            self._loop.remove_reader(self._sock.fileno())
            self._watching = False

    def _recheck_soon(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(self.BURST_RECHECK, self._tick)

    def _on_readable(self) -> None:
        if self._closed:
            return
        if not self._balancer.may_accept():
            self._stop_watching()  # level-triggered: watching on would spin
            self._declined_at = self._loop.time()
            self._recheck_soon()
            return
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # a sibling took it, or the peer gave up
        except OSError as exc:
            log.error("cannot accept a connection: %s", exc.strerror)
            self._resume_at = self._loop.time() + self.RETRY_AFTER_ERROR
            self._stop_watching()
            self._publish(self._loop.time())
            return
        conn.setblocking(False)
        self._pending += 1
        task = self._loop.create_task(self._adopt(conn))
        self._adopting.add(task)
        task.add_done_callback(self._adopting.discard)
        self._publish(self._loop.time())  # before the next readable event

    async def _adopt(self, conn: socket.socket) -> None:
        counted = True

        def made() -> None:  # the protocol joins the server's connections right after
            nonlocal counted
            counted = False
            self._pending -= 1

        try:
            await self._loop.connect_accepted_socket(
                lambda: _AgentProtocol(self._server, on_made=made), conn
            )
        except OSError:  # reset before the transport existed
            conn.close()
        finally:
            if counted:
                self._pending -= 1


class _AgentProtocol(asyncio.Protocol):
    def __init__(self, server: SpoaServer, on_made: Callable[[], None] | None = None) -> None:
        self._server = server
        self._on_made = on_made
        self._observer = server.observer
        self._handlers = server.handlers
        self._fallback = server.fallback_actions
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._conn: AgentConnection | None = None
        # Each task with the handler awaitables it still has to await.
        self._tasks: dict[asyncio.Task[None], list[tuple[str, Awaitable[Sequence[Action]]]]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._abort_timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._reading_paused = False
        self._write_paused = False
        self._refused = False
        # NOTIFYs in flight as last told to the observer: reported once per batch, so
        # a batch answered inline costs no observer call at all.
        self._reported_inflight = 0

    @property
    def busy(self) -> bool:
        return self._conn is not None and self._conn.inflight > 0

    # -- asyncio callbacks -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._on_made is not None:
            self._on_made()
        # uvloop's transports implement the interface without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        transport = self._transport
        server = self._server
        if server._closing or len(server._connections) >= server.limits.max_connections:
            # Refuse with a reason: HAProxy 2.x reads a DISCONNECT's status even while it
            # awaits AGENT-HELLO (3.x logs any such frame as status 4, invalid frame).
            self._refused = True
            transport.write(build_disconnect(Status.RESOURCE_ALLOCATION, "too many connections"))
            transport.close()
            return
        limits = server.limits
        self._conn = AgentConnection(
            max_frame_size=limits.max_frame_size,
            max_list_items=limits.max_list_items,
            max_inflight=limits.max_inflight,
            hello_timeout=limits.hello_timeout,
            idle_timeout=limits.idle_timeout,
            frame_timeout=limits.frame_timeout,
            now=self._loop.time(),
            answer_memo=server.answer_memo,
        )
        server._connections.add(self)
        self._observer.connection_opened()
        self._arm_timer()

    def data_received(self, data: bytes) -> None:
        conn = self._conn
        if conn is None:
            return
        self._handle_events(conn.receive_data(data, self._loop.time()))
        self._flush()

    def eof_received(self) -> bool:
        conn = self._conn
        if conn is None:
            return False
        self._handle_events(conn.receive_data(b"", self._loop.time()))
        self._flush()
        # True keeps the transport open for the ACKs of NOTIFYs still being answered;
        # the last one closes it (_flush).
        return conn.draining

    def connection_lost(self, exc: Exception | None) -> None:
        # A reset from HAProxy is a normal close: 3.1+ drops pooled connections that way.
        conn = self._conn
        self._conn = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._abort_timer is not None:
            self._abort_timer.cancel()
            self._abort_timer = None
        for task, pending in list(self._tasks.items()):
            task.cancel()
            _close_unstarted(pending)
        if conn is None:
            return
        if not conn.closed:
            conn.connection_lost()
        if self._reported_inflight:
            self._observer.inflight_changed(-self._reported_inflight)
            self._reported_inflight = 0
        self._server._connections.discard(self)
        self._observer.connection_closed(conn.close_status)

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()

    # -- events ------------------------------------------------------------

    def _handle_events(self, events: list[Event]) -> None:
        notifies = 0
        # A HAPROXY-DISCONNECT comes in the same events as the close it causes.
        by_haproxy = False
        answers = iter(
            self._answer(
                [
                    message
                    for event in events
                    if type(event) is NotifyReceived
                    for message in event.messages
                ]
            )
        )
        for event in events:
            if type(event) is NotifyReceived:
                notifies += 1
                self._dispatch(event, [next(answers) for _ in event.messages])
            elif type(event) is AnswersReplayed:
                notifies += len(event.tags)
                if self._server.on_replayed is not None:
                    self._server.on_replayed(event.tags)
            elif isinstance(event, HelloReceived):
                self._observer.frame_received("haproxy_hello")
            elif isinstance(event, DisconnectReceived):
                self._observer.frame_received("haproxy_disconnect")
                by_haproxy = True
            elif isinstance(event, ConnectionClosed):
                self._on_closed(event, by_haproxy)
        if notifies:
            self._observer.frame_received("notify", notifies)
        self._report_inflight()
        self._update_reading()

    def _report_inflight(self) -> None:
        conn = self._conn
        inflight = conn.inflight if conn is not None else 0
        if inflight != self._reported_inflight:
            self._observer.inflight_changed(inflight - self._reported_inflight)
            self._reported_inflight = inflight

    def _answer(self, messages: list[Message]) -> list[_Answer]:
        """Each message's handler result: None when no handler has its name, a _Failed
        when the handler raised. The messages of one read that a batch handler takes go
        to it together."""
        answers: list[_Answer] = [None] * len(messages)
        batches: dict[str, tuple[BatchAnswer, list[int]]] = {}
        for index, message in enumerate(messages):
            batch = batches.get(message.name)
            if batch is not None:
                batch[1].append(index)
                continue
            handler = self._handlers.get(message.name)
            if handler is None:
                self._server.unhandled_message(message.name)
                continue
            many = getattr(handler, "many", None)
            if callable(many):
                batches[message.name] = (many, [index])
            else:
                answers[index] = _call(handler, message)
        for name, (many, indices) in batches.items():
            results: Sequence[_Answer]
            try:
                results = many([messages[index] for index in indices])
                if len(results) != len(indices):
                    raise ValueError(f"{len(results)} answers to {len(indices)} messages")
            except Exception:
                # One by one, so that a failure stays with the message that caused it.
                handler = self._handlers[name]
                results = [_call(handler, messages[index]) for index in indices]
            for index, result in zip(indices, results, strict=True):
                answers[index] = result
        return answers

    def _dispatch(self, event: NotifyReceived, answers: list[_Answer]) -> None:
        actions: list[Action] = []
        pending: list[tuple[str, Awaitable[Sequence[Action]]]] = []
        for message, result in zip(event.messages, answers, strict=True):
            if result is None:
                continue
            if type(result) is _Failed:
                # The event's other answers will never be awaited.
                _close_unstarted(
                    [
                        (other_message.name, other)
                        for other_message, other in zip(event.messages, answers, strict=True)
                        if _is_awaitable(other)
                    ]
                )
                self._handler_failed(message.name, result.error)
                self._ack(event, self._fallback)
                return
            # A plain list or tuple first: inspect.isawaitable goes through ABC checks,
            # and the synchronous answer is the common case.
            if type(result) is list or type(result) is tuple:
                actions.extend(result)
            elif inspect.isawaitable(result):
                pending.append((message.name, result))
            else:
                actions.extend(cast(Sequence[Action], result))
        if not pending:
            self._ack(event, actions)
            return
        task = self._loop.create_task(self._finish(event, actions, pending))
        self._tasks[task] = pending
        task.add_done_callback(self._forget_task)

    def _forget_task(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)

    async def _finish(
        self,
        event: NotifyReceived,
        actions: list[Action],
        pending: list[tuple[str, Awaitable[Sequence[Action]]]],
    ) -> None:
        for name, awaitable in pending:
            try:
                actions.extend(await awaitable)
            except (Exception, asyncio.CancelledError) as error:
                current = asyncio.current_task()
                if isinstance(error, asyncio.CancelledError) and current and current.cancelling():
                    raise  # the connection is gone (connection_lost cancels its tasks)
                # A failure, or a cancellation of something the handler waited on (not of
                # this answer): the NOTIFY still gets its ACK, failing closed. Regression:
                # a cancellation sent none, and the frame stayed in flight for good.
                _close_unstarted(pending)
                self._handler_failed(name, error)
                actions = list(self._fallback)
                break
        self._ack(event, actions)
        self._flush()
        self._report_inflight()
        self._update_reading()

    def _handler_failed(self, message_name: str, error: BaseException) -> None:
        # The exception text may quote a token: log its type only. HAProxy gets the
        # fallback actions (fail closed).
        self._observer.handler_failed()
        log.error(
            "spoe_handler_failed",
            extra={"spoe_message": message_name, "error_type": type(error).__name__},
        )

    def _ack(self, event: NotifyReceived, actions: Sequence[Action]) -> None:
        conn = self._conn
        if conn is None or conn.closed:
            return
        try:
            conn.send_ack(event.stream_id, event.frame_id, actions or self._fallback)
        except SpopError as error:
            # An action that cannot be encoded or an ACK too big: fail closed.
            self._observer.handler_failed()
            log.error("spoe_ack_failed", extra={"error_type": type(error).__name__})
            conn.send_ack(event.stream_id, event.frame_id, self._fallback)

    def _on_closed(self, event: ConnectionClosed, by_haproxy: bool) -> None:
        if event.status is Status.NORMAL:
            return
        message = event.message
        if len(message) > LOGGED_MESSAGE_CHARS:
            message = message[:LOGGED_MESSAGE_CHARS] + "…"
        fields = {"spop_status": int(event.status), "reason": message}
        if not event.status.is_normal:
            # A frame was refused, by HAProxy (its DISCONNECT, 3 and up) or by the agent.
            self._observer.protocol_error(event.status)
            what = "spop_haproxy_disconnect" if by_haproxy else "spop_connection_error"
            log.warning(what, extra=fields)
        elif by_haproxy:
            # 1 or 2 (e.g. its `timeout idle`): routine, not the agent's timeouts below.
            log.info("spop_haproxy_disconnect", extra=fields)
        elif event.status is Status.TIMEOUT:
            # Not a protocol error, but a peer that never sent its HELLO or trickled a
            # frame is worth a line (so is an idle close).
            log.info("spop_connection_timeout", extra=fields)

    # -- output, flow and time -----------------------------------------------

    def _flush(self) -> None:
        conn = self._conn
        transport = self._transport
        if conn is None or transport is None:
            return
        data = conn.data_to_send()
        if data:
            transport.write(data)
        if conn.closed:
            self._close(transport)
        else:
            self._arm_timer()

    def _close(self, transport: asyncio.Transport) -> None:
        """Close once what is queued is written; a peer that stopped reading would keep
        the connection (and its slot of max_connections) forever, so after CLOSE_GRACE
        the connection is reset instead."""
        transport.close()
        if self._abort_timer is None:
            self._abort_timer = self._loop.call_later(CLOSE_GRACE, transport.abort)

    def _update_reading(self) -> None:
        conn = self._conn
        transport = self._transport
        if conn is None or transport is None or transport.is_closing() or conn.draining:
            return  # after the peer's end there is nothing to read (resuming reads it again)
        should_pause = self._write_paused or conn.inflight >= self._server.limits.max_inflight
        if should_pause and not self._reading_paused:
            self._reading_paused = True
            transport.pause_reading()
            conn.pause_input(True, self._loop.time())
        elif not should_pause and self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
            conn.pause_input(False, self._loop.time())
            self._arm_timer()

    def _arm_timer(self) -> None:
        conn = self._conn
        if conn is None:
            return
        deadline = conn.next_deadline()
        if deadline is None:
            return
        # A later deadline is picked up when the armed timer fires: no re-arming per frame.
        if self._timer is not None and self._timer_at is not None and self._timer_at <= deadline:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        conn = self._conn
        if conn is None:
            return
        self._handle_events(conn.handle_timeout(self._loop.time()))
        self._flush()

    def close(self, status: Status, message: str) -> None:
        """Send AGENT-DISCONNECT and close (used by shutdown)."""
        conn = self._conn
        transport = self._transport
        if conn is None or transport is None:
            return
        conn.send_disconnect(status, message)
        self._handle_events(conn.receive_data(b"", self._loop.time()))
        self._flush()  # writes the DISCONNECT, then closes: the connection is closed now
