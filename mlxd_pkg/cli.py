"""The `mlxd` entry point: a client command runs without the daemon package (no MLX)."""

from __future__ import annotations

import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    from mlxd.client.cli import COMMANDS

    if args and args[0] in COMMANDS:
        from mlxd.client.cli import main as run
    else:  # serve, service, --help: the daemon's parser, which knows every command
        from mlxd.daemon.cli import main as run
    return run(args)
