"""The conflict queue: what concurrent writes the strategies flagged for an operator.

A conflict's id is derived from the table, the key and both versions, so every node that
detects the same pair of writes files it under the same id. The stored row always follows the
strategy's order (a provisional winner identical on every node); an operator's resolution is a
new write that ranks above both versions, replicates like any write, and carries the id so it
closes the conflict on every node that applies it.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from protocol import Origin, RowVersion
from protocol.checks import SqlValue
from replicator.apply import quarantine
from replicator.capture import hlc
from replicator.capture.bookkeeping import log_end, mark_resolving
from replicator.capture.rows import decode_row, key_sql, quote_identifier
from replicator.capture.transactions import write_transaction
from replicator.errors import ReplicationError

__all__ = [
    "Conflict",
    "close_resolved",
    "conflict_id",
    "count",
    "expire",
    "get",
    "list_conflicts",
    "open_count",
    "record",
    "resolve",
    "summary",
]


def _version_json(version: RowVersion) -> str:
    return json.dumps(
        [version.hlc, version.origin.node_id, version.origin.incarnation, version.generation]
    )


def _version_from_json(text: str) -> RowVersion:
    stamp, node, inc, generation = json.loads(text)
    return RowVersion(stamp, Origin(node, inc), generation)


def conflict_id(table: str, key: str, first: RowVersion, second: RowVersion) -> str:
    low, high = sorted((_version_json(first), _version_json(second)))
    digest = hashlib.blake2b(
        json.dumps([table, key, low, high]).encode(), digest_size=8, person=b"repl-conflict"
    )
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class Conflict:
    id: str
    table: str
    key: str
    strategy: str
    reason: str
    local_version: RowVersion
    remote_version: RowVersion
    local_row: dict[str, SqlValue] | None
    remote_row: dict[str, SqlValue] | None
    winner: str
    status: str
    detected_at_ms: int
    closed_at_ms: int | None
    resolution: str | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly (blobs as hex) for the control API."""

        def version(v: RowVersion) -> dict[str, Any]:
            return {"hlc": v.hlc, "origin": str(v.origin), "generation": v.generation}

        def row(r: Mapping[str, SqlValue] | None) -> dict[str, Any] | None:
            if r is None:
                return None
            return {k: (v.hex() if isinstance(v, bytes) else v) for k, v in r.items()}

        return {
            "id": self.id,
            "table": self.table,
            "key": self.key,
            "strategy": self.strategy,
            "reason": self.reason,
            "local_version": version(self.local_version),
            "remote_version": version(self.remote_version),
            "local_row": row(self.local_row),
            "remote_row": row(self.remote_row),
            "winner": self.winner,
            "status": self.status,
            "detected_at_ms": self.detected_at_ms,
            "closed_at_ms": self.closed_at_ms,
            "resolution": self.resolution,
        }


def count(conn: sqlite3.Connection, table: str, strategy: str, kind: str) -> None:
    conn.execute(
        "INSERT INTO _repl_conflict_counts (tbl, strategy, kind, count) VALUES (?, ?, ?, 1)"
        " ON CONFLICT (tbl, strategy, kind) DO UPDATE SET count = count + 1",
        (table, strategy, kind),
    )


def record(
    conn: sqlite3.Connection,
    *,
    table: str,
    key: str,
    strategy: str,
    reason: str,
    local: tuple[RowVersion, bytes | None],
    remote: tuple[RowVersion, bytes | None],
    winner: str,
) -> str:
    """Queue a conflict (rows as `rows.encode_row` stores them); returns its id. Filing it
    twice is a no-op."""
    ident = conflict_id(table, key, local[0], remote[0])
    conn.execute(
        "INSERT OR IGNORE INTO _repl_conflicts (id, tbl, pk, strategy, reason, local_version,"
        " remote_version, local_row, remote_row, winner, detected_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            ident,
            table,
            key,
            strategy,
            reason,
            _version_json(local[0]),
            _version_json(remote[0]),
            local[1],
            remote[1],
            winner,
            hlc.wall_clock_ms(),
        ),
    )
    return ident


_COLUMNS = (
    "id, tbl, pk, strategy, reason, local_version, remote_version, local_row, remote_row,"
    " winner, status, detected_at, closed_at, resolution"
)


def _conflict(row: tuple[Any, ...]) -> Conflict:
    (ident, table, key, strategy, reason, local_version, remote_version, local_row,
     remote_row, winner, status, detected_at, closed_at, resolution) = row  # fmt: skip
    return Conflict(
        ident,
        table,
        key,
        strategy,
        reason,
        _version_from_json(local_version),
        _version_from_json(remote_version),
        decode_row(local_row),
        decode_row(remote_row),
        winner,
        status,
        detected_at,
        closed_at,
        resolution,
    )


def list_conflicts(
    conn: sqlite3.Connection, status: str | None = "open", limit: int = 1000
) -> list[Conflict]:
    if status is None:
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM _repl_conflicts ORDER BY detected_at LIMIT ?",
            (limit,),
        )
    else:
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM _repl_conflicts WHERE status = ? ORDER BY detected_at LIMIT ?",
            (status, limit),
        )
    return [_conflict(row) for row in rows]


def get(conn: sqlite3.Connection, ident: str) -> Conflict | None:
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM _repl_conflicts WHERE id = ?",
        (ident,),
    ).fetchone()
    return None if row is None else _conflict(row)


def close_resolved(conn: sqlite3.Connection, ident: str, by: str) -> None:
    """A resolution arrived (or was made here): close the conflict if this node has it."""
    conn.execute(
        "UPDATE _repl_conflicts SET status = 'resolved', closed_at = ?, resolution = ?"
        " WHERE id = ? AND status = 'open'",
        (hlc.wall_clock_ms(), by, ident),
    )


def expire(conn: sqlite3.Connection, timeout_ms: int) -> int:
    """Close conflicts older than the timeout: the provisional winner stands."""
    now = hlc.wall_clock_ms()
    cursor = conn.execute(
        "UPDATE _repl_conflicts SET status = 'timed_out', closed_at = ?,"
        " resolution = 'provisional winner kept'"
        " WHERE status = 'open' AND detected_at <= ?",
        (now, now - timeout_ms),
    )
    return cursor.rowcount


def resolve(
    conn: sqlite3.Connection,
    ident: str,
    primary_key: tuple[str, ...],
    *,
    use: str | None = None,
    row: Mapping[str, SqlValue] | None = None,
) -> Conflict:
    """Resolve with ``use`` = "local" / "remote", or an explicit ``row``.

    The chosen row is written as a new local write (captured by the triggers, so it gets a
    version above both conflicting ones and replicates), and its log entry carries the id.
    ``conn`` must be in autocommit mode; the write and the bookkeeping share one transaction.
    """
    with write_transaction(conn):
        conflict = get(conn, ident)
        if conflict is None:
            raise ReplicationError(f"no conflict {ident!r}", op="resolve")
        if conflict.status != "open":
            raise ReplicationError(f"conflict {ident} is already {conflict.status}", op="resolve")
        if row is None:
            if use not in ("local", "remote"):
                raise ReplicationError("resolve needs use='local', use='remote' or a row")
            row = conflict.local_row if use == "local" else conflict.remote_row
        before = log_end(conn)
        _write(conn, conflict, primary_key, row)
        mark_resolving(conn, ident, before, conflict.table)
        close_resolved(conn, ident, f"resolved here ({use or 'given row'})")
    resolved = get(conn, ident)
    assert resolved is not None
    return resolved


def _write(
    conn: sqlite3.Connection,
    conflict: Conflict,
    primary_key: tuple[str, ...],
    row: Mapping[str, SqlValue] | None,
) -> None:
    target = quote_identifier(conflict.table)
    key_expr = key_sql(None, primary_key)
    if row is None:  # the chosen side is a delete
        present = conn.execute(
            f"SELECT 1 FROM {target} WHERE {key_expr} = ?",
            (conflict.key,),
        ).fetchone()
        other = conflict.local_row or conflict.remote_row
        if present is None and other is not None:
            # Deleting an absent row writes nothing; re-create it first so that the deletion
            # is a captured write that ranks above both versions and replicates.
            _write(conn, conflict, primary_key, other)
        conn.execute(
            f"DELETE FROM {target} WHERE {key_expr} = ?",
            (conflict.key,),
        )
        return
    columns = list(row)
    names = ", ".join(quote_identifier(c) for c in columns)
    updates = ", ".join(f"{quote_identifier(c)} = excluded.{quote_identifier(c)}" for c in columns)
    keys = ", ".join(quote_identifier(c) for c in primary_key)
    conn.execute(
        f"INSERT INTO {target} ({names}) VALUES ({', '.join('?' for _ in columns)})"
        f" ON CONFLICT ({keys}) DO UPDATE SET {updates}",
        [row[c] for c in columns],
    )


def summary(conn: sqlite3.Connection) -> dict[str, Any]:
    """Open conflicts, conflicts counted per table / strategy / kind, quarantined changes."""
    open_conflicts = open_count(conn)
    by_table: dict[str, dict[str, dict[str, int]]] = {}
    for table, strategy, kind, count in conn.execute(
        "SELECT tbl, strategy, kind, count FROM _repl_conflict_counts"
    ):
        by_table.setdefault(table, {}).setdefault(strategy, {})[kind] = count
    return {"open": open_conflicts, "by_table": by_table, "quarantined": quarantine.held(conn)}


def open_count(conn: sqlite3.Connection) -> int:
    """How many conflicts wait for a decision."""
    (count,) = conn.execute("SELECT count(*) FROM _repl_conflicts WHERE status = 'open'").fetchone()
    return int(count)
