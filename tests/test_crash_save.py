"""A crash mid-save loses nothing: a writer SIGKILLed at random points always leaves the old
or the new file whole, never a partial one, and the daemon removes its temp files."""

from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import numpy as np

from mlxd.client import Client
from mlxd.daemon.kv import cachefile
from mlxd.daemon.models.builtin_model import BUILTIN_MODELS, ensure_builtin
from mlxd.daemon.models.model import fingerprint

from . import crash_writer
from .daemon_proc import DaemonProcess

TINY = BUILTIN_MODELS["tiny"]
KILLS = 20
MAX_KILLS = 60  # go on past KILLS until at least one kill has landed inside a write


class _Progress:
    """The writer's output lines, read by a thread so that no wait can hang the test."""

    def __init__(self, stream: IO[str]) -> None:
        self._lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line.strip())
        self._lines.put(None)

    def join(self) -> None:
        self._thread.join(30)

    def next(self, prefix: str) -> str:
        """The next line starting with `prefix`, skipping the rest of the writer's chatter.

        The writer and its children share the pipe, so their lines interleave in any order."""
        while True:
            line = self._lines.get(timeout=60)
            assert line is not None, f"the writer ended before printing {prefix!r}"
            if line.startswith(prefix):
                return line


def _version(path: Path, fp: str, versions: list[cachefile.Snapshot]) -> int:
    """Which version the file holds (it must load, fully validated, as one of them)."""
    snap = cachefile.read_snapshot(
        path,
        fingerprint=fp,
        num_layers=TINY.num_layers,
        kv_heads=TINY.num_kv_heads,
        head_dim=TINY.head_dim,
        dtype="float32",
    )
    (match,) = [i for i, v in enumerate(versions) if v.tokens == snap.tokens]
    for name, array in versions[match].arrays.items():
        assert np.array_equal(snap.arrays[name], array), name
    return match


def _temps(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name.endswith(cachefile.TEMP_SUFFIX)}


def test_sigkill_during_saves_leaves_the_old_or_the_new_file(
    short_dir: Path, model_cache: Path
) -> None:
    fp = fingerprint(ensure_builtin("tiny", model_cache))
    folder = short_dir / "state" / "sessions" / fp[:16]
    folder.mkdir(parents=True)
    path = folder / "crash.safetensors"
    versions = crash_writer.snapshots(TINY.num_layers, TINY.num_kv_heads, TINY.head_dim, cachefile)
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    shape = [str(TINY.num_layers), str(TINY.num_kv_heads), str(TINY.head_dim)]
    writer = subprocess.Popen(
        [sys.executable, crash_writer.__file__, str(path), fp, *shape],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdin is not None and writer.stdout is not None
    commands, progress = writer.stdin, _Progress(writer.stdout)

    live: list[int] = []

    def fork() -> int:
        commands.write("fork\n")
        commands.flush()
        live.append(int(progress.next("child ").split()[1]))
        return live[-1]

    def kill(child: int) -> None:
        os.kill(child, signal.SIGKILL)
        live.remove(child)
        assert progress.next(f"reaped {child}") == f"reaped {child} {int(signal.SIGKILL)}"

    seen = {0: 0, 1: 0}
    kills = kills_mid_write = 0
    try:
        assert progress.next("ready") == "ready"
        first = fork()
        progress.next(f"{first} writing")
        started = time.monotonic()
        progress.next(f"{first} wrote")  # from here on a whole file must exist
        write_s = time.monotonic() - started  # how long one save takes here, now
        kill(first)
        while kills < KILLS or (not kills_mid_write and kills < MAX_KILLS):
            temps_before = _temps(folder)
            child = fork()
            progress.next(f"{child} writing")  # it has begun a write
            time.sleep(rng.uniform(0, 2 * write_s))  # then dies at a random point
            kill(child)
            kills += 1
            # A new temp file: killed between creating it and the rename. It stays, as
            # after a real crash; the daemon removes it at start-up.
            kills_mid_write += bool(_temps(folder) - temps_before)
            seen[_version(path, fp, versions)] += 1
    finally:
        for child in live:  # a failed check leaves a writer running: stop it first
            os.kill(child, signal.SIGKILL)
        commands.close()  # the writer process exits at the end of its input
        try:
            writer.wait(30)
        except subprocess.TimeoutExpired:
            writer.kill()
            writer.wait(30)
        progress.join()
        writer.stdout.close()
    assert kills_mid_write, f"no kill landed inside a write in {kills} (seed {seed})"
    assert sum(seen.values()) == kills

    leftovers = _temps(folder)
    expected = _version(path, fp, versions)
    proc = DaemonProcess(short_dir, model_cache).start()
    try:
        assert not _temps(folder)
        removed = proc.events("removed unfinished cache files")
        assert [r["count"] for r in removed] == [len(leftovers)]
        with Client(proc.socket) as client:
            info = client.sessions_get("crash")
            assert (info.state, info.tokens) == ("disk", len(versions[expected].tokens))
            resumed = client.generate(crash_writer.TEXTS[expected], session="crash", max_tokens=2)
            assert resumed.usage.cached_tokens == len(versions[expected].tokens) - 1
    finally:
        assert proc.stop() == 0
