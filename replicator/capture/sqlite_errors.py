"""What an `sqlite3` error means for the node: a disk that refuses writes (full, I/O errors),
or another connection holding the lock past the busy timeout. Neither is damage nor a bug:
the node pauses or waits and tries again, and nothing is copied aside or restored over.
"""

from __future__ import annotations

import sqlite3

from replicator.errors import ReplicationError

__all__ = ["DatabaseFault", "is_locked", "refusal", "unusable"]

# SQLite's primary result codes for a disk that refuses writes, and for a lock held too long.
_SQLITE_IOERR = 10
_SQLITE_FULL = 13
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6


def is_locked(error: BaseException) -> bool:
    """``error`` says another connection holds the lock (SQLITE_BUSY or SQLITE_LOCKED)."""
    if not isinstance(error, sqlite3.OperationalError):
        return False
    code = getattr(error, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)
    return "database is locked" in str(error) or "database table is locked" in str(error)


def refusal(error: BaseException) -> sqlite3.DatabaseError | None:
    """The disk's refusal behind ``error``, if that is what it is (not a bug, not damage).

    A COMMIT the disk refuses rolls the transaction back by itself, so a ``ROLLBACK`` after it
    fails with "no transaction is active" and hides the refusal in its ``__context__``: the
    chain of database errors is looked through, not just the last one.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while isinstance(current, sqlite3.DatabaseError) and id(current) not in seen:
        seen.add(id(current))
        code = getattr(current, "sqlite_errorcode", None)
        if code is not None and code & 0xFF in (_SQLITE_IOERR, _SQLITE_FULL):
            return current
        text = str(current)
        if "disk is full" in text or "disk I/O error" in text:
            return current
        current = current.__cause__ or current.__context__
    return None


class DatabaseFault(ReplicationError):
    """The local state database is broken (corrupt, unreadable): the node cannot go on."""


# SQLite result codes that mean the file itself is unusable (not a full disk, not a bad row,
# not a file that cannot be opened for want of descriptors just now).
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26


def unusable(error: BaseException) -> DatabaseFault | None:
    """The fault that must stop the node, if ``error`` (or one inside it) is one."""
    pending = [error]
    while pending:
        leaf = pending.pop()
        if isinstance(leaf, BaseExceptionGroup):
            pending.extend(leaf.exceptions)
        elif isinstance(leaf, DatabaseFault):
            return leaf
        elif isinstance(leaf, sqlite3.DatabaseError) and (
            getattr(leaf, "sqlite_errorcode", 0) & 0xFF
        ) in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
            return DatabaseFault(
                f"the state database is unusable: {leaf}",
                op="database",
                hint="stop the node and restore it (replicator backup restore, or recovery at "
                "start with state.recovery.auto_recover)",
            )
    return None
