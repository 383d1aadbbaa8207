"""Connection limits for the server's HTTP/1.1 front (uvicorn's h11 protocol), so that no client can
shut the others out by holding sockets.

A connection is *waiting* from when it opens, or finishes a response, until its next request head
has arrived. A waiting connection is closed `head_timeout` seconds after it began waiting (a partly
sent head is answered 408 first), and it is the first to go when a new connection arrives past a
cap: the oldest waiting connection of the same client past `per_client` connections, or the oldest
of all past `max_connections`. Connections busy with a request are never closed for room; a new one
that finds none to close is refused (503 from uvicorn past the total cap, 429 and a closed socket
past the per-client cap). So slow or silent sockets cost nothing for long, and /health stays reachable.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol


def raw_response(status: int, reason: str, message: str, kind: str) -> bytes:
    """A whole HTTP/1.1 response that closes the connection, with the OpenAI error body the app sends."""
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


class ConnectionLimits:
    """One server's connection bookkeeping; `protocol()` is the protocol class to give uvicorn."""

    def __init__(self, max_connections: int, per_client: int, head_timeout_s: float):
        if min(max_connections, per_client) < 1 or head_timeout_s <= 0:
            raise ValueError(f"connection limits must be positive: --max-connections {max_connections}, "
                             f"--max-connections-per-client {per_client}, --head-timeout {head_timeout_s}")
        self.max_connections, self.per_client, self.head_timeout = max_connections, per_client, head_timeout_s
        self.waiting: dict[LimitedH11, asyncio.TimerHandle] = {}  # oldest first, with each one's head timer
        self.by_client: dict[str, dict[LimitedH11, None]] = {}  # every open connection, per client address
        self.head_late = raw_response(408, "Request Timeout", f"the request head did not arrive within "
                                      f"{head_timeout_s:g} s", "timeout")
        self.too_many = raw_response(429, "Too Many Requests", f"this client has {per_client} connections open, each "
                                     "busy with a request; this server allows no more per client", "rate_limit_exceeded")

    def protocol(self) -> type[H11Protocol]:
        return type("LimitedH11", (LimitedH11,), {"limits": self})

    def opened(self, conn: LimitedH11) -> None:
        mine = self.by_client.setdefault(conn.host, {})
        if len(mine) >= self.per_client and not self._close_oldest(mine):
            conn.transport.write(self.too_many)  # every connection of this client is busy: it has its share
            conn.transport.close()
            return
        if len(conn.connections) > self.max_connections:
            self._close_oldest(self.waiting)  # if none waits, uvicorn answers 503 at the request head
        mine[conn] = None
        self.update(conn)

    def update(self, conn: LimitedH11) -> None:
        """After anything happened on a connection: start or end its wait for a request head."""
        busy = conn.cycle is not None and not conn.cycle.response_complete
        if busy or conn.transport.is_closing():
            timer = self.waiting.pop(conn, None)
            if timer is not None:
                timer.cancel()
        elif conn not in self.waiting:
            conn.partial_head = False
            self.waiting[conn] = conn.loop.call_later(self.head_timeout, self._expire, conn)

    def closed(self, conn: LimitedH11) -> None:
        timer = self.waiting.pop(conn, None)
        if timer is not None:
            timer.cancel()
        mine = self.by_client.get(conn.host, {})
        mine.pop(conn, None)
        if not mine:
            self.by_client.pop(conn.host, None)

    def _close_oldest(self, among: dict[LimitedH11, Any]) -> bool:
        """Close the first connection of `among` (oldest first) that waits for a request head; False if none does."""
        oldest = next((c for c in among if c in self.waiting and not c.transport.is_closing()), None)
        if oldest is None:
            return False
        self.waiting.pop(oldest).cancel()
        oldest.transport.close()
        return True

    def _expire(self, conn: LimitedH11) -> None:
        if self.waiting.pop(conn, None) is not None and not conn.transport.is_closing():
            if conn.partial_head:
                conn.transport.write(self.head_late)
            conn.transport.close()


class LimitedH11(H11Protocol):
    """uvicorn's h11 protocol, reporting to its server's ConnectionLimits."""

    limits: ConnectionLimits
    partial_head = False  # bytes of a request head have arrived while waiting

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.host = self.client[0] if self.client else ""
        self.limits.opened(self)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.limits.update(self)
        self.partial_head = self.partial_head or self in self.limits.waiting

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.limits.update(self)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.limits.closed(self)
