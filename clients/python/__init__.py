"""The mlxd Python client: `Client` (blocking) and `AsyncClient` (anyio: asyncio or trio).

Depends only on `mlxd.rpc`, msgspec and anyio; importing it never loads MLX or the daemon.

    from mlxd.client import Client

    with Client() as mlxd:  # $MLXD_SOCKET or the platform default
        print(mlxd.generate("Hello", max_tokens=32).text)
        with mlxd.stream(messages=[{"role": "user", "content": "Hi"}]) as deltas:
            for delta in deltas:
                print(delta.text, end="")
        print(deltas.result.usage)

Error replies raise RpcError subclasses from `mlxd.client.errors` (ServerBusy, ...).
"""

from mlxd.rpc import Framing, RpcError, default_socket_path

from ._common import ChatInput, Sampling
from .aio import AsyncClient, AsyncGenerateStream
from .errors import (
    ConnectionClosed,
    ContextTooLong,
    DaemonNotRunning,
    InternalError,
    InvalidParams,
    InvalidRequest,
    MethodNotFound,
    ParseError,
    ProtocolError,
    RequestCancelled,
    ServerBusy,
    SessionNotFound,
    ShuttingDown,
    error_from_object,
)
from .sync import Client, GenerateStream

__all__ = [
    "AsyncClient",
    "AsyncGenerateStream",
    "ChatInput",
    "Client",
    "ConnectionClosed",
    "ContextTooLong",
    "DaemonNotRunning",
    "Framing",
    "GenerateStream",
    "InternalError",
    "InvalidParams",
    "InvalidRequest",
    "MethodNotFound",
    "ParseError",
    "ProtocolError",
    "RequestCancelled",
    "RpcError",
    "Sampling",
    "ServerBusy",
    "SessionNotFound",
    "ShuttingDown",
    "default_socket_path",
    "error_from_object",
]
