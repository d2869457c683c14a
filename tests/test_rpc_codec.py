"""The sans-I/O codec, h11-style: two Connections wired together in memory, no sockets."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlxd.rpc import (
    CLOSED,
    NEED_DATA,
    Batch,
    Connection,
    ErrorCode,
    ErrorObject,
    Framing,
    FramingError,
    Invalid,
    Notification,
    Request,
    Response,
    error_response,
    notification,
    request,
    response,
)

# -- helpers ----------------------------------------------------------------------------


def drain(conn: Connection) -> list[Any]:
    """Every event available now, ending with the NEED_DATA or CLOSED that stopped it."""
    events: list[Any] = []
    while True:
        event = conn.next_event()
        events.append(event)
        if event is NEED_DATA or event is CLOSED:
            return events


def feed(conn: Connection, *chunks: bytes, eof: bool = False) -> list[Any]:
    """Feed chunks one by one, collecting events after each; the sentinels are dropped."""
    events: list[Any] = []
    for chunk in chunks:
        if not chunk:
            continue  # b"" would mean EOF
        conn.receive_data(chunk)
        events += drain(conn)[:-1]
    if eof:
        conn.receive_data(b"")
        events += drain(conn)
    return events


def only(conn: Connection, data: bytes) -> Any:
    [event] = feed(conn, data)
    return event


def error_code(event: Any) -> int:
    assert isinstance(event, Invalid | FramingError), event
    return event.error.code


def params_of(event: Request | Notification) -> Any:
    assert event.params is not None
    return msgspec.json.decode(event.params)


def client_server(framing: Framing = Framing.NDJSON) -> tuple[Connection, Connection]:
    return Connection(framing), Connection()


MESSAGES = [
    request(1, "initialize", {"client": {"name": "t", "version": "1"}}),
    notification("$/cancelRequest", {"id": 1}),
    request("abc", "generate", {"prompt": "hi\nthere \u2028 \u00e9", "stream": True}),
    request(2, "status"),
]


def stream_of(conn: Connection, messages: list[Any] = MESSAGES) -> bytes:
    return b"".join(conn.send(m) for m in messages)


# -- framing detection ------------------------------------------------------------------


def test_ndjson_round_trip_between_client_and_server() -> None:
    client, server = client_server()
    events = feed(server, client.send(request(1, "status", {})))
    assert server.framing is Framing.NDJSON
    assert events == [Request(1, "status", msgspec.Raw(b"{}"))]
    reply = server.send(response(1, {"ok": True}))
    assert reply.endswith(b"\n") and reply.count(b"\n") == 1
    [event] = feed(client, reply)
    assert isinstance(event, Response) and event.id == 1 and event.error is None
    assert event.result is not None and msgspec.json.decode(event.result) == {"ok": True}


def test_lsp_round_trip_between_client_and_server() -> None:
    client, server = client_server(Framing.LSP)
    data = client.send(request(7, "status"))
    assert data.startswith(b"Content-Length: ")
    assert feed(server, data) == [Request(7, "status", None)]
    assert server.framing is Framing.LSP
    reply = server.send(error_response(7, ErrorObject(-32001, "draining")))
    assert reply.startswith(b"Content-Length: ")
    assert feed(client, reply) == [Response(7, None, ErrorObject(-32001, "draining"))]


def test_lsp_detected_with_the_header_split_byte_by_byte() -> None:
    client, server = client_server(Framing.LSP)
    data = client.send(request(1, "status"))
    events: list[Any] = []
    for i in range(len(data)):
        events += feed(server, data[i : i + 1])
        if i < len(b"Content-Length:") - 1:
            assert server.framing is None
    assert server.framing is Framing.LSP
    assert events == [Request(1, "status", None)]


@pytest.mark.parametrize("name", [b"content-length", b"CONTENT-LENGTH", b"Content-length"])
def test_lsp_header_name_is_case_insensitive(name: bytes) -> None:
    body = b'{"jsonrpc":"2.0","id":1,"method":"status"}'
    server = Connection()
    assert only(server, name + b": %d\r\n\r\n" % len(body) + body) == Request(1, "status", None)
    assert server.framing is Framing.LSP


def test_lsp_with_leading_blank_lines_and_extra_headers() -> None:
    body = b'{"jsonrpc":"2.0","id":1,"method":"status"}'
    frame = b"Content-Length: %d\r\nContent-Type: application/vscode-jsonrpc\r\n\r\n" % len(body)
    server = Connection()
    assert feed(server, b"\r\n\r\n  " + frame + body) == [Request(1, "status", None)]
    assert server.framing is Framing.LSP


def test_ndjson_with_leading_blank_lines() -> None:
    server = Connection()
    events = feed(server, b"\n\r\n  \n", b'{"jsonrpc":"2.0","method":"x"}\n\n')
    assert events == [Notification("x", None)]
    assert server.framing is Framing.NDJSON


def test_detection_waits_while_input_could_still_be_a_header() -> None:
    server = Connection()
    assert feed(server, b"  Conte") == []
    assert server.framing is None
    server.receive_data(b"x")  # "Contex" cannot become "Content-Length:"
    assert server.next_event() is NEED_DATA
    assert server.framing is Framing.NDJSON
    assert error_code(only(server, b"\n")) == ErrorCode.PARSE_ERROR


# -- frames and chunking ----------------------------------------------------------------


@pytest.mark.parametrize("framing", [Framing.NDJSON, Framing.LSP])
def test_every_split_point_gives_the_same_events(framing: Framing) -> None:
    data = stream_of(Connection(framing))
    whole = feed(Connection(), data, eof=True)
    assert len(whole) == len(MESSAGES) + 1 and whole[-1] is CLOSED
    for i in range(len(data) + 1):
        assert feed(Connection(), data[:i], data[i:], eof=True) == whole, i


@pytest.mark.parametrize("framing", [Framing.NDJSON, Framing.LSP])
def test_several_frames_in_one_chunk(framing: Framing) -> None:
    events = feed(Connection(), stream_of(Connection(framing)))
    assert [type(e) for e in events] == [Request, Notification, Request, Request]
    assert params_of(events[2])["prompt"] == "hi\nthere \u2028 \u00e9"
    assert events[3] == Request(2, "status", None)


def test_a_message_split_in_two_is_not_an_event_until_complete() -> None:
    server = Connection()
    data = Connection().send(request(1, "status"))
    assert drain_after(server, data[:10]) == [NEED_DATA]
    assert server.pending_bytes == 10
    assert feed(server, data[10:]) == [Request(1, "status", None)]
    assert server.pending_bytes == 0


def drain_after(conn: Connection, data: bytes) -> list[Any]:
    conn.receive_data(data)
    return drain(conn)


# -- batches ----------------------------------------------------------------------------


def test_batch_with_requests_notifications_and_invalid_items() -> None:
    data = (
        b'[{"jsonrpc":"2.0","id":1,"method":"status"},'
        b'{"jsonrpc":"2.0","method":"$/cancelRequest","params":{"id":1}},'
        b'1, {"foo": 2}, {"jsonrpc":"2.0","id":9,"method":7}]\n'
    )
    event = only(Connection(), data)
    assert isinstance(event, Batch)
    first, second, third, fourth, fifth = event.items
    assert first == Request(1, "status", None)
    assert isinstance(second, Notification) and params_of(second) == {"id": 1}
    assert error_code(third) == error_code(fourth) == ErrorCode.INVALID_REQUEST
    assert isinstance(fifth, Invalid) and fifth.id == 9


def test_batch_sent_as_a_list_decodes_as_a_batch_of_responses() -> None:
    client, server = client_server()
    feed(server, client.send(request(1, "status")))
    data = server.send([response(1, {}), error_response(2, ErrorObject(-32601, "nope"))])
    assert data.count(b"\n") == 1
    event = only(client, data)
    assert isinstance(event, Batch)
    assert event.items == (
        Response(1, msgspec.Raw(b"{}"), None),
        Response(2, None, ErrorObject(-32601, "nope")),
    )


def test_empty_batch_is_an_invalid_request() -> None:
    event = only(Connection(), b" [ ] \n")
    assert isinstance(event, Invalid) and event.id is None
    assert event.error.code == ErrorCode.INVALID_REQUEST


def test_batch_item_with_invalid_utf8_is_a_parse_error_of_that_item() -> None:
    data = b'[{"jsonrpc":"2.0","method":"\xff"},{"jsonrpc":"2.0","method":"ok"}]\n'
    event = only(Connection(), data)
    assert isinstance(event, Batch)
    bad, good = event.items
    assert error_code(bad) == ErrorCode.PARSE_ERROR and good == Notification("ok", None)


def test_malformed_batch_is_a_parse_error() -> None:
    assert error_code(only(Connection(), b'[{"jsonrpc":"2.0",]\n')) == ErrorCode.PARSE_ERROR


# -- parse error, invalid request, ids ---------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b'{"jsonrpc":',
        b"{'a': 1}",
        b"nul",
        b'{"a":1}}',
        b'{"id":1,}',
        b'"\xff"',  # invalid UTF-8 in a string
        b'{"jsonrpc":"2.0","method":"\xff"}',
        b'{"jsonrpc":"2.0","id":"\xff","method":"x"}',
        b'{"jsonrpc":"2.0","id":3,"method":5,]',  # a type error before the syntax error
    ],
)
def test_unparseable_json_is_a_parse_error_with_null_id(line: bytes) -> None:
    event = only(Connection(), line + b"\n")
    assert isinstance(event, Invalid) and event.id is None
    assert event.error.code == ErrorCode.PARSE_ERROR


@pytest.mark.parametrize(
    ("line", "salvaged_id"),
    [
        (b"5", None),
        (b'"x"', None),
        (b"null", None),
        (b'{"id":1,"method":"status"}', 1),  # no jsonrpc
        (b'{"jsonrpc":"1.0","id":"a","method":"status"}', "a"),
        (b'{"jsonrpc":"2.0","id":3,"method":5}', 3),  # method not a string
        (b'{"jsonrpc":"2.0","id":1.5,"method":"status"}', None),  # id not int/str
        (b'{"jsonrpc":"2.0","id":true,"method":"status"}', None),
        (b'{"jsonrpc":"2.0","id":[1],"method":"status"}', None),
        (b'{"jsonrpc":"2.0","id":5,"method":"x","result":1}', 5),
        (b'{"jsonrpc":"2.0","id":6}', 6),  # neither method nor result
        (b'{"jsonrpc":"2.0","id":7,"result":1,"error":{"code":1,"message":"m"}}', 7),
        (b'{"jsonrpc":"2.0","result":1}', None),  # a response needs an id
    ],
)
def test_invalid_requests_keep_a_usable_id(line: bytes, salvaged_id: Any) -> None:
    event = only(Connection(), line + b"\n")
    assert isinstance(event, Invalid)
    assert event.error.code == ErrorCode.INVALID_REQUEST
    assert event.id == salvaged_id


def test_null_id_is_a_request_and_absent_id_a_notification() -> None:
    events = feed(
        Connection(),
        b'{"jsonrpc":"2.0","id":null,"method":"status"}\n{"jsonrpc":"2.0","method":"status"}\n',
    )
    assert events == [Request(None, "status", None), Notification("status", None)]


def test_responses_with_result_error_and_null_id() -> None:
    events = feed(
        Connection(Framing.NDJSON),
        b'{"jsonrpc":"2.0","id":1,"result":null}\n'
        b'{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"bad","data":[1]}}\n',
    )
    assert events == [
        Response(1, msgspec.Raw(b"null"), None),
        Response(None, None, ErrorObject(-32700, "bad", [1])),
    ]


# -- the frame cap ----------------------------------------------------------------------


def assert_broken(conn: Connection, event: Any, code: int) -> None:
    assert isinstance(event, FramingError) and event.error.code == code
    assert conn.next_event() is CLOSED
    conn.receive_data(b'{"jsonrpc":"2.0","method":"x"}\n')
    assert conn.next_event() is CLOSED


def test_ndjson_line_over_the_cap_without_newline() -> None:
    server = Connection(max_frame_bytes=64)
    events = feed(server, b'{"jsonrpc":"2.0","method":"', b"x" * 40)
    assert_broken(server, events[-1], ErrorCode.INVALID_REQUEST)
    assert events[-1].error.data["limit"] == 64


def test_ndjson_line_over_the_cap_with_its_newline() -> None:
    server = Connection(max_frame_bytes=64)
    line = b'{"jsonrpc":"2.0","method":"' + b"x" * 64 + b'"}\n'
    assert_broken(server, only(server, line), ErrorCode.INVALID_REQUEST)


def test_ndjson_line_at_the_cap_is_accepted() -> None:
    line = b'{"jsonrpc":"2.0","method":"' + b"x" * 10 + b'"}'
    assert only(Connection(max_frame_bytes=len(line)), line + b"\n") == Notification("x" * 10, None)


def test_ndjson_frames_after_a_good_one_are_capped_too() -> None:
    server = Connection(max_frame_bytes=64)
    good = b'{"jsonrpc":"2.0","method":"x"}\n'
    events = feed(server, good + b"[" * 100)
    assert events[0] == Notification("x", None)
    assert_broken(server, events[1], ErrorCode.INVALID_REQUEST)


def test_lsp_content_length_over_the_cap() -> None:
    server = Connection(max_frame_bytes=1024)
    event = only(server, b"Content-Length: 1025\r\n\r\n{")
    assert_broken(server, event, ErrorCode.INVALID_REQUEST)
    assert event.error.data == {"limit": 1024, "size": 1025}


@pytest.mark.parametrize(
    "value", [b"-5", b"abc", b"", b"12a", b"1e3", b"99999999999999999999", b"\xd9\xa3"]
)
def test_lsp_bad_content_length(value: bytes) -> None:
    server = Connection()
    assert_broken(server, only(server, b"Content-Length: " + value + b"\r\n\r\n{}"), -32700)


def test_lsp_header_without_content_length_or_with_a_bad_line() -> None:
    for header in (b"Content-Length: 2\r\nno colon here", b"Content-Length: 2\r\nX-A: b"):
        server = Connection()
        server.receive_data(header + b"\r\n\r\n{}")
        event = server.next_event()
        if b"colon" in header:
            assert_broken(server, event, ErrorCode.PARSE_ERROR)
        else:
            assert event == Invalid(None, ErrorObject(-32600, event.error.message))
    server = Connection(Framing.LSP)
    assert_broken(server, only(server, b"X-A: 1\r\n\r\n{}"), ErrorCode.PARSE_ERROR)


def test_lsp_header_too_long() -> None:
    server = Connection()
    event = feed(server, b"Content-Length: 1\r\n", b"X-Pad: " + b"x" * 9000)[-1]
    assert_broken(server, event, ErrorCode.PARSE_ERROR)


# -- end of stream ----------------------------------------------------------------------


def test_eof_yields_a_last_line_without_newline() -> None:
    server = Connection()
    assert feed(server, b'{"jsonrpc":"2.0","method":"x"}', eof=True) == [
        Notification("x", None),
        CLOSED,
    ]
    assert server.next_event() is CLOSED


@pytest.mark.parametrize("cut", [5, 20, -3])
def test_eof_mid_lsp_frame_is_closed(cut: int) -> None:
    data = Connection(Framing.LSP).send(request(1, "status"))
    assert feed(Connection(), data + data[:cut], eof=True) == [Request(1, "status", None), CLOSED]


def test_eof_on_an_empty_or_blank_connection() -> None:
    assert feed(Connection(), eof=True) == [CLOSED]
    assert feed(Connection(), b"\n \r\n", eof=True) == [CLOSED]


def test_eof_while_detection_waits_decides_ndjson() -> None:
    server = Connection()
    events = feed(server, b"Content", eof=True)
    assert server.framing is Framing.NDJSON
    assert error_code(events[0]) == ErrorCode.PARSE_ERROR and events[1] is CLOSED


# -- encoding ---------------------------------------------------------------------------

TRICKY = ["a\nb", "a\r\nb", "\u2028", "\u2029", "\x00\x1f", "\u00e9\u2014\U0001f600", '"\\']


@pytest.mark.parametrize("framing", [Framing.NDJSON, Framing.LSP])
def test_encoded_messages_hold_no_raw_line_breaks(framing: Framing) -> None:
    conn = Connection(framing)
    for text in TRICKY:
        data = conn.send(response(1, {"text": text, "list": [text]}))
        body = data.split(b"\r\n\r\n", 1)[1] if framing is Framing.LSP else data[:-1]
        for forbidden in (b"\n", b"\r", "\u2028".encode(), "\u2029".encode()):
            assert forbidden not in body, (text, forbidden)
        assert len(body.decode().splitlines()) == 1
        [event] = feed(Connection(framing), data)
        assert event.result is not None
        assert msgspec.json.decode(event.result) == {"text": text, "list": [text]}


def test_lsp_content_length_counts_utf8_bytes() -> None:
    data = Connection(Framing.LSP).send(notification("x", {"t": "\u00e9\U0001f600"}))
    header, body = data.split(b"\r\n\r\n")
    assert int(header.split(b":")[1]) == len(body)


def test_builders_omit_what_is_absent() -> None:
    conn = Connection()
    assert conn.send(notification("x")) == b'{"jsonrpc":"2.0","method":"x"}\n'
    assert conn.send(request(3, "status")) == b'{"jsonrpc":"2.0","method":"status","id":3}\n'
    assert conn.send(response(None, {})) == b'{"jsonrpc":"2.0","id":null,"result":{}}\n'
    assert conn.send(error_response(1, ErrorObject(-32000, "busy"))) == (
        b'{"jsonrpc":"2.0","id":1,"error":{"code":-32000,"message":"busy"}}\n'
    )


# -- property: chunking never changes the events ----------------------------------------

json_text = st.text(st.characters(codec="utf-8"), max_size=20)
message_strategy = st.one_of(
    st.builds(
        request,
        st.integers(0, 2**53) | json_text,
        json_text,
        st.fixed_dictionaries({"t": json_text}),
    ),
    st.builds(notification, json_text, st.dictionaries(json_text, st.integers(), max_size=3)),
    st.builds(response, st.integers(0, 100), st.lists(json_text, max_size=3)),
)


@settings(max_examples=60, deadline=None)
@given(
    messages=st.lists(message_strategy, min_size=1, max_size=6),
    framing=st.sampled_from(Framing),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
)
def test_arbitrary_chunking_yields_the_same_events(
    messages: list[Any], framing: Framing, cuts: list[int]
) -> None:
    data = stream_of(Connection(framing), messages)
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    whole = feed(Connection(), data, eof=True)
    assert len(whole) == len(messages) + 1
    assert feed(Connection(), *chunks, eof=True) == whole
    assert feed(Connection(), *(data[i : i + 1] for i in range(len(data))), eof=True) == whole
