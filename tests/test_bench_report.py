"""The benchmark report's target rows: median ratio and spread of the pairs, cold and repeat
labelled apart, the hot-turn floor and the soak's verdict (no daemon: made-up results)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import mlx_server, run, soak
from bench.common import pairs


def test_pairs_give_the_median_and_the_spread() -> None:
    assert pairs([0.9, 1.1, 1.0]) == "1.00x (pairs 0.90-1.10, n=3)"
    assert pairs([0.97]) == "0.97x (1 pair)"


def _throughput_row(clients: int, ratios: list[float], repeat: list[float]) -> dict[str, Any]:
    return {
        "clients": clients, "daemon_tps": 10.0, "batch_generate_tps": 10.0,
        "ratio": sorted(ratios)[len(ratios) // 2], "ratios": ratios,
        "repeat_tps": 12.0, "repeat_ratio": sorted(repeat)[len(repeat) // 2],
        "repeat_ratios": repeat,
    }  # fmt: skip


def test_headline_has_cold_and_repeat_rows_for_every_client_count() -> None:
    results = {
        "throughput": {
            "rows": [_throughput_row(1, [0.9, 1.0, 0.96], [1.2, 1.3, 1.1]),
                     _throughput_row(16, [0.8, 0.9, 0.85], [0.9, 1.0, 0.95])],
            "single": {"ratio": 0.97, "ratios": [0.95, 0.97, 0.99], "daemon_decode_tps": 9.7,
                       "stream_generate_decode_tps": 10.0},
        }
    }  # fmt: skip
    rows = run._headline(results)
    cold16 = next(r for r in rows if "at 16 clients, cold" in r)
    assert "0.85x (pairs 0.80-0.90, n=3)" in cold16 and cold16.endswith("| **no** |")
    repeat1 = next(r for r in rows if "at 1 clients, repeat" in r)
    assert "1.20x (pairs 1.10-1.30, n=3)" in repeat1 and repeat1.endswith("| yes |")
    assert any("stream_generate | 0.97x (pairs 0.95-0.99" in r for r in rows)


def test_mlx_server_rows_judge_socket_and_http_together() -> None:
    row = {"clients": 8, "kind": "repeat", "ratio": 1.1, "ratios": [1.1], "http_ratio": 0.9,
           "http_ratios": [0.9], "daemon_tps": 11.0, "http_tps": 9.0, "server_tps": 10.0}  # fmt: skip
    (line,) = mlx_server.headline({"rows": [row]})
    assert "8 streaming client(s), repeat" in line and line.endswith("| **no** |")


def test_resume_rows_judge_hot_against_the_floor_and_disk_against_hot_plus_read() -> None:
    row = {
        "size": 4096, "disk_speedup": 40.0, "disk_ttft_ms": 900.0, "cold_after_ttft_ms": 36000.0,
        "hot_ttft_ms": 800.0, "floor_ms": 700.0, "floor_ms_all": [690.0, 700.0, 720.0],
        "floor_new_tokens": 37, "hot_floor_ratio": 800 / 700, "disk_bound_ms": 850.0,
        "exact": True,
    }  # fmt: skip
    rows = run._headline({"resume": {"rows": [row]}})
    hot = next(r for r in rows if "in-process floor" in r)
    assert "1.14x (800 vs 700 ms, floor 690-720)" in hot and hot.endswith("| yes |")
    disk = next(r for r in rows if "hot + read-and-restore" in r)
    assert "900 vs 850 ms" in disk and disk.endswith("| **no** |")


def _soak(**over: Any) -> dict[str, Any]:
    growth = {"growth_pct": 1.0, "base": 2**20, "end": 2**20}
    res = {
        "minutes": 60.0,
        "growth": {"rss_bytes": growth, "rss_net_bytes": growth, "session_kv_bytes": growth,
                   "fds": {"growth_pct": 0.0}},
        "fds_at_rest": {"before": 12, "after": 12},
        "counts": {"errors": 0}, "stalls": 0, "threads_stuck": 0,
    }  # fmt: skip
    for key, value in over.items():
        res[key] = value
    return res


def test_soak_verdict_needs_flat_fds_no_errors_and_no_stalls() -> None:
    assert soak.headline(_soak())[0].endswith("| yes |")
    assert soak.headline(_soak(fds_at_rest={"before": 12, "after": 13}))[0].endswith("| **no** |")
    assert soak.headline(_soak(counts={"errors": 2}))[0].endswith("| **no** |")
    assert soak.headline(_soak(stalls=1))[0].endswith("| **no** |")
