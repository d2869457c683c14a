"""The async client (anyio, on asyncio or trio): concurrent requests over one connection."""

from __future__ import annotations

import contextlib
import itertools
import os
from types import TracebackType
from typing import Any, cast

import anyio
from anyio.abc import SocketStream, TaskGroup
from anyio.streams.memory import (
    MemoryObjectReceiveStream,
    MemoryObjectSendStream,
    MemoryObjectStreamStatistics,
)
from msgspec import UNSET

from mlxd.rpc import (
    CLOSED,
    NEED_DATA,
    Batch,
    CancelParams,
    Connection,
    ErrorCode,
    ErrorObject,
    Framing,
    FramingError,
    GenerateDelta,
    GenerateParams,
    GenerateResult,
    Message,
    Response,
    notification,
    request,
)

from ._common import (
    CANCEL,
    GENERATE,
    RECV_BYTES,
    connect_retries,
    delta_of,
    result_of,
    socket_path,
)
from ._methods import AsyncMethods
from .errors import ConnectionClosed, DaemonNotRunning, ProtocolError

__all__ = [
    "CANCEL_DRAIN_TIMEOUT_S",
    "DEFAULT_MAX_BUFFERED_DELTAS",
    "AsyncClient",
    "AsyncGenerateStream",
]

DEFAULT_MAX_BUFFERED_DELTAS = 256
# A cancelled generate still waits for its final reply, shielded; this bounds that wait
# if the daemon never answers, so a caller's cancellation cannot hang forever.
CANCEL_DRAIN_TIMEOUT_S = 10.0


class _Pending:
    """One request waiting for its reply, and the stream its deltas go to."""

    def __init__(self, request_id: int, method: str, max_buffered_deltas: int | None) -> None:
        self.id = request_id
        self.method = method
        self.done = anyio.Event()
        self.reply: Response | None = None
        self.error: Exception | None = None
        self.send_deltas: MemoryObjectSendStream[GenerateDelta] | None = None
        self.receive_deltas: MemoryObjectReceiveStream[GenerateDelta] | None = None
        if max_buffered_deltas is not None:
            send, receive = anyio.create_memory_object_stream[GenerateDelta](max_buffered_deltas)
            self.send_deltas, self.receive_deltas = send, receive

    def finish(self, reply: Response) -> None:
        if not self.done.is_set():
            self.reply = reply
            self._end()

    def fail(self, error: Exception) -> None:
        if not self.done.is_set():
            self.error = error
            self._end()

    def _end(self) -> None:
        # Closing the send side after the last delta ends the consumer's iteration.
        if self.send_deltas is not None:
            self.send_deltas.close()
        self.done.set()

    def outcome(self) -> Response:
        if self.error is not None:
            raise self.error
        assert self.reply is not None
        return self.reply


class AsyncClient(AsyncMethods["AsyncGenerateStream"]):
    """An mlxd client for anyio (asyncio or trio); many requests may run at once.

    Use `async with AsyncClient(path) as client:`. A background task reads the socket and
    routes each reply to its caller by id and each `generate/delta` to its stream.

    `await AsyncClient.connect(path)` also works; then `await client.aclose()` must run
    in the same task, outside any task group or cancel scope entered after connect(),
    because the reader's task group was entered there. Pass `task_group=` to run the
    reader in a task group of your own instead.

    Each stream buffers at most `max_buffered_deltas` deltas. When its consumer falls
    that far behind, the reader waits for it, which pushes back on the daemon but also
    delays every other reply on this connection: read streams promptly, or give a slow
    consumer its own connection.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        framing: Framing = Framing.NDJSON,
        *,
        max_buffered_deltas: int = DEFAULT_MAX_BUFFERED_DELTAS,
        wait: float = 0.0,
    ) -> None:
        self.path = socket_path(path)
        self.wait = wait  # seconds to retry connecting while the daemon starts
        self.framing = framing
        self._conn = Connection(framing)
        self._max_buffered = max_buffered_deltas
        self._stream: SocketStream | None = None
        self._task_group: TaskGroup | None = None  # set when the client entered its own
        self._exit_on_aclose = False
        self._reader_scope = anyio.CancelScope()
        self._send_lock: anyio.Lock | None = None
        self._pending: dict[int | str, _Pending] = {}
        self._ids = itertools.count(1)
        self._closed: tuple[type[ConnectionError], str] | None = None
        self._orphan_error: ErrorObject | None = None

    # -- lifecycle ---------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        path: str | os.PathLike[str] | None = None,
        framing: Framing = Framing.NDJSON,
        *,
        max_buffered_deltas: int = DEFAULT_MAX_BUFFERED_DELTAS,
        task_group: TaskGroup | None = None,
        wait: float = 0.0,
    ) -> AsyncClient:
        client = cls(path, framing, max_buffered_deltas=max_buffered_deltas, wait=wait)
        await client._open(task_group)
        client._exit_on_aclose = task_group is None
        return client

    async def __aenter__(self) -> AsyncClient:
        await self._open(None)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        await self._close("the client closed the connection")
        task_group, self._task_group = self._task_group, None
        if task_group is not None:
            return await task_group.__aexit__(exc_type, exc, tb)
        return None

    async def aclose(self) -> None:
        """Close the connection; calls still waiting fail with ConnectionClosed."""
        await self._close("the client closed the connection")
        if self._exit_on_aclose and self._task_group is not None:
            task_group, self._task_group = self._task_group, None
            await task_group.__aexit__(None, None, None)

    @property
    def closed(self) -> bool:
        return self._closed is not None

    async def _open(self, task_group: TaskGroup | None) -> None:
        if self._stream is not None:
            raise RuntimeError("this AsyncClient is already connected")
        pauses = connect_retries(self.wait)
        while self._stream is None:
            try:
                self._stream = await anyio.connect_unix(self.path)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                pause = next(pauses, None)
                if pause is None:
                    raise DaemonNotRunning(self.path, self.wait) from exc
                await anyio.sleep(pause)
        self._send_lock = anyio.Lock()
        if task_group is None:
            task_group = anyio.create_task_group()
            await task_group.__aenter__()
            self._task_group = task_group
        task_group.start_soon(self._read_loop, name=f"mlxd.client reader ({self.path})")

    async def _close(self, reason: str) -> None:
        self._mark_closed(ConnectionClosed, reason)
        self._reader_scope.cancel()
        stream, self._stream = self._stream, None
        if stream is not None:
            with anyio.CancelScope(shield=True):
                await stream.aclose()

    def _mark_closed(self, kind: type[ConnectionError], reason: str) -> None:
        if self._closed is None:
            if self._orphan_error is not None:
                reason += f" (last error from mlxd: {self._orphan_error.message})"
            self._closed = (kind, reason)
        pending, self._pending = self._pending, {}
        for waiter in pending.values():
            waiter.fail(self._closed_error())

    def _closed_error(self) -> ConnectionError:
        kind, reason = self._closed or (ConnectionClosed, "not connected")
        return kind(f"connection to mlxd at {self.path} is closed: {reason}")

    # -- calls -------------------------------------------------------------------------

    async def call(self, method: str, params: Any = None) -> Any:
        """Send one request and return its typed result; raise its error as an RpcError.

        `params` is a params Struct, a dict, or None. Cancelling a `generate` call sends
        `$/cancelRequest` and waits (shielded) for its final reply.
        """
        pending = await self._start(method, params)
        return result_of(method, await self._wait(pending))

    async def cancel(self, request_id: int | str) -> None:
        """Ask mlxd to cancel a request; it then replies -32800 (RequestCancelled)."""
        await self._send(notification(CANCEL, CancelParams(request_id)))

    def _new_stream(self, params: GenerateParams) -> AsyncGenerateStream:
        return AsyncGenerateStream(self, params)

    # -- requests ----------------------------------------------------------------------

    async def _start(self, method: str, params: Any, *, stream: bool = False) -> _Pending:
        if self._closed is not None:
            raise self._closed_error()
        request_id = next(self._ids)
        pending = _Pending(request_id, method, self._max_buffered if stream else None)
        self._pending[request_id] = pending
        try:
            await self._send(request(request_id, method, UNSET if params is None else params))
        except BaseException as exc:
            self._pending.pop(request_id, None)
            pending.fail(exc if isinstance(exc, Exception) else ConnectionClosed("not sent"))
            if pending.receive_deltas is not None:
                pending.receive_deltas.close()
            raise
        return pending

    async def _wait(self, pending: _Pending) -> Response:
        try:
            await pending.done.wait()
        except BaseException:
            await self._abandon(pending)
            raise
        return pending.outcome()

    async def _abandon(self, pending: _Pending) -> None:
        """Leave a request early. A generate is cancelled and its final reply consumed."""
        if pending.done.is_set():
            return
        if pending.method == GENERATE and self._closed is None:
            with anyio.move_on_after(CANCEL_DRAIN_TIMEOUT_S, shield=True):
                try:
                    await self._send(notification(CANCEL, CancelParams(pending.id)))
                except ConnectionError:
                    return  # the connection is gone, and with it every pending reply
                await pending.done.wait()
        if not pending.done.is_set():
            self._pending.pop(pending.id, None)  # its late reply will be dropped
            pending.fail(TimeoutError(f"request {pending.id} abandoned before its reply"))

    async def _send(self, message: Any) -> None:
        if self._closed is not None or self._stream is None or self._send_lock is None:
            raise self._closed_error()
        data = self._conn.send(message)
        # Shielded: a frame cut off halfway would corrupt the stream for every request on it.
        with anyio.CancelScope(shield=True):
            async with self._send_lock:
                try:
                    await self._stream.send(data)
                except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError) as exc:
                    self._mark_closed(ConnectionClosed, f"sending failed: {exc!r}")
                    raise self._closed_error() from exc

    # -- the reader task ---------------------------------------------------------------

    async def _read_loop(self) -> None:
        closed: tuple[type[ConnectionError], str] = (ConnectionClosed, "mlxd closed it")
        try:
            with self._reader_scope:
                closed = await self._read_until_closed()
        except Exception as exc:  # a bug here must not crash the caller's task group
            closed = (ConnectionClosed, f"the client's reader failed: {exc!r}")
        finally:
            self._mark_closed(*closed)

    async def _read_until_closed(self) -> tuple[type[ConnectionError], str]:
        while True:
            stream = self._stream
            if stream is None:
                return ConnectionClosed, "the client closed it"
            try:
                data = await stream.receive(RECV_BYTES)
            except anyio.EndOfStream:
                data = b""
            except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError) as exc:
                return ConnectionClosed, f"connection lost: {exc!r}"
            self._conn.receive_data(data)
            while (event := self._conn.next_event()) is not NEED_DATA:
                if event is CLOSED:
                    return ConnectionClosed, "mlxd closed it"
                if isinstance(event, FramingError):
                    return ProtocolError, f"mlxd sent invalid framing: {event.error.message}"
                batch = event.items if isinstance(event, Batch) else (cast(Message, event),)
                for message in batch:
                    await self._dispatch(message)

    async def _dispatch(self, message: Message) -> None:
        if isinstance(message, Response):
            if message.id is None:
                self._orphan_error = message.error  # mlxd could not parse something we sent
                return
            pending = self._pending.pop(message.id, None)
            if pending is not None:  # else the late reply of an abandoned call
                pending.finish(message)
            return
        delta = delta_of(message)
        if delta is None:
            return
        pending = self._pending.get(delta.id)
        if pending is None or pending.send_deltas is None:
            return
        # Broken: the consumer left early; its final reply is still routed above.
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            # Waits while the consumer's buffer is full: backpressure reaches the daemon.
            await pending.send_deltas.send(delta)


class AsyncGenerateStream:
    """The deltas of one streaming `generate`; use as `async with`, then `async for`."""

    def __init__(self, client: AsyncClient, params: GenerateParams) -> None:
        self._client = client
        self._params = params
        self._pending: _Pending | None = None
        self.result: GenerateResult | None = None
        self.cancelled = False

    @property
    def id(self) -> int:
        return self._started().id

    def statistics(self) -> MemoryObjectStreamStatistics:
        """The delta buffer's statistics (buffered, max, waiting tasks)."""
        receive = self._started().receive_deltas
        assert receive is not None
        return receive.statistics()

    async def __aenter__(self) -> AsyncGenerateStream:
        if self._pending is not None:
            raise RuntimeError("a stream can be entered only once")
        self._pending = await self._client._start(GENERATE, self._params, stream=True)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        pending = self._started()
        if pending.receive_deltas is not None:
            pending.receive_deltas.close()
        await self._client._abandon(pending)
        self._settle(pending, raise_error=False)

    def __aiter__(self) -> AsyncGenerateStream:
        return self

    async def __anext__(self) -> GenerateDelta:
        pending = self._started()
        assert pending.receive_deltas is not None
        try:
            return await pending.receive_deltas.receive()
        except anyio.EndOfStream:
            pass
        self._settle(pending, raise_error=True)
        raise StopAsyncIteration

    def _started(self) -> _Pending:
        if self._pending is None:
            raise RuntimeError("use `async with client.stream(...) as deltas:` first")
        return self._pending

    def _settle(self, pending: _Pending, *, raise_error: bool) -> None:
        # The send side closes only after `reply` or `error` is set, so this is final.
        try:
            reply = pending.outcome()
            if reply.error is not None and reply.error.code == ErrorCode.REQUEST_CANCELLED:
                self.cancelled = True
            self.result = result_of(GENERATE, reply)
        except Exception:
            if raise_error:
                raise
