"""JSON-RPC error codes, the error object on the wire, and the exception that carries one."""

from __future__ import annotations

from enum import IntEnum
from typing import Any

import msgspec

__all__ = ["UNDECODABLE", "ErrorCode", "ErrorObject", "RpcError"]

# Invalid UTF-8 inside a JSON string: a DecodeError in recent msgspec, a UnicodeDecodeError
# in older ones. Either way the text cannot be parsed (-32700).
UNDECODABLE = (msgspec.DecodeError, UnicodeDecodeError)


class ErrorCode(IntEnum):
    PARSE_ERROR = -32700
    INVALID_REQUEST = -32600
    METHOD_NOT_FOUND = -32601
    INVALID_PARAMS = -32602
    INTERNAL_ERROR = -32603
    SERVER_BUSY = -32000
    SHUTTING_DOWN = -32001
    SESSION_NOT_FOUND = -32003
    CONTEXT_TOO_LONG = -32004
    REQUEST_CANCELLED = -32800


class ErrorObject(msgspec.Struct, omit_defaults=True):
    code: int
    message: str
    data: Any = msgspec.UNSET


class RpcError(Exception):
    """An error that becomes a JSON-RPC error response; raise it anywhere in a handler."""

    def __init__(self, code: int, message: str, data: Any = msgspec.UNSET) -> None:
        super().__init__(message)
        self.code = int(code)
        self.message = message
        self.data = data

    def to_object(self) -> ErrorObject:
        return ErrorObject(self.code, self.message, self.data)

    @classmethod
    def from_object(cls, error: ErrorObject) -> RpcError:
        return cls(error.code, error.message, error.data)

    @property
    def name(self) -> str:
        try:
            return ErrorCode(self.code).name
        except ValueError:
            return str(self.code)

    def __repr__(self) -> str:
        return f"RpcError({self.name}, {self.message!r})"
