"""What the state store raises: one root, so an application catches `StateStoreError` alone
(and, as everything replicator raises, `ReplicationError`)."""

from __future__ import annotations

from replicator.errors import ReplicationError

__all__ = [
    "ReadOnlyReplicaError",
    "StateSchemaError",
    "StateStoreClosed",
    "StateStoreError",
    "StateValueError",
    "WriteBehindFull",
]


class StateStoreError(ReplicationError):
    """The store could not do what was asked (the database refused, the store is closed...)."""


class StateStoreClosed(StateStoreError):
    """The store was closed: no retry can succeed."""


class StateSchemaError(StateStoreError):
    """The state table exists but has another shape than the store needs."""


class StateValueError(StateStoreError, TypeError):
    """A value msgpack cannot encode (a set, an object, an integer beyond 64 bits...)."""


class ReadOnlyReplicaError(StateStoreError):
    """This node is a replica: its capture triggers refuse local writes until it is promoted."""


class WriteBehindFull(StateStoreError):
    """The write-behind buffer is full and the database has refused writes for too long."""
