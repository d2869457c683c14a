"""A bounded drain: a client that stopped reading cannot hold the exit, new clients during a
drain are told ShuttingDown, stdio honours the deadline, and a swap cannot undo a drain."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import anyio
import msgspec
import pytest

from mlxd import rpc
from mlxd.client import Client
from mlxd.daemon.config import Config
from mlxd.daemon.service.service import Daemon, State
from mlxd.daemon.transport.server import RequestContext

from .daemon_proc import DaemonProcess, RawConnection, other_tiny_model


def _shutting_down(reply: object) -> bool:
    return (
        isinstance(reply, rpc.Response)
        and reply.error is not None
        and reply.error.code == rpc.ErrorCode.SHUTTING_DOWN
    )


def _stalled_stream(proc: DaemonProcess) -> RawConnection:
    """A streaming generate whose client never reads: the daemon's send blocks."""
    conn = RawConnection(proc.socket)
    conn.request(1, "generate", {"prompt": "never read", "max_tokens": 4000, "stream": True})
    with Client(proc.socket, timeout=30) as client:
        # Far more steps than deltas fit in the socket's buffers: the sender is blocked.
        while client.status().details["engine_steps"] < 1500:
            time.sleep(0.05)
    return conn


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_drain_with_a_client_that_stopped_reading_is_bounded(
    short_dir: Path, model_cache: Path, backend: str
) -> None:
    proc = DaemonProcess(short_dir, model_cache, backend=backend).start()
    stalled = _stalled_stream(proc)
    drain_s = 1.0
    with Client(proc.socket, timeout=30) as client:
        started = time.monotonic()
        client.shutdown(drain_timeout_s=drain_s)
    # A client arriving during the drain is answered, not left hanging until the exit.
    late = RawConnection(proc.socket, timeout=10)
    late.request(1, "generate", {"prompt": "too late", "max_tokens": 2})
    assert _shutting_down(late.reply(1))
    late.request(2, "status")
    status = late.reply(2)
    assert isinstance(status, rpc.Response) and status.error is None
    assert msgspec.json.decode(status.result)["state"] == "draining"
    assert proc.wait(30) == 0
    elapsed = time.monotonic() - started
    assert elapsed < drain_s + 1.0, f"the drain took {elapsed:.2f} s"
    stalled.close()
    late.close()
    assert not proc.socket.exists()


def test_stdio_honours_the_drain_timeout_with_a_peer_that_stopped_reading(
    short_dir: Path, model_cache: Path
) -> None:
    drain_s = 1.0
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlxd.daemon", "serve", "--stdio", "--model", "builtin:tiny", "--drain-timeout", str(drain_s),
         "--state-dir", str(short_dir / "st")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        env=dict(os.environ, MLXD_CACHE_DIR=str(model_cache)),
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    try:
        request = {"jsonrpc": "2.0", "id": 1, "method": "generate",
                   "params": {"prompt": "never read", "max_tokens": 4000, "stream": True}}  # fmt: skip
        proc.stdin.write(msgspec.json.encode(request) + b"\n")
        proc.stdin.flush()
        # Wait until the pipe is full (64 KiB on Linux): the daemon's write is blocked.
        deadline = time.monotonic() + 60
        while _pipe_bytes(proc.stdout.fileno()) < 60_000:
            assert time.monotonic() < deadline, "the stream never filled the pipe"
            time.sleep(0.05)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        elapsed = time.monotonic() - started
        assert elapsed < drain_s + 1.0, f"the drain took {elapsed:.2f} s"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdin.close()
        proc.stdout.close()


def _pipe_bytes(fd: int) -> int:
    buf = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return int.from_bytes(buf, sys.byteorder)


def test_sigterm_during_a_model_swap_stays_draining(short_dir: Path, model_cache: Path) -> None:
    proc = DaemonProcess(short_dir, model_cache, "--drain-timeout", "20").start()
    other = other_tiny_model(model_cache, short_dir / "model-b")
    busy = RawConnection(proc.socket)  # keeps the swap waiting for its own drain deadline
    busy.request(1, "generate", {"prompt": "busy", "max_tokens": 3000, "stream": True})
    assert isinstance(busy.next(), rpc.Notification)
    reader = threading.Thread(target=busy.reply, args=(1,), daemon=True)
    reader.start()
    swapper = RawConnection(proc.socket)
    swapper.request(1, "models/swap", {"model": str(other), "drain_timeout_s": 1})
    probe = RawConnection(proc.socket, timeout=30)
    for i in range(1000):  # until the swap has begun: generates are refused as "switching"
        probe.request(i, "generate", {"prompt": "x", "max_tokens": 1})
        reply = probe.reply(i)
        if isinstance(reply, rpc.Response) and reply.error and "switching" in reply.error.message:
            break
    proc.signal(signal.SIGTERM)
    proc.wait_for("signal: draining")
    swapped = swapper.reply(1)
    assert isinstance(swapped, rpc.Response) and swapped.error is None, swapped
    assert proc.wait(60) == 0
    assert proc.events("swap finished during a drain: still draining")
    assert not [e for e in proc.events("state") if e["new"] == "ok" and e["old"] == "swapping"]
    for conn in (busy, swapper, probe):
        conn.close()


async def _noop(*args: object) -> None:
    pass


@pytest.mark.anyio
async def test_a_swap_that_ends_during_a_drain_does_not_undo_it(tmp_path: Path) -> None:
    # In process, with the model load held open: the drain begins while the swap loads.
    daemon = Daemon(Config(state_dir=tmp_path))
    daemon.enter(State.OK)
    daemon.model = SimpleNamespace(  # type: ignore[assignment]
        id="a", path="/a", fingerprint="f" * 64, type="llama", vocab_size=1,
        context_length=1, dtype="float32", weights="float32",
    )  # fmt: skip
    loading, release = anyio.Event(), anyio.Event()

    async def load(spec: str) -> None:
        loading.set()
        await release.wait()

    daemon._load = load  # type: ignore[method-assign]
    daemon.drain_requests = _noop  # type: ignore[method-assign]
    daemon.persist_sessions = _noop  # type: ignore[method-assign]
    ctx = RequestContext(1, "models/swap", 1, _noop)
    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.models_swap, rpc.ModelsSwapParams("b"), ctx)
        await loading.wait()
        assert daemon._refuse("generate") is not None
        await daemon.drain(1.0)
        release.set()
    assert daemon.state is State.STOPPED
    refusal = daemon._refuse("generate")
    assert refusal is not None and refusal.code == rpc.ErrorCode.SHUTTING_DOWN
    assert "shutting down" in refusal.message
