"""A `Network` of in-memory streams, for real `Node`s in one trio process.

Each listening address keeps a channel of accepted streams; `connect` makes a
`trio.testing.memory_stream_pair` and hands one end to the listener. Nothing touches a socket.
"""

from __future__ import annotations

import itertools

import trio
import trio.testing

from replicator.sync.network import Listener


class MemoryListener(trio.abc.Listener[trio.abc.Stream]):
    def __init__(self, incoming: trio.MemoryReceiveChannel[trio.abc.Stream]) -> None:
        self._incoming = incoming

    async def accept(self) -> trio.abc.Stream:
        return await self._incoming.receive()

    async def aclose(self) -> None:
        await self._incoming.aclose()


class MemoryNetwork:
    def __init__(self) -> None:
        self._listening: dict[tuple[str, int], trio.MemorySendChannel[trio.abc.Stream]] = {}
        self._remotes: dict[int, tuple[str, str]] = {}
        self._ports = itertools.count(40000)

    async def listen(self, host: str, port: int) -> list[Listener]:
        if (host, port) in self._listening:
            raise OSError(f"{host}:{port} is taken")
        send, receive = trio.open_memory_channel[trio.abc.Stream](16)
        self._listening[(host, port)] = send
        return [MemoryListener(receive)]

    async def connect(self, host: str, port: int) -> trio.abc.Stream:
        send = self._listening.get((host, port))
        if send is None:
            raise OSError(f"nobody listens on {host}:{port}")
        ours, theirs = trio.testing.memory_stream_pair()
        self._remotes[id(theirs)] = (f"mem:{next(self._ports)}", "mem")
        try:
            await send.send(theirs)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            del self._listening[(host, port)]
            raise OSError(f"{host}:{port} stopped listening") from None
        return ours

    def remote(self, stream: trio.abc.Stream) -> tuple[str, str]:
        return self._remotes.get(id(stream), ("unknown", "unknown"))
