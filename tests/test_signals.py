"""SIGTERM, SIGINT and SIGHUP during model load, idle and streaming: every reply is sent,
sessions are saved, the socket and lock files are removed, exit 0."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from mlxd import rpc

from .daemon_proc import DaemonProcess, RawConnection

SIGNALS = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]


def _cleaned_up(proc: DaemonProcess) -> None:
    assert not proc.socket.exists()
    assert not proc.socket.with_name(proc.socket.name + ".lock").exists()
    assert proc.events("stopped")


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_a_signal_during_model_load_exits_cleanly(
    short_dir: Path, model_cache: Path, signum: int
) -> None:
    # builtin:small takes a while to load (weights read and fingerprinted): time to signal.
    proc = DaemonProcess(short_dir, model_cache, model="builtin:small")
    proc.start(until='"loading model"')
    proc.signal(signum)
    assert proc.wait(120) == 0, proc.lines[-10:]
    assert not proc.events("serving"), "the load finished before the signal: not a load test"
    assert proc.events("signal during model load: stopping")
    _cleaned_up(proc)


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_a_signal_when_idle_drains_and_exits_cleanly(
    short_dir: Path, model_cache: Path, signum: int
) -> None:
    proc = DaemonProcess(short_dir, model_cache).start()
    proc.signal(signum)
    assert proc.wait(60) == 0
    assert proc.events("signal: draining")
    _cleaned_up(proc)


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_a_signal_while_streaming_replies_saves_and_exits_cleanly(
    short_dir: Path, model_cache: Path, signum: int
) -> None:
    proc = DaemonProcess(short_dir, model_cache, "--drain-timeout", "1").start()
    conn = RawConnection(proc.socket, timeout=30)
    conn.request(1, "generate", {"prompt": "a long story", "max_tokens": 3000, "stream": True, "session": "kept"})  # fmt: skip
    event = conn.next()
    assert isinstance(event, rpc.Notification), event
    proc.signal(signum)
    reply = conn.reply(1)
    assert isinstance(reply, rpc.Response) and reply.error is not None
    assert reply.error.code == rpc.ErrorCode.REQUEST_CANCELLED
    assert reply.error.data["usage"]["completion_tokens"] > 0
    conn.close()
    assert proc.wait(60) == 0
    _cleaned_up(proc)
    saved = list((proc.state_dir / "sessions").glob("*/kept.safetensors"))
    assert len(saved) == 1
