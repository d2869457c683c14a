"""The benchmarks run end to end (tiny model, quick settings), so they cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_bench_writes_a_report(tmp_path: Path, model_cache: Path) -> None:
    out = tmp_path / "report"
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--model", "builtin:tiny",
         "--suite", "throughput,resume", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
        env=dict(os.environ, MLXD_CACHE_DIR=str(model_cache)),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert "## Throughput" in report and "## Resume" in report
    results = json.loads((out / "results.json").read_text())
    assert all(
        r["daemon_tps"] > 0 and r["batch_generate_tps"] > 0 for r in results["throughput"]["rows"]
    )
    assert all(r["exact"] for r in results["resume"]["rows"])
    assert (out / "throughput.png").stat().st_size > 0 and (out / "resume.png").stat().st_size > 0
