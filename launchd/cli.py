"""The install, uninstall, restart and service-status subcommands of the mlxd CLI."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path

from mlxd.rpc.transport import default_socket_path

from .plist import DEFAULT_IDLE_EXIT_S, DEFAULT_LABEL, ServiceConfig, default_python
from .service import ServiceError, ServiceManager, manager_for_platform

__all__ = ["add_service_commands"]

Handler = Callable[[argparse.Namespace], int]


def _errors_to_exit_codes(handler: Handler) -> Handler:
    @functools.wraps(handler)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except ValueError as exc:  # a bad option value: the config refused it
            print(f"mlxd: error: {exc}", file=sys.stderr)
            return 2
        except ServiceError as exc:
            print(f"mlxd: error: {exc}", file=sys.stderr)
            return 1

    return wrapper


def _idle_exit_s(args: argparse.Namespace) -> float:
    text = getattr(args, "idle_exit", None)
    if text is None:
        return DEFAULT_IDLE_EXIT_S
    from mlxd.daemon.service.idle import parse_duration  # the daemon's own reading of it

    return parse_duration(text)


def _config(args: argparse.Namespace) -> ServiceConfig:
    extra = ["--model", args.model] if getattr(args, "model", None) else []
    return ServiceConfig(
        label=args.label,
        python=getattr(args, "python", None) or default_python(),
        # Absolute now: the service manager starts the daemon from '/'.
        socket=Path(getattr(args, "socket", None) or default_socket_path()).expanduser().absolute(),
        drain_timeout_s=getattr(args, "drain_timeout", 20.0),
        extra_args=extra,
        activation=getattr(args, "activation", True),
        idle_exit_s=_idle_exit_s(args),
    )


def _manager(args: argparse.Namespace) -> ServiceManager:
    return manager_for_platform(
        _config(args), args.platform, dry_run=getattr(args, "dry_run", False), out=sys.stdout
    )


@_errors_to_exit_codes
def _install(args: argparse.Namespace) -> int:
    mgr = _manager(args)
    mgr.install()
    if not mgr.dry_run:
        how = "starts on the first connection to" if mgr.config.activation else "listens on"
        print(f"installed {mgr.definition_path}; the daemon {how} {mgr.config.socket}")
    return 0


@_errors_to_exit_codes
def _uninstall(args: argparse.Namespace) -> int:
    mgr = _manager(args)
    mgr.uninstall()
    if not mgr.dry_run:
        print(f"uninstalled {mgr.definition_path}")
    return 0


@_errors_to_exit_codes
def _restart(args: argparse.Namespace) -> int:
    mgr = _manager(args)
    mgr.restart()
    if not mgr.dry_run:
        print(f"restarted {mgr.config.label}")
    return 0


@_errors_to_exit_codes
def _status(args: argparse.Namespace) -> int:
    st = _manager(args).status()
    if st.output:
        print(st.output)
    state = "running" if st.running else "loaded, not running" if st.loaded else "not loaded"
    installed = "installed" if st.installed else "not installed"
    print(f"mlxd service: {installed}, {state}")
    # 3 is "program is not running" for LSB init scripts and systemctl status alike.
    return 0 if st.running else 3


def _common(p: argparse.ArgumentParser, *, dry_run: bool = True) -> None:
    p.add_argument(
        "--label", default=DEFAULT_LABEL, help=f"service label (default {DEFAULT_LABEL})"
    )
    p.add_argument(
        "--platform",
        choices=["launchd", "systemd"],
        default=None,
        help="service manager to use (default: launchd on macOS, systemd on Linux)",
    )
    if dry_run:
        p.add_argument(
            "--dry-run",
            action="store_true",
            help="print the file that would be written and the commands that would run",
        )


def add_service_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register install, uninstall, restart and service-status; each sets func(args) -> int."""
    p = subparsers.add_parser(
        "install",
        help="install the daemon as a per-user service and start it",
        description="Write the LaunchAgent plist (macOS) or systemd user unit (Linux), "
        "load it and start the daemon. Running it again replaces the service.",
    )
    _common(p)
    p.add_argument(
        "--socket",
        type=Path,
        default=None,
        help="socket path (default: $MLXD_SOCKET or the per-user runtime folder)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=20.0,
        metavar="SECONDS",
        help="seconds to let requests finish after a stop (default 20)",
    )
    p.add_argument("--model", default=None, help="model the daemon loads (default: its own)")
    p.add_argument(
        "--python",
        default=None,
        metavar="PATH",
        help="interpreter that runs the daemon (default: this one)",
    )
    p.add_argument(
        "--no-activation",
        dest="activation",
        action="store_false",
        help="run always (started at login, kept alive) instead of on the first connection",
    )
    p.add_argument(
        "--idle-exit",
        default=None,
        metavar="DURATION",
        help="on demand: exit after this long with nothing to do, e.g. 15m (the default)",
    )
    p.set_defaults(func=_install)

    p = subparsers.add_parser("uninstall", help="stop the service and remove it")
    _common(p)
    p.set_defaults(func=_uninstall)

    p = subparsers.add_parser("restart", help="restart the service (the daemon drains first)")
    _common(p)
    p.set_defaults(func=_restart)

    p = subparsers.add_parser(
        "service-status", help="what launchd or systemd says about the daemon"
    )
    _common(p, dry_run=False)
    p.set_defaults(func=_status)
