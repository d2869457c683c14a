"""The Neovim plugin (clients/nvim) in a headless nvim against a real daemon."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from mlxd.client import Client

from .daemon_proc import DaemonProcess

NVIM = shutil.which("nvim")
PLUGIN = Path(__file__).resolve().parent.parent / "clients" / "nvim"

pytestmark = pytest.mark.skipif(
    NVIM is None, reason="nvim is not installed (Debian: apt-get install neovim)"
)

# Each script runs inside a pcall; it fills `out`, which is written as JSON, then nvim quits.
PRELUDE = r"""
local mlxd = require("mlxd")
local out = {}
local function wait_done(buf)
  return vim.wait(20000, function() return not mlxd.running(buf) end, 5)
end
local function lines(buf) return vim.api.nvim_buf_get_lines(buf, 0, -1, false) end
local ok, err = pcall(function()
"""
POSTLUDE = r"""
end)
if not ok then out.lua_error = tostring(err) end
local f = assert(io.open(vim.env.MLXD_TEST_OUT, "w"))
f:write(vim.json.encode(out))
f:close()
vim.cmd("qa!")
"""


def run_nvim(folder: Path, socket: Path | str, script: str) -> dict[str, Any]:
    """Run `script` (Lua) in a headless nvim with the plugin on the runtimepath."""
    assert NVIM is not None
    script_path = folder / "test.lua"
    out_path = folder / "out.json"
    out_path.unlink(missing_ok=True)
    script_path.write_text(PRELUDE + script + POSTLUDE)
    env = dict(os.environ, MLXD_SOCKET=str(socket), MLXD_TEST_OUT=str(out_path))
    argv = [
        NVIM, "--headless", "-u", "NONE", "-i", "NONE", "-n",
        "--cmd", f"set rtp+={PLUGIN}",
        "-c", "runtime! plugin/mlxd.lua",
        "-c", f"luafile {script_path}",
    ]  # fmt: skip
    proc = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=env,
        timeout=30,
    )
    assert out_path.exists(), f"nvim wrote nothing: {proc.stdout!r} {proc.stderr!r}"
    out: dict[str, Any] = json.loads(out_path.read_text())
    assert "lua_error" not in out, out["lua_error"]
    return out


def test_completion_streams_into_the_buffer_and_reuses_the_session(
    daemon: DaemonProcess, short_dir: Path
) -> None:
    out = run_nvim(
        short_dir,
        daemon.socket,  # through $MLXD_SOCKET: setup{} resolves the default socket
        r"""
        mlxd.setup({ max_tokens = 24 })
        out.socket = mlxd.socket_path()
        local buf = vim.api.nvim_get_current_buf()
        out.session = mlxd.session_name(buf)
        vim.api.nvim_buf_set_lines(buf, 0, -1, false, { "def fib(n):", "    return", "# end" })
        vim.api.nvim_win_set_cursor(0, { 2, 9 }) -- on the last "n" of "return"
        vim.cmd("MlxdComplete")
        out.first_done = wait_done(buf)
        out.first = mlxd.last(buf)
        out.first_lines = lines(buf)
        vim.cmd("normal! G$") -- the end of the buffer: the prompt is now all of it
        vim.cmd("MlxdComplete")
        out.second_done = wait_done(buf)
        out.second = mlxd.last(buf)
        out.second_lines = lines(buf)
        mlxd.status(function(result, err) out.status = result or err end)
        vim.wait(10000, function() return out.status ~= nil end, 5)
        """,
    )
    assert out["socket"] == str(daemon.socket)
    assert out["first_done"] and out["second_done"]

    first, second = out["first"], out["second"]
    prompt1 = "def fib(n):\n    return"
    result1 = first["result"]
    assert first["prompt"] == prompt1
    assert result1["session"] == out["session"]
    assert result1["usage"]["completion_tokens"] == 24
    assert first["deltas"] >= 1
    # What the deltas inserted is the result's text, at the cursor, before the rest.
    assert first["text"] == result1["text"]
    assert "\n".join(out["first_lines"]) == prompt1 + result1["text"] + "\n# end"

    prompt2 = "\n".join(out["first_lines"])
    result2 = second["result"]
    assert second["prompt"] == prompt2
    assert "\n".join(out["second_lines"]) == prompt2 + result2["text"]
    # The buffer's session: the second completion reuses the first one's cache.
    assert result2["session"] == out["session"]
    assert result2["usage"]["cached_tokens"] > 0
    assert out["status"]["state"] in ("ok", "degraded")

    # Greedy output is deterministic: the same prompts, cold, from the Python client.
    with Client(daemon.socket) as client:
        assert client.generate(prompt1, max_tokens=24).text == result1["text"]
        assert client.generate(prompt2, max_tokens=24).text == result2["text"]
        # The plugin deleted its session when nvim exited.
        assert out["session"] not in {s.session for s in client.sessions_list()}


def test_cancel_with_the_default_keymap_keeps_the_partial_text(
    daemon: DaemonProcess, short_dir: Path
) -> None:
    out = run_nvim(
        short_dir,
        daemon.socket,
        r"""
        mlxd.setup({ max_tokens = 2000 })
        local buf = vim.api.nvim_get_current_buf()
        vim.api.nvim_buf_set_lines(buf, 0, -1, false, { "Once upon a time" })
        vim.cmd("normal! G$")
        vim.cmd("MlxdComplete")
        out.streaming = vim.wait(20000, function()
          local job = mlxd.job(buf)
          return job == nil or job.deltas > 0
        end, 1)
        out.running_at_cancel = mlxd.running(buf)
        vim.api.nvim_feedkeys("\\mc", "mx", false) -- <leader>mc, mapleader unset: "\"
        out.done = wait_done(buf)
        out.last = mlxd.last(buf)
        out.lines = lines(buf)
        """,
    )
    assert out["streaming"] and out["running_at_cancel"] and out["done"]
    last = out["last"]
    assert "result" not in last
    assert last["error"]["code"] == -32800
    assert "\n".join(out["lines"]) == "Once upon a time" + last["text"]
    # Cancelled mid-stream: the partial text the daemon reports is what was inserted.
    data = last["error"]["data"]
    assert data["text"] == last["text"]
    assert 0 < data["usage"]["completion_tokens"] < 2000


def test_visual_line_range_completes_the_selection(daemon: DaemonProcess, short_dir: Path) -> None:
    out = run_nvim(
        short_dir,
        daemon.socket,
        r"""
        mlxd.setup({ max_tokens = 8 })
        local buf = vim.api.nvim_get_current_buf()
        vim.api.nvim_buf_set_lines(buf, 0, -1, false, { "one", "two", "three", "four" })
        vim.cmd("normal! 2GVj")
        vim.api.nvim_feedkeys(":MlxdComplete\r", "x", false) -- :'<,'>MlxdComplete
        out.done = wait_done(buf)
        out.last = mlxd.last(buf)
        out.lines = lines(buf)
        """,
    )
    assert out["done"]
    last = out["last"]
    assert last["prompt"] == "two\nthree"
    text = last["result"]["text"]
    assert "\n".join(out["lines"]) == "one\ntwo\nthree" + text + "\nfour"


def test_no_daemon_is_an_error_not_a_hang(short_dir: Path) -> None:
    out = run_nvim(
        short_dir,
        short_dir / "nothing.sock",
        r"""
        mlxd.setup({})
        local buf = vim.api.nvim_get_current_buf()
        vim.api.nvim_buf_set_lines(buf, 0, -1, false, { "hello" })
        vim.cmd("MlxdComplete")
        out.done = wait_done(buf)
        out.last = mlxd.last(buf)
        out.lines = lines(buf)
        """,
    )
    assert out["done"]
    assert "cannot connect" in out["last"]["error"]["message"]
    assert out["lines"] == ["hello"]
