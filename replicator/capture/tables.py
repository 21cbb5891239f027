"""The application's replicated tables: what they look like, and the triggers that capture them.

Capture runs inside the application's own transactions, on connections we do not control, so
it is written in plain SQL: no custom functions, no temp tables. Every statement a trigger runs
is paid by the application, so for each write the trigger runs one: it appends the change to
`_repl_log` (table, key, operation, the rows as JSON) with the wall time, or refuses the write
if this node is a replica (the clock row says so). The origin sequence, the hybrid-clock stamp
and the row version are assigned by the node afterwards, in log order (`sealing`).

Triggers do nothing while `_repl_applying` holds a row: that is the applier writing what a peer
sent, which must not be captured again. An UPDATE that changes the primary key is captured as
a delete of the old key and an insert of the new one.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from replicator.capture.hlc import WALL_STAMP_SQL
from replicator.capture.rows import key_sql, quote_identifier, quote_literal, row_json_sql
from replicator.capture.sealing import seal_pending
from replicator.errors import SchemaError

__all__ = [
    "MAX_CHANGE_BYTES",
    "SIZE_LIMIT_TRIGGER",
    "TRIGGER_PREFIX",
    "TableInfo",
    "inspect_table",
    "resume_capture",
    "size_limit_statement",
    "suppress_capture",
    "trigger_statements",
]

TRIGGER_PREFIX = "_repl_capture_"
MAX_EVICTION_KEY_COLUMNS = 8  # _repl_evict holds up to eight key columns
MAX_CHANGE_BYTES = 15 << 20
"""The largest change capture accepts (its rows before and after, as logged; a blob counts
twice, logged as hex): a change must fit one message (16 MiB) to replicate, so a larger one is
refused in the application's own statement rather than left to halt replication later."""
SIZE_LIMIT_TRIGGER = f"{TRIGGER_PREFIX}_size_limit"
OP_SKIP, OP_INSERT, OP_UPDATE, OP_DELETE = 0, 1, 2, 3


def suppress_capture(conn: sqlite3.Connection) -> None:
    """Inside a write transaction: the triggers stand aside for what follows (a peer's
    changes, a snapshot, expiry), which must not be captured again as local writes. What the
    triggers logged before is stamped first, so what follows decides by every row's version."""
    seal_pending(conn)
    conn.execute("INSERT INTO _repl_applying (marker) VALUES (1)")


def resume_capture(conn: sqlite3.Connection) -> None:
    """Undo `suppress_capture` before the transaction commits (a rollback undoes it too)."""
    conn.execute("DELETE FROM _repl_applying")


@dataclass(frozen=True, slots=True)
class TableInfo:
    name: str
    columns: tuple[str, ...]
    primary_key: tuple[str, ...]
    without_rowid: bool
    auto_integer_key: bool
    unique_keys: tuple[tuple[str, ...], ...] = ()
    """Column sets of UNIQUE indexes besides the primary key (rows REPLACE may evict)."""

    @property
    def column_set(self) -> frozenset[str]:
        return frozenset(self.columns)

    @property
    def trigger_names(self) -> tuple[str, str, str, str]:
        base = TRIGGER_PREFIX + self.name
        return (f"{base}_insert", f"{base}_update", f"{base}_rekey", f"{base}_delete")

    @property
    def tracks_evictions(self) -> bool:
        return bool(self.unique_keys) and len(self.primary_key) <= MAX_EVICTION_KEY_COLUMNS


def inspect_table(conn: sqlite3.Connection, name: str) -> TableInfo:
    listed = conn.execute(
        "SELECT type, wr FROM pragma_table_list WHERE schema = 'main' AND name = ?", (name,)
    ).fetchone()
    if listed is None or listed[0] != "table":
        raise SchemaError(
            f"replicated table {name!r} does not exist in the state database",
            op="inspect",
            hint="create it (state.schema) or remove it from replication.data",
        )
    columns: list[str] = []
    keyed: list[tuple[int, str, str]] = []
    for _cid, column, declared, _notnull, _default, pk, hidden in conn.execute(
        'SELECT cid, name, type, "notnull", dflt_value, pk, hidden FROM pragma_table_xinfo(?)',
        (name,),
    ):
        if hidden:  # generated columns are computed on every node, never replicated
            continue
        columns.append(column)
        if pk:
            keyed.append((pk, column, declared))
    if not keyed:
        raise SchemaError(
            f"replicated table {name!r} has no primary key",
            op="inspect",
            hint="replication identifies rows by primary key; add one (a natural key or UUID)",
        )
    keyed.sort()
    without_rowid = bool(listed[1])
    auto_integer_key = (
        not without_rowid and len(keyed) == 1 and keyed[0][2].strip().upper() == "INTEGER"
    )
    return TableInfo(
        name=name,
        columns=tuple(columns),
        primary_key=tuple(column for _, column, _ in keyed),
        without_rowid=without_rowid,
        auto_integer_key=auto_integer_key,
        unique_keys=_unique_keys(conn, name),
    )


def _unique_keys(conn: sqlite3.Connection, name: str) -> tuple[tuple[str, ...], ...]:
    keys = []
    for _seq, index, unique, origin, _partial in conn.execute(
        'SELECT seq, name, "unique", origin, partial FROM pragma_index_list(?)', (name,)
    ):
        if not unique or origin == "pk":
            continue
        columns = conn.execute(
            "SELECT cid, name FROM pragma_index_info(?) ORDER BY seqno", (index,)
        ).fetchall()
        if all(cid >= 0 for cid, _ in columns):  # expression indexes cannot be matched here
            keys.append(tuple(column for _, column in columns))
    return tuple(sorted(keys))


def _capture(table: TableInfo, op: int) -> str:
    """The one statement logging a change: the row (or rows) and the wall time, nothing more
    (a delete reads the key from OLD, others from NEW). The node stamps it afterwards, in log
    order (`sealing`); a replica refuses the write here, as the clock row says.

    The position is the next after both the log's last entry and the last sealed position,
    so a log truncated to nothing never hands out a sealed position again.
    """
    name = quote_literal(table.name)
    prefix = "OLD" if op == OP_DELETE else "NEW"
    key = key_sql(prefix, table.primary_key)
    new_row = row_json_sql("NEW", table.columns) if op != OP_DELETE else "NULL"
    old_row = row_json_sql("OLD", table.columns) if op != OP_INSERT else "NULL"
    return f"""
    INSERT INTO _repl_log (seq, origin_node, origin_inc, origin_seq, op, tbl, pk, new_row,
                           old_row, hlc)
    SELECT {_NEXT_POSITION}, node_id, incarnation, 0, {op}, {name}, {key}, {new_row},
           {old_row}, {_wall_or_refusal(table)}
    FROM _repl_clock WHERE id = 1;"""


_NEXT_POSITION = "MAX(log_seq, COALESCE((SELECT MAX(seq) FROM _repl_log), 0)) + 1"


def _wall_or_refusal(table: TableInfo) -> str:
    """The wall time as a clock stamp, or the replica's refusal (reads the clock row)."""
    refusal = quote_literal(
        f"replicator: table {table.name} is read-only on this replica node; "
        "write on the primary (or promote this node)"
    )
    return f"CASE WHEN read_only THEN RAISE(ABORT, {refusal}) ELSE {WALL_STAMP_SQL} END"


def _stage_evictions(table: TableInfo, exclude: tuple[str, ...]) -> str:
    """BEFORE trigger body: stage the rows sharing a UNIQUE value with NEW."""
    target = quote_identifier(table.name)
    matches = _clash_sql(table, exclude)
    slots = ", ".join(f"k{n}" for n in range(1, len(table.primary_key) + 1))
    values = ", ".join(f"t.{quote_identifier(c)}" for c in table.primary_key)
    return f"""
    DELETE FROM _repl_evict;
    INSERT INTO _repl_evict ({slots}, pk, old_row)
    SELECT {values}, {key_sql("t", table.primary_key)}, {row_json_sql("t", table.columns)}
    FROM {target} AS t WHERE {matches};"""


def _clash_sql(table: TableInfo, exclude: tuple[str, ...]) -> str:
    """Rows ``t`` of another key sharing a UNIQUE value with NEW (REPLACE would evict them)."""
    matches = " OR ".join(
        "("
        + " AND ".join(f"t.{quote_identifier(c)} = NEW.{quote_identifier(c)}" for c in key)
        + ")"
        for key in table.unique_keys
    )
    excluded = " AND ".join(
        f"{key_sql('t', table.primary_key)} IS NOT {key_sql(prefix, table.primary_key)}"
        for prefix in exclude
    )
    return f"({matches}) AND {excluded}"


def _capture_evictions(table: TableInfo) -> str:
    """AFTER trigger prologue: log a delete for each staged row the statement removed (logged
    before the write itself, so a peer applying in order never meets the UNIQUE clash)."""
    name = quote_literal(table.name)
    target = quote_identifier(table.name)
    present = " AND ".join(
        f"{quote_identifier(c)} IS e.k{n}" for n, c in enumerate(table.primary_key, 1)
    )
    return f"""
    INSERT INTO _repl_log (seq, origin_node, origin_inc, origin_seq, op, tbl, pk, new_row,
                           old_row, hlc)
    SELECT {_NEXT_POSITION} - 1
           + (SELECT count(*) FROM _repl_evict AS earlier WHERE earlier.rowid <= e.rowid),
           c.node_id, c.incarnation, 0, {OP_DELETE}, {name}, e.pk, NULL, e.old_row,
           {_wall_or_refusal(table)}
    FROM _repl_evict AS e, _repl_clock AS c
    WHERE c.id = 1 AND NOT EXISTS (SELECT 1 FROM {target} WHERE {present});
    DELETE FROM _repl_evict WHERE rowid > 0;"""


def size_limit_statement() -> str:
    """The trigger refusing, in the application's transaction, a change too large to send."""
    size = (
        "COALESCE(length(CAST(NEW.new_row AS BLOB)), 0)"
        " + COALESCE(length(CAST(NEW.old_row AS BLOB)), 0)"
    )
    # length() of text counts characters, without copying: at most four bytes each, so
    # only a change of more than a quarter of the limit in characters is measured in bytes.
    characters = "COALESCE(length(NEW.new_row), 0) + COALESCE(length(NEW.old_row), 0)"
    message = quote_literal(
        f"replicator: this change is larger than {MAX_CHANGE_BYTES >> 20} MiB (the rows before "
        "and after, blobs counted twice) and cannot be replicated; store large values elsewhere"
    )
    return (
        f"CREATE TRIGGER {quote_identifier(SIZE_LIMIT_TRIGGER)} BEFORE INSERT ON _repl_log\n"
        f"WHEN {characters} > {MAX_CHANGE_BYTES // 4} AND {size} > {MAX_CHANGE_BYTES}\n"
        "AND NOT EXISTS (SELECT 1 FROM _repl_applying)\n"
        f"BEGIN SELECT RAISE(ABORT, {message}); END"
    )


def trigger_statements(table: TableInfo) -> dict[str, str]:
    """Trigger name -> CREATE TRIGGER statement, for the table as it is now."""
    target = quote_identifier(table.name)
    not_applying = "NOT EXISTS (SELECT 1 FROM _repl_applying)"
    same_key = f"{key_sql('OLD', table.primary_key)} IS {key_sql('NEW', table.primary_key)}"
    insert_name, update_name, rekey_name, delete_name = table.trigger_names
    evictions = _capture_evictions(table) if table.tracks_evictions else ""
    bodies = {
        insert_name: ("AFTER INSERT", not_applying, evictions + _capture(table, OP_INSERT)),
        update_name: (
            "AFTER UPDATE",
            f"{not_applying} AND {same_key}",
            evictions + _capture(table, OP_UPDATE),
        ),
        rekey_name: (
            "AFTER UPDATE",
            f"{not_applying} AND NOT ({same_key})",
            evictions + _capture(table, OP_DELETE) + _capture(table, OP_INSERT),
        ),
        delete_name: ("AFTER DELETE", not_applying, _capture(table, OP_DELETE)),
    }
    if table.tracks_evictions:
        base = TRIGGER_PREFIX + table.name
        target_t = f"{target} AS t"
        bodies[f"{base}_stage_insert"] = (
            "BEFORE INSERT",
            f"{not_applying} AND EXISTS (SELECT 1 FROM {target_t}"
            f" WHERE {_clash_sql(table, ('NEW',))})",
            _stage_evictions(table, ("NEW",)),
        )
        bodies[f"{base}_stage_update"] = (
            "BEFORE UPDATE",
            f"{not_applying} AND EXISTS (SELECT 1 FROM {target_t}"
            f" WHERE {_clash_sql(table, ('OLD', 'NEW'))})",
            _stage_evictions(table, ("OLD", "NEW")),
        )
    return {
        name: (
            f"CREATE TRIGGER {quote_identifier(name)} {event} ON {target}\n"
            f"WHEN {condition}\nBEGIN{body}\nEND"
        )
        for name, (event, condition, body) in bodies.items()
    }
