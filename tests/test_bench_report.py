"""The benchmark report's target rows: median ratio and spread of the pairs, cold and repeat
labelled apart, the hot-turn floor, the soak's verdict and the llama.cpp anchor's rows and
log reading (no daemon, no llama.cpp: made-up results)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import agents, llamacpp, mlx_server, run, soak
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


def test_agents_converse_interleaves_and_grows_every_side_with_the_first_sides_replies() -> None:
    calls: list[tuple[str, int, str]] = []

    def side(name: str) -> agents.Turn:
        def turn(i: int, prompt: str) -> dict[str, Any]:
            calls.append((name, i, prompt))
            return {"text": f"<{name}{i}:{len(prompt)}>", "prompt_tokens": len(prompt)}

        return turn

    p = {"agents": 2, "turns": 2, "user": 20}
    turns, walls = agents.converse(
        {"a": side("a"), "b": side("b")}, ["P0", "P1"], p, lambda msg: None
    )
    assert [c[:2] for c in calls] == [("a", 0), ("a", 1), ("b", 0), ("b", 1),
                                      ("b", 0), ("b", 1), ("a", 0), ("a", 1)]  # fmt: skip
    second = {(name, i): prompt for name, i, prompt in calls[4:]}
    assert second[("b", 0)] == second[("a", 0)] == "P0<a0:2>" + agents.user_message(0, 2, 20)
    assert len(walls["a"]) == len(walls["b"]) == 2 and len(turns["b"]) == 4
    same = agents.compare(turns)
    assert same == {"b": {"prompt_tokens": 4, "reply_text": 0}}


def test_llama_server_reads_prefix_hits_and_fills_in_the_usage_its_stream_lacks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = llamacpp.LlamaServer(Path("model.gguf"), 8192, "--cache", "true")
    server.port = 8000
    cmd = server.command()
    assert cmd[cmd.index("--n_ctx") + 1] == "8192" and cmd[-2:] == ["--cache", "true"]
    assert cmd[cmd.index("--interrupt_requests") + 1] == "false"
    server.on_line("Llama.generate: 1234 prefix-match hit, remaining 56 prompt tokens to eval")
    server.on_line('INFO:     127.0.0.1:40000 - "POST /v1/completions HTTP/1.1" 200 OK')
    assert server.hits == [1234] and server.counted == 0
    server.on_line('INFO:     127.0.0.1:40002 - "POST /extras/tokenize/count HTTP/1.1" 200 OK')
    assert server.counted == 1
    counts = {"": 1, "the prompt": 1290, "a reply": 4}  # BOS counted once on each
    monkeypatch.setattr(server, "count", counts.__getitem__)
    got = {"text": "a reply", "finish_reason": "stop", "prompt_tokens": None}
    server.usage(16)("the prompt", got)
    assert (got["prompt_tokens"], got["cached_tokens"], got["completion_tokens"]) == (1290, 1234, 4)
    assert server.hits == []
    full = {"text": "x", "finish_reason": "length", "prompt_tokens": None}
    server.usage(16)("the prompt", full)
    assert (full["cached_tokens"], full["completion_tokens"]) == (0, 16)


def _llamacpp_result(wall: dict[str, float]) -> dict[str, Any]:
    sides = [llamacpp.SESSIONS, llamacpp.SESSIONLESS, llamacpp.DEFAULTS, llamacpp.CACHED]
    pq = {"p50": 100.0, "p95": 200.0}
    summary = {
        s: {"wall_s": wall[s], "ttft_ms": pq, "ttft_ms_after_turn1": pq, "ttft_ms_by_turn": [pq],
            "prompt_tokens": 2100, "prefilled_tokens": 2100, "cached_tokens": 0, "cache_hits": 0}
        for s in sides
    }  # fmt: skip
    side = {"tps": 50.0, "ratio": 0.8, "ratios": [0.7, 0.8, 0.9], "ttft_ms_p50": 30.0,
            "same_text": "3/3", "stopped_early": 0}  # fmt: skip
    row = {"clients": 1, "mlxd_tps": 40.0, "mlxd_ttft_ms_p50": 90.0, "mlxd_stopped_early": 0,
           llamacpp.DEFAULTS: side, llamacpp.CACHED: side}  # fmt: skip
    return {
        "workload": {"agents": 1, "turns": 1, "first_tokens": 2048, "max_tokens": 128,
                     "rounds": 3, "reply": 32, "user": 600},
        "llama_cpp_python": "0.3.36", "gguf": "m.gguf", "n_ctx": 8192, "mlxd_dtype": "float32",
        "throughput": [row], "sides": sides, "summary": summary,
        "speedup": {f"{m} vs {s}": wall[s] / wall[m] for m in sides[:2] for s in sides[2:]},
        "same": {s: {"prompt_tokens": 1, "reply_text": 1} for s in sides[1:]},
        "turns_total": 1, "mlxd_sessions": {"hot": 1, "disk": 0},
        "turns": {llamacpp.SESSIONS: [{"turn": 0, "prompt_tokens": 2100}]},
    }  # fmt: skip


def test_llamacpp_rows_judge_agents_against_its_defaults_only() -> None:
    wall = {llamacpp.SESSIONS: 100.0, llamacpp.SESSIONLESS: 125.0, llamacpp.DEFAULTS: 120.0,
            llamacpp.CACHED: 60.0}  # fmt: skip
    res = _llamacpp_result(wall)
    rows = llamacpp.headline(res)
    target = [r for r in rows if "≥ 1.0x llama.cpp, defaults" in r]
    assert len(target) == 2 and all("2100+ tokens" in r for r in target)
    assert target[0].startswith("| agents: mlxd, sessions") and target[0].endswith("| yes |")
    assert "0.96x (125 vs 120 s)" in target[1] and target[1].endswith("| **no** |")
    assert sum(r.endswith("| no target |") for r in rows) == 3  # vs --cache true x2, throughput
    assert any("0.80x (pairs 0.70-0.90, n=3)" in r for r in rows)
    text = "\n".join(llamacpp.section(res))
    assert "--n_ctx 8192" in text and "**0.80x** (0.70, 0.80, 0.90)" in text
    assert f"| {llamacpp.CACHED} | 60.0 | **0.60x** |" in text
