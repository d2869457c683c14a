"""The client's typed methods, written once: the same names, signatures and requests on both clients."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from mlxd.client import AsyncClient, Client
from mlxd.client._methods import AsyncMethods, SyncMethods
from mlxd.rpc import (
    ChatMessage,
    EmptyParams,
    GenerateParams,
    InitializeParams,
    ModelsSwapParams,
    SessionForkParams,
    SessionInfo,
    SessionParams,
    SessionSaveParams,
    SessionSaveResult,
    SessionsDeleteResult,
    SessionsListResult,
    ShutdownParams,
    TokenizeParams,
)

INFO = SessionInfo("a", 3, 4096, "hot", 1.0)
RESULT = object()  # a result passed through as it is decoded
# (method and its arguments, the request it sends, what the daemon returns, what it gives back)
CASES: list[tuple[str, tuple[Any, ...], dict[str, Any], str, Any, Any, Any]] = [
    ("status", (), {}, "status", EmptyParams(), RESULT, RESULT),
    ("models_current", (), {}, "models/current", EmptyParams(), RESULT, RESULT),
    ("sessions_list", (), {}, "sessions/list", EmptyParams(), SessionsListResult([INFO]), [INFO]),
    ("sessions_get", ("a",), {}, "sessions/get", SessionParams("a"), INFO, INFO),
    ("sessions_delete", ("a",), {}, "sessions/delete", SessionParams("a"),
     SessionsDeleteResult(True), True),
    ("sessions_fork", ("a", "b"), {}, "sessions/fork", SessionForkParams("a", "b"), INFO, INFO),
    ("sessions_save", (), {}, "sessions/save", SessionSaveParams(None), SessionSaveResult(2), 2),
    ("models_swap", ("m",), {"drain_timeout_s": 2.0}, "models/swap", ModelsSwapParams("m", 2.0),
     RESULT, RESULT),
    ("shutdown", (), {"drain_timeout_s": 1.5}, "shutdown", ShutdownParams(1.5), None, None),
    ("generate", ("hi",), {"max_tokens": 3, "seed": 7}, "generate",
     GenerateParams(prompt="hi", max_tokens=3, seed=7), RESULT, RESULT),
    ("tokenize", (), {"messages": [{"role": "user", "content": "x"}]}, "tokenize",
     TokenizeParams(messages=[ChatMessage("user", "x")]), RESULT, RESULT),
]  # fmt: skip


class SyncRecorder(SyncMethods[GenerateParams]):
    def __init__(self, result: Any) -> None:
        self.result = result
        self.sent: list[tuple[str, Any]] = []

    def call(self, method: str, params: Any = None) -> Any:
        self.sent.append((method, params))
        return self.result

    def _new_stream(self, params: GenerateParams) -> GenerateParams:
        return params


class AsyncRecorder(AsyncMethods[GenerateParams]):
    def __init__(self, result: Any) -> None:
        self.result = result
        self.sent: list[tuple[str, Any]] = []

    async def call(self, method: str, params: Any = None) -> Any:
        self.sent.append((method, params))
        return self.result

    def _new_stream(self, params: GenerateParams) -> GenerateParams:
        return params


def _public(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


def test_both_clients_offer_the_same_methods_with_the_same_signatures() -> None:
    shared = _public(SyncMethods)
    assert {case[0] for case in CASES} | {"stream", "initialize", "call"} == shared
    assert shared <= _public(Client) and shared <= _public(AsyncClient)
    blocking, awaitable = SyncRecorder(None), AsyncRecorder(None)
    for name in sorted(shared - {"call"}):
        sync_method, async_method = getattr(blocking, name), getattr(awaitable, name)
        assert inspect.signature(sync_method) == inspect.signature(async_method), name
        assert not inspect.iscoroutinefunction(sync_method), name
        assert inspect.iscoroutinefunction(async_method) == (name != "stream"), name
        if name != "stream":  # a plain method; the others are bound per client
            assert sync_method.__qualname__ == f"SyncRecorder.{name}"
    assert str(inspect.signature(Client.sessions_fork)) == (
        "(self, session: 'str', new_session: 'str') -> 'SessionInfo'"
    )


@pytest.mark.parametrize(("name", "args", "kwargs", "method", "params", "result", "returns"), CASES)
def test_a_blocking_method_sends_its_request_and_reads_its_result(
    name: str, args: tuple[Any, ...], kwargs: dict[str, Any], method: str, params: Any,
    result: Any, returns: Any,
) -> None:  # fmt: skip
    client = SyncRecorder(result)
    assert getattr(client, name)(*args, **kwargs) == returns
    assert client.sent == [(method, params)]


@pytest.mark.anyio
@pytest.mark.parametrize(("name", "args", "kwargs", "method", "params", "result", "returns"), CASES)
async def test_an_async_method_sends_the_same_request_and_reads_the_same_result(
    name: str, args: tuple[Any, ...], kwargs: dict[str, Any], method: str, params: Any,
    result: Any, returns: Any,
) -> None:  # fmt: skip
    client = AsyncRecorder(result)
    assert await getattr(client, name)(*args, **kwargs) == returns
    assert client.sent == [(method, params)]


@pytest.mark.anyio
async def test_initialize_and_stream_build_the_same_requests_on_both() -> None:
    blocking, awaitable = SyncRecorder(RESULT), AsyncRecorder(RESULT)
    assert blocking.initialize() is RESULT and await awaitable.initialize() is RESULT
    assert blocking.sent == awaitable.sent
    [(method, params)] = blocking.sent
    assert method == "initialize" and isinstance(params, InitializeParams)
    assert params.client is not None and params.client.name == "mlxd.client"
    streamed = GenerateParams(prompt="hi", stream=True, max_tokens=2)
    assert blocking.stream("hi", max_tokens=2) == streamed == awaitable.stream("hi", max_tokens=2)
    with pytest.raises(ValueError):  # exactly one of prompt/messages, before anything is sent
        blocking.generate("hi", messages=[{"role": "user", "content": "x"}])
    assert len(blocking.sent) == 1
