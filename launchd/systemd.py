"""The systemd user unit that runs the daemon on Linux, with systemd's own quoting."""

from __future__ import annotations

from .plist import (
    DEFAULT_LABEL,
    SOCKET_MODE,
    SOCKET_NAME,
    THROTTLE_INTERVAL_S,
    ServiceConfig,
    exit_timeout_s,
    program_arguments,
)

__all__ = [
    "DEFAULT_UNIT_NAME",
    "exec_line",
    "quote_env_assignment",
    "quote_exec_arg",
    "render_socket_unit",
    "render_unit",
    "socket_unit_name",
    "unit_name",
]

DEFAULT_UNIT_NAME = "mlxd.service"

# Escapes systemd's C-unescaping understands inside a quoted word.
_C_ESCAPES = {
    "\\": "\\\\",
    '"': '\\"',
    "\n": "\\n",
    "\t": "\\t",
    "\r": "\\r",
    "\a": "\\a",
    "\b": "\\b",
    "\f": "\\f",
    "\v": "\\v",
}
# Words made only of these need no quotes; anything else (whitespace, quotes, backslash,
# a lone ';' that would separate commands, non-ASCII) is double-quoted.
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/._,=+-:@")


def unit_name(label: str) -> str:
    """mlxd.service for the default label, else <label>.service (so instances can coexist)."""
    return DEFAULT_UNIT_NAME if label == DEFAULT_LABEL else f"{label}.service"


def socket_unit_name(service: str) -> str:
    """mlxd.socket for mlxd.service: the same name, so the socket activates that service."""
    return service.removesuffix(".service") + ".socket"


def _escape_char(c: str) -> str:
    if c in _C_ESCAPES:
        return _C_ESCAPES[c]
    return f"\\x{ord(c):02x}" if ord(c) < 0x20 or c == "\x7f" else c


def _quote(word: str) -> str:
    """One word in systemd's unit-file syntax: quoted when needed, %-specifiers escaped."""
    if "\0" in word:
        raise ValueError(f"a NUL byte cannot be passed to a process: {word!r}")
    if word and all(c in _SAFE for c in word):
        quoted = word
    else:
        quoted = '"' + "".join(_escape_char(c) for c in word) + '"'
    # Specifiers (%h, %u, ...) are expanded inside the word as well: %% is a literal %.
    return quoted.replace("%", "%%")


def quote_exec_arg(arg: str) -> str:
    """An ExecStart= argument that systemd hands to the process unchanged."""
    # ExecStart expands $VAR and ${VAR} at exec time, even inside quotes; $$ is a literal $.
    return _quote(arg.replace("$", "$$"))


def exec_line(argv: list[str]) -> str:
    """An ExecStart= value for argv; argv[0] must be an absolute path."""
    # systemd reads a leading @ - : + ! of the first word as a flag, quoted or not, so
    # only an absolute path is safe there.
    if not argv or not argv[0].startswith("/"):
        raise ValueError(f"the executable must be an absolute path, got {argv[:1]!r}")
    return " ".join(quote_exec_arg(a) for a in argv)


def quote_env_assignment(name: str, value: str) -> str:
    """An Environment= assignment (no $-expansion there, only specifiers and quoting)."""
    return _quote(f"{name}={value}")


def render_unit(cfg: ServiceConfig) -> str:
    """The service unit text for ~/.config/systemd/user/<unit>."""
    env = {"MLXD_SOCKET": str(cfg.socket), **cfg.env}
    lines = ["[Unit]", "Description=mlxd local LLM inference daemon"]
    if cfg.activation:
        # Started by its socket on the first connection; never on its own, so no [Install].
        socket_unit = socket_unit_name(unit_name(cfg.label))
        lines += [f"Requires={socket_unit}", f"After={socket_unit}"]
    lines += [
        "",
        "[Service]",
        "Type=simple",
        f"ExecStart={exec_line(program_arguments(cfg))}",
        *(f"Environment={quote_env_assignment(k, v)}" for k, v in env.items()),
    ]
    if cfg.working_dir is not None:
        lines.append(f"WorkingDirectory={_quote(str(cfg.working_dir))}")
    lines += [
        # Like launchd's KeepAlive {SuccessfulExit: false}: a clean drained exit stays down.
        "Restart=on-failure",
        f"RestartSec={THROTTLE_INTERVAL_S}",
        "KillSignal=SIGTERM",
        # SIGTERM starts the drain; SIGKILL only after the drain plus time to persist sessions.
        f"TimeoutStopSec={exit_timeout_s(cfg)}",
        "",
    ]
    if not cfg.activation:
        lines += ["[Install]", "WantedBy=default.target", ""]
    return "\n".join(lines)


def render_socket_unit(cfg: ServiceConfig) -> str:
    """The socket unit that owns the daemon's socket and starts it on the first connection."""
    path = str(cfg.socket)
    if any(c in path for c in "\n\r\\") or path != path.strip():
        raise ValueError(
            f"systemd cannot listen on {path!r}: no newlines, backslashes or edge spaces"
        )
    return "\n".join(
        [
            "[Unit]",
            "Description=mlxd socket: starts the daemon on the first connection",
            "",
            "[Socket]",
            # ListenStream= takes the rest of the line as the path; only specifiers expand.
            f"ListenStream={path.replace('%', '%%')}",
            f"SocketMode={SOCKET_MODE:04o}",
            "DirectoryMode=0700",
            f"FileDescriptorName={SOCKET_NAME}",
            f"Service={unit_name(cfg.label)}",
            "",
            "[Install]",
            "WantedBy=sockets.target",
            "",
        ]
    )
