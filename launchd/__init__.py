"""Running the daemon as a per-user service: a launchd LaunchAgent or a systemd user unit."""

from .cli import add_service_commands
from .plist import DEFAULT_LABEL, ServiceConfig, build_plist, program_arguments, render_plist
from .service import (
    LaunchdManager,
    ServiceError,
    ServiceManager,
    ServiceStatus,
    SystemdManager,
    manager_for_platform,
)
from .systemd import render_unit

__all__ = [
    "DEFAULT_LABEL",
    "LaunchdManager",
    "ServiceConfig",
    "ServiceError",
    "ServiceManager",
    "ServiceStatus",
    "SystemdManager",
    "add_service_commands",
    "build_plist",
    "manager_for_platform",
    "program_arguments",
    "render_plist",
    "render_unit",
]
