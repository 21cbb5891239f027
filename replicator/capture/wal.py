"""The state file's write-ahead log: its size, and checkpoints that never make the
application's writers wait (not to be confused with `sync/checkpoints`, which record
replication positions)."""

from __future__ import annotations

import os
import sqlite3

from replicator.capture import dbcall

__all__ = ["checkpoint", "size"]


def size(path: str) -> int:
    """Bytes in the state file's WAL (0 when there is none)."""
    try:
        return os.path.getsize(f"{path}-wal")
    except OSError:
        return 0


def checkpoint(conn: sqlite3.Connection, truncate: bool) -> None:
    """PASSIVE copies the WAL into the file without waiting for, or blocking, any writer.
    TRUNCATE also empties the WAL file, holding the write lock while it does: it runs only
    after a PASSIVE pass (little left to copy) and without waiting (busy: next time), so the
    application's writers never wait on it for long."""
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    if truncate:
        with dbcall.no_waiting(conn):
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
