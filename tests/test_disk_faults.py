"""Disk faults under sessions: a full disk, a read-only folder, a disk budget too small,
files deleted or truncated behind the daemon's back. The old file stays intact, every
request is answered, and the error is logged and shown in `status`.

A read-only folder cannot be made with chmod here (the tests run as root, and root
writes through 0500), and there is no tiny tmpfs to fill: both faults are injected
inside the daemon with MLXD_FAULT_WRITE_EROFS / MLXD_FAULT_WRITE_ENOSPC (the next N
writes fail: EROFS creating the temp file, ENOSPC halfway through the data)."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlxd.client import Client

from .daemon_proc import DaemonProcess, block_bytes, short_tmpdir

TURN = 6
PROMPTS = {
    "kept": "A conversation whose cache file must survive every fault. " * 2,
    "deleted": "A conversation whose cache file is deleted behind the daemon's back.",
    "truncated": "A conversation whose cache file is truncated behind the daemon's back.",
}


@pytest.fixture(scope="module")
def seeded(model_cache: Path) -> Iterator[Path]:
    """A state folder holding one saved session per prompt, written by a clean daemon."""
    folder = short_tmpdir()
    proc = DaemonProcess(folder, model_cache).start()
    try:
        with Client(proc.socket) as client:
            for session, prompt in PROMPTS.items():
                client.generate(prompt, session=session, max_tokens=TURN)
    finally:
        assert proc.stop() == 0  # SIGTERM saves every session
    yield folder / "state"
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def state(seeded: Path, short_dir: Path) -> Path:
    """A private copy of the seeded state folder, inside a short folder for the socket."""
    shutil.copytree(seeded, short_dir / "state")
    return short_dir / "state"


def _file(state: Path, session: str) -> Path:
    (path,) = (state / "sessions").glob(f"*/{session}.safetensors")
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _temp_files(state: Path) -> list[Path]:
    return [p for p in (state / "sessions").rglob("*") if p.name.endswith(".tmp")]


def _daemon(state: Path, model_cache: Path, *args: str, **env: str) -> DaemonProcess:
    return DaemonProcess(state.parent, model_cache, *args, env=env).start()


def test_full_disk_and_read_only_folder_leave_the_old_file_intact(
    state: Path, model_cache: Path
) -> None:
    path = _file(state, "kept")
    before = _digest(path)
    faults = {"MLXD_FAULT_WRITE_EROFS": "1", "MLXD_FAULT_WRITE_ENOSPC": "2"}
    pool = str(2 * block_bytes(model_cache))  # two blocks: a 2-block request spills "kept"
    proc = _daemon(state, model_cache, "--kv-budget", pool, **faults)
    try:
        with Client(proc.socket) as client:
            more = PROMPTS["kept"] + " More."
            assert client.generate(more, session="kept", max_tokens=TURN).usage.cached_tokens > 0
            assert client.sessions_save("kept") == 0  # read-only folder
            assert client.sessions_save("kept") == 0  # disk full halfway through
            assert _digest(path) == before and not _temp_files(state)
            assert client.sessions_get("kept").state == "hot"  # the cache is still in memory
            # A request needing the whole pool spills "kept": its save fails, the hot copy
            # goes, the request runs, and the old file is still there to resume from.
            assert client.generate("z" * 300, max_tokens=4).usage.completion_tokens > 0
            assert client.sessions_get("kept").state == "disk"
            assert _digest(path) == before and not _temp_files(state)
            errors = client.status().details["disk_errors"]
            assert sum("Read-only file system" in e for e in errors) == 1, errors
            assert sum("No space left on device" in e for e in errors) == 2, errors
            again = client.generate(more, session="kept", max_tokens=TURN)
            assert again.usage.cached_tokens > 0  # from the old file
            assert client.sessions_save("kept") == 1  # the disk is back: it saves
        assert _digest(path) != before
        proc.wait_for("session cache disk error")
    finally:
        assert proc.stop() == 0


def test_sigterm_on_a_full_disk_exits_cleanly_and_keeps_the_old_file(
    state: Path, model_cache: Path
) -> None:
    path = _file(state, "kept")
    before = _digest(path)
    proc = _daemon(state, model_cache, MLXD_FAULT_WRITE_ENOSPC="100")
    try:
        with Client(proc.socket) as client:
            client.generate(PROMPTS["kept"] + " Again.", session="kept", max_tokens=TURN)
    finally:
        assert proc.stop() == 0  # the save fails; the drain still finishes
    assert any(
        "No space left on device" in str(e.get("error"))
        for e in proc.events("session cache disk error")
    )
    assert _digest(path) == before and not _temp_files(state)  # still the seeded, valid file


def test_files_deleted_or_truncated_after_listing(state: Path, model_cache: Path) -> None:
    proc = _daemon(state, model_cache)
    try:
        with Client(proc.socket) as client:
            listed = {s.session: s.state for s in client.sessions_list()}
            assert listed == dict.fromkeys(PROMPTS, "disk")
            _file(state, "deleted").unlink()
            truncated = _file(state, "truncated")
            truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 3])
            results = {}
            for session in ("deleted", "truncated"):
                prompt = PROMPTS[session] + " Still there?"
                results[session] = client.generate(prompt, session=session, max_tokens=TURN)
                cold = client.generate(prompt, max_tokens=TURN)
                assert results[session].usage.cached_tokens == 0  # ran cold, and right
                assert results[session].tokens == cold.tokens
            details = client.status().details
            assert details["sessions_quarantined"] == 1  # the truncated file
            assert any(e.startswith("load deleted:") for e in details["disk_errors"])
            assert (
                client.generate(PROMPTS["kept"], session="kept", max_tokens=2).usage.cached_tokens
                > 0
            )
    finally:
        assert proc.stop() == 0
    quarantined = [p for p in (state / "quarantine").iterdir() if p.suffix != ".reason"]
    assert len(quarantined) == 1 and quarantined[0].name.startswith("truncated.safetensors")
    assert "truncated" in next((state / "quarantine").glob("*.reason")).read_text()


def test_disk_budget_too_small(state: Path, model_cache: Path) -> None:
    shutil.rmtree(state / "sessions")  # start empty: only this test's files count
    per_token = block_bytes(model_cache) // 256
    budget = 100 * per_token  # "a" (11 tokens) and "c" (90) fit alone, not together
    proc = _daemon(state, model_cache, "--disk-budget", str(budget))
    try:
        with Client(proc.socket) as client:
            client.generate("small", session="a", max_tokens=TURN)
            assert client.sessions_save("a") == 1
            a_file = _file(state, "a")
            a_digest = _digest(a_file)
            # Bigger than the whole budget: not written, and nothing else deleted for it.
            client.generate("b" * 200, session="big", max_tokens=TURN)
            assert client.sessions_save("big") == 0
            errors = client.status().details["disk_errors"]
            assert any("exceed the disk budget" in e for e in errors), errors
            assert _digest(a_file) == a_digest and not _temp_files(state)
            assert client.sessions_get("big").state == "hot"
            # Fits alone but not with "a": the least recently used file goes.
            client.generate("c" * 84, session="c", max_tokens=TURN)
            assert client.sessions_save("c") == 1
            assert not a_file.exists() and _file(state, "c").exists()
            tiers = client.status().sessions
            assert tiers.disk == 1 and tiers.disk_bytes <= budget
            assert client.sessions_get("a").state == "hot"  # its cache is still in memory
    finally:
        assert proc.stop() == 0
