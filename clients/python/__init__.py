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

from mlxd.rpc import Framing, default_socket_path

from . import errors
from ._common import ChatInput, Sampling
from .aio import AsyncClient, AsyncGenerateStream
from .errors import *  # noqa: F403  the exceptions, listed once in errors.__all__
from .sync import Client, GenerateStream

__all__ = [
    "AsyncClient",
    "AsyncGenerateStream",
    "ChatInput",
    "Client",
    "Framing",
    "GenerateStream",
    "Sampling",
    "default_socket_path",
]
__all__ += errors.__all__
