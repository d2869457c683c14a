"""The `mlxd` commands that only talk to a daemon (status, generate, chat, token): no MLX."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from mlxd.rpc import SocketPathTooLong, check_socket_path, default_socket_path

if TYPE_CHECKING:
    from . import Client

__all__ = ["COMMANDS", "Parser", "add_client_commands", "main", "run", "socket_default"]

COMMANDS = frozenset({"status", "generate", "chat", "token"})


class Parser(argparse.ArgumentParser):
    """Usage errors in one line (the usage itself is one `--help` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


class _OutputClosed(Exception):
    """Whoever read stdout went away (`mlxd status | head -1`): not the daemon's socket."""


def _write(text: str) -> None:
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError as exc:
        raise _OutputClosed from exc


def _token(args: argparse.Namespace) -> int:
    from mlxd.paths import load_token, state_dir

    folder = Path(args.state_dir).expanduser().absolute() if args.state_dir else state_dir()
    print(load_token(folder))
    return 0


def _client(args: argparse.Namespace) -> Client:
    from . import Client

    check_socket_path(args.socket)  # too long: one line from main(), not an OSError
    return Client(args.socket, wait=getattr(args, "wait", 0.0))


def _generate(args: argparse.Namespace) -> int:
    from . import RpcError
    from .chat import sanitize

    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.seed is not None:
        sampling["seed"] = args.seed
    try:
        with _client(args) as client:
            stream = client.stream(args.prompt, session=args.session, **sampling)
            # A terminal must not obey escape sequences a model emits; a pipe gets raw text.
            show = sanitize if sys.stdout.isatty() else str
            for delta in stream:
                _write(show(delta.text))
            result = stream.result
    except (RpcError, ConnectionError) as exc:
        print(f"\nmlxd: {exc}", file=sys.stderr)
        return 1
    _write("\n")
    if result is not None and args.verbose:
        usage, timings = result.usage, result.timings
        print(
            f"[{usage.prompt_tokens} prompt tokens ({usage.cached_tokens} cached), "
            f"{usage.completion_tokens} generated, ttft {timings.ttft_ms:.0f} ms, "
            f"{timings.tokens_per_s:.1f} tok/s, {result.finish_reason}]",
            file=sys.stderr,
        )
    return 0


def _status(args: argparse.Namespace) -> int:
    import msgspec

    from . import RpcError

    try:
        with _client(args) as client:
            status = client.status()
    except (RpcError, ConnectionError) as exc:
        print(f"mlxd: {exc}", file=sys.stderr)
        return 1
    _write(json.dumps(msgspec.to_builtins(status), indent=2) + "\n")
    return 0


def _chat(args: argparse.Namespace) -> int:
    from .chat import run_chat

    return run_chat(args)


def socket_default() -> str:
    try:
        return str(default_socket_path())
    except SocketPathTooLong as exc:  # a too-long $MLXD_SOCKET: said when a command uses it
        return os.environ.get("MLXD_SOCKET", str(exc))


def add_client_commands(sub: Any, socket_default: str) -> None:
    """Add token, generate, status and chat to the `mlxd` subcommands `sub`."""
    token = sub.add_parser("token", help="print the API token the HTTP port requires")
    token.add_argument("--state-dir", help="the daemon's state folder")
    token.set_defaults(func=_token)

    gen = sub.add_parser("generate", help="stream a completion to the terminal")
    gen.add_argument("prompt")
    gen.add_argument("--socket", default=socket_default)
    gen.add_argument("--session")
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("-v", "--verbose", action="store_true", help="print usage and timings")
    gen.add_argument(
        "--wait",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="wait this long for a daemon that is starting (default 30)",
    )
    gen.set_defaults(func=_generate)

    status = sub.add_parser("status", help="print the daemon's status as JSON")
    status.add_argument("--socket", default=socket_default)
    status.set_defaults(func=_status)

    chat = sub.add_parser("chat", help="chat with the model in the terminal")
    chat.add_argument("--socket", default=socket_default)
    chat.add_argument("--session", help="keep the conversation under this name, to resume it")
    chat.add_argument("--max-tokens", type=int, default=512, help="per reply")
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.add_argument("--system", help="system prompt (replaces a resumed one)")
    chat.set_defaults(func=_chat)


def run(args: argparse.Namespace) -> int:
    """Run the parsed command; a too-long socket path is one line, not a traceback."""
    try:
        return int(args.func(args))
    except SocketPathTooLong as exc:
        print(f"mlxd: {exc}", file=sys.stderr)
        return 1
    except _OutputClosed:
        # Stop quietly, as a tool killed by SIGPIPE does; what is still buffered would
        # fail again when Python flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="mlxd", description="A local LLM inference sidecar.")
    add_client_commands(parser.add_subparsers(dest="command", required=True), socket_default())
    return run(parser.parse_args(argv))
