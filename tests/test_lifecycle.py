"""Lifecycle with the daemon as a process: drain on SIGTERM, one instance, stale sockets,
a private socket, model swaps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import pytest

from mlxd import rpc
from mlxd.client import Client

from .daemon_proc import DaemonProcess, RawConnection, other_tiny_model, probe_as_nobody


def _serve_refused(model_cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `serve` with the tiny model and `args`, expecting it to refuse and exit."""
    return subprocess.run(
        [sys.executable, "-m", "mlxd.daemon", "serve", "--model", "builtin:tiny", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, MLXD_CACHE_DIR=str(model_cache)),
    )


def _first_delta(conn: RawConnection) -> None:
    event = conn.next()
    assert isinstance(event, rpc.Notification) and event.method == rpc.DELTA_NOTIFICATION, event


def test_sigterm_drains_replies_to_everyone_and_persists_sessions(
    short_dir: Path, model_cache: Path
) -> None:
    drain_s = 3.0
    proc = DaemonProcess(short_dir, model_cache, "--drain-timeout", str(drain_s)).start()
    streams = {
        "short-1": 8,
        "short-2": 8,
        "long-1": 3000,
        "long-2": 3000,
    }
    conns = {}
    for name, max_tokens in streams.items():
        conn = RawConnection(proc.socket)
        params = {
            "prompt": f"{name}: a conversation",
            "max_tokens": max_tokens,
            "stream": True,
            "session": name,
        }
        conn.request(1, "generate", params)
        _first_delta(conn)
        conns[name] = conn
    spare = RawConnection(proc.socket)
    started = time.monotonic()
    proc.signal(signal.SIGTERM)
    proc.wait_for("signal: draining")
    spare.request(9, "generate", {"prompt": "too late", "max_tokens": 4})
    refused = spare.reply(9)
    assert isinstance(refused, rpc.Response) and refused.error is not None
    assert refused.error.code == rpc.ErrorCode.SHUTTING_DOWN
    replies = {name: conn.reply(1) for name, conn in conns.items()}
    assert proc.wait(drain_s + 30) == 0
    elapsed = time.monotonic() - started
    assert elapsed < drain_s + 15
    for name in ("short-1", "short-2"):
        reply = replies[name]
        assert isinstance(reply, rpc.Response) and reply.error is None, reply
    partial = {}
    for name in ("long-1", "long-2"):
        reply = replies[name]
        assert isinstance(reply, rpc.Response) and reply.error is not None
        assert reply.error.code == rpc.ErrorCode.REQUEST_CANCELLED
        partial[name] = reply.error.data["text"]
        assert reply.error.data["usage"]["completion_tokens"] > 0
    for conn in [*conns.values(), spare]:
        with pytest.raises((ConnectionError, OSError)):
            while True:  # exactly one reply each: then the connection just ends
                event = conn.next()
                assert event is rpc.CLOSED or not isinstance(event, rpc.Response)
                if event is rpc.CLOSED:
                    raise ConnectionError
        conn.close()
    assert not proc.socket.exists()
    files = {p.stem for p in (short_dir / "state" / "sessions").glob("*/*.safetensors")}
    assert files == set(streams)
    # After a restart every session resumes, exactly as a cold run would go.
    first = {
        n: msgspec.json.decode(bytes(replies[n].result))["text"] for n in ("short-1", "short-2")
    }  # type: ignore[union-attr]
    proc = DaemonProcess(short_dir, model_cache).start()
    try:
        with Client(proc.socket) as client:
            for name in streams:
                said = first.get(name, partial.get(name, ""))
                follow = f"{name}: a conversation" + said + " next"
                resumed = client.generate(follow, session=name, max_tokens=8)
                cold = client.generate(follow, max_tokens=8)
                assert resumed.usage.cached_tokens > 0, name
                assert resumed.tokens == cold.tokens, name
    finally:
        assert proc.stop() == 0


def test_one_daemon_per_socket_and_stale_sockets_are_replaced(
    short_dir: Path, model_cache: Path
) -> None:
    first = DaemonProcess(short_dir, model_cache).start()
    second = DaemonProcess(short_dir, model_cache)
    with pytest.raises(RuntimeError, match="already serving"):
        second.start()
    assert second.proc is not None and second.proc.returncode == 1
    with Client(first.socket) as client:
        assert client.generate("still me", max_tokens=2).usage.completion_tokens == 2
    first.signal(signal.SIGKILL)
    first.wait(30)
    assert first.socket.exists()  # left behind by the killed daemon
    third = DaemonProcess(short_dir, model_cache).start()
    try:
        assert any("stale socket" in line for line in third.lines)
        with Client(third.socket) as client:
            assert client.generate("replaced", max_tokens=2).usage.completion_tokens == 2
    finally:
        assert third.stop() == 0


def test_socket_is_private_and_long_paths_are_refused(short_dir: Path, model_cache: Path) -> None:
    proc = DaemonProcess(short_dir, model_cache).start()
    try:
        assert proc.socket.stat().st_mode & 0o777 == 0o600
        assert short_dir.stat().st_mode & 0o777 == 0o700
    finally:
        proc.stop()
    long_folder = short_dir / ("x" * 120)
    result = _serve_refused(model_cache, "--socket", str(long_folder / "d.sock"))
    assert result.returncode == 1
    assert "socket path is" in result.stderr and "at most" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
def test_peers_with_another_uid_are_refused(short_dir: Path, model_cache: Path) -> None:
    proc = DaemonProcess(short_dir, model_cache).start()
    try:
        # Open the door on purpose, as a misconfiguration would: the uid check still holds.
        short_dir.chmod(0o755)
        proc.socket.chmod(0o666)
        out = probe_as_nobody(proc.socket)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "b''"  # closed without an answer
        assert any("another user" in line for line in proc.lines)
        with Client(proc.socket) as client:
            assert client.status().state == "ok"
    finally:
        proc.stop()


def test_model_swap_under_load_and_a_failed_swap_keeps_the_old_model(
    short_dir: Path, model_cache: Path
) -> None:
    other = other_tiny_model(model_cache, short_dir / "model-b")
    proc = DaemonProcess(short_dir, model_cache, "--drain-timeout", "2").start()
    try:
        with Client(proc.socket) as client:
            before = client.models_current()
        busy = [RawConnection(proc.socket) for _ in range(3)]
        for i, conn in enumerate(busy):
            conn.request(
                1,
                "generate",
                {"prompt": f"load {i}", "max_tokens": 6 if i else 3000, "stream": True},
            )
            _first_delta(conn)
        swapped: dict[str, object] = {}

        def swap() -> None:
            with Client(proc.socket) as client:
                swapped["info"] = client.models_swap(str(other))

        worker = threading.Thread(target=swap)
        worker.start()
        outcomes = [conn.reply(1) for conn in busy]
        worker.join(120)
        assert (
            outcomes[0].error is not None
            and outcomes[0].error.code == rpc.ErrorCode.REQUEST_CANCELLED
        )  # type: ignore[union-attr]
        assert all(o.error is None for o in outcomes[1:])  # type: ignore[union-attr]
        info = swapped["info"]
        assert isinstance(info, rpc.ModelInfo) and info.fingerprint != before.fingerprint
        with Client(proc.socket) as client:
            assert client.models_current().path == str(other.resolve())
            assert client.generate("on the new model", max_tokens=3).usage.completion_tokens == 3
            with pytest.raises(rpc.RpcError) as failure:
                client.models_swap(str(short_dir / "no-such-model"))
            assert "still serving" in failure.value.message
            assert client.models_current().fingerprint == info.fingerprint
            assert client.generate("still serving", max_tokens=3).usage.completion_tokens == 3
        for conn in busy:
            conn.close()
    finally:
        assert proc.stop() == 0


def test_shutdown_method_drains_and_exits_zero(short_dir: Path, model_cache: Path) -> None:
    proc = DaemonProcess(short_dir, model_cache).start()
    with Client(proc.socket) as client:
        client.generate("save me", session="bye", max_tokens=4)
        client.shutdown(drain_timeout_s=5)
    assert proc.wait(60) == 0
    assert list((short_dir / "state" / "sessions").glob("*/bye.safetensors"))


def test_stdio_transport_serves_one_peer(model_cache: Path, short_dir: Path) -> None:
    lines = (
        b'{"jsonrpc":"2.0","id":1,"method":"tokenize","params":{"text":"abc"}}\n'
        b'{"jsonrpc":"2.0","id":2,"method":"generate","params":{"prompt":"hi","max_tokens":3}}\n'
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlxd.daemon",
            "serve",
            "--model",
            "builtin:tiny",
            "--stdio",
            "--state-dir",
            str(short_dir / "st"),
        ],
        input=lines,
        capture_output=True,
        timeout=120,
        env=dict(os.environ, MLXD_CACHE_DIR=str(model_cache)),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    replies = {r["id"]: r for r in map(msgspec.json.decode, out.stdout.splitlines())}
    assert replies[1]["result"]["count"] == 3
    assert replies[2]["result"]["usage"]["completion_tokens"] == 3
    assert b'"event": "serving"' in out.stderr  # logs on stderr only


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a folder to another user")
def test_a_socket_folder_owned_by_another_user_is_refused(
    short_dir: Path, model_cache: Path
) -> None:
    folder = short_dir / "theirs"
    folder.mkdir(mode=0o700)
    os.chown(folder, 65534, 65534)
    result = _serve_refused(model_cache, "--socket", str(folder / "d.sock"))
    assert result.returncode == 1
    assert "belongs to uid 65534" in result.stderr
    assert not (folder / "d.sock").exists()


def test_a_socket_in_a_shared_sticky_folder_is_refused_and_the_folder_left_alone(
    short_dir: Path, model_cache: Path
) -> None:
    shared = short_dir / "shared"  # like /tmp: world-writable with the sticky bit
    shared.mkdir()
    shared.chmod(0o1777)
    result = _serve_refused(
        model_cache, "--socket", str(shared / "d.sock"), "--state-dir", str(short_dir / "st")
    )
    assert result.returncode == 1
    assert "is a shared folder" in result.stderr
    assert shared.stat().st_mode & 0o7777 == 0o1777
    assert not (shared / "d.sock").exists()
