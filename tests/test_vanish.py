"""Clients that vanish mid-stream, mid-prefill and while queued, and floods of connections:
the daemon frees what they held within a step, and its descriptors return to baseline.
Also: a request that needs more than the free blocks spills idle sessions for itself,
on arrival and while it waits in the queue."""

from __future__ import annotations

import os
import resource
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mlxd import rpc
from mlxd.client import Client
from mlxd.daemon.models.builtin_model import ensure_builtin

from .daemon_proc import (
    DaemonProcess,
    RawConnection,
    block_bytes,
    blocks_beyond_anonymous,
    daemon_in_short_dir,
)

POOL_BLOCKS = 4  # 1024 tokens: one long request fills it
PREFILL_CHUNK = 64  # prompt tokens per engine step: a 1000-token prompt takes 16 steps


@pytest.fixture(scope="module", params=["asyncio", "trio"])
def pool(request: pytest.FixtureRequest, model_cache: Path) -> Iterator[DaemonProcess]:
    ensure_builtin("tiny", model_cache)  # the model exists before we size the pool
    budget = str(POOL_BLOCKS * block_bytes(model_cache))
    chunk = str(PREFILL_CHUNK)
    args = ("--kv-budget", budget, "--prefill-chunk", chunk)
    yield from daemon_in_short_dir(model_cache, *args, backend=str(request.param))


def _wait(client: Client, ok: Callable[[rpc.StatusResult], bool], what: str) -> rpc.StatusResult:
    deadline = time.monotonic() + 30
    while not ok(status := client.status()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {status}"
    return status


def _idle(status: rpc.StatusResult) -> bool:
    return status.active == 0 and blocks_beyond_anonymous(status) == 0 and status.queue.depth == 0


def _steps(status: rpc.StatusResult) -> int:
    return int(status.details["engine_steps"])


def _generates(proc: DaemonProcess) -> list[dict[str, object]]:
    return [e for e in proc.events("request") if e.get("method") == "generate"]


def _outcomes(proc: DaemonProcess, client: Client, since: int, count: int) -> list[object]:
    """The outcomes of generate requests logged after the first `since`, once `count` are."""
    deadline = time.monotonic() + 30
    while len(logged := _generates(proc)[since:]) < count:
        assert time.monotonic() < deadline, logged
        client.status()  # paces the loop while the log line travels
    return [e["outcome"] for e in logged]


def test_pool_is_sized_as_intended(pool: DaemonProcess) -> None:
    with Client(pool.socket) as client:
        assert client.status().pool.blocks_total == POOL_BLOCKS


def test_vanish_mid_stream(pool: DaemonProcess) -> None:
    with Client(pool.socket) as watcher:
        _wait(watcher, _idle, "an idle daemon")
        logged = len(_generates(pool))
        conn = RawConnection(pool.socket)
        conn.request(1, "generate", {"prompt": "stream", "max_tokens": 1000, "stream": True})
        for _ in range(3):
            assert isinstance(conn.next(), rpc.Notification)
        at_close = watcher.status()
        conn.close()
        after = _wait(watcher, _idle, "the sequence to leave the batch")
        assert _outcomes(pool, watcher, logged, 1) == ["disconnected"]
    # Left at a step boundary, hundreds of steps before its end.
    assert _steps(after) - _steps(at_close) < 100


def test_vanish_mid_prefill(pool: DaemonProcess) -> None:
    with Client(pool.socket) as watcher:
        _wait(watcher, _idle, "an idle daemon")
        logged = len(_generates(pool))
        conn = RawConnection(pool.socket)
        # 1000 prompt tokens: 16 prefill chunks, one per engine step.
        conn.request(1, "generate", {"prompt": "p" * 1000, "max_tokens": 8})
        prefilling = _wait(watcher, lambda s: s.active == 1, "the prefill to start")
        conn.close()
        after = _wait(watcher, _idle, "the sequence to leave the batch")
        assert _outcomes(pool, watcher, logged, 1) == ["disconnected"]
    taken = _steps(after) - _steps(prefilling)
    assert taken <= 3, f"{taken} steps after the close; the prefill alone needs 16"


def test_vanish_while_queued(pool: DaemonProcess) -> None:
    with Client(pool.socket) as watcher:
        _wait(watcher, _idle, "an idle daemon")
        logged = len(_generates(pool))
        hog = RawConnection(pool.socket)
        # prompt + max_tokens = the whole context = every block of the pool
        hog.request(1, "generate", {"prompt": "hog", "max_tokens": 1018, "stream": True})
        assert isinstance(hog.next(), rpc.Notification)
        queued = RawConnection(pool.socket)
        queued.request(1, "generate", {"prompt": "waiting", "max_tokens": 8})
        full = _wait(watcher, lambda s: s.queue.depth == 1, "the request to queue")
        assert full.pool.blocks_used == POOL_BLOCKS and full.state == "degraded"
        queued.close()
        gone = _wait(watcher, lambda s: s.queue.depth == 0, "the queue to empty")
        assert gone.active == 1 and gone.pool.blocks_used == POOL_BLOCKS
        hog.send(rpc.notification("$/cancelRequest", {"id": 1}))
        reply = hog.reply(1)
        assert isinstance(reply, rpc.Response) and reply.error is not None
        assert reply.error.code == rpc.ErrorCode.REQUEST_CANCELLED
        hog.close()
        _wait(watcher, _idle, "the pool to empty")
        assert _outcomes(pool, watcher, logged, 2) == ["disconnected", "request_cancelled"]


def test_vanish_mid_stream_keeps_what_the_session_generated(pool: DaemonProcess) -> None:
    with Client(pool.socket) as watcher:
        _wait(watcher, _idle, "an idle daemon")
        conn = RawConnection(pool.socket)
        params = {"prompt": "a session", "max_tokens": 1000, "stream": True, "session": "v"}
        conn.request(1, "generate", params)
        for _ in range(3):
            assert isinstance(conn.next(), rpc.Notification)
        conn.close()
        _wait(watcher, lambda s: s.active == 0, "the sequence to leave the batch")
        info = watcher.sessions_get("v")
        assert info.state == "hot" and info.tokens >= len("a session") + 3
        assert watcher.status().pool.blocks_used == 1  # the session's cache holds its block
        assert watcher.sessions_delete("v")
        _wait(watcher, _idle, "the session's block to return")


# -- room for a big request: idle sessions are spilled, on arrival and from the queue ------


def test_a_request_bigger_than_the_free_blocks_spills_idle_sessions(pool: DaemonProcess) -> None:
    with Client(pool.socket) as client:
        _wait(client, _idle, "an idle daemon")
        client.generate("an idle session", session="room-a", max_tokens=4)
        assert client.status().pool.blocks_used == 1  # 3 of 4 blocks free
        # Needs all 4: the idle session must go to disk (it used to wait forever).
        whole = RawConnection(pool.socket, timeout=30)
        whole.request(1, "generate", {"prompt": "w" * 1000, "max_tokens": 8})
        assert _replies_ok(whole)
        whole.close()
        assert client.sessions_get("room-a").state == "disk"
        assert client.sessions_delete("room-a")
        _wait(client, _idle, "the pool to empty")


def test_a_queued_request_spills_a_session_that_went_idle(pool: DaemonProcess) -> None:
    with Client(pool.socket) as client:
        _wait(client, _idle, "an idle daemon")
        turn = RawConnection(pool.socket)
        params = {"prompt": "a turn", "max_tokens": 200, "stream": True, "session": "room-b"}
        turn.request(1, "generate", params)
        assert isinstance(turn.next(), rpc.Notification)  # running, holding its block
        big = RawConnection(pool.socket, timeout=30)
        big.request(1, "generate", {"prompt": "w" * 1000, "max_tokens": 8})
        _wait(client, lambda s: s.queue.depth == 1, "the big request to queue")
        assert _replies_ok(turn)  # the turn ends; its session keeps its block, idle
        assert _replies_ok(big)  # which the queued request spills to run
        assert client.sessions_get("room-b").state == "disk"
        turn.close()
        big.close()
        assert client.sessions_delete("room-b")
        _wait(client, _idle, "the pool to empty")


def _replies_ok(conn: RawConnection) -> bool:
    reply = conn.reply(1)
    assert isinstance(reply, rpc.Response) and reply.error is None, reply
    return True


# -- floods -----------------------------------------------------------------------------


def _fds(proc: DaemonProcess) -> int:
    assert proc.proc is not None
    return len(os.listdir(f"/proc/{proc.proc.pid}/fd"))


def _wait_fds(proc: DaemonProcess, baseline: int) -> None:
    """Until the daemon holds no more descriptors than at baseline; a status round trip
    between looks paces the loop (a connection's fd closes just after it stops counting)."""
    deadline = time.monotonic() + 30
    with Client(proc.socket) as client:
        baseline += 1  # this client's own connection
        while (now := _fds(proc)) > baseline:
            assert time.monotonic() < deadline, f"{now} fds open, baseline {baseline}"
            client.status()


def _connect(path: Path) -> socket.socket:
    # Blocking connect: past the listen backlog (128) it waits for the daemon to accept,
    # where a non-blocking one fails with EAGAIN.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        raise
    sock.settimeout(30)
    return sock


def _open_many(path: Path, n: int, into: list[socket.socket]) -> None:
    for _ in range(n):
        into.append(_connect(path))


def _baseline(proc: DaemonProcess, client: Client) -> int:
    """The daemon's descriptors with only `client` connected."""
    _wait(client, lambda s: s.connections == 1, "other connections to close")
    return _fds(proc) - 1


def test_hundreds_of_idle_connections(pool: DaemonProcess) -> None:
    with Client(pool.socket) as client:
        baseline = _baseline(pool, client)
        idle: list[socket.socket] = []
        try:
            _open_many(pool.socket, 300, idle)
            _wait(client, lambda s: s.connections == 301, "every connection to be accepted")
            assert _fds(pool) >= baseline + 300
            result = client.generate("served while 300 connections idle", max_tokens=4)
            assert result.usage.completion_tokens == 4
        finally:
            for sock in idle:
                sock.close()
        _wait(client, lambda s: s.connections == 1, "the idle connections to close")
    _wait_fds(pool, baseline)


def test_connections_opened_and_closed_in_a_loop(pool: DaemonProcess) -> None:
    with Client(pool.socket) as client:
        baseline = _baseline(pool, client)
        stop = threading.Event()
        served: list[int] = []

        def normal_client() -> None:
            with Client(pool.socket) as mine:
                while not stop.is_set():
                    served.append(mine.generate("steady", max_tokens=2).usage.completion_tokens)

        worker = threading.Thread(target=normal_client)
        worker.start()
        try:
            request = b'{"jsonrpc":"2.0","id":1,"method":"generate","params":{"prompt":"x","max_tokens":50}}\n'
            for i in range(400):
                sock = _connect(pool.socket)
                if i % 4 == 1:
                    sock.sendall(request)  # then leave without reading the reply
                elif i % 4 == 2:
                    sock.sendall(request[:20])  # leave mid-frame
                elif i % 4 == 3:
                    sock.sendall(b'{"jsonrpc":"2.0","id":1,"method":"status"}\n')
                    sock.recv(1)  # the reply started; leave before the rest
                sock.close()
        finally:
            stop.set()
            worker.join(60)
        assert served and all(n == 2 for n in served)
        _wait(client, lambda s: s.connections == 1 and _idle(s), "the daemon to settle")
    _wait_fds(pool, baseline)


def test_out_of_descriptors_the_daemon_waits_and_recovers(pool: DaemonProcess) -> None:
    assert pool.proc is not None
    pid = pool.proc.pid
    with Client(pool.socket) as client:
        baseline = _baseline(pool, client)
        limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        socks: list[socket.socket] = []
        try:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (baseline + 10, limits[1]))
            _open_many(pool.socket, 40, socks)  # the listen backlog holds those not accepted
            pool.wait_for("cannot accept a connection")
        finally:
            for sock in socks:
                sock.close()
            resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)
        assert pool.proc.poll() is None
        _wait(client, lambda s: s.connections == 1, "the connections to close")
        assert client.generate("after the fd storm", max_tokens=3).usage.completion_tokens == 3
    with Client(pool.socket) as fresh:
        assert fresh.tokenize("new connections are accepted again").count > 0
    _wait_fds(pool, baseline)
