"""Streaming a generate: every update's text goes out as a delta before the reply."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

import mlxd.daemon  # noqa: F401  (loads OpenBLAS before mlx.core)
from mlxd import rpc
from mlxd.daemon.engine.engine import Job, Outcome, Update
from mlxd.daemon.service.generation import _follow, _Pending
from mlxd.daemon.transport.server import RequestContext

pytestmark = pytest.mark.anyio


class _Engine:
    def __init__(self) -> None:
        self.cancelled: list[Job] = []

    def cancel(self, job: Job) -> None:
        self.cancelled.append(job)


class _Daemon:
    def __init__(self) -> None:
        self.engine = _Engine()


def _outcome(reason: str, text: str, tokens: list[int]) -> Outcome:
    return Outcome(reason, text, tokens, None, 3, 0, 0.0, 0.0, 0.0)


@pytest.mark.parametrize("reason", ["length", "cancelled"])
async def test_the_last_update_arriving_during_a_send_still_goes_out_as_a_delta(
    reason: str,
) -> None:
    pending = _Pending(want_logprobs=False)
    sent: list[rpc.GenerateDelta] = []

    async def notify(method: str, delta: Any) -> None:
        sent.append(delta)
        if len(sent) == 1:
            # The engine delivers the final update while this delta is on its way.
            pending.push(Update("b", [2], None, _outcome(reason, "ab", [1, 2])))
        await anyio.lowlevel.checkpoint()

    ctx = RequestContext(7, "generate", 1, notify)
    params = rpc.GenerateParams(prompt="x", max_tokens=2, stream=True)
    job = Job(prompt=[0, 0, 0], max_tokens=2, deliver=pending.push)
    pending.push(Update("a", [1]))
    daemon: Any = _Daemon()
    if reason == "cancelled":
        with pytest.raises(rpc.RpcError) as info:
            await _follow(daemon, params, ctx, job, pending, 0.0)
        assert info.value.code == rpc.ErrorCode.REQUEST_CANCELLED
        final_text = "ab"
    else:
        result = await _follow(daemon, params, ctx, job, pending, 0.0)
        final_text = result.text
    assert "".join(d.text for d in sent) == final_text == "ab"
    assert [t for d in sent for t in d.tokens] == [1, 2]
    assert daemon.engine.cancelled == []
