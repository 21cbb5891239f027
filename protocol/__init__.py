"""The replicator wire protocol, sans-IO: bytes in, events out; messages in, bytes out.

Nothing here touches a socket, a clock other than an injected one, or a database: the node in
`replicator/` owns every bit of I/O and drives these state machines.
"""

from protocol.crypto import PROTOCOL_VERSION, Keyring, key_id, stretch_passphrase
from protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from protocol.messages import (
    BUCKETS,
    WITHHELD,
    Ack,
    Change,
    Changes,
    Goodbye,
    Heartbeat,
    Hello,
    Message,
    Op,
    Origin,
    Resend,
    RowVersion,
    Skip,
    SnapshotBegin,
    SnapshotChunk,
    SnapshotEnd,
    SnapshotRequest,
    SnapshotRow,
    SnapshotTable,
    VersionVector,
)
from protocol.session import (
    ConnectionClosed,
    Event,
    HandshakeComplete,
    MessageTooLarge,
    Session,
    SessionSettings,
    State,
)

__all__ = [
    "BUCKETS",
    "PROTOCOL_VERSION",
    "WITHHELD",
    "Ack",
    "Change",
    "Changes",
    "ConnectionClosed",
    "Event",
    "Goodbye",
    "HandshakeComplete",
    "Heartbeat",
    "Hello",
    "Keyring",
    "LocalProtocolError",
    "Message",
    "MessageTooLarge",
    "Op",
    "Origin",
    "ProtocolError",
    "RemoteProtocolError",
    "Resend",
    "RowVersion",
    "Session",
    "SessionSettings",
    "Skip",
    "SnapshotBegin",
    "SnapshotChunk",
    "SnapshotEnd",
    "SnapshotRequest",
    "SnapshotRow",
    "SnapshotTable",
    "State",
    "VersionVector",
    "key_id",
    "stretch_passphrase",
]
