"""mlxd.launchd: the plist, the systemd unit and its quoting, and the commands each action runs."""

from __future__ import annotations

import argparse
import json
import os
import plistlib
import random
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mlxd.launchd import (
    LaunchdManager,
    ServiceConfig,
    ServiceError,
    SystemdManager,
    add_service_commands,
    build_plist,
    manager_for_platform,
    program_arguments,
    render_plist,
    render_unit,
)
from mlxd.launchd.systemd import exec_line, quote_env_assignment, quote_exec_arg, render_socket_unit

LABEL = "dev.mlxd.daemon"
UID = 501
TARGET = f"gui/{UID}/{LABEL}"
SOCKET = Path("/tmp/mlxd-test/mlxd.sock")  # never bound: only written into files


@pytest.fixture(autouse=True)
def sandbox_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HOME and XDG_CONFIG_HOME in tmp: nothing reaches the real ~/Library or ~/.config."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("MLXD_SOCKET", str(SOCKET))
    return home


# A recording stand-in for launchctl / systemctl: logs argv as one JSON line per call.
# Rules (argv prefix -> exit code, stdout, stderr) inject failures; without a rule,
# launchctl keeps a tiny "loaded labels" state so it answers like the real one
# (bootout of an unloaded label: 3 "No such process"; bootstrap of a loaded one: 5).
FAKE_TOOL = """\
#!{python}
import json, os, plistlib, sys
root = {root!r}
argv = [os.path.basename(sys.argv[0]), *sys.argv[1:]]
with open(os.path.join(root, "calls.jsonl"), "a") as f:
    f.write(json.dumps(argv) + "\\n")

def load(name, default):
    try:
        with open(os.path.join(root, name)) as f:
            return json.load(f)
    except FileNotFoundError:
        return default

def finish(rc, out="", err=""):
    sys.stdout.write(out)
    sys.stderr.write(err)
    sys.exit(rc)

for rule in load("rules.json", []):
    if argv[: len(rule["prefix"])] == rule["prefix"]:
        finish(rule["rc"], rule.get("stdout", ""), rule.get("stderr", ""))
if argv[0] != "launchctl":
    finish(0)
loaded = set(load("loaded.json", []))

def save():
    with open(os.path.join(root, "loaded.json"), "w") as f:
        json.dump(sorted(loaded), f)

verb = argv[1]
if verb == "bootstrap":
    with open(argv[3], "rb") as f:
        label = argv[2] + "/" + plistlib.load(f)["Label"]
    if label in loaded:
        finish(5, err="Bootstrap failed: 5: Input/output error\\n")
    loaded.add(label)
    save()
elif verb == "bootout":
    if argv[2] not in loaded:
        finish(3, err="Boot-out failed: 3: No such process\\n")
    loaded.discard(argv[2])
    save()
elif verb in ("print", "kickstart"):
    if argv[-1] not in loaded:
        finish(113, err='Could not find service "%s" in domain for port\\n' % argv[-1])
    if verb == "print":
        finish(0, argv[-1] + " = {{\\n\\tstate = running\\n}}\\n")
finish(0)
"""


class FakeTools:
    """The stand-ins on PATH, their call log, injected failures and launchctl's loaded set."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bin = root / "bin"
        self.bin.mkdir(parents=True)
        for name in ("launchctl", "systemctl"):
            tool = self.bin / name
            tool.write_text(FAKE_TOOL.format(python=sys.executable, root=str(root)))
            tool.chmod(0o755)

    def calls(self) -> list[list[str]]:
        log = self.root / "calls.jsonl"
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines()]

    def clear(self) -> None:
        (self.root / "calls.jsonl").unlink(missing_ok=True)

    def rule(self, prefix: list[str], rc: int, *, stdout: str = "", stderr: str = "") -> None:
        path = self.root / "rules.json"
        rules = json.loads(path.read_text()) if path.exists() else []
        rules.append({"prefix": prefix, "rc": rc, "stdout": stdout, "stderr": stderr})
        path.write_text(json.dumps(rules))

    def loaded(self) -> list[str]:
        path = self.root / "loaded.json"
        return json.loads(path.read_text()) if path.exists() else []


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeTools:
    tools = FakeTools(tmp_path / "fake")
    monkeypatch.setenv("PATH", f"{tools.bin}{os.pathsep}{os.environ['PATH']}")
    return tools


def make_config(**kw: object) -> ServiceConfig:
    # The always-on service; the on-demand one (the default) has its own tests below.
    kw.setdefault("activation", False)
    kw.setdefault("socket", SOCKET)
    kw.setdefault("extra_args", ["--model", "builtin:small"])
    return ServiceConfig(**kw)


def launchd(tmp_path: Path, cfg: ServiceConfig | None = None, **kw: object) -> LaunchdManager:
    return LaunchdManager(cfg or make_config(), agents_dir=tmp_path / "LaunchAgents", uid=UID, **kw)


def systemd(tmp_path: Path, cfg: ServiceConfig | None = None, **kw: object) -> SystemdManager:
    return SystemdManager(cfg or make_config(), unit_dir=tmp_path / "units", **kw)


# --- the plist -------------------------------------------------------------------------


def test_plist_round_trips_with_every_key_and_type(sandbox_home: Path) -> None:
    cfg = make_config(drain_timeout_s=20, env={"MLXD_LOG": "a<b>&c"})
    data = plistlib.loads(render_plist(cfg))
    assert data == build_plist(cfg)
    assert data["Label"] == LABEL
    args = data["ProgramArguments"]
    assert all(isinstance(a, str) for a in args)
    assert args[1:] == [
        "-m",
        "mlxd.daemon",
        "serve",
        "--socket",
        str(SOCKET),
        "--drain-timeout",
        "20",
        "--model",
        "builtin:small",
    ]
    assert data["RunAtLoad"] is True
    assert data["KeepAlive"] == {"SuccessfulExit": False}
    assert type(data["ThrottleInterval"]) is int and data["ThrottleInterval"] > 0
    assert type(data["ExitTimeOut"]) is int
    assert data["ProcessType"] == "Interactive"
    env = data["EnvironmentVariables"]
    assert env["MLXD_SOCKET"] == str(SOCKET)
    assert env["MLXD_LOG"] == "a<b>&c"  # escaped by plistlib, not by hand
    assert str(Path(sys.executable).parent) == env["PATH"].split(":")[0]
    assert "/usr/bin" in env["PATH"].split(":")
    logs = sandbox_home / "Library" / "Logs" / "mlxd"
    assert Path(data["StandardOutPath"]).parent == logs
    assert Path(data["StandardErrorPath"]).parent == logs
    assert data["StandardOutPath"] != data["StandardErrorPath"]


@pytest.mark.parametrize("drain", [0.5, 1, 20, 29.9, 120])
def test_exit_timeout_leaves_time_after_the_drain(drain: float) -> None:
    data = build_plist(make_config(drain_timeout_s=drain))
    assert data["ExitTimeOut"] > drain + 10  # room to persist sessions after the drain
    assert (
        float(data["ProgramArguments"][data["ProgramArguments"].index("--drain-timeout") + 1])
        == drain
    )


def test_program_arguments_are_absolute_and_keep_the_venv_symlink() -> None:
    args = program_arguments(make_config())
    assert os.path.isabs(args[0])
    # The venv's python is a symlink; resolving it would lose the venv's site-packages.
    assert args[0] == str(Path(sys.executable).absolute())
    assert os.path.isabs(args[args.index("--socket") + 1])


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"python": "python3"}, "absolute"),
        ({"socket": Path("rel/mlxd.sock")}, "absolute"),
        ({"socket": Path("/tmp/" + "x" * 200)}, "at most"),
        ({"drain_timeout_s": 0}, "positive"),
        ({"drain_timeout_s": float("nan")}, "positive"),
        ({"label": "../evil"}, "label"),
        ({"label": "has space"}, "label"),
        ({"extra_args": ["--drain-timeout", "5"]}, "--drain-timeout"),
        ({"extra_args": ["--socket=/x"]}, "--socket"),
        ({"env": {"BAD NAME": "x"}}, "BAD NAME"),
    ],
)
def test_config_refuses_what_would_break_the_service(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_config(**kw)


def test_importing_the_package_loads_neither_the_daemon_nor_mlx() -> None:
    code = "import json, sys, mlxd.launchd; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    modules = set(json.loads(out.stdout))
    assert not {"mlxd.daemon", "mlx", "mlx.core", "anyio"} & modules


# --- launchd ---------------------------------------------------------------------------


def test_launchd_install_writes_the_plist_and_bootstraps(tmp_path: Path, fake: FakeTools) -> None:
    mgr = launchd(tmp_path)
    mgr.install()
    plist = tmp_path / "LaunchAgents" / f"{LABEL}.plist"
    assert mgr.definition_path == plist
    assert plist.read_bytes() == render_plist(mgr.config)
    assert stat.S_IMODE(plist.stat().st_mode) == 0o644
    assert mgr.config.log_dir.is_dir()
    # The first bootout answers "No such process" (not loaded); install goes on.
    assert fake.calls() == [
        ["launchctl", "bootout", TARGET],
        ["launchctl", "bootstrap", f"gui/{UID}", str(plist)],
    ]
    assert fake.loaded() == [TARGET]


def test_launchd_install_twice_is_idempotent(tmp_path: Path, fake: FakeTools) -> None:
    mgr = launchd(tmp_path)
    mgr.install()
    first = mgr.definition_path.read_bytes()
    fake.clear()
    mgr.install()
    assert mgr.definition_path.read_bytes() == first
    assert fake.calls() == [
        ["launchctl", "bootout", TARGET],
        ["launchctl", "bootstrap", f"gui/{UID}", str(mgr.definition_path)],
    ]
    assert fake.loaded() == [TARGET]  # loaded once, not twice
    assert os.listdir(mgr.agents_dir) == [f"{LABEL}.plist"]  # no temp files left


def test_launchd_bootout_could_not_find_service_counts_as_not_loaded(
    tmp_path: Path, fake: FakeTools
) -> None:
    fake.rule(
        ["launchctl", "bootout"],
        113,
        stderr="Boot-out failed: 113: Could not find specified service\n",
    )
    launchd(tmp_path).install()
    assert fake.loaded() == [TARGET]


def test_launchd_other_bootout_failures_are_errors(tmp_path: Path, fake: FakeTools) -> None:
    fake.rule(["launchctl", "bootout"], 5, stderr="Boot-out failed: 5: Input/output error\n")
    with pytest.raises(ServiceError) as err:
        launchd(tmp_path).install()
    assert f"launchctl bootout {TARGET}" in str(err.value)
    assert "exit code 5" in str(err.value)
    assert "Input/output error" in str(err.value)


def test_launchd_bootstrap_failure_names_the_command_and_stderr(
    tmp_path: Path, fake: FakeTools
) -> None:
    fake.rule(["launchctl", "bootstrap"], 5, stderr="Bootstrap failed: 5: Input/output error\n")
    mgr = launchd(tmp_path)
    with pytest.raises(ServiceError) as err:
        mgr.install()
    assert f"launchctl bootstrap gui/{UID} {mgr.definition_path}" in str(err.value)
    assert "Bootstrap failed: 5: Input/output error" in str(err.value)


def test_launchd_uninstall_boots_out_and_removes(tmp_path: Path, fake: FakeTools) -> None:
    mgr = launchd(tmp_path)
    mgr.install()
    fake.clear()
    mgr.uninstall()
    assert fake.calls() == [["launchctl", "bootout", TARGET]]
    assert not mgr.definition_path.exists()
    assert fake.loaded() == []
    mgr.uninstall()  # again: not loaded, no file, still fine


def test_launchd_restart_and_status(tmp_path: Path, fake: FakeTools) -> None:
    mgr = launchd(tmp_path)
    st = mgr.status()
    assert (st.installed, st.loaded, st.running) == (False, False, False)
    assert "Could not find service" in st.output
    mgr.install()
    fake.clear()
    mgr.restart()
    st = mgr.status()
    assert (st.installed, st.loaded, st.running) == (True, True, True)
    assert fake.calls() == [
        ["launchctl", "kickstart", "-k", TARGET],
        ["launchctl", "print", TARGET],
    ]


def test_launchd_restart_when_not_loaded_is_an_error(tmp_path: Path, fake: FakeTools) -> None:
    with pytest.raises(
        ServiceError, match=f"launchctl kickstart -k {TARGET} failed.*Could not find"
    ):
        launchd(tmp_path).restart()


def test_launchd_status_other_failures_are_errors(tmp_path: Path, fake: FakeTools) -> None:
    fake.rule(["launchctl", "print"], 1, stderr="Unrecognized target specifier.\n")
    with pytest.raises(ServiceError, match="Unrecognized target"):
        launchd(tmp_path).status()


def test_missing_binary_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(
        ServiceError,
        match=f"launchctl not found on PATH; cannot run: launchctl kickstart -k {TARGET}",
    ):
        launchd(tmp_path).restart()
    with pytest.raises(ServiceError, match="systemctl not found on PATH"):
        systemd(tmp_path).install()


def test_launchd_dry_run_changes_nothing_and_prints_the_plan(
    tmp_path: Path, fake: FakeTools, capsys: pytest.CaptureFixture[str]
) -> None:
    mgr = launchd(tmp_path, dry_run=True)
    mgr.install()
    out = capsys.readouterr().out
    assert not (tmp_path / "LaunchAgents").exists()
    assert not mgr.config.log_dir.exists()
    assert fake.calls() == []
    assert f"would write {mgr.definition_path}:" in out
    assert render_plist(mgr.config).decode() in out
    assert f"would run: launchctl bootout {TARGET}" in out
    assert f"would run: launchctl bootstrap gui/{UID} {mgr.definition_path}" in out

    launchd(tmp_path).install()
    fake.clear()
    capsys.readouterr()
    mgr.uninstall()
    mgr.restart()
    out = capsys.readouterr().out
    assert fake.calls() == []
    assert mgr.definition_path.exists()
    assert f"would remove {mgr.definition_path}" in out
    assert f"would run: launchctl kickstart -k {TARGET}" in out


def test_default_launch_agents_folder_follows_home(sandbox_home: Path) -> None:
    mgr = LaunchdManager(make_config())
    assert mgr.definition_path == sandbox_home / "Library" / "LaunchAgents" / f"{LABEL}.plist"
    assert mgr.target == f"gui/{os.getuid()}/{LABEL}"


# --- systemd ---------------------------------------------------------------------------

SYSTEMCTL = ["systemctl", "--user"]


def test_systemd_install_writes_the_unit_and_enables_it(tmp_path: Path, fake: FakeTools) -> None:
    mgr = systemd(tmp_path)
    mgr.install()
    assert mgr.definition_path == tmp_path / "units" / "mlxd.service"
    assert mgr.definition_path.read_text() == render_unit(mgr.config)
    assert fake.calls() == [
        [*SYSTEMCTL, "daemon-reload"],
        [*SYSTEMCTL, "enable", "--now", "mlxd.service"],
    ]


def test_systemd_install_twice_is_idempotent_and_a_change_restarts(
    tmp_path: Path, fake: FakeTools
) -> None:
    mgr = systemd(tmp_path)
    mgr.install()
    first = mgr.definition_path.read_text()
    fake.clear()
    mgr.install()
    assert mgr.definition_path.read_text() == first
    assert fake.calls() == [
        [*SYSTEMCTL, "daemon-reload"],
        [*SYSTEMCTL, "enable", "--now", "mlxd.service"],
    ]
    assert os.listdir(mgr.unit_dir) == ["mlxd.service"]
    fake.clear()
    # enable --now leaves a running daemon alone, so a changed unit needs a restart.
    systemd(tmp_path, make_config(drain_timeout_s=60)).install()
    assert fake.calls()[-1] == [*SYSTEMCTL, "try-restart", "mlxd.service"]


def test_systemd_uninstall_restart_status(tmp_path: Path, fake: FakeTools) -> None:
    mgr = systemd(tmp_path)
    mgr.uninstall()  # nothing installed: nothing to run
    assert fake.calls() == []
    mgr.install()
    fake.clear()
    mgr.restart()
    st = mgr.status()
    assert (st.installed, st.loaded, st.running) == (True, True, True)
    mgr.uninstall()
    assert not mgr.definition_path.exists()
    assert fake.calls() == [
        [*SYSTEMCTL, "restart", "mlxd.service"],
        [*SYSTEMCTL, "status", "--no-pager", "mlxd.service"],
        [*SYSTEMCTL, "disable", "--now", "mlxd.service"],
        [*SYSTEMCTL, "daemon-reload"],
    ]


@pytest.mark.parametrize(("rc", "loaded"), [(3, True), (4, False)])
def test_systemd_status_not_running(tmp_path: Path, fake: FakeTools, rc: int, loaded: bool) -> None:
    fake.rule(
        [*SYSTEMCTL, "status"], rc, stdout="○ mlxd.service - mlxd\n     Active: inactive (dead)\n"
    )
    st = systemd(tmp_path).status()
    assert (st.loaded, st.running) == (loaded, False)
    assert "inactive" in st.output


def test_systemd_failure_names_the_command_and_stderr(tmp_path: Path, fake: FakeTools) -> None:
    fake.rule([*SYSTEMCTL, "enable"], 1, stderr="Failed to connect to bus: No medium found\n")
    with pytest.raises(ServiceError) as err:
        systemd(tmp_path).install()
    assert "systemctl --user enable --now mlxd.service failed with exit code 1" in str(err.value)
    assert "Failed to connect to bus: No medium found" in str(err.value)
    fake.rule([*SYSTEMCTL, "status"], 1, stderr="Failed to connect to bus\n")
    with pytest.raises(ServiceError, match="Failed to connect to bus"):
        systemd(tmp_path).status()


def test_systemd_dry_run_changes_nothing_and_prints_the_plan(
    tmp_path: Path, fake: FakeTools, capsys: pytest.CaptureFixture[str]
) -> None:
    mgr = systemd(tmp_path, dry_run=True)
    mgr.install()
    out = capsys.readouterr().out
    assert not mgr.unit_dir.exists()
    assert fake.calls() == []
    assert f"would write {mgr.definition_path}:" in out
    assert render_unit(mgr.config) in out
    assert "would run: systemctl --user daemon-reload" in out
    assert "would run: systemctl --user enable --now mlxd.service" in out

    systemd(tmp_path).install()
    fake.clear()
    capsys.readouterr()
    mgr.uninstall()
    out = capsys.readouterr().out
    assert fake.calls() == []
    assert mgr.definition_path.exists()
    assert "would run: systemctl --user disable --now mlxd.service" in out
    assert f"would remove {mgr.definition_path}" in out


def test_default_unit_folder_follows_xdg_config_home(
    sandbox_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert SystemdManager(make_config()).definition_path == (
        sandbox_home / ".config" / "systemd" / "user" / "mlxd.service"
    )
    monkeypatch.delenv("XDG_CONFIG_HOME")
    mgr = SystemdManager(make_config(label="dev.mlxd.second"))
    assert (
        mgr.definition_path
        == sandbox_home / ".config" / "systemd" / "user" / "dev.mlxd.second.service"
    )


def test_manager_for_platform() -> None:
    cfg = make_config()
    assert isinstance(manager_for_platform(cfg, "darwin"), LaunchdManager)
    assert isinstance(manager_for_platform(cfg, "launchd"), LaunchdManager)
    assert isinstance(manager_for_platform(cfg, "linux"), SystemdManager)
    assert isinstance(manager_for_platform(cfg, "systemd"), SystemdManager)
    with pytest.raises(ServiceError, match="win32"):
        manager_for_platform(cfg, "win32")


# --- on demand: the service manager owns the socket ----------------------------------


def test_on_demand_plist_has_sockets_and_no_keepalive(tmp_path: Path, fake: FakeTools) -> None:
    sock = tmp_path / "run" / "mlxd.sock"
    cfg = make_config(activation=True, socket=sock)
    mgr = manager_for_platform(cfg, "launchd")  # forced on Linux too
    assert isinstance(mgr, LaunchdManager)
    mgr.agents_dir = tmp_path / "LaunchAgents"
    mgr.install()
    data = plistlib.loads(mgr.definition_path.read_bytes())
    assert data == build_plist(mgr.config)
    assert data["Sockets"] == {
        "Listener": {"SockPathName": str(sock), "SockPathMode": 0o600, "SockType": "stream"}
    }
    assert type(data["Sockets"]["Listener"]["SockPathMode"]) is int  # 384, not "0600"
    assert "KeepAlive" not in data and "RunAtLoad" not in data
    args = data["ProgramArguments"]
    assert args[args.index("--activation-socket") + 1] == "Listener"  # the Sockets key
    assert args[args.index("--idle-exit") + 1] == "15m"
    assert args[args.index("--socket") + 1] == str(sock)
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700  # launchd binds into it
    assert fake.calls()[-1] == [
        "launchctl",
        "bootstrap",
        f"gui/{os.getuid()}",
        str(mgr.definition_path),
    ]


def test_on_demand_units() -> None:
    cfg = make_config(activation=True, idle_exit_s=120)
    service, sock = render_unit(cfg).splitlines(), render_socket_unit(cfg).splitlines()
    assert "[Install]" not in service  # started by its socket, never by itself
    assert {"Requires=mlxd.socket", "After=mlxd.socket", "Restart=on-failure"} <= set(service)
    exec_start = next(x for x in service if x.startswith("ExecStart="))
    assert systemd_split(exec_start.removeprefix("ExecStart=")) == program_arguments(cfg)
    assert program_arguments(cfg)[-4:-2] == ["--idle-exit", "2m"]
    assert {
        f"ListenStream={SOCKET}",
        "SocketMode=0600",
        "DirectoryMode=0700",
        "FileDescriptorName=Listener",
        "Service=mlxd.service",
        "WantedBy=sockets.target",
    } <= set(sock)
    with pytest.raises(ValueError, match="positive"):
        make_config(activation=True, idle_exit_s=0)
    with pytest.raises(ValueError, match="--idle-exit"):
        make_config(activation=True, extra_args=["--idle-exit", "1m"])


def test_systemd_on_demand_install_switches_and_back(tmp_path: Path, fake: FakeTools) -> None:
    on_demand = make_config(activation=True)
    systemd(tmp_path).install()  # always on first
    fake.clear()
    mgr = systemd(tmp_path, on_demand)
    mgr.install()
    assert mgr.socket_definition_path == tmp_path / "units" / "mlxd.socket"
    assert mgr.socket_definition_path.read_text() == render_socket_unit(on_demand)
    assert mgr.definition_path.read_text() == render_unit(on_demand)
    assert fake.calls() == [
        [*SYSTEMCTL, "disable", "--now", "mlxd.service"],  # it held the socket path
        [*SYSTEMCTL, "daemon-reload"],
        [*SYSTEMCTL, "enable", "--now", "mlxd.socket"],
    ]
    fake.clear()
    mgr.install()  # unchanged: nothing stopped
    assert fake.calls() == [
        [*SYSTEMCTL, "daemon-reload"],
        [*SYSTEMCTL, "enable", "--now", "mlxd.socket"],
    ]
    fake.clear()
    systemd(tmp_path, make_config(activation=True, idle_exit_s=60)).install()
    assert fake.calls()[0] == [*SYSTEMCTL, "stop", "mlxd.service", "mlxd.socket"]
    fake.clear()
    systemd(tmp_path).install()  # --no-activation again
    assert not mgr.socket_definition_path.exists()
    assert fake.calls() == [
        [*SYSTEMCTL, "disable", "--now", "mlxd.socket"],
        [*SYSTEMCTL, "stop", "mlxd.service"],
        [*SYSTEMCTL, "daemon-reload"],
        [*SYSTEMCTL, "enable", "--now", "mlxd.service"],
        [*SYSTEMCTL, "try-restart", "mlxd.service"],
    ]


# --- the systemd unit and its quoting --------------------------------------------------

_C_UNESCAPES = {
    "\\": "\\",
    '"': '"',
    "'": "'",
    "n": "\n",
    "t": "\t",
    "r": "\r",
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "v": "\v",
    "s": " ",
}


def systemd_split(line: str) -> list[str]:
    """A reference reading of an ExecStart= value, as systemd.syntax(7) and systemd.service(5)
    describe it: whitespace-separated words, '...' and "..." quoting, C escapes, then per word
    %% -> % (specifiers) and $$ -> $ (environment expansion at exec time)."""
    words: list[str] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i] in " \t":
            i += 1
        if i == n:
            return words
        if line[i] == ";" and (i + 1 == n or line[i + 1] in " \t"):
            raise AssertionError(f"unquoted ';' separates commands: {line!r}")
        word: list[str] = []
        quote = ""
        while i < n and (quote or line[i] not in " \t"):
            c = line[i]
            if c == "\\":
                nxt = line[i + 1]
                if nxt == "x":
                    word.append(chr(int(line[i + 2 : i + 4], 16)))
                    i += 4
                    continue
                assert nxt in _C_UNESCAPES, f"unknown escape \\{nxt}"
                word.append(_C_UNESCAPES[nxt])
                i += 2
                continue
            if quote and c == quote:
                quote = ""
            elif not quote and c in "\"'":
                quote = c
            else:
                word.append(c)
            i += 1
        assert not quote, f"unterminated quote in {line!r}"
        words.append(_expand(_expand("".join(word), "%"), "$"))


def _expand(word: str, sigil: str) -> str:
    parts = word.split(sigil * 2)
    assert all(sigil not in p for p in parts), f"{sigil} would be expanded in {word!r}"
    return sigil.join(parts)


TRICKY = [
    "plain",
    "two words",
    "it's",
    'say "hi"',
    "back\\slash",
    "trailing\\",
    "100%",
    "%h",
    "$HOME",
    "${HOME}",
    "$$",
    "",
    ";",
    "\\;",
    "tab\there",
    "new\nline",
    "ünï cødé",
    "-leading",
    "a=b c",
    "#hash",
    "'single'",
    "%%$$\\\"'",
]


def test_exec_start_quoting_round_trips() -> None:
    argv = ["/opt/my env/bin/python", *TRICKY]
    assert systemd_split(exec_line(argv)) == argv
    for arg in TRICKY:
        assert systemd_split(quote_exec_arg(arg)) == [arg]


@given(st.lists(st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\0"))))
def test_exec_start_quoting_round_trips_for_any_text(args: list[str]) -> None:
    argv = ["/usr/bin/python3", *args]
    assert systemd_split(exec_line(argv)) == argv


def test_exec_start_refuses_what_systemd_cannot_carry() -> None:
    with pytest.raises(ValueError, match="absolute"):
        exec_line(["-python"])
    with pytest.raises(ValueError, match="NUL"):
        quote_exec_arg("a\0b")


def test_unit_text() -> None:
    cfg = make_config(socket=Path("/tmp/a b/100%/$x.sock"), drain_timeout_s=20)
    unit = render_unit(cfg)
    lines = unit.splitlines()
    assert lines[0] == "[Unit]"
    assert "Type=simple" in lines
    assert "Restart=on-failure" in lines
    assert "KillSignal=SIGTERM" in lines
    assert "WantedBy=default.target" in lines
    stop = next(int(x.split("=")[1]) for x in lines if x.startswith("TimeoutStopSec="))
    assert stop > 20
    exec_start = next(x for x in lines if x.startswith("ExecStart="))
    assert systemd_split(exec_start.removeprefix("ExecStart=")) == program_arguments(cfg)
    env = next(x for x in lines if x.startswith("Environment="))
    assert env == "Environment=" + quote_env_assignment("MLXD_SOCKET", str(cfg.socket))
    # No $-expansion in Environment=, so $ stays single there.
    assert env == 'Environment="MLXD_SOCKET=/tmp/a b/100%%/$x.sock"'


def _shell_words(line: str) -> list[str]:
    """Words of systemd's own dump ("Command Line: ..."), which quotes like a POSIX shell."""
    words, i = [], 0
    while i < len(line):
        if line[i] == " ":
            i += 1
            continue
        word, quote = [], False
        while i < len(line) and (quote or line[i] != " "):
            if line[i] == "\\":
                word.append(line[i + 1])
                i += 2
                continue
            if line[i] == '"':
                quote = not quote
            else:
                word.append(line[i])
            i += 1
        words.append("".join(word))
    return words


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze not installed (Debian package: systemd)",
)
@pytest.mark.parametrize("activation", [False, True], ids=["always-on", "on-demand"])
def test_systemd_analyze_verifies_the_unit_and_reads_the_same_argv(
    tmp_path: Path, activation: bool
) -> None:
    # A python path with a space, through a symlink to the real interpreter, so systemd's
    # check that the executable exists passes.
    pydir = tmp_path / "my env"
    pydir.mkdir()
    (pydir / "python").symlink_to(sys.executable)
    rng = random.Random(0)
    alphabet = "ab z'\"\\%$;#=-"
    randoms = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8))) for _ in range(40)]
    printable = [a for a in TRICKY if a.isprintable()]
    cfg = make_config(
        python=str(pydir / "python"),
        socket=Path("/tmp/a b/100%/$x.sock"),
        extra_args=["--model", "builtin:small", *printable, *randoms],
        activation=activation,
    )
    unit = tmp_path / "units" / "mlxd.service"
    unit.parent.mkdir()
    unit.write_text(render_unit(cfg))
    units = [str(unit)]
    if activation:  # the socket unit first: it is what the user enables
        socket_unit = tmp_path / "units" / "mlxd.socket"
        socket_unit.write_text(render_socket_unit(cfg))
        units.insert(0, str(socket_unit))
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "SYSTEMD_LOG_LEVEL": "debug"}
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--user", *units],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # verify exits 0 even on parse warnings; those name the file and line.
    for path in units:
        assert f"{path}:" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    dump = (proc.stdout + proc.stderr).splitlines()
    command = next(x.strip() for x in dump if x.strip().startswith("Command Line:"))
    # The dump shows argv before exec-time expansion, where $$ still stands for one $.
    expected = [a.replace("$", "$$") for a in program_arguments(cfg)]
    assert _shell_words(command.removeprefix("Command Line: ")) == expected
    assert f"Environment: MLXD_SOCKET={cfg.socket}" in [x.strip() for x in dump]
    if activation:
        stripped = [x.strip() for x in dump]
        assert f"ListenStream: {cfg.socket}" in stripped  # %% read back as one %
        assert "SocketMode: 0600" in stripped
        assert "Triggers: mlxd.service (origin-implicit)" in stripped


# --- the CLI ---------------------------------------------------------------------------


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="mlxd")
    add_service_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    result = args.func(args)
    assert isinstance(result, int)
    return result


def test_cli_install_dry_run(
    sandbox_home: Path, fake: FakeTools, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = run_cli(
        "install",
        "--dry-run",
        "--platform",
        "launchd",
        "--socket",
        "/tmp/m/s.sock",
        "--drain-timeout",
        "30",
        "--model",
        "builtin:small",
        "--label",
        "dev.mlxd.x",
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert fake.calls() == []
    assert not (sandbox_home / "Library").exists()
    plist_xml = out.split(":\n", 1)[1].split("would run:")[0]
    data = plistlib.loads(plist_xml.encode())
    assert data["Label"] == "dev.mlxd.x"
    assert data["ExitTimeOut"] == 45
    assert data["ProgramArguments"][4:] == [
        "--socket",
        "/tmp/m/s.sock",
        "--drain-timeout",
        "30",
        "--activation-socket",
        "Listener",
        "--idle-exit",
        "15m",
        "--model",
        "builtin:small",
    ]
    assert data["Sockets"]["Listener"]["SockPathName"] == "/tmp/m/s.sock"
    assert "KeepAlive" not in data and "RunAtLoad" not in data
    assert f"would run: launchctl bootout gui/{os.getuid()}/dev.mlxd.x" in out


def test_cli_systemd_actions(
    sandbox_home: Path, fake: FakeTools, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        run_cli("install", "--platform", "systemd", "--socket", "/tmp/m/s.sock", "--no-activation")
        == 0
    )
    unit = sandbox_home / ".config" / "systemd" / "user" / "mlxd.service"
    assert "--socket /tmp/m/s.sock" in unit.read_text()
    assert run_cli("restart", "--platform", "systemd") == 0
    assert run_cli("service-status", "--platform", "systemd") == 0
    fake.rule([*SYSTEMCTL, "status"], 3, stdout="Active: inactive (dead)\n")
    assert run_cli("service-status", "--platform", "systemd") == 3
    assert run_cli("uninstall", "--platform", "systemd") == 0
    assert not unit.exists()
    assert [c[2] for c in fake.calls()] == [
        "daemon-reload",
        "enable",
        "restart",
        "status",
        "status",
        "disable",
        "daemon-reload",
    ]
    assert "not running" in capsys.readouterr().out


def test_cli_on_demand_systemd_install_and_uninstall(
    sandbox_home: Path, fake: FakeTools, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["install", "--platform", "systemd", "--socket", "/tmp/m/s.sock", "--idle-exit", "90s"]
    assert run_cli(*argv) == 0
    units = sandbox_home / ".config" / "systemd" / "user"
    assert "--idle-exit 90s" in (units / "mlxd.service").read_text()
    assert "ListenStream=/tmp/m/s.sock" in (units / "mlxd.socket").read_text()
    assert "starts on the first connection" in capsys.readouterr().out
    assert run_cli("uninstall", "--platform", "systemd") == 0
    assert sorted(os.listdir(units)) == []
    assert fake.calls() == [
        [*SYSTEMCTL, "daemon-reload"],
        [*SYSTEMCTL, "enable", "--now", "mlxd.socket"],
        [*SYSTEMCTL, "disable", "--now", "mlxd.socket"],
        [*SYSTEMCTL, "stop", "mlxd.service"],
        [*SYSTEMCTL, "daemon-reload"],
    ]
    assert run_cli("install", "--platform", "systemd", "--idle-exit", "soon") == 2
    assert "not a duration" in capsys.readouterr().err


def test_cli_errors_become_exit_codes(fake: FakeTools, capsys: pytest.CaptureFixture[str]) -> None:
    fake.rule(["launchctl", "kickstart"], 113, stderr="Could not find service\n")
    assert run_cli("restart", "--platform", "launchd") == 1
    assert "mlxd: error: launchctl kickstart -k" in capsys.readouterr().err
    assert run_cli("install", "--platform", "systemd", "--socket", "/tmp/" + "x" * 200) == 2
    assert "at most" in capsys.readouterr().err
    assert fake.calls() == [["launchctl", "kickstart", "-k", f"gui/{os.getuid()}/{LABEL}"]]


def test_fake_tools_are_first_on_path(fake: FakeTools) -> None:
    # Guards every test above: the real launchctl/systemctl must never be the one that runs.
    assert shutil.which("launchctl") == str(fake.bin / "launchctl")
    assert shutil.which("systemctl") == str(fake.bin / "systemctl")
