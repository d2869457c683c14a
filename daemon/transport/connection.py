"""Connection-level helpers both fronts share: connection ids and telling a peer's hang-up."""

from __future__ import annotations

import itertools
import select

from anyio.abc import ByteStream, SocketAttribute

__all__ = ["hung_up", "next_connection_id"]

# One sequence for JSON-RPC and HTTP connections, so an id names one connection in the logs.
_ids = itertools.count(1)


def next_connection_id() -> int:
    return next(_ids)


def hung_up(stream: ByteStream) -> bool:
    """Did the peer close both directions (gone), rather than only its sending side?"""
    sock = stream.extra(SocketAttribute.raw_socket, None)
    if sock is None:
        return False  # not a socket (stdio): EOF means the peer is done
    if sock.fileno() < 0:
        return True  # closed already: our writer gave up on this peer
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN | getattr(select, "POLLRDHUP", 0))
    events = dict(poller.poll(0)).get(sock.fileno(), 0)
    return bool(events & (select.POLLHUP | select.POLLERR))
