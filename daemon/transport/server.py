"""The JSON-RPC server: one task per connection and per request over any byte stream.

Each request runs in its own cancel scope. `$/cancelRequest` cancels it (a handler may hook
that, e.g. to remove its sequence from the batch), a closed connection cancels all of its
requests, and every request gets exactly one response, whatever happens to it. It knows
JSON-RPC and the method table it is given, not what any method does.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec
import structlog
from anyio.abc import ByteStream, TaskGroup

from mlxd import rpc

from .connection import hung_up, next_connection_id

__all__ = ["Handler", "RequestContext", "RpcServer"]

log = structlog.get_logger("mlxd.server")
_BROKEN_GRACE_S = 5.0  # a broken connection's cancelled requests reply within this, or not
# A cancelled request normally ends through its hook (the engine's next step, with its
# partial text). A send blocked on a peer that stopped reading cannot see that: it is
# cancelled after _SEND_GRACE_S, and the whole request after _CANCEL_GRACE_S.
_SEND_GRACE_S = 0.25
_CANCEL_GRACE_S = 2.0


@dataclass(eq=False)
class RequestContext:
    """What a method handler may know of its request and its connection."""

    id: int | str | None
    method: str
    connection_id: int
    notify: Callable[[str, Any], Awaitable[None]]
    cancel_hook: Callable[[], None] | None = None  # tried first, before the scope cancel
    cancel_requested: bool = False
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    summary: dict[str, Any] = field(default_factory=dict)  # extra fields for the request's log line
    sending: anyio.CancelScope | None = None  # around a send to the peer, while one runs
    cancelled_data: Any = msgspec.UNSET  # the error data of a reply to a cancel, set by a handler

    def cancel(self) -> None:
        """Cancel the request: through its hook if it has one, else (or if that does not
        end it in time) through its scope; a send blocked on its peer is cut short."""
        self.cancel_requested = True
        if self.cancel_hook is None:
            self.scope.cancel()
            return
        self.cancel_hook()
        now = anyio.current_time()
        self.scope.deadline = min(self.scope.deadline, now + _CANCEL_GRACE_S)
        if self.sending is not None:
            self.sending.deadline = min(self.sending.deadline, now + _SEND_GRACE_S)

    async def send_bounded(self, send: Awaitable[None]) -> None:
        """Await `send`, cut short once the request is cancelled and the grace is over."""
        with anyio.CancelScope() as scope:
            if self.cancel_requested:
                scope.deadline = anyio.current_time() + _SEND_GRACE_S
            self.sending = scope
            try:
                await send
            finally:
                self.sending = None


Handler = Callable[[Any, RequestContext], Awaitable[Any]]


class _Writer:
    """Serialises writes to one connection; a failed, timed-out or interrupted write marks
    it closed (a frame may be half-written: nothing can follow it) and never raises but
    cancellation."""

    def __init__(self, stream: ByteStream, codec: rpc.Connection, timeout_s: float) -> None:
        self._stream = stream
        self._codec = codec
        self._timeout_s = timeout_s
        self._lock = anyio.Lock()
        self.closed = False
        self.unanswered = 0  # requests and batches read but not yet replied to
        self.running = 0  # requests being handled, batch items and null ids included

    async def send(self, message: Any) -> None:
        if self.closed:
            return
        data = self._codec.send(message)
        async with self._lock:
            if self.closed:
                return
            try:
                with anyio.fail_after(self._timeout_s):  # a peer that stopped reading
                    await self._stream.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                await self._abort()  # TimeoutError is an OSError
            except anyio.get_cancelled_exc_class():
                await self._abort()
                raise

    async def _abort(self) -> None:
        self.closed = True
        with anyio.CancelScope(shield=True):  # ends the read loop too: the connection is done
            await self._stream.aclose()


class RpcServer:
    """Routes messages to handlers; `serve_stream` runs one connection to its end."""

    def __init__(
        self,
        handlers: dict[str, Handler],
        *,
        max_frame_bytes: int = rpc.DEFAULT_MAX_FRAME_BYTES,
        idle_frame_timeout_s: float = 30.0,
        max_inflight_per_connection: int = 64,
        send_timeout_s: float = 30.0,
        refuse: Callable[[str], rpc.RpcError | None] | None = None,
    ) -> None:
        self.handlers = handlers
        self.send_timeout_s = send_timeout_s
        self.max_frame_bytes = max_frame_bytes
        self.idle_frame_timeout_s = idle_frame_timeout_s
        self.max_inflight = max_inflight_per_connection
        self.refuse = refuse  # e.g. ShuttingDown while draining
        self.connections = 0
        self.inflight: set[RequestContext] = set()  # every connection's requests, for drain
        self._idle_waiters: list[anyio.Event] = []
        self._conn_waiters: list[anyio.Event] = []
        self.on_request_done: Callable[[RequestContext, str, float], None] | None = None
        # A connection that opens with an HTTP request line is served by this instead.
        self.http: Callable[[ByteStream, bytes, int], Awaitable[None]] | None = None
        # Called on every request start and end and connection open and close (idle exit).
        self.on_activity: Callable[[], None] | None = None

    def _activity(self) -> None:
        if self.on_activity is not None:
            self.on_activity()

    async def wait_idle(self, exclude: RequestContext | None = None) -> None:
        """Return once no request (but `exclude`) is in flight on any connection."""
        while self.inflight - {exclude}:
            waiter = anyio.Event()
            self._idle_waiters.append(waiter)
            await waiter.wait()

    def cancel_all(self, exclude: RequestContext | None = None) -> None:
        """Cancel every request in flight (but `exclude`); each still gets its reply (-32800)."""
        for ctx in list(self.inflight - {exclude}):
            ctx.cancel()

    async def serve_stream(self, stream: ByteStream) -> None:
        conn_id = next_connection_id()
        codec = rpc.Connection(max_frame_bytes=self.max_frame_bytes)
        writer = _Writer(stream, codec, self.send_timeout_s)
        inflight: dict[int | str, RequestContext] = {}
        self.connections += 1
        self._activity()
        try:
            async with anyio.create_task_group() as tg:
                end = await self._read_loop(stream, codec, writer, inflight, tg, conn_id)
                if end == "http" and self.http is not None:
                    await self.http(stream, codec.take_data(), conn_id)
                elif end == "half_closed" and not writer.closed:
                    # The peer finished sending (`echo ... | socat`): answer, then close.
                    await self._wait_connection_idle(writer)
                elif end == "broken" and not writer.closed:
                    # Bad framing or an idle partial frame: what was read before still gets
                    # its reply (cancelled, with its partial text), then the connection closes.
                    for ctx in list(inflight.values()):
                        ctx.cancel()
                    with anyio.move_on_after(_BROKEN_GRACE_S):
                        await self._wait_connection_idle(writer)
                tg.cancel_scope.cancel()  # the peer is gone: cancel what it asked for
        finally:
            self.connections -= 1
            self._activity()
            with anyio.CancelScope(shield=True):
                await stream.aclose()

    async def _wait_connection_idle(self, writer: _Writer) -> None:
        while writer.unanswered and not writer.closed:
            waiter = anyio.Event()
            self._conn_waiters.append(waiter)
            await waiter.wait()

    def _answered(self, writer: _Writer) -> None:
        writer.unanswered -= 1
        for waiter in self._conn_waiters:  # connections waiting to close re-check
            waiter.set()
        self._conn_waiters.clear()

    async def _read_loop(
        self,
        stream: ByteStream,
        codec: rpc.Connection,
        writer: _Writer,
        inflight: dict[int | str, RequestContext],
        tg: TaskGroup,
        conn_id: int,
    ) -> str:
        """Read until the peer stops: "half_closed" (it still reads replies), "gone", or
        "broken" (the stream cannot be read further: bad framing, idle partial frame)."""
        eof = False
        while not writer.closed:
            event = codec.next_event()
            if event is rpc.NEED_DATA:
                timeout = self.idle_frame_timeout_s if codec.pending_bytes else None
                with anyio.move_on_after(timeout) as idle:
                    try:
                        data = await stream.receive(65536)
                    except (
                        anyio.EndOfStream,
                        anyio.BrokenResourceError,
                        anyio.ClosedResourceError,  # the writer gave up on the peer
                        OSError,
                    ):
                        data = b""
                if idle.cancelled_caught:
                    log.info("closing connection: partial frame idle", conn=conn_id)
                    return "broken"
                eof = not data
                codec.receive_data(data)
            elif event is rpc.CLOSED:
                return "half_closed" if eof and not hung_up(stream) else "gone"
            elif event is rpc.HTTP:
                return "http"
            elif isinstance(event, rpc.FramingError):
                await writer.send(rpc.error_response(None, event.error))
                return "broken"
            elif isinstance(event, rpc.Batch):
                writer.unanswered += 1
                tg.start_soon(self._run_batch, event, writer, inflight, conn_id)
            elif isinstance(event, rpc.Request | rpc.Notification | rpc.Response | rpc.Invalid):
                await self._route(event, writer, inflight, tg, conn_id)
        return "gone"

    async def _route(
        self,
        message: rpc.Message,
        writer: _Writer,
        inflight: dict[int | str, RequestContext],
        tg: TaskGroup,
        conn_id: int,
    ) -> None:
        if isinstance(message, rpc.Invalid):
            await writer.send(rpc.error_response(message.id, message.error))
        elif isinstance(message, rpc.Notification):
            self._notification(message, inflight)
        elif isinstance(message, rpc.Request):
            ctx = self._context(message, writer, conn_id)
            if ctx.id is not None and ctx.id in inflight:
                error = rpc.ErrorObject(rpc.ErrorCode.INVALID_REQUEST, f"id {ctx.id!r} is in use")
                await writer.send(rpc.error_response(ctx.id, error))
            elif writer.running >= self.max_inflight:
                await writer.send(rpc.error_response(ctx.id, self._too_many(writer)))
            else:
                if ctx.id is not None:
                    inflight[ctx.id] = ctx
                writer.unanswered += 1
                writer.running += 1
                tg.start_soon(self._run_one, message, ctx, writer, inflight)
        # A Response from a client has no request of ours to answer: ignore it.

    def _too_many(self, writer: _Writer) -> rpc.ErrorObject:
        return rpc.ErrorObject(
            rpc.ErrorCode.SERVER_BUSY,
            f"too many requests in flight on this connection (limit {self.max_inflight})",
            {"retry_after_ms": 100, "queue_depth": writer.running},
        )

    def _notification(
        self, message: rpc.Notification, inflight: dict[int | str, RequestContext]
    ) -> None:
        if message.method != "$/cancelRequest":
            return  # unknown notifications are ignored, as JSON-RPC requires
        try:
            params = rpc.decode_params(message.method, message.params)
        except rpc.RpcError:
            return
        ctx = inflight.get(params.id)
        if ctx is not None:
            ctx.cancel()

    def _context(self, message: rpc.Request, writer: _Writer, conn_id: int) -> RequestContext:
        async def notify(method: str, params: Any) -> None:
            await ctx.send_bounded(writer.send(rpc.notification(method, params)))

        ctx = RequestContext(message.id, message.method, conn_id, notify)
        return ctx

    async def _run_one(
        self,
        message: rpc.Request,
        ctx: RequestContext,
        writer: _Writer,
        inflight: dict[int | str, RequestContext],
    ) -> None:
        try:
            reply = await self.call(message, ctx)
            if reply is not None:
                await writer.send(reply)
        finally:
            writer.running -= 1
            if ctx.id is not None:
                inflight.pop(ctx.id, None)
            self._answered(writer)

    async def _run_batch(
        self,
        batch: rpc.Batch,
        writer: _Writer,
        inflight: dict[int | str, RequestContext],
        conn_id: int,
    ) -> None:
        replies: list[Any] = []

        async def one(message: rpc.Message) -> None:
            if isinstance(message, rpc.Invalid):
                replies.append(rpc.error_response(message.id, message.error))
            elif isinstance(message, rpc.Notification):
                self._notification(message, inflight)
            elif isinstance(message, rpc.Request):
                ctx = self._context(message, writer, conn_id)
                if writer.running >= self.max_inflight:  # batch items count like the rest
                    replies.append(rpc.error_response(ctx.id, self._too_many(writer)))
                    return
                if ctx.id is not None:
                    inflight.setdefault(ctx.id, ctx)
                writer.running += 1
                try:
                    reply = await self.call(message, ctx)
                finally:
                    writer.running -= 1
                    if ctx.id is not None and inflight.get(ctx.id) is ctx:
                        del inflight[ctx.id]
                if reply is not None:
                    replies.append(reply)

        try:
            async with anyio.create_task_group() as tg:
                for message in batch.items:
                    tg.start_soon(one, message)
            if replies:  # a batch of only notifications gets no reply at all
                await writer.send(replies)
        finally:
            self._answered(writer)

    async def call(self, message: rpc.Request, ctx: RequestContext) -> Any:
        """Run one request to its single response (None for none: the peer is gone)."""
        outcome = "error"
        started = time.perf_counter()
        self.inflight.add(ctx)
        self._activity()
        try:
            with ctx.scope:
                try:
                    refusal = self.refuse(message.method) if self.refuse else None
                    if refusal is not None:
                        raise refusal
                    params = rpc.decode_params(message.method, message.params)
                    handler = self.handlers.get(message.method)
                    if handler is None:  # in the table but not served here
                        raise rpc.RpcError(rpc.ErrorCode.METHOD_NOT_FOUND, message.method)
                    result = await handler(params, ctx)
                    outcome = "ok"
                    return rpc.response(ctx.id, result)
                except rpc.RpcError as exc:
                    outcome = rpc.ErrorCode(exc.code).name.lower() if _known(exc.code) else "error"
                    return rpc.error_response(ctx.id, exc.to_object())
                except anyio.get_cancelled_exc_class():
                    if not ctx.cancel_requested:
                        outcome = "disconnected"  # the peer left; nobody to answer
                        raise
                    outcome = "cancelled"
                    error = rpc.ErrorObject(
                        rpc.ErrorCode.REQUEST_CANCELLED, "request cancelled", ctx.cancelled_data
                    )
                    return rpc.error_response(ctx.id, error)
                except Exception as exc:  # a bug of ours, never the client's fault: -32603
                    log.exception("handler failed", method=message.method, id=ctx.id)
                    error = rpc.ErrorObject(rpc.ErrorCode.INTERNAL_ERROR, f"internal error: {exc}")
                    return rpc.error_response(ctx.id, error)
            return None  # cancelled by the connection closing: nobody to answer
        finally:
            self.inflight.discard(ctx)
            if len(self.inflight) <= 1:  # idle, or only the request that waits (its `exclude`)
                for waiter in self._idle_waiters:
                    waiter.set()
                self._idle_waiters.clear()
            if self.on_request_done is not None:
                self.on_request_done(ctx, outcome, (time.perf_counter() - started) * 1000)
            self._activity()


def _known(code: int) -> bool:
    try:
        rpc.ErrorCode(code)
    except ValueError:
        return False
    return True
