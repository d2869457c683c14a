"""Sans-I/O JSON-RPC 2.0 codec: bytes in, messages out; message in, bytes out.

Like h11's Connection, nothing here touches a socket. Framing is newline-delimited JSON
or LSP `Content-Length`, detected per connection from its first bytes; a frame over the
size cap is an error, never a memory leak. A connection that starts with an HTTP request
line is handed over whole (`HTTP` event) to the daemon's HTTP glue.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

from .errors import UNDECODABLE, ErrorCode, ErrorObject

__all__ = [
    "CLOSED",
    "DEFAULT_MAX_FRAME_BYTES",
    "HTTP",
    "NEED_DATA",
    "Batch",
    "Connection",
    "Event",
    "Framing",
    "FramingError",
    "Invalid",
    "Message",
    "Notification",
    "OutMessage",
    "Request",
    "Response",
    "error_response",
    "notification",
    "request",
    "response",
]

DEFAULT_MAX_FRAME_BYTES = 8 * 1024 * 1024
MAX_HEADER_BYTES = 8 * 1024
_LSP_MAGIC = b"content-length:"
_WHITESPACE = b" \t\r\n"
_HTTP_METHODS = tuple(
    m + b" " for m in (b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"PATCH")
)

Id = int | str | None


class Framing(enum.Enum):
    NDJSON = "ndjson"
    LSP = "lsp"
    HTTP = "http"


class _Sentinel:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA: Any = _Sentinel("NEED_DATA")
CLOSED: Any = _Sentinel("CLOSED")
HTTP: Any = _Sentinel("HTTP")  # the connection speaks HTTP/1.1: take_data() and hand it on


# -- incoming events --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    id: Id
    method: str
    params: msgspec.Raw | None


@dataclass(frozen=True, slots=True)
class Notification:
    method: str
    params: msgspec.Raw | None


@dataclass(frozen=True, slots=True)
class Response:
    id: Id
    result: msgspec.Raw | None
    error: ErrorObject | None


@dataclass(frozen=True, slots=True)
class Invalid:
    """A message that cannot be dispatched; answer it with `error` (id is null if unknown)."""

    id: Id
    error: ErrorObject


Message = Request | Notification | Response | Invalid


@dataclass(frozen=True, slots=True)
class Batch:
    items: tuple[Message, ...]


@dataclass(frozen=True, slots=True)
class FramingError:
    """The byte stream cannot be parsed further: reply with `error`, then close."""

    error: ErrorObject


Event = Message | Batch | FramingError | _Sentinel


# -- outgoing messages ------------------------------------------------------------------


class _Out(msgspec.Struct, omit_defaults=True):
    jsonrpc: str


class RequestOut(_Out, omit_defaults=True):
    method: str
    params: Any = UNSET
    id: int | str | UnsetType = UNSET  # UNSET: a notification


class ResponseOut(_Out, omit_defaults=True):
    id: Id
    result: Any = UNSET
    error: ErrorObject | UnsetType = UNSET


OutMessage = RequestOut | ResponseOut


def request(id: int | str, method: str, params: Any = UNSET) -> RequestOut:
    return RequestOut("2.0", method, params, id)


def notification(method: str, params: Any = UNSET) -> RequestOut:
    return RequestOut("2.0", method, params)


def response(id: Id, result: Any) -> ResponseOut:
    return ResponseOut("2.0", id, result=result)


def error_response(id: Id, error: ErrorObject) -> ResponseOut:
    return ResponseOut("2.0", id, error=error)


# -- decoding ---------------------------------------------------------------------------


class _Envelope(msgspec.Struct):
    jsonrpc: str | UnsetType = UNSET
    method: str | UnsetType = UNSET
    id: int | str | UnsetType | None = UNSET
    params: msgspec.Raw | UnsetType = UNSET
    result: msgspec.Raw | UnsetType = UNSET
    error: ErrorObject | UnsetType = UNSET


_envelope_decoder = msgspec.json.Decoder(_Envelope)
_batch_decoder = msgspec.json.Decoder(list[msgspec.Raw])
_encoder = msgspec.json.Encoder()
_UNPARSEABLE = (*UNDECODABLE, RecursionError)
# U+2028/U+2029 are legal raw inside JSON strings, but str.splitlines(), JavaScript and many
# line-oriented tools treat them as line breaks; escaping keeps one message per line for them.
_LINE_SEPARATORS = ((b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"))


def _invalid(id: Id, code: ErrorCode, message: str) -> Invalid:
    return Invalid(id, ErrorObject(int(code), message))


def _salvage_id(obj: object) -> Id:
    """The id of a malformed request, if it has a usable one, so the error can name it."""
    if isinstance(obj, dict):
        value = obj.get("id")
        if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
            return value
    return None


def _params(raw: msgspec.Raw | UnsetType) -> msgspec.Raw | None:
    return None if raw is UNSET else raw


def decode_message(raw: bytes) -> Message:
    """One JSON-RPC message from one JSON value (not a batch)."""
    try:
        env = _envelope_decoder.decode(raw)
    except msgspec.ValidationError as exc:
        # The typed decode can stop at a bad field before reaching a syntax error further on;
        # a parse error takes precedence, else salvage the id.
        try:
            obj = msgspec.json.decode(raw)
        except msgspec.ValidationError:
            obj = None  # valid JSON, but a number out of range (a 5,000-digit id, 1e999)
        except _UNPARSEABLE as parse_exc:
            return _invalid(None, ErrorCode.PARSE_ERROR, f"parse error: {parse_exc}")
        return _invalid(_salvage_id(obj), ErrorCode.INVALID_REQUEST, f"invalid request: {exc}")
    except _UNPARSEABLE as exc:
        return _invalid(None, ErrorCode.PARSE_ERROR, f"parse error: {exc}")
    msg_id: Id = None if env.id is UNSET else env.id
    if env.jsonrpc != "2.0":
        return _invalid(
            msg_id, ErrorCode.INVALID_REQUEST, 'invalid request: "jsonrpc" must be "2.0"'
        )
    if env.method is not UNSET:
        if env.result is not UNSET or env.error is not UNSET:
            return _invalid(
                msg_id, ErrorCode.INVALID_REQUEST, "invalid request: method with result"
            )
        if env.id is UNSET:
            return Notification(env.method, _params(env.params))
        return Request(msg_id, env.method, _params(env.params))
    if env.id is not UNSET and (env.result is UNSET) != (env.error is UNSET):
        error = None if env.error is UNSET else env.error
        return Response(msg_id, _params(env.result), error)
    return _invalid(msg_id, ErrorCode.INVALID_REQUEST, "invalid request: no method")


def decode_body(body: bytes) -> Message | Batch:
    """A frame's body: one message, or a batch (JSON array) of them."""
    stripped = body.lstrip(_WHITESPACE)
    if not stripped.startswith(b"["):
        return decode_message(body)
    try:
        items = _batch_decoder.decode(body)
    except _UNPARSEABLE as exc:
        return _invalid(None, ErrorCode.PARSE_ERROR, f"parse error: {exc}")
    if not items:
        return _invalid(None, ErrorCode.INVALID_REQUEST, "invalid request: empty batch")
    return Batch(tuple(decode_message(bytes(item)) for item in items))


# -- the connection ---------------------------------------------------------------------


class Connection:
    """One side of a JSON-RPC byte stream.

    `receive_data(bytes)` (b"" at EOF) feeds it; `next_event()` returns a Message, Batch,
    FramingError, NEED_DATA or CLOSED; `send(message)` returns the framed bytes to write.
    With `framing=None` (a server) the framing is detected from the first bytes received.
    """

    def __init__(
        self, framing: Framing | None = None, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    ) -> None:
        self._framing = framing
        self._max_frame = max_frame_bytes
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf already searched for a delimiter
        self._eof = False
        self._broken = False

    @property
    def framing(self) -> Framing | None:
        return self._framing

    @property
    def pending_bytes(self) -> int:
        """Bytes of an incomplete frame held; a server closes a frame left idle too long."""
        return len(self._buf)

    def take_data(self) -> bytes:
        """Every byte received and not consumed (for the HTTP glue once `HTTP` is seen)."""
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def receive_data(self, data: bytes) -> None:
        if data:
            self._buf += data
        else:
            self._eof = True

    def send(self, message: OutMessage | list[OutMessage]) -> bytes:
        body = _encoder.encode(message)
        if b"\xe2\x80" in body:  # the shared UTF-8 prefix of U+2000..U+203F
            for raw, escaped in _LINE_SEPARATORS:
                body = body.replace(raw, escaped)
        if self._framing is Framing.LSP:
            return b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        return body + b"\n"

    def next_event(self) -> Event:
        if self._broken:
            return CLOSED
        while True:
            if self._framing is None and not self._detect():
                return CLOSED if self._eof else NEED_DATA
            if self._framing is Framing.HTTP:
                return HTTP
            frame = self._next_lsp() if self._framing is Framing.LSP else self._next_line()
            if isinstance(frame, FramingError):
                self._broken = True
                return frame
            if not isinstance(frame, bytes):
                return CLOSED if self._eof else NEED_DATA
            if frame.strip(_WHITESPACE):
                return decode_body(frame)

    # framing detection and frames ------------------------------------------------------

    def _detect(self) -> bool:
        head = bytes(self._buf[:8])
        if any(m.startswith(head) and m != head for m in _HTTP_METHODS) and not self._eof:
            return False  # could still become "POST /v1/..."
        if head.startswith(_HTTP_METHODS):
            self._framing = Framing.HTTP
            return True
        start = len(self._buf) - len(self._buf.lstrip(_WHITESPACE))
        head = bytes(self._buf[start : start + len(_LSP_MAGIC)]).lower()
        if not head:
            if self._eof:
                self._buf.clear()
            return False
        if _LSP_MAGIC.startswith(head) and len(head) < len(_LSP_MAGIC) and not self._eof:
            return False  # could still become "Content-Length:"
        if head == _LSP_MAGIC:
            self._framing = Framing.LSP
            del self._buf[:start]
        else:
            self._framing = Framing.NDJSON
        return True

    def _too_large(self, size: int) -> FramingError:
        return FramingError(
            ErrorObject(
                int(ErrorCode.INVALID_REQUEST),
                f"frame of {size} bytes exceeds the limit of {self._max_frame} bytes",
                {"limit": self._max_frame, "size": size},
            )
        )

    def _next_line(self) -> bytes | FramingError | _Sentinel:
        idx = self._buf.find(b"\n", self._scanned)
        if idx < 0:
            if len(self._buf) > self._max_frame:
                return self._too_large(len(self._buf))
            if self._eof and self._buf:
                line = bytes(self._buf)  # a last line without a newline still counts
                self._buf.clear()
                self._scanned = 0
                return line
            self._scanned = len(self._buf)
            return NEED_DATA
        if idx > self._max_frame:
            return self._too_large(idx)
        line = bytes(self._buf[:idx])
        del self._buf[: idx + 1]
        self._scanned = 0
        return line

    def _next_lsp(self) -> bytes | FramingError | _Sentinel:
        end = self._buf.find(b"\r\n\r\n", max(0, self._scanned - 3))
        if end < 0:
            if len(self._buf) > MAX_HEADER_BYTES:
                return self._framing_error("LSP header section too long or not terminated")
            self._scanned = len(self._buf)
            return NEED_DATA
        length = self._content_length(bytes(self._buf[:end]))
        if isinstance(length, FramingError):
            return length
        start = end + 4
        if len(self._buf) - start < length:
            self._scanned = end  # header found; rescan is cheap
            return NEED_DATA
        body = bytes(self._buf[start : start + length])
        del self._buf[: start + length]
        self._scanned = 0
        return body

    def _content_length(self, header: bytes) -> int | FramingError:
        length: int | None = None
        for line in header.split(b"\r\n"):
            name, sep, value = line.partition(b":")
            if not sep:
                return self._framing_error(f"malformed LSP header line: {line[:80]!r}")
            if name.strip().lower() == b"content-length":
                text = value.strip()
                if not text.isdigit() or len(text) > 12:
                    return self._framing_error(f"invalid Content-Length: {text[:40]!r}")
                length = int(text)
        if length is None:
            return self._framing_error("LSP frame without Content-Length")
        if length > self._max_frame:
            return self._too_large(length)
        return length

    @staticmethod
    def _framing_error(message: str) -> FramingError:
        return FramingError(ErrorObject(int(ErrorCode.PARSE_ERROR), message))
