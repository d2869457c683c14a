"""Start the daemon as a user would (a process on a real socket) and wait until it serves."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "DaemonProcess",
    "RawConnection",
    "assert_pool_is_the_sessions",
    "block_bytes",
    "blocks_beyond_anonymous",
    "daemon_in_short_dir",
    "free_port",
    "held_blocks",
    "other_tiny_model",
    "probe_as_nobody",
    "short_tmpdir",
]


def block_bytes(model_cache: Path) -> int:
    """KV bytes of one 256-token pool block of the tiny built-in model (float32)."""
    (folder,) = (model_cache / "models").glob("builtin-tiny-*")
    config = json.loads((folder / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    per_token = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 4
    return per_token * 256


def other_tiny_model(model_cache: Path, dest: Path) -> Path:
    """A copy of the tiny model with one weight changed: another model, another fingerprint."""
    (tiny,) = (model_cache / "models").glob("builtin-tiny-*")
    shutil.copytree(tiny, dest, ignore=shutil.ignore_patterns(".mlxd-*"))
    weights = dest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8] ^= 0x01
    weights.write_bytes(bytes(data))
    return dest


def free_port() -> int:
    """A loopback TCP port nobody listens on (for `--http`)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def short_tmpdir() -> Path:
    """A folder short enough for a socket path (sun_path is 104-108 bytes)."""
    return Path(tempfile.mkdtemp(prefix="mlxd-t", dir="/tmp"))


def daemon_in_short_dir(
    cache_dir: Path, *args: str, backend: str = "asyncio", clean_exit: bool = False
) -> Iterator[DaemonProcess]:
    """For a fixture to `yield from`: a daemon serving in a fresh short folder, stopped and
    the folder removed afterwards; with `clean_exit`, its exit code must be 0."""
    folder = short_tmpdir()
    proc = DaemonProcess(folder, cache_dir, *args, backend=backend).start()
    yield proc
    code = proc.stop()
    if clean_exit:
        assert code == 0, "\n".join(proc.lines[-60:])
    shutil.rmtree(folder, ignore_errors=True)


class DaemonProcess:
    def __init__(
        self,
        folder: Path,
        cache_dir: Path,
        *args: str,
        model: str | None = "builtin:tiny",  # None: no --model, the daemon's default
        backend: str = "asyncio",
        state_dir: Path | None = None,
        env: dict[str, str] | None = None,
        launcher: list[str] | None = None,
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        self.extra_env = env or {}
        self.launcher = launcher or []  # e.g. systemd-socket-activate and its options
        self.pass_fds = pass_fds
        self.folder = folder
        self.socket = folder / "d.sock"
        self.state_dir = state_dir or folder / "state"
        self.cache_dir = cache_dir
        self.args = [
            *(["--model", model] if model else []), "--backend", backend, "--socket", str(self.socket),
            "--state-dir", str(self.state_dir), "--log-level", "debug", *args,
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._new_line = threading.Condition()
        self._reader: threading.Thread | None = None
        self._until = '"serving"'

    def spawn(self) -> DaemonProcess:
        """Start the process without waiting for it to serve (an activated one serves later)."""
        env = dict(os.environ, MLXD_CACHE_DIR=str(self.cache_dir), PYTHONUNBUFFERED="1")
        env.update(self.extra_env)
        env.pop("MLXD_SOCKET", None)
        self.proc = subprocess.Popen(
            [*self.launcher, sys.executable, "-m", "mlxd.daemon", "serve", *self.args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            pass_fds=self.pass_fds,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def start(self, timeout: float = 120.0, until: str = '"serving"') -> DaemonProcess:
        """Spawn the daemon and wait for a log line containing `until` (it serves)."""
        self._until = until
        self.spawn()
        assert self.proc is not None
        serving = self._ready.wait(timeout) and any(until in x for x in self.lines)
        if not serving or self.proc.poll() is not None:
            self.kill()
            raise RuntimeError("daemon did not start:\n" + "\n".join(self.lines[-40:]))
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._new_line:
                self.lines.append(line)
                self._new_line.notify_all()
            if self._until in line:
                self._ready.set()
        self._ready.set()  # the process ended: let start() report it
        with self._new_line:
            self._new_line.notify_all()

    def wait_for(self, text: str, timeout: float = 60.0) -> str:
        """The first log line containing `text`, waiting for it to be written."""
        with self._new_line:
            found = self._new_line.wait_for(
                lambda: next((x for x in self.lines if text in x), None) or self._reader_done(),
                timeout,
            )
        line = next((x for x in self.lines if text in x), None)
        if not found or line is None:
            raise AssertionError(f"no log line with {text!r}:\n" + "\n".join(self.lines[-20:]))
        return line

    def _reader_done(self) -> bool:
        return self._reader is not None and not self._reader.is_alive()

    def events(self, name: str) -> list[dict[str, object]]:
        found = []
        for line in list(self.lines):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == name:
                found.append(record)
        return found

    def signal(self, signum: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return code

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None and self.proc.stderr is not None and not self.proc.stderr.closed:
            self.wait(10)


class RawConnection:
    """A bare JSON-RPC connection for tests that need to see every byte and message."""

    def __init__(self, path: Path, framing: object = None, timeout: float = 60.0) -> None:
        import socket

        from mlxd import rpc

        self.rpc = rpc
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.codec = rpc.Connection(framing=framing or rpc.Framing.NDJSON)

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, message: object) -> None:
        self.sock.sendall(self.codec.send(message))  # type: ignore[arg-type]

    def request(self, id: int | str, method: str, params: object = None) -> None:
        from msgspec import UNSET

        self.send(self.rpc.request(id, method, UNSET if params is None else params))

    def next(self) -> object:
        while True:
            event = self.codec.next_event()
            if event is not self.rpc.NEED_DATA:
                return event
            data = self.sock.recv(65536)
            self.codec.receive_data(data)

    def reply(self, id: int | str) -> object:
        """The response to `id`, skipping notifications and other replies."""
        while True:
            event = self.next()
            if event is self.rpc.CLOSED:
                raise ConnectionError("closed before the reply")
            if isinstance(event, self.rpc.Response) and event.id == id:
                return event

    def close(self) -> None:
        self.sock.close()


_PEER_PROBE = """
import os, socket
os.setgid(65534)
os.setuid(65534)
s = socket.socket(socket.AF_UNIX)
s.settimeout(20)
s.connect(%r)
try:
    s.sendall(b'{"jsonrpc":"2.0","id":1,"method":"status"}\\n')
    print(repr(s.recv(100)))
except (BrokenPipeError, ConnectionResetError):
    print(repr(b""))
"""


def probe_as_nobody(socket_path: Path) -> subprocess.CompletedProcess[str]:
    """Send `status` as uid 65534 (needs root); its stdout is repr() of what came back."""
    probe = _PEER_PROBE % str(socket_path)
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)


def held_blocks(client: Any, per_block: int) -> int:
    """Blocks the listed hot sessions and the anonymous entries hold, as the pool counts them."""
    listed = sum(
        max(1, math.ceil(s.bytes / per_block)) for s in client.sessions_list() if s.state == "hot"
    )
    return listed + int(client.status().details["prefix_cache"]["anonymous_blocks"])


def assert_pool_is_the_sessions(client: Any, per_block: int) -> None:
    deadline = time.monotonic() + 30
    while True:  # a reply is sent before its turn's bookkeeping lands: settle first
        status = client.status()
        if status.active == 0 and status.queue.depth == 0:
            break
        assert time.monotonic() < deadline, status
        time.sleep(0.01)
    assert status.pool.blocks_used == held_blocks(client, per_block)
    assert status.sessions.hot_bytes <= status.pool.blocks_total * per_block


def blocks_beyond_anonymous(status: Any) -> int:
    """Pool blocks not held by anonymous entries (sessionless requests keep their caches)."""
    return int(status.pool.blocks_used - status.details["prefix_cache"]["anonymous_blocks"])
