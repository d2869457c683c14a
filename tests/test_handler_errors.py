"""Errors inside a handler are the server's (-32603, logged); only params that do not decode
are the client's (-32602)."""

from __future__ import annotations

from typing import Any

import pytest

from mlxd import rpc
from mlxd.daemon.transport.server import RequestContext, RpcServer


def _request(line: bytes) -> rpc.Request:
    codec = rpc.Connection()
    codec.receive_data(line + b"\n")
    message = codec.next_event()
    assert isinstance(message, rpc.Request), message
    return message


async def _notify(method: str, params: Any) -> None:
    pass


async def _call(server: RpcServer, line: bytes) -> Any:
    request = _request(line)
    return await server.call(request, RequestContext(request.id, request.method, 1, _notify))


@pytest.mark.anyio
@pytest.mark.parametrize("error", [ValueError("bad state"), TypeError("bad call"), KeyError("k")])
async def test_an_exception_inside_a_handler_is_an_internal_error(error: Exception) -> None:
    async def handler(params: Any, ctx: RequestContext) -> Any:
        raise error

    server = RpcServer({"tokenize": handler})
    reply = await _call(
        server, b'{"jsonrpc":"2.0","id":1,"method":"tokenize","params":{"text":"a"}}'
    )
    assert reply.error.code == rpc.ErrorCode.INTERNAL_ERROR
    assert "internal error" in reply.error.message


@pytest.mark.anyio
async def test_params_that_do_not_decode_are_invalid_params() -> None:
    async def handler(params: Any, ctx: RequestContext) -> Any:
        raise AssertionError("not reached")

    server = RpcServer({"tokenize": handler})
    for params in (b'{"text":"a","messages":[]}', b'{"txt":"a"}', b'{"text":5}'):
        line = b'{"jsonrpc":"2.0","id":1,"method":"tokenize","params":' + params + b"}"
        reply = await _call(server, line)
        assert reply.error.code == rpc.ErrorCode.INVALID_PARAMS, params
