"""Expired keys: purged locally, never replicated, and never a source of false divergence.

A purge must not be replicated: a DELETE captured now would carry a newer clock than a ``set``
of the same key made meanwhile on another node, and would win over it. So a purge runs with
the applier's marker in `_repl_applying` (the capture triggers stand aside), inside one
IMMEDIATE transaction: it only removes rows whose expiry is still the expired one, since any
newer write, local or applied, would have to commit before or after it, never in between.

Each removed row keeps its version as a tombstone in `_repl_rowmeta`. A newer write arriving
later still beats it and comes back in; a late write that would have lost to the expired
version still loses; the tombstone is collected like any other (`replicator.sync.retention`). And
the divergence checker, which looks for live versions whose row is gone, does not mistake a
purged row for one deleted behind replication's back.

One node purging and another not yet must not make their table checksums differ. Leaving out
rows "expired by now" would not do: two nodes compute checksums at the same version vector but
at different times. So the cut is replicated data: before purging, a writable node records
its cutoff (now minus a margin, only ever raised) as a row of the reserved scope
``_repl_expiry``, keyed by its node id, in the same transaction. Checksums leave out the rows
expiring before the highest recorded cutoff (`checksum_cutoff`), which every node at the same
version vector reads alike, and a purge only removes rows below a cutoff already recorded. A
replica, whose triggers refuse writes, purges below the cutoff its primary recorded.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping

import msgpack

from protocol.checks import SqlValue
from replicator.capture.bookkeeping import mark_deleted, read_clock
from replicator.capture.rows import key_sql
from replicator.capture.tables import TableInfo, resume_capture, suppress_capture
from replicator.state.schema import EXPIRY_SCOPE, TABLE, is_replicated

__all__ = ["checksum_cutoff", "left_out", "purge", "watermarks"]

_REQUIRED = frozenset({"scope", "key", "value", "expires_at"})
_EXPIRED = f"FROM {TABLE} WHERE expires_at < ? AND scope != '{EXPIRY_SCOPE}'"


def watermarks(conn: sqlite3.Connection) -> dict[str, int]:
    """The cutoff each node recorded (node id -> unix ms)."""
    found = {}
    for node, value in conn.execute(
        f"SELECT key, value FROM {TABLE} WHERE scope = ?", (EXPIRY_SCOPE,)
    ):
        try:
            cutoff = msgpack.unpackb(value)
        except (ValueError, TypeError):
            continue
        if isinstance(cutoff, int) and not isinstance(cutoff, bool):
            found[node] = cutoff
    return found


def checksum_cutoff(conn: sqlite3.Connection, info: TableInfo) -> int | None:
    """For the state table: rows expiring before this are left out of its checksum (None:
    not the state table, or no node has purged yet). Call in the checksum's read transaction."""
    if info.name != TABLE or not info.column_set >= _REQUIRED:
        return None
    return max(watermarks(conn).values(), default=None)


def left_out(values: Mapping[str, SqlValue], cutoff: int) -> bool:
    expires_at = values.get("expires_at")
    return isinstance(expires_at, int) and expires_at < cutoff


def purge(conn: sqlite3.Connection, now_ms: int, margin_ms: int) -> int:
    """Remove the keys that expired more than ``margin_ms`` ago; returns how many went.

    Call inside an IMMEDIATE transaction (the write lock held from the first read on).
    """
    wanted = now_ms - margin_ms
    (candidates,) = conn.execute(f"SELECT count(*) {_EXPIRED}", (wanted,)).fetchone()
    if not candidates:
        return 0
    if not is_replicated(conn):  # nobody captures the table: a plain delete
        return int(conn.execute(f"DELETE {_EXPIRED}", (wanted,)).rowcount)
    clock = read_clock(conn)
    node_id, read_only = clock.origin.node_id, clock.read_only
    recorded = watermarks(conn)
    if read_only:
        cutoff = min(wanted, max(recorded.values(), default=0))
    else:
        cutoff = wanted
        if recorded.get(node_id, cutoff - 1) < cutoff:
            conn.execute(  # captured and replicated like any write
                f"INSERT INTO {TABLE} (scope, key, value, expires_at) VALUES (?, ?, ?, NULL)"
                " ON CONFLICT (scope, key) DO UPDATE SET value = excluded.value",
                (EXPIRY_SCOPE, node_id, msgpack.packb(cutoff)),
            )
    suppress_capture(conn)
    try:
        mark_deleted(conn, TABLE, f"SELECT {key_sql(None, ('scope', 'key'))} {_EXPIRED}", (cutoff,))
        removed = int(conn.execute(f"DELETE {_EXPIRED}", (cutoff,)).rowcount)
    finally:
        resume_capture(conn)
    return removed
