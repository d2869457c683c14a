"""mlxd.client against a scripted fake daemon on a real Unix socket (no MLX, no sleeps)."""

from __future__ import annotations

import contextlib
import gc
import os
import queue
import re
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from mlxd.client import (
    AsyncClient,
    Client,
    ConnectionClosed,
    ContextTooLong,
    DaemonNotRunning,
    InvalidParams,
    MethodNotFound,
    RequestCancelled,
    RpcError,
    ServerBusy,
    SessionNotFound,
    ShuttingDown,
    error_from_object,
)
from mlxd.client import errors as client_errors
from mlxd.rpc import (
    CLOSED,
    DELTA_NOTIFICATION,
    METHODS,
    NEED_DATA,
    Batch,
    Capabilities,
    Connection,
    EmptyResult,
    ErrorCode,
    ErrorObject,
    Framing,
    FramingError,
    GenerateDelta,
    GenerateResult,
    InitializeResult,
    Invalid,
    LatencyStatus,
    MemoryStatus,
    ModelInfo,
    Notification,
    Percentiles,
    PoolStatus,
    QueueStatus,
    Request,
    ServerInfo,
    SessionInfo,
    SessionSaveResult,
    SessionsDeleteResult,
    SessionsListResult,
    SessionTierStatus,
    StatusResult,
    Timings,
    TokenizeResult,
    Totals,
    Usage,
    decode_params,
    error_response,
    notification,
    response,
)

WAIT_S = 5.0  # an upper bound for a hung test, never a pause

MODEL = ModelInfo("tiny", "/m/tiny", "sha256:ab", "llama", 256, 512, "float32")
SESSION = SessionInfo("s1", 12, 4096, "hot", 1.7e9)
STATUS = StatusResult(
    "ok",
    MODEL,
    1.0,
    PoolStatus(16, 64, 0, 0.0),
    QueueStatus(0, 8),
    0,
    SessionTierStatus(),
    LatencyStatus(Percentiles(), Percentiles()),
    Totals(),
    MemoryStatus(),
)


# -- the fake daemon --------------------------------------------------------------------


class FakeDaemon:
    """A scripted mlxd: one thread per connection, speaking through mlxd.rpc.Connection.

    generate prompts: "busy"/"too long"/"draining" fail; "hold" streams "a","b","c" and
    then waits for $/cancelRequest (or a "release" request on the same connection);
    "interleave" mixes in traffic for other ids; anything else is echoed word by word.
    Method "test/hangup" closes the connection without a reply.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.log: list[tuple[str, Any]] = []
        self.framings: list[Framing | None] = []
        self.held: queue.Queue[Any] = queue.Queue()  # ids now waiting for a cancel
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(16)
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._stopping = False

    def start(self) -> FakeDaemon:
        self._spawn(self._accept_loop)
        return self

    def stop(self) -> None:
        self._stopping = True
        with (
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as waker,
            contextlib.suppress(OSError),
        ):
            waker.connect(self.path)  # wakes accept()
        self._threads[0].join(WAIT_S)
        self._listener.close()
        for sock in self._socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(WAIT_S)

    def wait_held(self) -> Any:
        return self.held.get(timeout=WAIT_S)

    def cancels(self) -> list[Any]:
        return [params["id"] for method, params in self.log if method == "$/cancelRequest"]

    def generate_ids(self) -> list[Any]:
        return [value for method, value in self.log if method == "generate"]

    def _spawn(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            if self._stopping:
                sock.close()
                return
            self._socks.append(sock)
            self._spawn(self._serve, sock)

    def _serve(self, sock: socket.socket) -> None:
        conn = Connection()
        held: dict[Any, str] = {}  # held generate ids and their text so far
        recorded = False
        with sock:
            while True:
                try:
                    data = sock.recv(65536)
                except OSError:
                    return
                conn.receive_data(data)
                while (event := conn.next_event()) is not NEED_DATA:
                    if event is CLOSED:
                        return
                    if not recorded:
                        self.framings.append(conn.framing)
                        recorded = True
                    if isinstance(event, FramingError):
                        self._send(sock, conn, error_response(None, event.error))
                        return
                    for message in event.items if isinstance(event, Batch) else (event,):
                        if not self._handle(sock, conn, held, message):
                            sock.shutdown(socket.SHUT_RDWR)
                            return

    @staticmethod
    def _send(sock: socket.socket, conn: Connection, *messages: Any) -> None:
        with contextlib.suppress(OSError):
            sock.sendall(b"".join(conn.send(m) for m in messages))

    def _handle(
        self, sock: socket.socket, conn: Connection, held: dict[Any, str], message: Any
    ) -> bool:
        if isinstance(message, Notification):
            params: Any = msgspec.json.decode(message.params) if message.params else None
            self.log.append((message.method, params))
            if message.method == "$/cancelRequest" and params["id"] in held:
                text = held.pop(params["id"])
                data = {"text": text, "usage": {"completion_tokens": len(text)}}
                cancelled = ErrorObject(-32800, "request cancelled", data)
                self._send(sock, conn, error_response(params["id"], cancelled))
            return True
        if isinstance(message, Invalid):
            self._send(sock, conn, error_response(message.id, message.error))
            return True
        if not isinstance(message, Request):
            return True
        self.log.append((message.method, message.id))
        if message.method == "test/hangup":
            return False
        try:
            params = decode_params(message.method, message.params)
            replies = self._reply(message.id, message.method, params, held)
        except RpcError as exc:
            replies = [error_response(message.id, exc.to_object())]
        self._send(sock, conn, *replies)
        if message.method == "generate" and message.id in held:
            self.held.put(message.id)
        return True

    def _reply(self, id: Any, method: str, p: Any, held: dict[Any, str]) -> list[Any]:
        simple: dict[str, Any] = {
            "initialize": lambda: InitializeResult(
                ServerInfo("fake-mlxd", "0"), 1, MODEL, Capabilities(sorted(METHODS), ["ndjson"])
            ),
            "status": lambda: STATUS,
            "tokenize": lambda: TokenizeResult([ord(c) for c in p.text], len(p.text)),
            "sessions/list": lambda: SessionsListResult([SESSION]),
            "sessions/get": lambda: self._session(p.session),
            "sessions/delete": lambda: SessionsDeleteResult(p.session == "s1"),
            "sessions/fork": lambda: SessionInfo(p.new_session, 12, 0, "hot", 1.7e9),
            "sessions/save": lambda: SessionSaveResult(1 if p.session else 2),
            "models/current": lambda: MODEL,
            "models/swap": lambda: msgspec.structs.replace(MODEL, id=p.model),
            "shutdown": lambda: EmptyResult(),
        }
        if method in simple:
            return [response(id, simple[method]())]
        assert method == "generate"
        return self._generate(id, p, held)

    @staticmethod
    def _session(session: str) -> SessionInfo:
        if session != "s1":
            raise RpcError(ErrorCode.SESSION_NOT_FOUND, f"no session {session!r}")
        return SESSION

    def _generate(self, id: Any, p: Any, held: dict[Any, str]) -> list[Any]:
        prompt = p.prompt if p.prompt is not None else p.messages[-1].content
        errors = {
            "busy": (-32000, {"retry_after_ms": 250, "queue_depth": 8}),
            "too long": (-32004, {"limit": 512, "requested": 900}),
            "draining": (-32001, msgspec.UNSET),
        }
        if prompt in errors:
            code, data = errors[prompt]
            raise RpcError(code, prompt, data)

        def delta(text: str, for_id: Any = id) -> Any:
            return notification(DELTA_NOTIFICATION, GenerateDelta(for_id, text, tokens=[1]))

        def done(text: str, request_id: Any = id) -> Any:
            usage = Usage(len(prompt), 0, len(text))
            return response(request_id, GenerateResult(text, "stop", usage, Timings(), p.session))

        if prompt == "hold":
            held[id] = "abc"
            return [delta(c) for c in "abc"] if p.stream else []
        if prompt == "release":
            released = [done("released", other) for other in held]
            held.clear()
            return [done("release"), *released]
        if prompt == "interleave":
            other = f"{id}-other"
            return [
                delta("x", other),
                notification("window/logMessage", {"message": "hi"}),
                response(424242, {}),
                delta("one "),
                [delta("two"), delta("y", other)],  # a list goes out as one batch frame
                done("one two"),
            ]
        text = f"echo: {prompt}"
        pieces = re.findall(r"\S+\s*", text)
        return [*(delta(piece) for piece in pieces if p.stream), done(text)]


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[str]:
    path = tmp_path / "s.sock"
    if len(os.fsencode(path)) < 100:
        yield str(path)
        return
    folder = tempfile.mkdtemp(prefix="mlxd-t-", dir="/tmp")  # sun_path is ~104 bytes
    yield os.path.join(folder, "s.sock")
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(folder, "s.sock"))
    os.rmdir(folder)


@pytest.fixture
def fake(sock_path: str) -> Iterator[FakeDaemon]:
    daemon = FakeDaemon(sock_path).start()
    yield daemon
    daemon.stop()


# -- packaging and connecting -----------------------------------------------------------


def test_importing_the_client_loads_neither_mlx_nor_the_daemon() -> None:
    code = (
        "import sys, mlxd.client\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm', 'numpy')"
        " or m.startswith('mlxd.daemon')]\n"
        "print(bad)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )
    assert out.stdout.strip() == "[]"


def test_missing_socket_says_how_to_start_mlxd(tmp_path: Path) -> None:
    path = str(tmp_path / "nothing.sock")
    with pytest.raises(DaemonNotRunning) as info:
        Client(path)
    assert info.value.path == path
    assert str(info.value) == f"mlxd is not running at {path}; start it with `mlxd serve`"
    assert isinstance(info.value, ConnectionError)


@pytest.mark.parametrize("command", [["status"], ["generate", "hi"]])
def test_a_reader_that_closes_the_pipe_ends_the_command_quietly(
    fake: FakeDaemon, command: list[str]
) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # `mlxd status | head -1` once head has exited: every write fails
    argv = [sys.executable, "-m", "mlxd", *command, "--socket", fake.path]
    try:
        out = subprocess.run(argv, stdout=write_end, stderr=subprocess.PIPE, timeout=60)
    finally:
        os.close(write_end)
    assert out.stderr.decode() == ""  # no BrokenPipeError traceback
    assert out.returncode == 128 + 13  # as if SIGPIPE had ended it, like other Unix tools


def test_stale_socket_file_is_not_running(sock_path: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(sock_path)  # bound, never listening: connecting is refused
        with pytest.raises(DaemonNotRunning):
            Client(sock_path)


def test_default_path_comes_from_the_environment(
    fake: FakeDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLXD_SOCKET", fake.path)
    with Client() as client:
        assert client.path == fake.path
        assert client.status() == STATUS


# -- errors -----------------------------------------------------------------------------


def test_error_from_object_maps_every_code() -> None:
    expected = {
        -32700: client_errors.ParseError,
        -32600: client_errors.InvalidRequest,
        -32601: MethodNotFound,
        -32602: InvalidParams,
        -32603: client_errors.InternalError,
        -32000: ServerBusy,
        -32001: ShuttingDown,
        -32003: SessionNotFound,
        -32004: ContextTooLong,
        -32800: RequestCancelled,
    }
    assert set(expected) == {int(code) for code in ErrorCode}
    for code, cls in expected.items():
        error = error_from_object(ErrorObject(code, "m", {"k": 1}))
        assert type(error) is cls and isinstance(error, RpcError)
        assert (error.code, error.message, error.data) == (code, "m", {"k": 1})
    other = error_from_object(ErrorObject(-31999, "custom"))
    assert type(other) is RpcError and other.code == -31999


def test_error_data_accessors_tolerate_missing_data() -> None:
    busy = error_from_object(ErrorObject(-32000, "busy", {"retry_after_ms": 5, "queue_depth": 2}))
    assert isinstance(busy, ServerBusy) and (busy.retry_after_ms, busy.queue_depth) == (5, 2)
    cancelled = error_from_object(
        ErrorObject(-32800, "c", {"text": "ab", "usage": {"completion_tokens": 2}})
    )
    assert isinstance(cancelled, RequestCancelled)
    assert cancelled.text == "ab" and cancelled.usage == Usage(completion_tokens=2)
    bare = error_from_object(ErrorObject(-32800, "c"))
    assert isinstance(bare, RequestCancelled) and (bare.text, bare.usage) == ("", None)
    long = error_from_object(ErrorObject(-32004, "long", "not a dict"))
    assert isinstance(long, ContextTooLong) and long.limit is None
    assert repr(long) == "ContextTooLong('long')"


# -- the sync client --------------------------------------------------------------------


def test_sync_calls_return_typed_results(fake: FakeDaemon) -> None:
    with Client(fake.path, timeout=WAIT_S) as client:
        init = client.initialize()
        assert isinstance(init, InitializeResult) and init.model == MODEL
        assert client.status() == STATUS
        assert client.tokenize("hi") == TokenizeResult([104, 105], 2)
        assert client.sessions_list() == [SESSION]
        assert client.sessions_get("s1") == SESSION
        assert client.sessions_delete("s1") is True
        assert client.sessions_fork("s1", "s2").session == "s2"
        assert client.sessions_save() == 2 and client.sessions_save("s1") == 1
        assert client.models_current() == MODEL
        assert client.models_swap("other").id == "other"
        assert client.shutdown() is None
        assert client.call("status", {}) == STATUS  # dict params
        result = client.generate(messages=[{"role": "user", "content": "hi"}], session="s1")
        assert result.text == "echo: hi" and result.session == "s1"
    assert client.closed
    assert fake.log[0] == ("initialize", 1)


def test_sync_error_replies_raise_mapped_errors(fake: FakeDaemon) -> None:
    with Client(fake.path, timeout=WAIT_S) as client:
        with pytest.raises(ServerBusy) as busy:
            client.generate("busy")
        assert busy.value.retry_after_ms == 250 and busy.value.queue_depth == 8
        assert busy.value.data == {"retry_after_ms": 250, "queue_depth": 8}
        with pytest.raises(ContextTooLong) as long:
            client.generate("too long")
        assert (long.value.limit, long.value.requested) == (512, 900)
        with pytest.raises(ShuttingDown):
            client.generate("draining")
        with pytest.raises(SessionNotFound):
            client.sessions_get("nope")
        with pytest.raises(MethodNotFound):
            client.call("sessions/rename", {"session": "s1"})
        with pytest.raises(InvalidParams):
            client.call("generate", {"prompt": "x", "max_token": 5})
        with pytest.raises(ValueError, match="exactly one"):
            client.generate()
        assert client.status() == STATUS  # still usable


def test_sync_stream_yields_deltas_then_the_result(fake: FakeDaemon) -> None:
    with Client(fake.path, timeout=WAIT_S) as client:
        deltas = client.stream("the quick fox", max_tokens=8, temperature=0.5)
        assert deltas.result is None
        texts = [d.text for d in deltas]
        assert texts == ["echo: ", "the ", "quick ", "fox"]
        assert deltas.result is not None and deltas.result.text == "".join(texts)
        assert not deltas.cancelled
        assert list(deltas) == []
        assert fake.cancels() == []


def test_sync_stream_error_is_raised_from_iteration(fake: FakeDaemon) -> None:
    with Client(fake.path, timeout=WAIT_S) as client:
        with pytest.raises(ServerBusy):
            list(client.stream("busy"))
        assert client.status() == STATUS


def _assert_cancelled_and_usable(fake: FakeDaemon, client: Client) -> None:
    [request_id] = fake.generate_ids()
    assert fake.cancels() == [request_id]
    assert client.status() == STATUS
    assert fake.log[-1] == ("status", request_id + 1)


def test_sync_break_then_garbage_collection_cancels(fake: FakeDaemon) -> None:
    with Client(fake.path, timeout=WAIT_S) as client:
        for delta in client.stream("hold"):
            assert delta.text == "a"
            break
        gc.collect()
        assert fake.cancels() == fake.generate_ids()  # before any further call
        _assert_cancelled_and_usable(fake, client)


def test_sync_exception_in_a_bare_loop_body_cancels(fake: FakeDaemon) -> None:
    with Client(fake.path, timeout=WAIT_S) as client:
        with pytest.raises(KeyError):
            for _ in client.stream("hold"):
                raise KeyError("boom")
        gc.collect()
        assert fake.cancels() == fake.generate_ids()
        _assert_cancelled_and_usable(fake, client)


def test_sync_close_cancels_and_reads_the_final_reply(fake: FakeDaemon) -> None:
    with Client(fake.path, timeout=WAIT_S) as client:
        deltas = client.stream("hold")
        assert next(deltas).text == "a"
        deltas.close()
        assert deltas.cancelled and deltas.result is None
        assert list(deltas) == []
        _assert_cancelled_and_usable(fake, client)


def test_sync_exception_in_the_loop_body_cancels(fake: FakeDaemon) -> None:
    with Client(fake.path, timeout=WAIT_S) as client:
        with pytest.raises(KeyError), client.stream("hold") as deltas:
            for _ in deltas:
                raise KeyError("boom")
        assert deltas.cancelled
        _assert_cancelled_and_usable(fake, client)


def test_sync_next_call_finishes_an_abandoned_stream(fake: FakeDaemon) -> None:
    with Client(fake.path, timeout=WAIT_S) as client:
        deltas = client.stream("hold")
        next(deltas)
        assert client.status() == STATUS
        assert fake.cancels() == fake.generate_ids() == [deltas.id]
        assert deltas.cancelled and list(deltas) == []


def test_sync_cancel_by_id_ends_the_stream_with_the_partial_text(fake: FakeDaemon) -> None:
    with Client(fake.path, timeout=WAIT_S) as client:
        deltas = client.stream("hold")
        assert [next(deltas).text for _ in range(3)] == ["a", "b", "c"]
        client.cancel(deltas.id)
        with pytest.raises(RequestCancelled) as info:
            next(deltas)
        assert info.value.text == "abc" and info.value.usage == Usage(completion_tokens=3)
        _assert_cancelled_and_usable(fake, client)


def test_sync_skips_notifications_and_replies_for_other_ids(fake: FakeDaemon) -> None:
    with Client(fake.path, timeout=WAIT_S) as client:
        deltas = client.stream("interleave")
        assert [d.text for d in deltas] == ["one ", "two"]
        assert deltas.result is not None and deltas.result.text == "one two"
        assert client.generate("interleave").text == "one two"
        assert client.status() == STATUS


def test_sync_timeout_cancels_generate_and_skips_its_late_reply(fake: FakeDaemon) -> None:
    with Client(fake.path, timeout=0.05) as client:
        with pytest.raises(TimeoutError):
            client.generate("hold")
        held = fake.wait_held()
        client._sock.settimeout(WAIT_S)
        assert client.status() == STATUS  # the -32800 for the held request was skipped
        assert held in fake.cancels()


def test_sync_lsp_framing(fake: FakeDaemon) -> None:
    with Client(fake.path, framing=Framing.LSP, timeout=WAIT_S) as client:
        assert client.status() == STATUS
        assert [d.text for d in client.stream("a b")] == ["echo: ", "a ", "b"]
    assert fake.framings == [Framing.LSP]


def test_sync_hangup_fails_the_call_and_later_calls(fake: FakeDaemon) -> None:
    with Client(fake.path, timeout=WAIT_S) as client:
        with pytest.raises(ConnectionClosed, match="closed the connection"):
            client.call("test/hangup")
        assert client.closed
        with pytest.raises(ConnectionClosed):
            client.status()


# -- the async client -------------------------------------------------------------------


async def held_id(fake: FakeDaemon) -> Any:
    return await anyio.to_thread.run_sync(fake.wait_held, abandon_on_cancel=True)


@pytest.fixture
async def aclient(fake: FakeDaemon) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(fake.path) as client:
        yield client


@pytest.mark.anyio
async def test_async_calls_return_typed_results(fake: FakeDaemon) -> None:
    with anyio.fail_after(WAIT_S):
        async with AsyncClient(fake.path) as client:
            assert (await client.initialize()).server.name == "fake-mlxd"
            assert await client.status() == STATUS
            assert await client.tokenize("hi") == TokenizeResult([104, 105], 2)
            assert await client.sessions_list() == [SESSION]
            assert await client.sessions_get("s1") == SESSION
            assert await client.sessions_delete("s2") is False
            assert (await client.sessions_fork("s1", "s3")).session == "s3"
            assert await client.sessions_save("s1") == 1
            assert await client.models_current() == MODEL
            assert (await client.models_swap("m2")).id == "m2"
            assert await client.shutdown() is None
            assert (await client.generate("hi there")).text == "echo: hi there"
            assert await client.call("status") == STATUS
        assert client.closed


@pytest.mark.anyio
async def test_async_connect_and_aclose(fake: FakeDaemon) -> None:
    with anyio.fail_after(WAIT_S):
        client = await AsyncClient.connect(fake.path)
        try:
            assert await client.status() == STATUS
        finally:
            await client.aclose()
        with pytest.raises(ConnectionClosed):
            await client.status()
        async with anyio.create_task_group() as tg:
            client = await AsyncClient.connect(fake.path, task_group=tg)
            assert await client.status() == STATUS
            await client.aclose()


@pytest.mark.anyio
async def test_async_missing_socket(tmp_path: Path) -> None:
    with pytest.raises(DaemonNotRunning, match="mlxd serve"):
        async with AsyncClient(tmp_path / "none.sock"):
            pass


@pytest.mark.anyio
async def test_async_error_mapping(aclient: AsyncClient) -> None:
    with anyio.fail_after(WAIT_S):
        with pytest.raises(ServerBusy) as busy:
            await aclient.generate("busy")
        assert busy.value.retry_after_ms == 250
        with pytest.raises(SessionNotFound):
            await aclient.sessions_get("zz")
        with pytest.raises(MethodNotFound):
            await aclient.call("nope")
        with pytest.raises(ServerBusy):
            async with aclient.stream("busy") as deltas:
                async for _ in deltas:
                    pass
        assert await aclient.status() == STATUS


@pytest.mark.anyio
async def test_async_stream_deltas_and_result(aclient: AsyncClient) -> None:
    with anyio.fail_after(WAIT_S):
        async with aclient.stream("x y z", seed=3) as deltas:
            assert deltas.statistics().max_buffer_size == 256
            texts = [d.text async for d in deltas]
        assert texts == ["echo: ", "x ", "y ", "z"]
        assert deltas.result is not None and deltas.result.text == "echo: x y z"
        assert not deltas.cancelled


@pytest.mark.anyio
async def test_async_tiny_buffer_applies_backpressure_without_losing_deltas(
    fake: FakeDaemon,
) -> None:
    with anyio.fail_after(WAIT_S):
        async with AsyncClient(fake.path, max_buffered_deltas=1) as client:
            words = " ".join(f"w{i}" for i in range(200))
            async with client.stream(words) as deltas:
                text = "".join([d.text async for d in deltas])
            assert deltas.result is not None and text == deltas.result.text


@pytest.mark.anyio
async def test_async_leaving_a_stream_early_cancels_it(
    fake: FakeDaemon, aclient: AsyncClient
) -> None:
    with anyio.fail_after(WAIT_S):
        async with aclient.stream("hold") as deltas:
            async for delta in deltas:
                assert delta.text == "a"
                break
        assert deltas.cancelled and deltas.result is None
        assert fake.cancels() == [deltas.id]
        assert await aclient.status() == STATUS
        assert not aclient._pending


@pytest.mark.anyio
async def test_async_cancelled_stream_sends_cancel_and_consumes_the_reply(
    fake: FakeDaemon, aclient: AsyncClient
) -> None:
    with anyio.fail_after(WAIT_S):
        with anyio.CancelScope() as scope:
            async with aclient.stream("hold") as deltas:
                async for _ in deltas:
                    scope.cancel()
        assert scope.cancelled_caught
        assert deltas.cancelled
        assert fake.cancels() == [deltas.id]
        assert not aclient._pending
        assert await aclient.status() == STATUS


@pytest.mark.anyio
async def test_async_cancelled_generate_sends_cancel(
    fake: FakeDaemon, aclient: AsyncClient
) -> None:
    with anyio.fail_after(WAIT_S):
        async with anyio.create_task_group() as tg:
            tg.start_soon(aclient.generate, "hold")
            request_id = await held_id(fake)
            tg.cancel_scope.cancel()
        assert fake.cancels() == [request_id]
        assert not aclient._pending
        assert await aclient.status() == STATUS


@pytest.mark.anyio
async def test_async_cancel_by_id(fake: FakeDaemon, aclient: AsyncClient) -> None:
    with anyio.fail_after(WAIT_S):
        async with aclient.stream("hold") as deltas:
            with pytest.raises(RequestCancelled) as info:
                async for delta in deltas:
                    if delta.text == "c":
                        await aclient.cancel(deltas.id)
        assert info.value.text == "abc" and deltas.cancelled


@pytest.mark.anyio
async def test_async_skips_traffic_for_other_ids(aclient: AsyncClient) -> None:
    with anyio.fail_after(WAIT_S):
        async with aclient.stream("interleave") as deltas:
            assert [d.text async for d in deltas] == ["one ", "two"]
        assert (await aclient.generate("interleave")).text == "one two"


@pytest.mark.anyio
async def test_async_concurrent_requests_on_one_connection(
    fake: FakeDaemon, aclient: AsyncClient
) -> None:
    results: dict[str, Any] = {}

    async def run(name: str, prompt: str) -> None:
        results[name] = (await aclient.generate(prompt)).text

    async def tokenize(text: str) -> None:
        results[text] = (await aclient.tokenize(text)).count

    with anyio.fail_after(WAIT_S):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, "held", "hold")  # answered only after "release" arrives
            await held_id(fake)
            for n in range(20):
                tg.start_soon(tokenize, "t" * n)
            async with aclient.stream("hold") as deltas:  # a stream next to the held call
                assert (await deltas.__anext__()).text == "a"
                await run("release", "release")  # which also finishes the stream
                assert [d.text async for d in deltas] == ["b", "c"]
            assert deltas.result is not None and deltas.result.text == "released"
    assert results.pop("held") == "released" and results.pop("release") == "release"
    assert results == {"t" * n: n for n in range(20)}
    assert fake.cancels() == []


@pytest.mark.anyio
async def test_async_lsp_framing(fake: FakeDaemon) -> None:
    with anyio.fail_after(WAIT_S):
        async with AsyncClient(fake.path, Framing.LSP) as client:
            assert await client.status() == STATUS
            async with client.stream("a") as deltas:
                assert [d.text async for d in deltas] == ["echo: ", "a"]
    assert fake.framings == [Framing.LSP]


@pytest.mark.anyio
async def test_async_closing_fails_pending_calls(fake: FakeDaemon) -> None:
    failures: list[BaseException] = []

    async def wait_forever() -> None:
        try:
            await client.generate("hold")
        except ConnectionClosed as exc:
            failures.append(exc)

    with anyio.fail_after(WAIT_S):
        async with AsyncClient(fake.path) as client:
            async with anyio.create_task_group() as tg:
                tg.start_soon(wait_forever)
                await held_id(fake)
                await client.aclose()
            with pytest.raises(ConnectionClosed, match="is closed"):
                await client.status()
    [failure] = failures
    assert "the client closed the connection" in str(failure)


@pytest.mark.anyio
async def test_async_hangup_fails_pending_calls(fake: FakeDaemon, aclient: AsyncClient) -> None:
    with anyio.fail_after(WAIT_S):
        with pytest.raises(ConnectionClosed, match="mlxd closed it"):
            await aclient.call("test/hangup")
        with pytest.raises(ConnectionClosed):
            await aclient.status()
