"""Bad options and CLI errors: refused at start with one clear line and a non-zero exit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlxd.daemon.config import Config, ConfigError


def _mlxd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mlxd.daemon", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, **(env or {})),
        stdin=subprocess.DEVNULL,
    )


def _one_line_refusal(done: subprocess.CompletedProcess[str], words: str) -> None:
    assert done.returncode != 0, done
    assert "Traceback" not in done.stderr, done.stderr
    lines = [x for x in done.stderr.splitlines() if x.strip() and not x.startswith("{")]
    assert len(lines) == 1, done.stderr
    assert words in lines[0], lines[0]


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("--max-batch", "0", "--max-batch must be at least 1"),
        ("--prefill-chunk", "0", "--prefill-chunk must be at least 1"),
        ("--drain-timeout", "-5", "--drain-timeout must be at least 0"),
        ("--drain-timeout", "nan", "--drain-timeout must be a finite number"),
        ("--max-queue", "-1", "--max-queue must be at least 0"),
        ("--idle-frame-timeout", "0", "--idle-frame-timeout must be at least"),
        ("--kv-budget", "foo", "--kv-budget: not a size"),
        ("--kv-budget", "0", "--kv-budget must be at least 1"),
        ("--disk-budget", "-1G", "--disk-budget"),
        ("--max-frame-bytes", "10", "--max-frame-bytes must be at least 1024"),
        ("--max-batch", "many", "invalid int value"),
        ("--kv-bits", "3", "invalid choice"),
    ],
)
def test_bad_options_are_refused_in_one_line(
    short_dir: Path, option: str, value: str, words: str
) -> None:
    done = _mlxd("serve", "--socket", str(short_dir / "d.sock"), "--state-dir", str(short_dir / "s"), option, value)  # fmt: skip
    _one_line_refusal(done, words)
    assert not (short_dir / "d.sock").exists()


def test_a_state_dir_under_a_file_is_refused(short_dir: Path) -> None:
    (short_dir / "file").write_text("not a folder")
    done = _mlxd("serve", "--socket", str(short_dir / "d.sock"), "--state-dir", str(short_dir / "file" / "state"))  # fmt: skip
    _one_line_refusal(done, "--state-dir")


def test_a_state_dir_on_a_read_only_mount_is_refused(short_dir: Path) -> None:
    mount = short_dir / "ro"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], capture_output=True)  # fmt: skip
    if made.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {made.stderr.decode().strip()}")
    try:
        done = _mlxd("serve", "--socket", str(short_dir / "d.sock"), "--state-dir", str(mount / "state"))  # fmt: skip
        _one_line_refusal(done, "--state-dir")
        assert "Read-only file system" in done.stderr
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_missing_model_is_one_line_and_cleans_up(short_dir: Path, model_cache: Path) -> None:
    done = _mlxd(
        "serve", "--model", "/nonexistent", "--socket", str(short_dir / "d.sock"),
        "--state-dir", str(short_dir / "s"), env={"MLXD_CACHE_DIR": str(model_cache)},
    )  # fmt: skip
    _one_line_refusal(done, "/nonexistent")
    assert not (short_dir / "d.sock").exists()
    assert not (short_dir / "d.sock.lock").exists()


def test_status_with_a_too_long_socket_path_is_one_line() -> None:
    done = _mlxd("status", env={"MLXD_SOCKET": "/tmp/" + "x" * 120})
    _one_line_refusal(done, "socket path is")


def test_status_with_no_daemon_is_one_line(short_dir: Path) -> None:
    done = _mlxd("status", "--socket", str(short_dir / "none.sock"))
    _one_line_refusal(done, "mlxd")


def test_config_validate_names_the_option(tmp_path: Path) -> None:
    Config(state_dir=tmp_path).validate()  # the defaults are fine
    for name, value in [("max_batch", 0), ("prefill_step_size", -1), ("max_queue", -1),
                        ("drain_timeout_s", float("inf")), ("kv_bits", 2), ("backend", "x")]:  # fmt: skip
        config = Config(state_dir=tmp_path)
        setattr(config, name, value)
        with pytest.raises(ConfigError):
            config.validate()
