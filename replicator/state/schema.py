"""The one table the state store keeps, in the application's SQLite file.

Values are msgpack blobs; ``expires_at`` (unix milliseconds, NULL for never) travels with the
value, so a key's expiry replicates with it. Scope names starting with ``_repl`` are reserved:
the store keeps its expiry watermarks in ``_repl_expiry`` (see `replicator.state.expiry`).
"""

from __future__ import annotations

import sqlite3

from replicator.capture.tables import TRIGGER_PREFIX
from replicator.capture.transactions import write_transaction
from replicator.state.errors import StateSchemaError

__all__ = ["DDL", "EXPIRY_SCOPE", "RESERVED_PREFIX", "TABLE", "ensure_table", "is_replicated"]

TABLE = "state_kv"
RESERVED_PREFIX = "_repl"
EXPIRY_SCOPE = "_repl_expiry"
DDL = """\
CREATE TABLE IF NOT EXISTS state_kv (
    scope      TEXT    NOT NULL,
    key        TEXT    NOT NULL,
    value      BLOB    NOT NULL,
    expires_at INTEGER,
    PRIMARY KEY (scope, key)
) WITHOUT ROWID;
"""
_COLUMNS = {"scope": 1, "key": 2, "value": 0, "expires_at": 0}  # column -> position in the key


def _shape(conn: sqlite3.Connection) -> dict[str, int] | None:
    """Column -> primary-key position of the state table as it is (None: no such table)."""
    columns: dict[str, int] = dict(
        conn.execute("SELECT name, pk FROM pragma_table_info(?)", (TABLE,)).fetchall()
    )
    return columns or None


def ensure_table(conn: sqlite3.Connection) -> None:
    """Create the table if it is missing; refuse one of another shape. ``conn`` autocommits."""
    shape = _shape(conn)
    if shape is None:
        with write_transaction(conn):
            conn.execute(DDL)
        shape = _shape(conn)
    assert shape is not None
    wrong = {
        column: position for column, position in _COLUMNS.items() if shape.get(column) != position
    }
    if wrong or sum(1 for pk in shape.values() if pk) != 2:
        raise StateSchemaError(
            f"table {TABLE} exists but is not the state store's: it needs columns scope, key "
            "(the primary key, in that order), value and expires_at"
        )


def is_replicated(conn: sqlite3.Connection) -> bool:
    """Whether a node captures the table (its triggers are installed): only then do writes
    replicate, and only a node listing the table in ``replication.data`` installs them."""
    row = conn.execute(
        "SELECT 1 FROM sqlite_schema WHERE type = 'trigger' AND tbl_name = ?"
        " AND substr(name, 1, ?) = ? LIMIT 1",
        (TABLE, len(TRIGGER_PREFIX), TRIGGER_PREFIX),
    ).fetchone()
    return row is not None
