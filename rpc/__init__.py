"""The mlxd protocol: typed messages, error codes and a sans-I/O codec (msgspec only)."""

from .codec import (
    CLOSED,
    DEFAULT_MAX_FRAME_BYTES,
    HTTP,
    NEED_DATA,
    Batch,
    Connection,
    Framing,
    FramingError,
    Invalid,
    Message,
    Notification,
    Request,
    Response,
    error_response,
    notification,
    request,
    response,
)
from .errors import ErrorCode, ErrorObject, RpcError
from .messages import *  # noqa: F403
from .messages import __all__ as _messages_all
from .methods import DELTA_NOTIFICATION, METHODS, MethodSpec, decode_params, decode_result
from .transport import SUN_PATH_MAX, SocketPathTooLong, check_socket_path, default_socket_path

__all__ = [
    "CLOSED",
    "DEFAULT_MAX_FRAME_BYTES",
    "DELTA_NOTIFICATION",
    "HTTP",
    "METHODS",
    "NEED_DATA",
    "SUN_PATH_MAX",
    "Batch",
    "Connection",
    "ErrorCode",
    "ErrorObject",
    "Framing",
    "FramingError",
    "Invalid",
    "Message",
    "MethodSpec",
    "Notification",
    "Request",
    "Response",
    "RpcError",
    "SocketPathTooLong",
    "check_socket_path",
    "decode_params",
    "decode_result",
    "default_socket_path",
    "error_response",
    "notification",
    "request",
    "response",
    *_messages_all,
]
