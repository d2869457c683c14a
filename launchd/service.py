"""Installing, removing, restarting and querying the daemon under launchd or systemd --user."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TextIO

from mlxd.durable import write_atomic

from .plist import ServiceConfig, exit_timeout_s, render_plist
from .systemd import render_socket_unit, render_unit, socket_unit_name, unit_name

__all__ = [
    "LaunchdManager",
    "ServiceError",
    "ServiceManager",
    "ServiceStatus",
    "SystemdManager",
    "manager_for_platform",
    "run_command",
]

# Slack on top of the service's stop timeout: bootout/stop wait for the drain to finish.
_COMMAND_SLACK_S = 30


class ServiceError(RuntimeError):
    """A service-manager command could not run or failed; the message says which and why."""


@dataclass(frozen=True)
class ServiceStatus:
    """What the service manager says about the daemon."""

    installed: bool  # the plist / unit file exists
    loaded: bool  # the service manager knows the service
    running: bool
    output: str  # the manager's own report, for people


class ServiceManager(Protocol):
    """One service manager (launchd or systemd --user) for one configured daemon."""

    config: ServiceConfig
    dry_run: bool

    @property
    def definition_path(self) -> Path: ...

    def install(self) -> None: ...

    def uninstall(self) -> None: ...

    def restart(self) -> None: ...

    def status(self) -> ServiceStatus: ...


def run_command(
    argv: Sequence[str], *, check: bool = True, timeout: float | None = None
) -> subprocess.CompletedProcess[str]:
    """Run argv, never through a shell; a missing binary or (with check) a failure: ServiceError."""
    cmd = shlex.join(argv)
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, check=False, timeout=timeout
        )
    except FileNotFoundError:
        raise ServiceError(f"{argv[0]} not found on PATH; cannot run: {cmd}") from None
    except subprocess.TimeoutExpired:
        raise ServiceError(f"{cmd} did not finish within {timeout:g} s") from None
    except OSError as exc:
        raise ServiceError(f"cannot run {cmd}: {exc}") from None
    if check and proc.returncode != 0:
        raise ServiceError(command_failure(proc))
    return proc


def command_failure(proc: subprocess.CompletedProcess[str]) -> str:
    """A one-paragraph message for a failed command: the command, its exit code and stderr."""
    said = (proc.stderr or "").strip() or (proc.stdout or "").strip() or "no output"
    return f"{shlex.join(proc.args)} failed with exit code {proc.returncode}: {said}"


def _atomic_write(path: Path, data: bytes) -> None:
    # Atomic: the manager never reads a half-written file. 0644: launchd refuses plists
    # that are group- or world-writable.
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data, mode=0o644)


class _Manager:
    """Shared plumbing: dry-run printing, atomic writes, running commands."""

    def __init__(self, config: ServiceConfig, *, dry_run: bool, out: TextIO | None) -> None:
        self.config = config
        self.dry_run = dry_run
        self.out = out if out is not None else sys.stdout
        self.timeout = exit_timeout_s(config) + _COMMAND_SLACK_S

    def _run(self, argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        if self.dry_run:
            print(f"would run: {shlex.join(argv)}", file=self.out)
            return subprocess.CompletedProcess(argv, 0, "", "")
        return run_command(argv, check=check, timeout=self.timeout)

    def _query(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        # Read-only, so it runs even in dry-run mode.
        return run_command(argv, check=False, timeout=self.timeout)

    def _write(self, path: Path, data: bytes) -> None:
        if self.dry_run:
            print(f"would write {path}:", file=self.out)
            print(data.decode(), file=self.out)
            return
        _atomic_write(path, data)

    def _remove(self, path: Path) -> None:
        if self.dry_run:
            print(f"would remove {path}", file=self.out)
            return
        path.unlink(missing_ok=True)

    def _mkdir(self, path: Path, mode: int = 0o777) -> None:
        if self.dry_run:
            print(f"would create folder {path}", file=self.out)
            return
        path.mkdir(parents=True, exist_ok=True, mode=mode)


def _not_loaded(proc: subprocess.CompletedProcess[str]) -> bool:
    # launchctl reports an unknown service as 3 "No such process" (bootout) or
    # 113 "Could not find service" (print, newer bootout).
    text = f"{proc.stdout}\n{proc.stderr}"
    return proc.returncode in (3, 113) or "No such process" in text or "Could not find" in text


class LaunchdManager(_Manager):
    """A per-user LaunchAgent in the gui/<uid> domain."""

    def __init__(
        self,
        config: ServiceConfig,
        *,
        agents_dir: Path | None = None,
        uid: int | None = None,
        dry_run: bool = False,
        out: TextIO | None = None,
    ) -> None:
        super().__init__(config, dry_run=dry_run, out=out)
        # Path.home() follows $HOME, so tests and sandboxes can point it elsewhere.
        default_dir = Path.home() / "Library" / "LaunchAgents"
        self.agents_dir = agents_dir if agents_dir is not None else default_dir
        self.uid = os.getuid() if uid is None else uid

    @property
    def definition_path(self) -> Path:
        return self.agents_dir / f"{self.config.label}.plist"

    @property
    def domain(self) -> str:
        return f"gui/{self.uid}"

    @property
    def target(self) -> str:
        return f"{self.domain}/{self.config.label}"

    def install(self) -> None:
        """Write the plist, then reload it: bootout (if loaded) and bootstrap."""
        self._mkdir(self.config.log_dir)  # launchd does not create the log folder
        if self.config.activation:  # nor the folder of a Sockets path
            self._mkdir(self.config.socket.parent, 0o700)
        self._write(self.definition_path, render_plist(self.config))
        # bootstrap fails on an already-loaded label, so unload first: re-install restarts
        # the daemon with the new plist and it stays loaded exactly once.
        self._bootout()
        self._run(["launchctl", "bootstrap", self.domain, str(self.definition_path)])

    def uninstall(self) -> None:
        """Unload (SIGTERM, drain, exit) and remove the plist; fine if neither exists."""
        self._bootout()
        self._remove(self.definition_path)

    def restart(self) -> None:
        """Kill the running daemon (SIGTERM, so it drains) and start it again."""
        self._run(["launchctl", "kickstart", "-k", self.target])

    def status(self) -> ServiceStatus:
        proc = self._query(["launchctl", "print", self.target])
        installed = self.definition_path.exists()
        if proc.returncode != 0:
            if _not_loaded(proc):
                return ServiceStatus(installed, False, False, proc.stderr.strip())
            raise ServiceError(command_failure(proc))
        running = "state = running" in proc.stdout
        return ServiceStatus(installed, True, running, proc.stdout)

    def _bootout(self) -> None:
        proc = self._run(["launchctl", "bootout", self.target], check=False)
        if proc.returncode != 0 and not _not_loaded(proc):
            raise ServiceError(command_failure(proc))


def _default_unit_dir() -> Path:
    config_home = os.environ.get("XDG_CONFIG_HOME", "")
    # The XDG spec says to ignore a relative XDG_CONFIG_HOME.
    base = Path(config_home) if os.path.isabs(config_home) else Path.home() / ".config"
    return base / "systemd" / "user"


class SystemdManager(_Manager):
    """A systemd user unit, driven with systemctl --user."""

    def __init__(
        self,
        config: ServiceConfig,
        *,
        unit_dir: Path | None = None,
        unit: str | None = None,
        dry_run: bool = False,
        out: TextIO | None = None,
    ) -> None:
        super().__init__(config, dry_run=dry_run, out=out)
        self.unit_dir = unit_dir if unit_dir is not None else _default_unit_dir()
        self.unit = unit if unit is not None else unit_name(config.label)

    @property
    def definition_path(self) -> Path:
        return self.unit_dir / self.unit

    @property
    def socket_unit(self) -> str:
        return socket_unit_name(self.unit)

    @property
    def socket_definition_path(self) -> Path:
        return self.unit_dir / self.socket_unit

    def install(self) -> None:
        """Write the unit(s), reload systemd, enable and start; restart what changed."""
        if not self.config.activation:
            self._install_always_on()
            return
        service, sock = self.definition_path, self.socket_definition_path
        texts = {service: render_unit(self.config), sock: render_socket_unit(self.config)}
        previous = {p: p.read_text() if p.exists() else None for p in texts}
        if "[Install]" in (previous[service] or ""):
            # An always-on service before: stop it (it holds the socket path) and unhook it.
            self._systemctl("disable", "--now", self.unit)
        elif any(old is not None and old != texts[p] for p, old in previous.items()):
            self._systemctl("stop", self.unit, self.socket_unit)  # rebound below
        for path, text in texts.items():
            self._write(path, text.encode())
        self._systemctl("daemon-reload")
        self._systemctl("enable", "--now", self.socket_unit)

    def _install_always_on(self) -> None:
        text = render_unit(self.config)
        path = self.definition_path
        previous = path.read_text() if path.exists() else None
        if self.socket_definition_path.exists():  # on demand before: its socket goes
            self._systemctl("disable", "--now", self.socket_unit)
            self._systemctl("stop", self.unit)
            self._remove(self.socket_definition_path)
        self._write(path, text.encode())
        self._systemctl("daemon-reload")
        self._systemctl("enable", "--now", self.unit)
        # enable --now leaves a running daemon alone, so a changed unit would not apply.
        if previous is not None and previous != text:
            self._systemctl("try-restart", self.unit)

    def uninstall(self) -> None:
        """Stop and disable the unit(s), remove them, reload systemd; nothing to do if absent."""
        if self.socket_definition_path.exists():
            self._systemctl("disable", "--now", self.socket_unit)
            self._systemctl("stop", self.unit)
            self._remove(self.socket_definition_path)
        elif self.definition_path.exists():
            self._systemctl("disable", "--now", self.unit)
        else:
            return
        self._remove(self.definition_path)
        self._systemctl("daemon-reload")

    def restart(self) -> None:
        self._systemctl("restart", self.unit)

    def status(self) -> ServiceStatus:
        proc = self._query(["systemctl", "--user", "status", "--no-pager", self.unit])
        installed = self.definition_path.exists()
        # systemctl status: 0 active, 3 not active, 4 no such unit.
        if proc.returncode not in (0, 3, 4):
            raise ServiceError(command_failure(proc))
        output = proc.stdout.strip() or proc.stderr.strip()
        return ServiceStatus(installed, proc.returncode != 4, proc.returncode == 0, output)

    def _systemctl(self, *args: str) -> None:
        self._run(["systemctl", "--user", *args])


def manager_for_platform(
    config: ServiceConfig,
    platform: str | None = None,
    *,
    dry_run: bool = False,
    out: TextIO | None = None,
) -> ServiceManager:
    """launchd on macOS, systemd --user on Linux; platform may also name the manager."""
    platform = sys.platform if platform is None else platform
    if platform in ("darwin", "launchd"):
        return LaunchdManager(config, dry_run=dry_run, out=out)
    if platform.startswith("linux") or platform == "systemd":
        return SystemdManager(config, dry_run=dry_run, out=out)
    raise ServiceError(f"no service manager for platform {platform!r} (use launchd or systemd)")
