"""The versioned schema of replicator's own `_repl_*` tables, migrated forward on start.

Each migration runs once, in its own transaction, and is recorded in `_repl_migrations`; running
them again is a no-op. A database whose recorded version is newer than this code knows is
refused rather than guessed at.
"""

from __future__ import annotations

import sqlite3
import time

from replicator.capture.transactions import write_transaction
from replicator.errors import SchemaError

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "migrate", "recorded_version", "split_statements"]

MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (
        1,
        "change log, row versions, clock, progress, conflicts, quarantine",
        """
        CREATE TABLE _repl_clock (
            id          INTEGER PRIMARY KEY CHECK (id = 1),
            node_id     TEXT    NOT NULL,
            incarnation INTEGER NOT NULL,
            hlc         INTEGER NOT NULL,
            local_seq   INTEGER NOT NULL,
            log_seq     INTEGER NOT NULL DEFAULT 0,
            read_only   INTEGER NOT NULL DEFAULT 0,
            promoted    INTEGER NOT NULL DEFAULT 0
        );
        -- Every change this node holds, local or forwarded, in commit order. ``seq`` is a log
        -- position drawn from _repl_clock.log_seq, a counter that only grows, so a position is
        -- never reused, even after truncation (what AUTOINCREMENT would give, without its
        -- extra sqlite_sequence write per row). The origin sequence is per (origin_node,
        -- origin_inc) and contiguous. op: 0 skip marker (first_seq..origin_seq withheld by a
        -- filter), 1 insert, 2 update, 3 delete.
        CREATE TABLE _repl_log (
            seq         INTEGER PRIMARY KEY,
            origin_node TEXT    NOT NULL,
            origin_inc  INTEGER NOT NULL,
            origin_seq  INTEGER NOT NULL,
            op          INTEGER NOT NULL,
            tbl         TEXT,
            pk          TEXT,
            new_row     TEXT,
            old_row     TEXT,
            hlc         INTEGER NOT NULL,
            generation  INTEGER,
            prev_hlc    INTEGER,
            prev_node   TEXT,
            prev_inc    INTEGER,
            prev_gen    INTEGER,
            first_seq   INTEGER,
            resolves    TEXT
        );
        -- The current version of every replicated row, deleted ones included (tombstones).
        CREATE TABLE _repl_rowmeta (
            tbl        TEXT    NOT NULL,
            pk         TEXT    NOT NULL,
            hlc        INTEGER NOT NULL,
            node       TEXT    NOT NULL,
            inc        INTEGER NOT NULL,
            generation INTEGER NOT NULL,
            deleted    INTEGER NOT NULL,
            prev_hlc   INTEGER,
            prev_node  TEXT,
            prev_inc   INTEGER,
            prev_gen   INTEGER,
            hash       BLOB,
            PRIMARY KEY (tbl, pk)
        ) WITHOUT ROWID;
        -- Version vector: highest contiguous origin sequence applied, per origin.
        CREATE TABLE _repl_progress (
            origin_node TEXT    NOT NULL,
            origin_inc  INTEGER NOT NULL,
            seq         INTEGER NOT NULL,
            PRIMARY KEY (origin_node, origin_inc)
        ) WITHOUT ROWID;
        -- Holds one row only inside the applier's transaction: triggers skip while it exists.
        CREATE TABLE _repl_applying (marker INTEGER PRIMARY KEY);
        -- Rows an INSERT/UPDATE OR REPLACE may evict through a secondary UNIQUE index, staged
        -- by a BEFORE trigger inside the application's statement (SQLite fires no DELETE
        -- trigger for them); the AFTER trigger logs a delete for those that vanished.
        CREATE TABLE _repl_evict (
            k1, k2, k3, k4, k5, k6, k7, k8,
            pk      TEXT NOT NULL,
            old_row TEXT,
            n       INTEGER
        );
        CREATE TABLE _repl_conflicts (
            id             TEXT    PRIMARY KEY,
            tbl            TEXT    NOT NULL,
            pk             TEXT    NOT NULL,
            strategy       TEXT    NOT NULL,
            reason         TEXT    NOT NULL,
            local_version  TEXT    NOT NULL,
            remote_version TEXT    NOT NULL,
            local_row      TEXT,
            remote_row     TEXT,
            winner         TEXT    NOT NULL,
            status         TEXT    NOT NULL DEFAULT 'open',
            detected_at    INTEGER NOT NULL,
            closed_at      INTEGER,
            resolution     TEXT
        ) WITHOUT ROWID;
        CREATE INDEX _repl_conflicts_status ON _repl_conflicts (status, detected_at);
        CREATE TABLE _repl_conflict_counts (
            tbl      TEXT    NOT NULL,
            strategy TEXT    NOT NULL,
            kind     TEXT    NOT NULL,
            count    INTEGER NOT NULL,
            PRIMARY KEY (tbl, strategy, kind)
        ) WITHOUT ROWID;
        CREATE TABLE _repl_quarantine (
            id          INTEGER PRIMARY KEY,
            origin_node TEXT    NOT NULL,
            origin_inc  INTEGER NOT NULL,
            origin_seq  INTEGER NOT NULL,
            tbl         TEXT    NOT NULL,
            pk          TEXT,
            op          INTEGER NOT NULL,
            new_row     TEXT,
            old_row     TEXT,
            hlc         INTEGER NOT NULL,
            reason      TEXT    NOT NULL,
            at          INTEGER NOT NULL
        );
        """,
    ),
    (
        2,
        "per-origin log floor",
        """
        -- Entries of an origin at or below this sequence were truncated from _repl_log (every
        -- node held them); a peer that lacks them needs a snapshot, not the log.
        CREATE TABLE _repl_log_floor (
            origin_node TEXT    NOT NULL,
            origin_inc  INTEGER NOT NULL,
            seq         INTEGER NOT NULL,
            PRIMARY KEY (origin_node, origin_inc)
        ) WITHOUT ROWID;
        """,
    ),
    (
        3,
        "tombstone collection",
        """
        -- The highest stamp of this origin's truncated entries that every node held: every
        -- entry of the origin some node still lacks is stamped later.
        ALTER TABLE _repl_log_floor ADD COLUMN stable_hlc INTEGER NOT NULL DEFAULT 0;
        -- Tombstones by age, so collecting old ones reads only tombstones.
        CREATE INDEX _repl_rowmeta_tombstones ON _repl_rowmeta (hlc) WHERE deleted;
        """,
    ),
    (
        4,
        "origin sequence of row versions",
        """
        -- The origin sequence that wrote the current version, so a snapshot can tell whether
        -- its sender had seen that version (NULL: written before this column existed).
        ALTER TABLE _repl_rowmeta ADD COLUMN seq INTEGER;
        -- A snapshot being received: held here until every chunk arrived and its checksums
        -- matched, then merged. Rows keep the sender's order (id).
        CREATE TABLE _repl_snapshot_stage (
            id    INTEGER PRIMARY KEY,
            tbl   TEXT NOT NULL,
            row   BLOB NOT NULL
        );
        """,
    ),
    (
        5,
        "checkpoints",
        """
        -- Where replication stood, recorded every incremental.checkpoint_interval and on
        -- request: this node's version vector and each peer's acknowledged position.
        CREATE TABLE _repl_checkpoints (
            id       INTEGER PRIMARY KEY,
            taken_at REAL NOT NULL,
            reason   TEXT NOT NULL,
            vector   TEXT NOT NULL,
            peers    TEXT NOT NULL
        );
        """,
    ),
    (
        6,
        "write probe",
        """
        -- Written and emptied to learn whether the disk takes writes again after a failure
        -- (disk full, I/O error) paused replication.
        CREATE TABLE _repl_probe (
            id    INTEGER PRIMARY KEY,
            data  BLOB NOT NULL
        );
        """,
    ),
    (
        7,
        "state store metrics",
        """
        -- Counters of each application process's state store (replicator.state), published
        -- here so the node's /metrics can sum them; closed stores fold into instance ''.
        CREATE TABLE _repl_store_metrics (
            instance   TEXT    PRIMARY KEY,
            pid        INTEGER NOT NULL,
            reads      INTEGER NOT NULL,
            writes     INTEGER NOT NULL,
            deletes    INTEGER NOT NULL,
            hits       INTEGER NOT NULL,
            misses     INTEGER NOT NULL,
            updated_at REAL    NOT NULL
        ) WITHOUT ROWID;
        """,
    ),
    (
        8,
        "snapshot staging per snapshot",
        """
        -- Which snapshot a staged chunk belongs to: snapshots from two peers at once stage side
        -- by side, and one abandoned is cleared without touching the other.
        ALTER TABLE _repl_snapshot_stage ADD COLUMN snapshot INTEGER NOT NULL DEFAULT 0;
        CREATE INDEX _repl_snapshot_stage_by_snapshot ON _repl_snapshot_stage (snapshot, id);
        """,
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]


def _current_version(conn: sqlite3.Connection) -> int:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS _repl_migrations ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)"
    )
    (version,) = conn.execute("SELECT COALESCE(MAX(version), 0) FROM _repl_migrations").fetchone()
    return int(version)


def recorded_version(conn: sqlite3.Connection) -> int | None:
    """The newest migration recorded in a file (None: none, or a file no node prepared)."""
    present = conn.execute("SELECT 1 FROM sqlite_schema WHERE name = '_repl_migrations'").fetchone()
    if present is None:
        return None
    (version,) = conn.execute("SELECT MAX(version) FROM _repl_migrations").fetchone()
    return None if version is None else int(version)


def migrate(conn: sqlite3.Connection) -> int:
    """Bring `_repl_*` up to date; returns the schema version. ``conn`` is in autocommit mode."""
    with write_transaction(conn):
        version = _current_version(conn)
    if version > SCHEMA_VERSION:
        raise SchemaError(
            f"the database's replicator schema is version {version}, newer than this "
            f"replicator knows ({SCHEMA_VERSION})",
            op="migrate",
            hint="upgrade replicator on this node",
        )
    for number, name, script in MIGRATIONS:
        if number <= version:
            continue
        with write_transaction(conn):
            if _current_version(conn) >= number:  # another process migrated meanwhile
                continue
            for statement in split_statements(script):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO _repl_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (number, name, int(time.time())),
            )
    return SCHEMA_VERSION


def split_statements(script: str) -> list[str]:
    """Split a migration into statements (executescript would commit on its own)."""
    statements, buffer = [], ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        statements.append(buffer.strip())
    return [statement for statement in statements if statement]
