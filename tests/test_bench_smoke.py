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


# The agents and shared-prompt suites at toy sizes, in a fresh interpreter (the model cache
# comes from the environment); the JSON holds their results and rendered report lines.
SMALL_RUNS = f"""
import json, sys
sys.path.insert(0, {str(ROOT)!r})
from bench import agents, shared_prompt
a = agents.run("builtin:tiny", True, agents=3, turns=2, first=96, user=48, reply=4)
s = shared_prompt.run("builtin:tiny", True, agents=(1, 3), system=300, task=40, reply=4)
a.pop("status"); s.pop("status")
lines = agents.headline(a) + agents.section(a) + shared_prompt.headline(s) + shared_prompt.section(s)
print(json.dumps({{"agents": a, "shared": s, "lines": lines}}))
"""


def test_agents_and_shared_prompt_suites(model_cache: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-c", SMALL_RUNS], capture_output=True, text=True, timeout=600,
        env=dict(os.environ, MLXD_CACHE_DIR=str(model_cache)), cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    a = got["agents"]
    assert a["sides"] == [
        "mlxd",
        "mlx_lm.server",
        "mlx_lm.server, default cache",
        "mlxd, sessionless",
    ]
    total = a["turns_total"]
    for side, same in a["same"].items():  # every server saw the same prompts
        assert same["prompt_tokens"] == total, (side, same)
    # mlxd's two paths are exact; mlx_lm.server's float path may break a near-tie of the
    # random tiny model's logits another way, so its reply match is reported, not required.
    assert a["same"]["mlxd, sessionless"]["reply_text"] == total, a["same"]
    for side in a["sides"]:  # turn 2 of every agent resumed from that agent's turn 1
        turn2 = [t for t in a["turns"][side] if t["turn"] == 1]
        assert len(turn2) == 3 and all(t["cached_tokens"] > 0 for t in turn2), side
    # the sessionless daemon, given no session, served turn 2 from its prefix cache
    assert a["sessionless_prefix_cache"]["hits_anonymous"] >= 3
    rows = got["shared"]["rows"]
    assert [r["agents"] for r in rows] == [1, 3]
    for r in rows:
        assert r["same_replies_mlxd"] == r["agents"]  # mlxd's sessions and prefix cache, alike
        assert len({r["prompt_tokens"][s] for s in r["prompt_tokens"]}) == 1
    three = rows[1]
    for side in ("mlxd, sessions", "mlxd, no session"):  # the system prompt, prefilled once
        assert three["prefilled"][side] < 2 * three["system_tokens"], side
        assert three["turns"][side][0]["cached_tokens"] == 0  # a fresh system prompt: cold
    assert any(line.startswith("| agents: sessionless mlxd within 10%") for line in got["lines"])
    assert any(line.startswith("| shared ") for line in got["lines"])
