"""The service's configuration and the launchd LaunchAgent property list built from it."""

from __future__ import annotations

import math
import os
import plistlib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlxd.rpc.transport import check_socket_path, default_socket_path

__all__ = [
    "DEFAULT_IDLE_EXIT_S",
    "DEFAULT_LABEL",
    "EXIT_MARGIN_S",
    "SOCKET_NAME",
    "ServiceConfig",
    "build_plist",
    "default_python",
    "exit_timeout_s",
    "program_arguments",
    "render_plist",
]

DEFAULT_LABEL = "dev.mlxd.daemon"
# Time on top of the drain deadline for persisting every hot session and removing the
# socket; launchd (ExitTimeOut) and systemd (TimeoutStopSec) SIGKILL after the total.
EXIT_MARGIN_S = 15
THROTTLE_INTERVAL_S = 10
# The plist's Sockets key (and the systemd socket's FileDescriptorName) the daemon asks for.
SOCKET_NAME = "Listener"
DEFAULT_IDLE_EXIT_S = 15 * 60.0  # on demand: the model's memory comes back after a quiet spell
SOCKET_MODE = 0o600
# launchd starts agents with PATH=/usr/bin:/bin:/usr/sbin:/sbin; Homebrew lives elsewhere.
BASE_PATH = ("/opt/homebrew/bin", "/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin")
# The label names a file (<label>.plist, <label>.service): no slashes, no spaces.
_LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def default_python() -> str:
    """The running interpreter as an absolute path, symlinks kept."""
    # Not resolve(): a venv's bin/python is a symlink to the base interpreter, and only
    # the symlinked path finds pyvenv.cfg and so the venv's site-packages.
    return str(Path(sys.executable).absolute())


def _default_log_dir() -> Path:
    return Path.home() / "Library" / "Logs" / "mlxd"


@dataclass
class ServiceConfig:
    """What the installed service runs: interpreter, socket, drain deadline, extra daemon args."""

    label: str = DEFAULT_LABEL
    python: str = field(default_factory=default_python)
    socket: Path = field(default_factory=default_socket_path)
    drain_timeout_s: float = 20.0
    extra_args: list[str] = field(default_factory=list)
    log_dir: Path = field(default_factory=_default_log_dir)
    env: dict[str, str] = field(default_factory=dict)
    working_dir: Path | None = None
    # On demand: the service manager owns the socket and starts the daemon on the first
    # connection; the daemon exits (sessions saved) after `idle_exit`. False: always on.
    activation: bool = True
    idle_exit_s: float = DEFAULT_IDLE_EXIT_S

    def __post_init__(self) -> None:
        self.socket = Path(self.socket)
        self.log_dir = Path(self.log_dir)
        if not _LABEL_RE.fullmatch(self.label):
            raise ValueError(f"label {self.label!r} must be letters, digits, '.', '_' or '-'")
        # launchd and systemd start the daemon from '/', so relative paths would move.
        if not os.path.isabs(self.python):
            raise ValueError(f"python must be an absolute path, got {self.python!r}")
        if not self.socket.is_absolute():
            raise ValueError(f"socket must be an absolute path, got {str(self.socket)!r}")
        check_socket_path(self.socket)
        if not (math.isfinite(self.drain_timeout_s) and self.drain_timeout_s > 0):
            raise ValueError(f"drain timeout must be a positive number, got {self.drain_timeout_s}")
        if not (math.isfinite(self.idle_exit_s) and self.idle_exit_s > 0):
            raise ValueError(f"idle exit must be a positive number, got {self.idle_exit_s}")
        for name in self.env:
            if not _ENV_NAME_RE.fullmatch(name):
                raise ValueError(f"environment variable name {name!r} is not valid")
        reserved_args = ["--socket", "--drain-timeout"]
        if self.activation:
            reserved_args += ["--idle-exit", "--activation-socket"]
        for reserved in reserved_args:
            if any(a == reserved or a.startswith(reserved + "=") for a in self.extra_args):
                raise ValueError(f"{reserved} is set from the config, not from extra_args")


def exit_timeout_s(cfg: ServiceConfig) -> int:
    """Seconds the service manager waits after SIGTERM: the drain plus time to persist."""
    return math.ceil(cfg.drain_timeout_s) + EXIT_MARGIN_S


def _duration(seconds: float) -> str:
    return f"{seconds / 60:g}m" if seconds % 60 == 0 else f"{seconds:g}s"


def program_arguments(cfg: ServiceConfig) -> list[str]:
    """The daemon's full argv; the drain deadline is passed so it agrees with ExitTimeOut."""
    return [
        cfg.python,
        "-m",
        "mlxd.daemon",
        "serve",
        "--socket",
        str(cfg.socket),
        "--drain-timeout",
        f"{cfg.drain_timeout_s:g}",
        *(
            ["--activation-socket", SOCKET_NAME, "--idle-exit", _duration(cfg.idle_exit_s)]
            if cfg.activation
            else []
        ),
        *cfg.extra_args,
    ]


def _path_env(cfg: ServiceConfig) -> str:
    # The interpreter's own bin folder first, so console scripts of its venv are found.
    parts = [str(Path(cfg.python).parent), *BASE_PATH]
    return ":".join(dict.fromkeys(parts))


def build_plist(cfg: ServiceConfig) -> dict[str, Any]:
    """The LaunchAgent as a dict, ready for plistlib."""
    env = {"PATH": _path_env(cfg), "MLXD_SOCKET": str(cfg.socket), **cfg.env}
    plist: dict[str, Any] = {
        "Label": cfg.label,
        "ProgramArguments": program_arguments(cfg),
        "ThrottleInterval": THROTTLE_INTERVAL_S,
        "ExitTimeOut": exit_timeout_s(cfg),
        # Not "Background": App Nap and throttled I/O would slow every token.
        "ProcessType": "Interactive",
        "EnvironmentVariables": env,
        "StandardOutPath": str(cfg.log_dir / "mlxd.out.log"),
        "StandardErrorPath": str(cfg.log_dir / "mlxd.err.log"),
    }
    if cfg.activation:
        # launchd binds the socket and starts the job on the first connection; no KeepAlive,
        # no RunAtLoad: after an idle exit it stays down until someone connects again.
        plist["Sockets"] = {
            SOCKET_NAME: {
                "SockPathName": str(cfg.socket),
                "SockPathMode": SOCKET_MODE,  # an integer: plists have no octal
                "SockType": "stream",
            }
        }
    else:
        plist["RunAtLoad"] = True
        # Restart after a crash, but a clean exit (drained after SIGTERM) stays down.
        plist["KeepAlive"] = {"SuccessfulExit": False}
    if cfg.working_dir is not None:
        plist["WorkingDirectory"] = str(cfg.working_dir)
    return plist


def render_plist(cfg: ServiceConfig) -> bytes:
    """The LaunchAgent as XML plist bytes."""
    return plistlib.dumps(build_plist(cfg), fmt=plistlib.FMT_XML, sort_keys=True)
