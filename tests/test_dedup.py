"""Two connections between the same pair of nodes: exactly one survives, the same one on both
sides (the one dialled by the node with the smaller id), and the other is told why.

The far side is played by the test, so both connections exist at once every time: a real node
process on one end, a hand-driven peer (real sockets, real handshake, real Hello) on the other.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from protocol import Goodbye, Hello, Keyring, stretch_passphrase
from replicator.config import load_config
from replicator.membership import fingerprint, shared_settings
from replicator.migrations import SCHEMA_VERSION
from replicator.peer import PeerConnection, PeerSettings
from replicator.store import Store, StoreSettings
from tests.node_procs import SCHEMA, NodeProcess


class FakePeer:
    """Speaks for ``me``: handshake and Hello like a node, then only listens."""

    def __init__(self, me: NodeProcess, node: NodeProcess) -> None:
        config = load_config(str(me.write_config([node])))
        store = Store.open(
            StoreSettings(
                str(me.db_path),
                me.node_id,
                config.replication.replicated_tables(),
                schema_sql=SCHEMA,
            )
        )
        try:
            self.settings = shared_settings(config.replication, store.tables)
        finally:
            store.close()
        key = stretch_passphrase(me.secret, "test")
        self.peer_settings = PeerSettings("test", Keyring(key))
        self.me, self.node = me, node
        self.connections: list[PeerConnection] = []

    async def close(self) -> None:
        for connection in self.connections:
            await connection.abort()

    def hello(self) -> Hello:
        return Hello(
            node_id=self.me.node_id,
            incarnation=1,
            capabilities=frozenset({"changes", "skips", "resend", "role:peer"}),
            schema_version=SCHEMA_VERSION,
            settings_fingerprint=fingerprint(self.settings),
            version_vector={},
            settings=self.settings,
        )

    async def greet(self, connection: PeerConnection) -> None:
        self.connections.append(connection)
        await connection.send(self.hello())
        reply = await connection.receive()
        assert isinstance(reply, Hello)
        assert reply.node_id == self.node.node_id

    async def dial(self) -> PeerConnection:
        connection = await PeerConnection.dial(self.node.host, self.node.port, self.peer_settings)
        await self.greet(connection)
        return connection

    async def accept_one(self) -> PeerConnection:
        """Listen where the node expects ``me`` and take its dial."""
        listeners = await trio.open_tcp_listeners(self.me.port, host=self.me.host)
        try:
            with trio.fail_after(15):
                stream = await listeners[0].accept()
        finally:
            await listeners[0].aclose()
        connection = await PeerConnection.accept(stream, self.peer_settings, "node")
        await self.greet(connection)
        return connection


async def next_goodbye(connection: PeerConnection, within: float = 5.0) -> str | None:
    """The reason of the Goodbye that arrives within ``within`` (None: still open then)."""
    with trio.move_on_after(within):
        while True:
            message = await connection.receive()
            if isinstance(message, Goodbye):
                return message.reason
    return None


@pytest.fixture
def procs() -> Iterator[list[NodeProcess]]:
    started: list[NodeProcess] = []
    yield started
    for node in started:
        node.stop()


async def test_second_connection_from_the_larger_id_is_refused(
    tmp_path: Path, procs: list[NodeProcess]
) -> None:
    node, fake = NodeProcess(tmp_path, "a", "127.0.0.1"), NodeProcess(tmp_path, "b", "127.0.0.2")
    procs.append(node)
    peer = FakePeer(fake, node)
    node.start([fake])
    try:
        preferred = await peer.accept_one()  # a dialled b: the one both sides keep
        crossed = await peer.dial()  # b dialled a as well
        assert await next_goodbye(crossed) == "duplicate connection"
        assert await next_goodbye(preferred, within=1.0) is None
        status = await trio.to_thread.run_sync(node.status)
        states = [p["state"] for p in status["peers"]]
    finally:
        await peer.close()
    assert states == ["connected"]
    assert node.logged("peer connected", peer="b", dialled_by="a")
    assert not node.logged("peer connected", peer="b", dialled_by="b")


async def test_connection_from_the_smaller_id_replaces_the_other(
    tmp_path: Path, procs: list[NodeProcess]
) -> None:
    node, fake = NodeProcess(tmp_path, "b", "127.0.0.2"), NodeProcess(tmp_path, "a", "127.0.0.1")
    procs.append(node)
    peer = FakePeer(fake, node)
    node.start([fake])
    try:
        first = await peer.accept_one()  # b dialled a: not the preferred direction
        preferred = await peer.dial()  # a dialled b: b must switch to this one
        assert await next_goodbye(first) == "replaced by the preferred connection"
        assert await next_goodbye(preferred, within=1.0) is None
    finally:
        await peer.close()
    assert node.logged("peer connected", peer="a", dialled_by="a")
