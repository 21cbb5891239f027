"""Replication's bookkeeping rows on a bare connection: the clock row, the applied progress and
log floor, the log's end and entries, and row versions, for modules that hold a connection
rather than a `Store` (the applier's, a snapshot's copy, a backup's copy)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from protocol import Origin
from replicator.capture.sealing import SEALED_END_SQL
from replicator.errors import SchemaError

__all__ = [
    "ClockState",
    "advance_clock",
    "applied_progress",
    "last_logged",
    "log_end",
    "log_entries",
    "logged_against_progress",
    "logged_writes",
    "mark_deleted",
    "mark_resolving",
    "own_position",
    "raise_log_floor",
    "raise_progress",
    "read_clock",
    "record_progress",
    "reserve_log_positions",
    "tombstones",
    "vector_of_copy",
]


@dataclass(frozen=True, slots=True)
class ClockState:
    origin: Origin
    hlc: int
    local_seq: int
    read_only: bool
    promoted: bool


def read_clock(conn: sqlite3.Connection) -> ClockState:
    row = conn.execute(
        "SELECT node_id, incarnation, hlc, local_seq, read_only, promoted"
        " FROM _repl_clock WHERE id = 1"
    ).fetchone()
    if row is None:
        raise SchemaError("the state database has no clock row", op="clock")
    node_id, incarnation, stamp, local_seq, read_only, promoted = row
    return ClockState(
        Origin(node_id, incarnation), stamp, local_seq, bool(read_only), bool(promoted)
    )


def own_position(conn: sqlite3.Connection) -> tuple[Origin, int] | None:
    """This file's origin and its last captured sequence (None: no clock row)."""
    row = conn.execute(
        "SELECT node_id, incarnation, local_seq FROM _repl_clock WHERE id = 1"
    ).fetchone()
    return None if row is None else (Origin(row[0], row[1]), row[2])


def reserve_log_positions(conn: sqlite3.Connection, count: int) -> int:
    """Take ``count`` log positions after the last stamped one (the caller sealed, in this
    write transaction, what the triggers logged: `tables.suppress_capture`); returns the
    last one taken."""
    (last,) = conn.execute(
        "UPDATE _repl_clock SET log_seq = log_seq + ? WHERE id = 1 RETURNING log_seq",
        (count,),
    ).fetchone()
    return int(last)


def advance_clock(conn: sqlite3.Connection, stamp: int) -> None:
    """The clock has seen ``stamp``: later local writes are stamped above it."""
    conn.execute("UPDATE _repl_clock SET hlc = MAX(hlc, ?) WHERE id = 1", (stamp,))


def applied_progress(conn: sqlite3.Connection) -> dict[Origin, int]:
    """Highest contiguous sequence applied, per origin (this node's own captures aside)."""
    return {
        Origin(node, inc): seq
        for node, inc, seq in conn.execute(
            "SELECT origin_node, origin_inc, seq FROM _repl_progress"
        )
    }


def record_progress(conn: sqlite3.Connection, progress: Iterable[tuple[Origin, int]]) -> None:
    """Set each origin's applied sequence (the applier's, which only moves it forward)."""
    conn.executemany(
        "INSERT INTO _repl_progress (origin_node, origin_inc, seq) VALUES (?, ?, ?)"
        " ON CONFLICT (origin_node, origin_inc) DO UPDATE SET seq = excluded.seq",
        [(origin.node_id, origin.incarnation, seq) for origin, seq in progress],
    )


def raise_progress(conn: sqlite3.Connection, origin: Origin, seq: int) -> None:
    """Count ``origin`` as applied through ``seq``, unless it already is further."""
    conn.execute(
        "INSERT INTO _repl_progress (origin_node, origin_inc, seq) VALUES (?, ?, ?)"
        " ON CONFLICT (origin_node, origin_inc) DO UPDATE"
        " SET seq = MAX(seq, excluded.seq)",
        (origin.node_id, origin.incarnation, seq),
    )


def raise_log_floor(conn: sqlite3.Connection, origin: Origin, seq: int) -> None:
    """This log holds nothing of ``origin`` through ``seq``: a peer lacking it needs a
    snapshot."""
    conn.execute(
        "INSERT INTO _repl_log_floor (origin_node, origin_inc, seq) VALUES (?, ?, ?)"
        " ON CONFLICT (origin_node, origin_inc) DO UPDATE"
        " SET seq = MAX(seq, excluded.seq)",
        (origin.node_id, origin.incarnation, seq),
    )


def vector_of_copy(conn: sqlite3.Connection) -> dict[Origin, int]:
    """`Store.version_vector` of a file that may not be a node's (a backup, a copy): a
    bookkeeping table it lacks counts as empty."""
    tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_schema")}
    vector = applied_progress(conn) if "_repl_progress" in tables else {}
    if "_repl_clock" in tables:
        own = own_position(conn)
        if own is not None and own[1]:
            vector[own[0]] = own[1]
    return vector


def log_end(conn: sqlite3.Connection, empty: int = 0) -> int:
    """The last log position (``empty`` for an empty log)."""
    (end,) = conn.execute("SELECT COALESCE(MAX(seq), ?) FROM _repl_log", (empty,)).fetchone()
    return int(end)


def log_entries(conn: sqlite3.Connection) -> int:
    (count,) = conn.execute("SELECT count(*) FROM _repl_log").fetchone()
    return int(count)


def logged_writes(conn: sqlite3.Connection, after: int, limit: int) -> list[tuple[Any, ...]]:
    """Stamped inserts and updates after a log position, raw: (position, table, key, new row
    as stored, stamp, origin node, origin incarnation)."""
    return conn.execute(
        "SELECT seq, tbl, pk, new_row, hlc, origin_node, origin_inc FROM _repl_log"
        f" WHERE seq > ? AND seq <= {SEALED_END_SQL} AND op IN (1, 2) ORDER BY seq LIMIT ?",
        (after, limit),
    ).fetchall()


def mark_resolving(conn: sqlite3.Connection, ident: str, after: int, table: str) -> None:
    """The entries of ``table`` logged after ``after`` resolve conflict ``ident``."""
    conn.execute(
        "UPDATE _repl_log SET resolves = ? WHERE seq > ? AND tbl = ?", (ident, after, table)
    )


def last_logged(conn: sqlite3.Connection, origin: Origin) -> int | None:
    """The highest sequence of ``origin`` the log holds (None: none)."""
    (seq,) = conn.execute(
        "SELECT MAX(origin_seq) FROM _repl_log WHERE origin_node = ? AND origin_inc = ?",
        (origin.node_id, origin.incarnation),
    ).fetchone()
    return None if seq is None else int(seq)


def logged_against_progress(conn: sqlite3.Connection) -> list[tuple[str, int, int, int]]:
    """Per origin both applied and logged: (node, incarnation, applied sequence, highest
    logged sequence)."""
    return conn.execute(
        "SELECT p.origin_node, p.origin_inc, p.seq, MAX(l.origin_seq) FROM _repl_progress p"
        " JOIN _repl_log l ON l.origin_node = p.origin_node AND l.origin_inc = p.origin_inc"
        " GROUP BY 1, 2, 3"
    ).fetchall()


def tombstones(conn: sqlite3.Connection, table: str) -> int:
    """How many deleted rows of ``table`` keep their version."""
    (count,) = conn.execute(
        "SELECT count(*) FROM _repl_rowmeta WHERE tbl = ? AND deleted", (table,)
    ).fetchone()
    return int(count)


def mark_deleted(conn: sqlite3.Connection, table: str, keys_sql: str, args: Sequence[Any]) -> None:
    """Keep the versions of rows deleted without capture (the keys ``keys_sql`` selects) as
    tombstones, their content hash forgotten."""
    conn.execute(
        f"UPDATE _repl_rowmeta SET deleted = 1, hash = NULL WHERE tbl = ? AND pk IN ({keys_sql})",
        (table, *args),
    )
