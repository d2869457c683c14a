"""The blocking client: one Unix socket, one outstanding call at a time."""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, cast

from msgspec import UNSET

from mlxd.rpc import (
    CLOSED,
    NEED_DATA,
    Batch,
    CancelParams,
    Connection,
    ErrorCode,
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
from ._methods import SyncMethods
from .errors import ConnectionClosed, DaemonNotRunning, ProtocolError

__all__ = ["Client", "GenerateStream"]


class _ClosedOnExit:
    """`with x:` closes x on the way out."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError


@dataclass(eq=False)
class _StreamState:
    """What the client and a GenerateStream share; holds no reference back to the stream."""

    id: int
    done: bool = False
    cancelled: bool = False
    result: GenerateResult | None = None


class Client(SyncMethods["GenerateStream"], _ClosedOnExit):
    """A blocking mlxd client over the daemon's Unix socket.

    One call at a time: methods wait for their reply and must not be called concurrently
    from several threads. `cancel()` is the exception: another thread may call it to
    cancel a request this one is waiting on. Notifications and late replies for other
    request ids are skipped. `timeout` (seconds) applies to each socket operation; `wait`
    (seconds) retries connecting while the daemon starts (not running yet: DaemonNotRunning).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        framing: Framing = Framing.NDJSON,
        timeout: float | None = None,
        wait: float = 0.0,
    ) -> None:
        self.path = socket_path(path)
        self._conn = Connection(framing)
        self._sock = self._connect(timeout, wait)
        self._ids = itertools.count(1)
        self._inbox: deque[Message] = deque()
        self._send_lock = threading.Lock()
        self._reading = False
        self._open_stream: _StreamState | None = None
        self._closed_reason: str | None = None

    def _connect(self, timeout: float | None, wait: float) -> socket.socket:
        pauses = connect_retries(wait)
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(self.path)
                return sock
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                pause = next(pauses, None)
                if pause is None:
                    raise DaemonNotRunning(self.path, wait) from exc
                time.sleep(pause)
            except BaseException:
                sock.close()
                raise

    # -- lifecycle ---------------------------------------------------------------------

    def close(self) -> None:
        if self._closed_reason is None:
            self._closed_reason = "the client closed the connection"
        if self._open_stream is not None:
            self._open_stream.done = True
            self._open_stream = None
        self._sock.close()

    @property
    def closed(self) -> bool:
        return self._closed_reason is not None

    # -- calls -------------------------------------------------------------------------

    def call(self, method: str, params: Any = None) -> Any:
        """Send one request and return its typed result; raise its error as an RpcError.

        `params` is a params Struct, a dict, or None. A method the protocol table does not
        know returns plain JSON values.
        """
        self._finish_open_stream()
        request_id = self._send_request(method, params)
        try:
            reply = self._wait_reply(request_id)
        except BaseException:
            # A timeout or Ctrl-C: stop the work; its late reply will be skipped.
            if method == GENERATE:
                self._send_quietly(notification(CANCEL, CancelParams(request_id)))
            raise
        return result_of(method, reply)

    def cancel(self, request_id: int | str) -> None:
        """Ask mlxd to cancel a request; it then replies -32800 (RequestCancelled)."""
        self._send(notification(CANCEL, CancelParams(request_id)))

    def _new_stream(self, params: GenerateParams) -> GenerateStream:
        self._finish_open_stream()
        state = _StreamState(self._send_request(GENERATE, params))
        self._open_stream = state
        return GenerateStream(self, state)

    # -- streams -----------------------------------------------------------------------

    def _next_delta(self, state: _StreamState) -> GenerateDelta | None:
        """The stream's next delta; None once its final reply has been read (or raised)."""
        if state.done:
            return None
        message = self._wait_for(state.id)
        if isinstance(message, GenerateDelta):
            return message
        self._settle(state, message, raise_error=True)
        return None

    def _close_stream(self, state: _StreamState, *, from_gc: bool = False) -> None:
        """Cancel an unfinished stream and read up to its final reply."""
        if state.done or self.closed:
            return
        if from_gc and self._reading:
            return  # collected in the middle of a read: the next call finishes it
        state.done = True  # even if draining fails below: its late reply is then skipped
        if self._open_stream is state:
            self._open_stream = None
        self._send(notification(CANCEL, CancelParams(state.id)))
        reply = self._wait_reply(state.id)
        self._settle(state, reply, raise_error=False)

    def _finish_open_stream(self) -> None:
        if self._open_stream is not None:
            self._close_stream(self._open_stream)

    def _settle(self, state: _StreamState, reply: Response, *, raise_error: bool) -> None:
        state.done = True
        if self._open_stream is state:
            self._open_stream = None
        if reply.error is not None and reply.error.code == ErrorCode.REQUEST_CANCELLED:
            state.cancelled = True
        try:
            state.result = result_of(GENERATE, reply)
        except Exception:
            if raise_error:
                raise

    # -- wire --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed_reason is not None:
            raise ConnectionClosed(
                f"connection to mlxd at {self.path} is closed: {self._closed_reason}"
            )

    def _send_request(self, method: str, params: Any) -> int:
        self._check_open()
        request_id = next(self._ids)
        self._send(request(request_id, method, UNSET if params is None else params))
        return request_id

    def _send(self, message: Any) -> None:
        self._check_open()
        data = self._conn.send(message)
        with self._send_lock:
            try:
                self._sock.sendall(data)
            except TimeoutError:
                raise
            except OSError as exc:
                raise self._fail(ConnectionClosed, f"sending to mlxd failed: {exc}") from exc

    def _send_quietly(self, message: Any) -> None:
        with contextlib.suppress(OSError):  # ConnectionClosed and timeouts too: best effort
            self._send(message)

    def _wait_reply(self, request_id: int) -> Response:
        while True:
            message = self._wait_for(request_id)
            if isinstance(message, Response):
                return message

    def _wait_for(self, request_id: int) -> GenerateDelta | Response:
        """The next delta or reply for `request_id`, skipping everything else."""
        while True:
            message = self._read()
            if isinstance(message, Response):
                # id null: mlxd could not parse what we sent; only one call is outstanding.
                if message.id == request_id or (message.id is None and message.error):
                    return message
                continue  # the late reply of an abandoned call
            delta = delta_of(message)
            if delta is not None and delta.id == request_id:
                return delta

    def _read(self) -> Message:
        self._reading = True
        try:
            while not self._inbox:
                self._read_event()
            return self._inbox.popleft()
        finally:
            self._reading = False

    def _read_event(self) -> None:
        event = self._conn.next_event()
        if event is NEED_DATA:
            self._check_open()
            try:
                data = self._sock.recv(RECV_BYTES)
            except TimeoutError:
                raise
            except OSError as exc:
                raise self._fail(ConnectionClosed, f"connection to mlxd lost: {exc}") from exc
            self._conn.receive_data(data)
        elif event is CLOSED:
            raise self._fail(ConnectionClosed, f"mlxd at {self.path} closed the connection")
        elif isinstance(event, FramingError):
            raise self._fail(ProtocolError, f"mlxd sent invalid framing: {event.error.message}")
        elif isinstance(event, Batch):
            self._inbox.extend(event.items)
        else:
            self._inbox.append(cast(Message, event))  # the sentinels were handled above

    def _fail(self, kind: type[ConnectionError], reason: str) -> ConnectionError:
        if self._closed_reason is None:
            self._closed_reason = reason
        self.close()
        return kind(reason)


class GenerateStream(Iterator[GenerateDelta], _ClosedOnExit):
    """The deltas of one streaming `generate`; `.result` is set once the final reply is read."""

    def __init__(self, client: Client, state: _StreamState) -> None:
        self._client = client
        self._state = state

    @property
    def id(self) -> int:
        return self._state.id

    @property
    def result(self) -> GenerateResult | None:
        """The final result; None until the stream ends, or if it was cancelled."""
        return self._state.result

    @property
    def cancelled(self) -> bool:
        return self._state.cancelled

    def __iter__(self) -> GenerateStream:
        return self

    def __next__(self) -> GenerateDelta:
        delta = self._client._next_delta(self._state)
        if delta is None:
            raise StopIteration
        return delta

    def close(self) -> None:
        """Cancel the request if it is still running and read its final reply."""
        self._client._close_stream(self._state)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # too late to report; the next call retries
            self._client._close_stream(self._state, from_gc=True)
