"""The durable atomic write helper: whole file or old file, never a temp left behind."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from mlxd.durable import TEMP_SUFFIX, publish_folder, write_atomic
from mlxd.paths import TOKEN_FILE, load_token


def test_write_replaces_with_the_asked_mode_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    path.write_bytes(b"old")
    old = os.umask(0o077)
    try:
        write_atomic(path, b"new", mode=0o644)
    finally:
        os.umask(old)
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_failed_fsync_keeps_the_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"old")

    def fail(*args: Any) -> None:
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError):
        write_atomic(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_exclusive_never_replaces(tmp_path: Path) -> None:
    path = tmp_path / "f"
    write_atomic(path, b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        write_atomic(path, b"second", exclusive=True)
    assert path.read_bytes() == b"first"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(TEMP_SUFFIX)]


def test_token_made_once_and_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLXD_API_KEY", raising=False)
    token = load_token(tmp_path / "state")
    assert load_token(tmp_path / "state") == token
    assert stat.S_IMODE((tmp_path / "state" / TOKEN_FILE).stat().st_mode) == 0o600


def test_publish_folder_keeps_the_first_published(tmp_path: Path) -> None:
    target = tmp_path / "model"
    for content in (b"one", b"two"):
        tmp = tmp_path / f".model.{content.decode()}{TEMP_SUFFIX}"
        tmp.mkdir()
        (tmp / "config.json").write_bytes(content)
        publish_folder(tmp, target, lambda t: (t / "config.json").is_file())
        assert not tmp.exists()
    assert (target / "config.json").read_bytes() == b"one"
