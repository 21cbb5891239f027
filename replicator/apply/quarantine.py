"""The quarantine: changes a peer sent that cannot be applied here, kept for an operator to
look at (`replicator queue`) instead of stopping the stream. The applier decides what goes in
and how many it holds (`applier.QUARANTINE_LIMIT`); this module is its table."""

from __future__ import annotations

import sqlite3

from protocol import Change
from replicator.capture import hlc
from replicator.capture.rows import encode_row

__all__ = ["TABLE", "held", "record"]

TABLE = "_repl_quarantine"  # named in what operators read, too


def held(conn: sqlite3.Connection) -> int:
    """How many changes the quarantine holds."""
    (count,) = conn.execute("SELECT count(*) FROM _repl_quarantine").fetchone()
    return int(count)


def record(conn: sqlite3.Connection, change: Change, key: str, reason: str) -> None:
    """Keep ``change`` (its row under ``key``) and why it could not be applied."""
    conn.execute(
        "INSERT INTO _repl_quarantine (origin_node, origin_inc, origin_seq, tbl, pk, op,"
        " new_row, old_row, hlc, reason, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            change.origin.node_id,
            change.origin.incarnation,
            change.seq,
            change.table,
            key,
            int(change.op),
            encode_row(change.row),
            encode_row(change.old),
            change.version.hlc,
            reason,
            hlc.wall_clock_ms(),
        ),
    )
