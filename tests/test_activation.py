"""Socket activation (systemd's LISTEN_FDS, launchd's launch_activate_socket) and idle exit."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio
import msgspec
import pytest

from mlxd import rpc
from mlxd.client import AsyncClient, Client, DaemonNotRunning
from mlxd.daemon.config import Config
from mlxd.daemon.models.model import ModelLoadError
from mlxd.daemon.service.idle import IdleWatcher, parse_duration
from mlxd.daemon.service.lifecycle import run_daemon
from mlxd.daemon.transport import activation
from mlxd.daemon.transport.activation import ActivationError, inherited_socket, launchd_sockets

from .daemon_proc import DaemonProcess, RawConnection, probe_as_nobody

ACTIVATE = shutil.which("systemd-socket-activate") or (
    "/usr/lib/systemd/systemd-socket-activate"
    if os.path.exists("/usr/lib/systemd/systemd-socket-activate")
    else None
)
needs_activate = pytest.mark.skipif(
    ACTIVATE is None or sys.platform != "linux",
    reason="systemd-socket-activate not installed (Debian package: systemd)",
)
# A service manager in miniature: the test holds the listening socket across the daemon's
# lives (as systemd's .socket unit and launchd do) and hands it over as fd 3.
HOLDER = [
    sys.executable,
    "-c",
    "import os, sys\n"
    "fd = int(os.environ.pop('HELD_FD'))\n"
    "os.dup2(fd, 3)\n"
    "fd != 3 and os.close(fd)\n"
    "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1')\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n",
]


def _held_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(128)
    return sock


def _activated(folder: Path, cache: Path, *args: str) -> DaemonProcess:
    """The daemon under the real systemd-socket-activate: it starts on the first connection."""
    assert ACTIVATE is not None
    proc = DaemonProcess(
        folder, cache, *args, launcher=[ACTIVATE, "-l", str(folder / "d.sock")]
    ).spawn()
    proc.wait_for("Listening on")
    return proc


def _held(folder: Path, cache: Path, held: socket.socket, *args: str) -> DaemonProcess:
    env = {"HELD_FD": str(held.fileno())}
    return DaemonProcess(
        folder, cache, *args, launcher=HOLDER, pass_fds=(held.fileno(),), env=env
    ).spawn()


def _result(reply: object) -> dict[str, object]:
    assert isinstance(reply, rpc.Response) and reply.error is None, reply
    value = msgspec.json.decode(bytes(reply.result))  # type: ignore[arg-type]
    assert isinstance(value, dict)
    return value


def _generate(conn: RawConnection, id: int, prompt: str, session: str | None, **kw: object) -> None:
    params: dict[str, object] = {"prompt": prompt, "max_tokens": 8, **kw}
    if session is not None:
        params["session"] = session
    conn.request(id, "generate", params)


def _reply_then_end(conn: RawConnection, id: int) -> object:
    reply = conn.reply(id)
    _no_more_messages(conn)
    return reply


def _no_more_messages(conn: RawConnection) -> None:
    """Exactly one reply was sent: after it the connection just ends."""
    while True:
        try:
            event = conn.next()
        except (ConnectionError, OSError):
            return
        if event is rpc.CLOSED:
            return
        assert not isinstance(event, rpc.Response), event


@pytest.fixture
def folder(short_dir: Path) -> Path:
    return short_dir


linux_only = pytest.mark.skipif(sys.platform != "linux", reason="LISTEN_FDS is systemd's protocol")


# --- the hand-over itself ---------------------------------------------------------------


def test_durations() -> None:
    assert parse_duration("15m") == 900
    assert parse_duration("900s") == parse_duration("900") == 900
    assert parse_duration("1.5h") == 5400
    assert parse_duration("500ms") == 0.5
    for bad in ("", "0", "-1s", "15 minutes", "m"):
        with pytest.raises(ValueError):
            parse_duration(bad)


@pytest.mark.anyio
async def test_idle_watcher_waits_while_busy_and_counts_from_the_last_activity(
    anyio_backend: str,
) -> None:
    busy = True
    watcher = IdleWatcher(0.05, lambda: busy)
    with anyio.move_on_after(0.3) as scope:
        await watcher.wait()
    assert scope.cancelled_caught  # busy the whole time: never idle
    busy = False
    watcher.activity()  # the last request ended now
    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        tg.start_soon(watcher.wait)
        await anyio.sleep(0.03)
        watcher.activity()  # another one came and went: the clock starts again
    assert time.monotonic() - started >= 0.08


def test_systemd_variables_for_another_process_are_ignored_and_cleared() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x", "A": "b"}
    assert activation.systemd_sockets(env) == []
    assert env == {"A": "b"}  # children never see them
    assert activation.systemd_sockets({}) == []
    with pytest.raises(ActivationError, match="not numbers"):
        activation.systemd_sockets({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "one"})


CHILD = """
import fcntl, json, os
from mlxd.daemon.transport.activation import inherited_socket
sock = inherited_socket("Listener")
print(json.dumps({
    "path": sock.getsockname(), "fd": sock.fileno(),
    "cloexec": bool(fcntl.fcntl(sock.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC),
    "left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
}))
"""


@linux_only
def test_sd_listen_fds_protocol_in_a_child(folder: Path) -> None:
    held = _held_socket(folder / "h.sock")
    try:
        out = subprocess.run(
            [*HOLDER, sys.executable, "-c", CHILD],
            pass_fds=(held.fileno(),),
            env={**os.environ, "HELD_FD": str(held.fileno()), "LISTEN_FDNAMES": "Listener"},
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        held.close()
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got == {"path": str(folder / "h.sock"), "fd": 3, "cloexec": True, "left": []}


def _fake_launchd(fds: list[int], err: int = 0) -> tuple[object, object, list[object]]:
    """launch_activate_socket and free as ctypes functions: the array is malloc'd like libSystem's."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    calls: list[object] = []

    def activate(name: bytes, out_fds: object, out_count: object) -> int:
        calls.append(name)
        if err:
            return err
        array = ctypes.cast(libc.malloc(4 * len(fds)), ctypes.POINTER(ctypes.c_int))
        for i, fd in enumerate(fds):
            array[i] = fd
        out_fds[0] = array  # type: ignore[index]
        out_count[0] = len(fds)  # type: ignore[index]
        return 0

    def free(pointer: object) -> None:
        calls.append(("free", ctypes.cast(pointer, ctypes.c_void_p).value))
        libc.free(ctypes.cast(pointer, ctypes.c_void_p))

    return activation._ACTIVATE_PROTO(activate), free, calls


def test_launchd_path_takes_the_socket_named_in_the_plist(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = _held_socket(folder / "l.sock")
    fd = os.dup(held.fileno())
    fake, free, calls = _fake_launchd([fd])
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(activation, "_libsystem", lambda: (fake, free))
    sock = inherited_socket("Listener")
    try:
        assert sock is not None and sock.fileno() == fd
        assert sock.getsockname() == str(folder / "l.sock")
        assert calls[0] == b"Listener"
        assert calls[1][0] == "free" and calls[1][1]  # type: ignore[index]
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        with socket.socket(socket.AF_UNIX) as client:  # it is the listening socket itself
            client.connect(str(folder / "l.sock"))
            peer, _ = sock.accept()
            peer.close()
        assert inherited_socket(None) is None  # no name: not asked to take one
    finally:
        if sock is not None:
            sock.close()
        held.close()


def test_launchd_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    fake, free, _ = _fake_launchd([], errno.ESRCH)
    assert launchd_sockets("Listener", activate=fake, free=free) == []  # not a launchd job
    fake, free, _ = _fake_launchd([], errno.ENOENT)
    with pytest.raises(ActivationError, match="Sockets"):
        launchd_sockets("Nope", activate=fake, free=free)


def test_a_passed_descriptor_that_is_not_a_listening_socket_is_refused() -> None:
    a, b = socket.socketpair()
    try:
        with pytest.raises(ActivationError, match="listening Unix stream"):
            activation._listening_unix_socket(os.dup(a.fileno()))
    finally:
        a.close()
        b.close()


# --- the daemon under systemd-socket-activate -------------------------------------------


@needs_activate
def test_started_on_demand_answers_everything_sent_while_loading_then_idles_out_and_resumes(
    folder: Path, model_cache: Path
) -> None:
    prompts = {f"s{i}": f"Agent {i} asks about the weather in a far city." for i in range(4)}
    proc = _activated(folder, model_cache, "--idle-exit", "2s")
    replies: dict[str, dict[str, object]] = {}
    try:
        assert not proc.events("loading model")  # nothing runs until someone connects
        conns = {name: RawConnection(proc.socket) for name in prompts}
        for i, (name, prompt) in enumerate(prompts.items()):
            _generate(conns[name], i, prompt, name)
        conns["status"] = RawConnection(proc.socket)
        conns["status"].request(99, "status")
        assert not proc.events("serving")  # all of it sent while the daemon was starting
        for i, name in enumerate(prompts):
            replies[name] = _result(conns[name].reply(i))
        status = _result(conns["status"].reply(99))
        assert status["connections"] == 5
        for conn in conns.values():
            conn.close()
        # Idle: every session saved, a clean exit, no process left.
        assert proc.wait(30) == 0
        assert proc.events("idle: exiting")
        assert proc.events("sessions persisted")[-1]["saved"] == 4
    finally:
        proc.kill()
    assert proc.socket.exists()  # the service manager's: never unlinked by the daemon
    # The next connection starts it again; turn 2 comes from disk and equals a cold run.
    proc.socket.unlink()  # this stand-in manager binds anew each start
    proc = _activated(folder, model_cache, "--idle-exit", "2s")
    try:
        with Client(proc.socket) as client:
            follow = prompts["s1"] + str(replies["s1"]["text"]) + " And tomorrow?"
            resumed = client.generate(follow, session="s1", max_tokens=8)
            cold = client.generate(follow, max_tokens=8)
            assert resumed.usage.cached_tokens > 0
            assert resumed.tokens == cold.tokens
            assert client.status().details["sessions_restored"] >= 1
        assert proc.wait(30) == 0
    finally:
        proc.kill()


@needs_activate
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")
def test_peer_uid_check_holds_on_the_inherited_socket(folder: Path, model_cache: Path) -> None:
    proc = _activated(folder, model_cache)
    try:
        with Client(proc.socket) as client:
            assert client.status().state == "ok"
        folder.chmod(0o755)  # the service manager's socket opened up, as a bad mode would
        proc.socket.chmod(0o666)
        out = probe_as_nobody(proc.socket)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "b''"  # closed without an answer
        assert proc.wait_for("another user")
    finally:
        assert proc.stop() == 0


@needs_activate
def test_an_idle_open_connection_is_closed_at_idle_exit_unless_kept(
    folder: Path, model_cache: Path
) -> None:
    proc = _activated(folder, model_cache, "--idle-exit", "1s")
    try:
        conn = RawConnection(proc.socket)
        conn.request(1, "status")
        _result(conn.reply(1))
        assert proc.wait(30) == 0  # the editor's idle connection did not hold it
        assert conn.next() is rpc.CLOSED  # closed cleanly, nothing sent
        conn.close()
    finally:
        proc.kill()
    proc.socket.unlink()
    proc = _activated(folder, model_cache, "--idle-exit", "1s", "--idle-exit-keep-connections")
    try:
        conn = RawConnection(proc.socket)
        conn.request(1, "status")
        _result(conn.reply(1))
        with pytest.raises(subprocess.TimeoutExpired):
            proc.proc.wait(3)  # type: ignore[union-attr]
        conn.close()  # the last connection gone: idle from now
        assert proc.wait(30) == 0
    finally:
        proc.kill()


@needs_activate
def test_sigterm_while_idle_and_with_streams_in_flight(folder: Path, model_cache: Path) -> None:
    proc = _activated(folder, model_cache, "--idle-exit", "10m")
    try:
        idle = RawConnection(proc.socket)
        idle.request(1, "status")
        _result(idle.reply(1))
        streams = {f"st{i}": RawConnection(proc.socket) for i in range(2)}
        for i, (name, conn) in enumerate(streams.items()):
            _generate(conn, i, f"{name} tells a long story", name, max_tokens=400, stream=True)
        for conn in streams.values():
            event = conn.next()
            assert isinstance(event, rpc.Notification), event
        proc.signal(signal.SIGTERM)
        # Read every stream at once: a stream nobody reads would block on a full socket.
        with ThreadPoolExecutor(len(streams)) as pool:
            replies = list(pool.map(_reply_then_end, streams.values(), range(len(streams))))
        assert all(isinstance(r, rpc.Response) for r in replies)
        assert idle.next() is rpc.CLOSED
        for conn in [idle, *streams.values()]:
            conn.close()
        assert proc.wait(60) == 0
        assert proc.events("sessions persisted")[-1]["saved"] == 2
    finally:
        proc.kill()
    # Idle and nothing open: SIGTERM is a clean exit too.
    proc.socket.unlink()
    proc = _activated(folder, model_cache, "--idle-exit", "10m")
    try:
        with Client(proc.socket) as client:
            assert client.status().state == "ok"
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        proc.kill()


def _catches_sigterm(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) & (1 << (signal.SIGTERM - 1)))


@needs_activate
def test_sigterm_while_the_daemon_is_still_importing_is_a_clean_exit(
    folder: Path, model_cache: Path
) -> None:
    proc = _activated(folder, model_cache)
    try:
        conn = RawConnection(proc.socket)  # starts it
        proc.wait_for("Execing")
        assert proc.proc is not None
        deadline = time.monotonic() + 30
        while not _catches_sigterm(proc.proc.pid):  # the first thing `serve` does
            assert time.monotonic() < deadline
            time.sleep(0.005)
        proc.signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert not proc.events("loading model")  # it was still importing
        conn.close()
    finally:
        proc.kill()


def _stopped_while_loading(
    folder: Path, cache: Path, held: socket.socket, conns: list[RawConnection]
) -> bool:
    """SIGTERM once the daemon logs that it loads the model: exit 0 either way; True if the
    signal landed before it served (the tiny model loads in ~0.1 s: the test may lose)."""
    for i, conn in enumerate(conns):
        _generate(conn, i, f"queued {i}", None)
    proc = _held(folder, cache, held)
    try:
        proc.wait_for("loading model")
        proc.signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        return not proc.events("serving")
    finally:
        proc.kill()


@linux_only
def test_sigterm_during_the_model_load_leaves_queued_requests_to_the_next_start(
    folder: Path, model_cache: Path
) -> None:
    for attempt in range(3):
        path = folder / f"d{attempt}.sock"
        held = _held_socket(path)
        conns = [RawConnection(path) for _ in range(3)]
        try:
            if not _stopped_while_loading(folder, model_cache, held, conns):
                continue  # it was serving already: not the case under test, start over
            # The socket stayed with its owner, so the queued requests wait for the next
            # start, and each gets exactly one reply.
            proc = _held(folder, model_cache, held)
            try:
                for i, conn in enumerate(conns):
                    assert _result(conn.reply(i))["usage"]
                assert proc.stop() == 0
                for conn in conns:
                    _no_more_messages(conn)
            finally:
                proc.kill()
            return
        finally:
            for conn in conns:
                conn.close()
            held.close()
    raise AssertionError("SIGTERM never arrived during the model load in 3 tries")


def test_a_model_that_fails_to_load_raises_bare_from_run_daemon(folder: Path) -> None:
    # Signals are watched during the load (in a task group): its error must not come out
    # wrapped in an ExceptionGroup, or the CLI could not tell the user what went wrong.
    config = Config(model=str(folder / "missing"), socket=folder / "d.sock")
    config.state_dir = folder / "state"
    with pytest.raises(ModelLoadError, match="not found"):
        anyio.run(run_daemon, config)
    assert not (folder / "d.sock").exists()


# --- clients wait for a daemon that is starting -------------------------------------------


@pytest.mark.anyio
async def test_async_client_waits_then_says_the_daemon_did_not_start(
    anyio_backend: str, folder: Path
) -> None:
    started = time.monotonic()
    with pytest.raises(DaemonNotRunning, match=r"did not start within 0\.3 s"):
        await AsyncClient.connect(folder / "d.sock", wait=0.3)
    assert time.monotonic() - started >= 0.3


def _mlxd_generate(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "mlxd.daemon", "generate", "hi", "--socket", str(path), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_client_waits_for_the_daemon_to_start(folder: Path, model_cache: Path) -> None:
    path = folder / "d.sock"
    started = time.monotonic()
    with pytest.raises(DaemonNotRunning, match=r"within 0\.5 s"):
        Client(path, wait=0.5)
    assert time.monotonic() - started >= 0.5
    proc = DaemonProcess(folder, model_cache).spawn()  # binds a while after this
    try:
        with Client(path, wait=60) as client:
            assert client.status().state == "ok"
        out = _mlxd_generate(path, "--max-tokens", "2", "--wait", "30")
        assert out.returncode == 0, out.stderr
    finally:
        assert proc.stop() == 0
    out = _mlxd_generate(path, "--wait", "0.3")
    assert out.returncode == 1
    assert "did not start within 0.3 s" in out.stderr
