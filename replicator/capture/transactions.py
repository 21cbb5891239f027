"""The node's transactions on its state file, written once: a write transaction takes the lock
at BEGIN IMMEDIATE and commits, or rolls back on any exception (cancellation included) and
re-raises; a read transaction is a deferred BEGIN for one consistent snapshot.

Connections here are in autocommit mode (`capture/store.connect`), so every transaction is
explicit. A `Store` goes through its own ``begin_immediate`` / ``commit`` / ``rollback``: they
time how long the lock was held and tell the write pacer (`capture/pacing`).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from typing import Protocol

__all__ = ["TimedStore", "read_transaction", "write_transaction"]


class TimedStore(Protocol):
    """What `write_transaction` needs of a `Store`: its connection and the timed steps."""

    conn: sqlite3.Connection

    def begin_immediate(self) -> None: ...

    def commit(self) -> None: ...

    def rollback(self) -> None: ...


@contextlib.contextmanager
def write_transaction(
    target: sqlite3.Connection | TimedStore, *, rollback_only_if_open: bool = False
) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE; COMMIT when the block ends, ROLLBACK and re-raise when it raises.

    A `Store` rolls back only what is still open, and reports the hold to its pacer either
    way. A bare connection rolls back unconditionally unless ``rollback_only_if_open``: after a
    COMMIT the disk refused, SQLite has already rolled back, and that ROLLBACK fails with "no
    transaction is active", the refusal kept in its ``__context__`` (where
    `sqlite_errors.refusal` looks for it). Callers that must see the refusal itself, or whose
    connection may be broken, pass ``rollback_only_if_open=True``.
    """
    if not isinstance(target, sqlite3.Connection):
        target.begin_immediate()
        try:
            yield target.conn
            target.commit()
        except BaseException:
            target.rollback()
            raise
        return
    conn = target
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if not rollback_only_if_open or conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


@contextlib.contextmanager
def read_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A deferred BEGIN, so every read inside sees one snapshot; COMMIT (it wrote nothing)
    however the block ends."""
    conn.execute("BEGIN")
    try:
        yield conn
    finally:
        conn.execute("COMMIT")
