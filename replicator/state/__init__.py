"""An embedded, replicated key-value store for applications, in the node's own SQLite file.

    from replicator.state import StateStore

    store = StateStore("/var/lib/replicator/state.db")
    store.set("leases/02:00:00:00:00:01", {"ip": "10.0.0.10"}, ttl=3600)
    store.get("leases/02:00:00:00:00:01")     # {'ip': '10.0.0.10'}, on every node

Its table, ``state_kv``, replicates like any table a node lists in ``replication.data``:
same capture, same conflict strategy. Scopes isolate tenants; transactions are all or
nothing; keys may expire; `BatchedWriter` coalesces rapid updates; `AsyncStateStore` serves
trio and asyncio code. Migrations for the application's own tables are in
`replicator.state.migrations` (imported by applications as `replicator.app_migrations`).
"""

from replicator.state.aio import AsyncStateStore, Runner, asyncio_runner, trio_runner
from replicator.state.errors import (
    ReadOnlyReplicaError,
    StateSchemaError,
    StateStoreClosed,
    StateStoreError,
    StateValueError,
    WriteBehindFull,
)
from replicator.state.schema import DDL, TABLE
from replicator.state.store import DEFAULT_SCOPE, StateStore
from replicator.state.writer import BatchedWriter

__all__ = [
    "DDL",
    "DEFAULT_SCOPE",
    "TABLE",
    "AsyncStateStore",
    "BatchedWriter",
    "ReadOnlyReplicaError",
    "Runner",
    "StateSchemaError",
    "StateStore",
    "StateStoreClosed",
    "StateStoreError",
    "StateValueError",
    "WriteBehindFull",
    "asyncio_runner",
    "trio_runner",
]
