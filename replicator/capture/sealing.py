"""Stamps for the changes the capture triggers logged, assigned by the node in log order.

The triggers run inside the application's transactions, so each costs the application: they
only append the change with the wall time (`tables`). Its origin sequence, hybrid-clock stamp
and row version are assigned here afterwards, for every entry after the clock row's
``log_seq`` (the last sealed position), in one write transaction. The log order is this node's
commit order and the applier appends peers' entries to the same log (after sealing what
precedes them), so the stamps are exactly those the triggers would have assigned at commit:

- stamp n of the batch is ``max(stamp n-1 + 1, wall n)`` (the tick rule), which unrolls to
  ``n + max(clock, max over j <= n of (wall j - j))``: one running maximum, a window function;
- a row's version replaces the one `_repl_rowmeta` holds, or the previous entry of the same
  key in the batch: generation + 1, and that version as the replaced one.

The triggers log origin sequence 0: that is what waits. Senders read only through
``log_seq``, so nothing leaves before it is stamped, and a sealed entry is durable before it
is sent. Every transaction that decides by row versions seals first (`tables.suppress_capture`
does), so it sees the versions of every committed write.
"""

from __future__ import annotations

import sqlite3

__all__ = ["SEALED_END_SQL", "pending_keys", "seal_pending", "unsealed"]

SEALED_END_SQL = "(SELECT log_seq FROM _repl_clock WHERE id = 1)"
"""The last position whose entry carries its stamps (senders read through it)."""

_STAMP = """
WITH c AS (SELECT hlc AS h0, local_seq AS s0, log_seq AS p0 FROM _repl_clock WHERE id = 1),
batch AS (
    SELECT l.seq, l.tbl, l.pk, l.hlc AS wall, l.origin_node AS node, l.origin_inc AS inc,
           ROW_NUMBER() OVER (ORDER BY l.seq) AS n,
           ROW_NUMBER() OVER (PARTITION BY l.tbl, l.pk ORDER BY l.seq) AS k
    FROM _repl_log AS l, c
    WHERE l.seq > c.p0 AND l.seq <= :through AND l.origin_seq = 0 AND l.op != 0
),
stamped AS (
    SELECT b.seq, b.tbl, b.pk, b.node, b.inc, b.n, b.k, c.s0 + b.n AS origin_seq,
           b.n + MAX(c.h0, MAX(b.wall - b.n) OVER (ORDER BY b.seq)) AS hlc
    FROM batch AS b, c
),
versioned AS (
    SELECT s.seq, s.origin_seq, s.hlc, s.k,
           COALESCE(m.generation, 0) + s.k AS generation,
           LAG(s.hlc) OVER key_order AS before_hlc,
           LAG(s.node) OVER key_order AS before_node,
           LAG(s.inc) OVER key_order AS before_inc,
           m.hlc AS meta_hlc, m.node AS meta_node, m.inc AS meta_inc,
           m.generation AS meta_gen
    FROM stamped AS s LEFT JOIN _repl_rowmeta AS m ON m.tbl = s.tbl AND m.pk = s.pk
    WINDOW key_order AS (PARTITION BY s.tbl, s.pk ORDER BY s.seq)
)
UPDATE _repl_log SET
    origin_seq = v.origin_seq, hlc = v.hlc, generation = v.generation,
    prev_hlc = CASE WHEN v.k = 1 THEN v.meta_hlc ELSE v.before_hlc END,
    prev_node = CASE WHEN v.k = 1 THEN v.meta_node ELSE v.before_node END,
    prev_inc = CASE WHEN v.k = 1 THEN v.meta_inc ELSE v.before_inc END,
    prev_gen = CASE WHEN v.k = 1 THEN v.meta_gen ELSE v.generation - 1 END
FROM versioned AS v WHERE _repl_log.seq = v.seq
"""

_VERSIONS = """
INSERT INTO _repl_rowmeta (tbl, pk, hlc, node, inc, generation, deleted,
                           prev_hlc, prev_node, prev_inc, prev_gen, hash, seq)
SELECT l.tbl, l.pk, l.hlc, l.origin_node, l.origin_inc, l.generation, l.op = 3,
       l.prev_hlc, l.prev_node, l.prev_inc, l.prev_gen, NULL, l.origin_seq
FROM _repl_log AS l
WHERE l.seq IN (
    SELECT MAX(seq) FROM _repl_log
    WHERE seq > ? AND seq <= ? AND op != 0 AND tbl IS NOT NULL GROUP BY tbl, pk
)
ON CONFLICT (tbl, pk) DO UPDATE SET
    hlc = excluded.hlc, node = excluded.node, inc = excluded.inc,
    generation = excluded.generation, deleted = excluded.deleted,
    prev_hlc = excluded.prev_hlc, prev_node = excluded.prev_node,
    prev_inc = excluded.prev_inc, prev_gen = excluded.prev_gen, hash = NULL,
    seq = excluded.seq
"""

_CLOCK = """
UPDATE _repl_clock SET
    hlc = MAX(hlc, COALESCE((SELECT hlc FROM _repl_log WHERE seq = ?), 0)),
    local_seq = local_seq + ?, log_seq = ?
WHERE id = 1
"""


def unsealed(conn: sqlite3.Connection) -> tuple[int, int]:
    """(last sealed position, last logged position): equal when nothing waits for stamps."""
    row = conn.execute(
        "SELECT c.log_seq, MAX(c.log_seq, COALESCE((SELECT MAX(seq) FROM _repl_log), 0))"
        " FROM _repl_clock AS c WHERE c.id = 1"
    ).fetchone()
    return (0, 0) if row is None else (int(row[0]), int(row[1]))


def seal_pending(conn: sqlite3.Connection, through: int | None = None) -> int:
    """Inside a write transaction: stamp every entry after the last sealed position (up to
    ``through``: a reader stamps only what it saw); returns how many. Cheap when there are
    none (two index lookups)."""
    sealed, end = unsealed(conn)
    if through is not None:
        end = min(end, through)
    if end <= sealed:
        return 0
    (count, stamped) = conn.execute(
        "SELECT count(*), MAX(seq) FROM _repl_log"
        " WHERE seq > ? AND seq <= ? AND origin_seq = 0 AND op != 0",
        (sealed, end),
    ).fetchone()
    if count:
        conn.execute(_STAMP, {"through": end})
        conn.execute(_VERSIONS, (sealed, end))
    # Anything else past the sealed end was not a trigger's (a damaged file): left as it is,
    # for validation to judge.
    conn.execute(_CLOCK, (stamped or 0, count, end))
    return int(count)


def pending_keys(conn: sqlite3.Connection) -> set[tuple[str, str]]:
    """(table, key) of the rows whose last change waits for its stamps: their content is newer
    than their recorded version (checks of content against versions leave them for later)."""
    return {
        (table, key)
        for table, key in conn.execute(
            f"SELECT tbl, pk FROM _repl_log WHERE seq > {SEALED_END_SQL} AND op != 0"
        )
    }
