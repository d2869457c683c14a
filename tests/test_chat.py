"""`mlxd chat` as a user runs it: a subprocess fed lines on stdin, against a real daemon."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mlxd.client import Client
from mlxd.client.chat import sanitize

from .daemon_proc import DaemonProcess

STATUS = re.compile(
    r"\[(?P<tps>[\d.]+) tok/s · (?P<cached>\d+) cached · (?P<tokens>\d+) tokens"
    r" · ttft (?P<ttft>\d+) ms(?: · max tokens reached)?\]\n"
)
CANCELLED = re.compile(r"\[cancelled · (?P<cached>\d+) cached · (?P<tokens>\d+) tokens\]\n")


def chat_argv(daemon: DaemonProcess, *args: str) -> list[str]:
    return [sys.executable, "-m", "mlxd.daemon", "chat", "--socket", str(daemon.socket), *args]


def chat_env(state: Path) -> dict[str, str]:
    env = dict(os.environ, MLXD_STATE_DIR=str(state))
    env.pop("MLXD_SOCKET", None)
    env.pop("NO_COLOR", None)
    return env


def run_chat(daemon: DaemonProcess, state: Path, lines: str, *args: str) -> str:
    proc = subprocess.run(
        chat_argv(daemon, *args),
        input=lines.encode(),
        capture_output=True,
        env=chat_env(state),
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def replies(stdout: str) -> list[tuple[str, re.Match[str]]]:
    """(printed reply, its status line) for each turn in the output."""
    found, start = [], 0
    for match in STATUS.finditer(stdout):
        found.append((stdout[start : match.start()], match))
        start = match.end()
    return found


def test_a_named_chat_resumes_its_transcript_and_the_daemon_cache(
    daemon: DaemonProcess, short_dir: Path
) -> None:
    state = short_dir / "state"
    args = ("--session", "resume-me", "--max-tokens", "12", "--system", "Be brief.")
    out1 = run_chat(daemon, state, "hello\nsecond question\n", *args)
    turns = replies(out1)
    assert len(turns) == 2
    assert turns[0][1]["cached"] == "0"  # a new session
    assert all(int(m["tokens"]) == 12 for _, m in turns)

    transcript = state / "chats" / "resume-me.json"
    saved = json.loads(transcript.read_text())
    assert oct(transcript.stat().st_mode & 0o777) == "0o600"
    roles = [m["role"] for m in saved["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in saved["messages"][:2]] == ["Be brief.", "hello"]
    # What was printed is the reply (control characters made visible), then a newline.
    assert turns[0][0] == sanitize(saved["messages"][2]["content"]) + "\n"
    assert turns[1][0] == sanitize(saved["messages"][4]["content"]) + "\n"

    out2 = run_chat(daemon, state, "and a third\n", "--session", "resume-me", "--max-tokens", "12")
    assert out2.startswith("[resumed resume-me: 4 messages;")
    (_, status), = replies(out2)  # fmt: skip
    assert int(status["cached"]) > 0  # the daemon kept the session's cache
    saved = json.loads(transcript.read_text())
    assert len(saved["messages"]) == 7
    assert saved["messages"][0] == {"role": "system", "content": "Be brief."}
    assert saved["messages"][5] == {"role": "user", "content": "and a third"}


def test_an_unnamed_chat_leaves_nothing_behind(daemon: DaemonProcess, short_dir: Path) -> None:
    state = short_dir / "state"
    with Client(daemon.socket) as client:
        before = {s.session for s in client.sessions_list()}
    out = run_chat(daemon, state, "hi\n/history\n/quit\nnot sent\n", "--max-tokens", "4")
    assert len(replies(out)) == 1
    assert "user: hi\nassistant: " in out
    assert not (state / "chats").exists()
    with Client(daemon.socket) as client:
        assert {s.session for s in client.sessions_list()} <= before


class _Output:
    """A child's stdout, read by a thread, that a test can wait on without sleeping."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self._stream = proc.stdout
        self._data = b""
        self._eof = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        fd = self._stream.fileno()
        while chunk := os.read(fd, 4096):
            with self._changed:
                self._data += chunk
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def join(self) -> None:
        self._thread.join(20)

    def wait_for(self, predicate: object, timeout: float = 20.0) -> str:
        assert callable(predicate)
        with self._changed:
            ok = self._changed.wait_for(lambda: predicate(self._data) or self._eof, timeout)
            text = self._data.decode("utf-8", "replace")
        assert ok and predicate(self._data), f"no such output; got {text!r}"
        return text


def test_ctrl_c_cancels_the_reply_and_the_chat_goes_on(
    daemon: DaemonProcess, short_dir: Path
) -> None:
    state = short_dir / "state"
    with subprocess.Popen(
        chat_argv(daemon, "--session", "cancel-me", "--max-tokens", "2000"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=chat_env(state),
    ) as proc:
        assert proc.stdin is not None and proc.stderr is not None
        output = _Output(proc)
        try:
            proc.stdin.write(b"tell me a long story\n")
            proc.stdin.flush()
            output.wait_for(lambda data: len(data) > 0)  # the reply is streaming
            proc.send_signal(signal.SIGINT)
            output.wait_for(lambda data: b"[cancelled" in data and data.endswith(b"]\n"))
            # Still chatting: the next lines are read and answered.
            proc.stdin.write(b"/history\n/quit\n")
            proc.stdin.close()
            assert proc.wait(20) == 0, proc.stderr.read().decode()
        finally:
            if proc.poll() is None:
                proc.kill()
            output.join()
    text = output.wait_for(lambda data: b"user: tell me a long story" in data)
    match = CANCELLED.search(text)
    assert match is not None, text
    assert 0 < int(match["tokens"]) < 2000
    saved = json.loads((state / "chats" / "cancel-me.json").read_text())["messages"]
    assert [m["role"] for m in saved] == ["user", "assistant"]
    partial = saved[1]["content"]
    assert partial  # the reply so far stays in the conversation
    assert text[: match.start()] == sanitize(partial) + "\n"

    # The cancelled turn is in the daemon's session: a resumed chat reuses it.
    out = run_chat(daemon, state, "go on\n", "--session", "cancel-me", "--max-tokens", "4")
    (_, status), = replies(out)  # fmt: skip
    assert int(status["cached"]) > 0


def test_no_daemon_is_a_clear_error(short_dir: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mlxd.daemon", "chat", "--socket", str(short_dir / "none.sock")],
        input=b"hi\n",
        capture_output=True,
        env=chat_env(short_dir / "state"),
        timeout=30,
    )
    assert proc.returncode == 1
    assert b"mlxd is not running" in proc.stderr


@pytest.mark.parametrize("name", ["../evil", "a/b", ""])
def test_bad_session_names_are_refused(short_dir: Path, name: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mlxd.daemon", "chat", "--session", name],
        input=b"",
        capture_output=True,
        env=chat_env(short_dir / "state"),
        timeout=30,
    )
    assert proc.returncode == 2
    assert b"--session must match" in proc.stderr
