"""A peer that holds the cluster key: what a compromised or buggy node can send a real node.

It speaks the real protocol (`protocol.Session` inside `replicator.sync.peer.PeerConnection`, over
real sockets) under the identity of a node the target has configured, with the settings
fingerprint that node would send, so the target lets it past Hello. After that it sends
whatever a test hands it: well-formed messages with hostile content, or raw plaintext sealed
with the session's key (bytes the encoder would never produce).
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Mapping

import trio

from protocol import Goodbye, Hello, Keyring, Message, Origin, stretch_passphrase
from protocol.crypto import STREAM_OVERHEAD, TAG_MESSAGE
from protocol.framing import frame_header
from replicator.capture.migrations import SCHEMA_VERSION
from replicator.capture.store import Store, StoreSettings
from replicator.config import load_config
from replicator.harness import SCHEMA, NodeProcess
from replicator.sync.membership import fingerprint, shared_settings
from replicator.sync.peer import PeerConnection, PeerSettings

__all__ = ["KeyHolder", "next_goodbye", "origin_of", "reset", "seal_raw", "until_closed"]


class KeyHolder:
    """Speaks for ``me`` (a node ``node`` has configured) toward ``node``."""

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
            self.tables = store.tables
        finally:
            store.close()
        key = stretch_passphrase(me.secret, "test")
        self.peer_settings = PeerSettings("test", Keyring(key))
        self.me, self.node = me, node
        self.connections: list[PeerConnection] = []

    async def close(self) -> None:
        for connection in self.connections:
            await connection.abort()

    def hello(
        self, node_id: str | None = None, vector: Mapping[Origin, int] | None = None
    ) -> Hello:
        return Hello(
            node_id=node_id or self.me.node_id,
            incarnation=1,
            capabilities=frozenset({"changes", "skips", "resend", "role:peer"}),
            schema_version=SCHEMA_VERSION,
            settings_fingerprint=fingerprint(self.settings),
            version_vector=dict(vector or {}),
            settings=self.settings,
        )

    async def greet(self, connection: PeerConnection, hello: Hello | None = None) -> Hello:
        """Hello both ways; returns the node's."""
        await connection.send(hello or self.hello())
        reply = await connection.receive()
        assert isinstance(reply, Hello), reply
        return reply

    async def dial(self, *, hello: Hello | None = None, greet: bool = True) -> PeerConnection:
        """Connect to the node and complete the handshake (and Hello, unless not ``greet``)."""
        connection = await PeerConnection.dial(self.node.host, self.node.port, self.peer_settings)
        self.connections.append(connection)
        if greet:
            await self.greet(connection, hello)
        return connection

    async def accept_one(
        self, *, hello: Hello | None = None, greet: bool = True, within: float = 20
    ) -> PeerConnection:
        """Listen where the node expects ``me`` and take its dial."""
        listeners = await trio.open_tcp_listeners(self.me.port, host=self.me.host)
        try:
            with trio.fail_after(within):
                stream = await listeners[0].accept()
        finally:
            await listeners[0].aclose()
        connection = await PeerConnection.accept(stream, self.peer_settings, "node")
        self.connections.append(connection)
        if greet:
            await self.greet(connection, hello)
        return connection


async def seal_raw(connection: PeerConnection, plaintext: bytes) -> None:
    """Send ``plaintext`` (a codec header and body, however malformed) as one sealed frame."""
    sender = connection.session._sender
    assert sender is not None, "the handshake is not complete"
    header = frame_header(len(plaintext) + STREAM_OVERHEAD)
    await connection.stream.send_all(header + sender.seal(plaintext, header, TAG_MESSAGE))


def reset(connection: PeerConnection) -> None:
    """Close with RST instead of FIN, as a crashed host or a middlebox would."""
    sock = connection.stream.socket  # type: ignore[attr-defined]
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def next_goodbye(connection: PeerConnection, within: float = 5.0) -> str | None:
    """The reason of the Goodbye that arrives within ``within`` (None: still open then)."""
    with trio.move_on_after(within):
        while True:
            message = await connection.receive()
            if isinstance(message, Goodbye):
                return message.reason
    return None


async def until_closed(connection: PeerConnection, within: float = 10.0) -> list[Message]:
    """Read until the node drops the connection; returns what it sent before."""
    from replicator.sync.peer import PeerDisconnected

    received: list[Message] = []
    with trio.fail_after(within):
        while True:
            try:
                received.append(await connection.receive())
            except PeerDisconnected:
                return received


def origin_of(status: Mapping[str, object]) -> Origin:
    """A node's own origin, from its status report ("node2#1733...")."""
    node, _, incarnation = str(status["origin"]).partition("#")
    return Origin(node, int(incarnation))
