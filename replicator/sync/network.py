"""The node's network, as a parameter: TCP in production, anything stream-shaped in a test.

A node listens, dials and names the far end of a connection only through a `Network`, so a
test can run several real nodes in one trio process over in-memory streams (see
`tests/support/memory_network.py`) and a simulation can drop, delay or cut what they say.
"""

from __future__ import annotations

from typing import Protocol

import trio

__all__ = ["Listener", "Network", "TcpNetwork"]

Listener = trio.abc.Listener[trio.abc.Stream]


class Network(Protocol):
    async def listen(self, host: str, port: int) -> list[Listener]:
        """Listeners on ``host:port``; `OSError` when the address is taken."""
        ...

    async def connect(self, host: str, port: int) -> trio.abc.Stream:
        """A stream to ``host:port``; `OSError` when nobody listens there."""
        ...

    def remote(self, stream: trio.abc.Stream) -> tuple[str, str]:
        """``host:port`` of the far end of an accepted stream, and its host alone (the source
        address the handshake limits count by)."""
        ...


class TcpNetwork:
    """The real one: TCP sockets."""

    async def listen(self, host: str, port: int) -> list[Listener]:
        return list(await trio.open_tcp_listeners(port, host=host))

    async def connect(self, host: str, port: int) -> trio.abc.Stream:
        return await trio.open_tcp_stream(host, port)

    def remote(self, stream: trio.abc.Stream) -> tuple[str, str]:
        if not isinstance(stream, trio.SocketStream):
            return "unknown", "unknown"
        try:
            host, port = stream.socket.getpeername()[:2]
        except OSError:
            return "unknown", "unknown"
        return f"{host}:{port}", str(host)
