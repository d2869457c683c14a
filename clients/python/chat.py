"""`mlxd chat`: an interactive chat in the terminal, through the daemon (mlxd.client only).

The conversation is a list of messages sent whole each turn with a daemon session, so the
daemon prefills only the new turn. With `--session NAME` the transcript is also kept in
`<state folder>/chats/NAME.json` ($MLXD_STATE_DIR, else the user state folder), and the
next `mlxd chat --session NAME` resumes it. Ctrl-C during a reply cancels the reply;
Ctrl-D or /quit leaves.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from mlxd.client import Client, RequestCancelled, RpcError
from mlxd.durable import write_atomic
from mlxd.paths import state_dir

__all__ = ["chats_dir", "run_chat", "sanitize"]

SESSION_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
HELP = "/quit (or Ctrl-D) leaves, /history shows the conversation, /reset starts it over"

# Terminal control characters a model may emit (ESC could rewrite the screen): shown as
# their Unicode control pictures, or U+FFFD for DEL and the C1 range. Newline and tab stay.
_CONTROL = {c: 0x2400 + c for c in range(0x20) if c not in (0x09, 0x0A)}
_CONTROL.update({c: 0xFFFD for c in range(0x7F, 0xA0)})


def sanitize(text: str) -> str:
    """The text as printed: control characters other than newline and tab made visible."""
    return text.translate(_CONTROL)


def chats_dir() -> Path:
    return state_dir() / "chats"


# -- transcript ----------------------------------------------------------------------


def _load(path: Path) -> list[dict[str, str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    messages = data.get("messages") if isinstance(data, dict) else None
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    ):
        raise ValueError(f"{path} is not an mlxd chat transcript")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _save(path: Path, session: str, messages: list[dict[str, str]]) -> None:
    """Write atomically and durably, readable by the user only."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    text = json.dumps({"version": 1, "session": session, "messages": messages}, indent=1)
    write_atomic(path, (text + "\n").encode("utf-8"), mode=0o600)


# -- Ctrl-C during a reply -----------------------------------------------------------


class _CancelOnInterrupt:
    """While installed, the first SIGINT cancels the request instead of raising.

    The $/cancelRequest goes out from a thread (Client.cancel is safe from another
    thread), so the interrupted read is never torn; the stream then ends with the
    daemon's -32800 reply. A second SIGINT raises KeyboardInterrupt as usual.
    """

    def __init__(self, client: Client) -> None:
        self.client = client
        self.request_id: int | None = None
        self.requested = False
        self._sent = False
        self._previous: Callable[[int, FrameType | None], Any] | int | None = None

    def __enter__(self) -> _CancelOnInterrupt:
        self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def started(self, request_id: int) -> None:
        self.request_id = request_id
        if self.requested:
            self._send()

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.request_id is not None:
            self._send()

    def _send(self) -> None:
        if self._sent or self.request_id is None:
            return
        self._sent = True
        request_id = self.request_id

        def cancel() -> None:
            with contextlib.suppress(Exception):  # the stream's end reports what happened
                self.client.cancel(request_id)

        threading.Thread(target=cancel, name="mlxd-chat-cancel", daemon=True).start()


# -- the chat ------------------------------------------------------------------------


class Chat:
    def __init__(self, args: argparse.Namespace, out: TextIO) -> None:
        self.args = args
        self.out = out
        self.color = out.isatty() and not os.environ.get("NO_COLOR")
        self.named = args.session is not None
        self.session: str = args.session or f"chat-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.path = chats_dir() / f"{self.session}.json" if self.named else None
        self.messages: list[dict[str, str]] = []

    # output
    def dim(self, text: str) -> None:
        self.out.write(f"\x1b[2m{text}\x1b[0m\n" if self.color else f"{text}\n")
        self.out.flush()

    def save(self) -> None:
        if self.path is not None:
            _save(self.path, self.session, self.messages)

    def start(self) -> None:
        if self.path is not None:
            self.messages = _load(self.path)
        system = self.args.system
        has_system = bool(self.messages) and self.messages[0]["role"] == "system"
        if system is not None:
            if has_system:
                self.messages[0]["content"] = system
            else:
                self.messages.insert(0, {"role": "system", "content": system})
        turns = sum(1 for m in self.messages if m["role"] != "system")
        if turns:
            self.dim(f"[resumed {self.session}: {turns} messages; {HELP}]")
        elif sys.stdin.isatty():
            self.dim(f"[{HELP}]")

    def command(self, line: str, client: Client) -> bool:
        """Run a /command; False to leave the chat."""
        name = line.split()[0]
        if name in ("/quit", "/exit", "/q"):
            return False
        if name == "/history":
            for m in self.messages:
                self.out.write(f"{m['role']}: {sanitize(m['content'])}\n")
            self.out.flush()
        elif name == "/reset":
            self.messages = [m for m in self.messages[:1] if m["role"] == "system"]
            with contextlib.suppress(RpcError):
                client.sessions_delete(self.session)
            self.save()
            self.dim("[the conversation starts over]")
        else:
            self.dim(f"[unknown command {name}; {HELP}]")
        return True

    def turn(self, client: Client, text: str) -> None:
        """One user message and the streamed reply; Ctrl-C cancels the reply."""
        self.messages.append({"role": "user", "content": text})
        pieces: list[str] = []
        result = None
        cancelled: RequestCancelled | None = None
        with _CancelOnInterrupt(client) as interrupt:
            stream = client.stream(
                messages=self.messages,
                session=self.session,
                max_tokens=self.args.max_tokens,
                temperature=self.args.temperature,
            )
            interrupt.started(stream.id)
            try:
                for delta in stream:
                    pieces.append(delta.text)
                    self.out.write(sanitize(delta.text))
                    self.out.flush()
                result = stream.result
            except RequestCancelled as exc:
                cancelled = exc
            except RpcError as exc:
                self.messages.pop()
                self.out.write("\n" if pieces else "")
                print(f"mlxd: {exc.message} ({exc.name})", file=sys.stderr)
                return
        self.out.write("\n")
        if result is not None:
            self.messages.append({"role": "assistant", "content": result.text})
            usage, timings = result.usage, result.timings
            self.dim(
                f"[{timings.tokens_per_s:.1f} tok/s · {usage.cached_tokens} cached · "
                f"{usage.completion_tokens} tokens · ttft {timings.ttft_ms:.0f} ms"
                f"{' · max tokens reached' if result.finish_reason == 'length' else ''}]"
            )
        else:
            self.after_cancel(cancelled, "".join(pieces))
        self.save()

    def after_cancel(self, error: RequestCancelled | None, printed: str) -> None:
        """Keep the reply so far in the conversation (the session holds it too)."""
        partial = (error.text if error is not None else "") or printed
        if partial:
            self.messages.append({"role": "assistant", "content": partial})
        else:
            self.messages.pop()
        usage = error.usage if error is not None else None
        if usage is None:  # cancelled before it started: the daemon reports no usage
            self.dim("[cancelled]")
        else:
            self.dim(
                f"[cancelled · {usage.cached_tokens} cached · {usage.completion_tokens} tokens]"
            )

    def read_line(self) -> Iterator[str]:
        """User lines until Ctrl-D; Ctrl-C at the prompt just clears the line."""
        prompt = "> " if sys.stdin.isatty() else ""
        while True:
            try:
                yield input(prompt)
            except EOFError:
                if prompt:
                    self.out.write("\n")
                return
            except KeyboardInterrupt:
                self.out.write("\n")


def run_chat(args: argparse.Namespace) -> int:
    if args.session is not None and not SESSION_NAME.match(args.session):
        print("mlxd: --session must match [A-Za-z0-9._-]{1,128}", file=sys.stderr)
        return 2
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
    chat = Chat(args, sys.stdout)
    try:
        chat.start()
    except (OSError, ValueError) as exc:
        print(f"mlxd: cannot read the transcript: {exc}", file=sys.stderr)
        return 1
    try:
        with Client(args.socket) as client:
            for line in chat.read_line():
                text = line.strip()
                if not text:
                    continue
                if text.startswith("/"):
                    if not chat.command(text, client):
                        break
                    continue
                chat.turn(client, text)
            with contextlib.suppress(RpcError, OSError):
                if chat.named:  # on disk too, should the daemon stop uncleanly
                    client.sessions_save(chat.session)
                else:  # nobody can resume it
                    client.sessions_delete(chat.session)
    except KeyboardInterrupt:  # a second Ctrl-C while a reply was being cancelled
        sys.stdout.write("\n")
        return 130
    except (OSError, ValueError) as exc:  # ConnectionClosed, SocketPathTooLong, disk errors
        print(f"\nmlxd: {exc}", file=sys.stderr)
        return 1
    return 0
