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

# The batch is staged in a TEMP table (n = its place in the batch), stamped there, then copied
# onto the log and into `_repl_rowmeta`: a few passes of plain scans, where one statement of
# chained window functions sorted the batch four times (about 3x slower).
_STAGE_TABLE = """
CREATE TEMP TABLE IF NOT EXISTS seal_batch (
    n INTEGER PRIMARY KEY, seq INTEGER NOT NULL, tbl TEXT, pk TEXT,
    wall INTEGER NOT NULL, node TEXT, inc INTEGER, hlc INTEGER,
    k INTEGER NOT NULL DEFAULT 1, last INTEGER NOT NULL DEFAULT 1,
    before_hlc INTEGER, before_node TEXT, before_inc INTEGER)
"""
_STAGE_INDEX = "CREATE INDEX IF NOT EXISTS temp.seal_batch_key ON seal_batch (tbl, pk, n)"

# Every position after the sealed end is a trigger's (the usual case: triggers take the next
# position, and every other writer seals first): n is the distance from the sealed end, so the
# running maximum needs no numbering pass.
_STAGE_CONTIGUOUS = """
INSERT INTO temp.seal_batch (n, seq, tbl, pk, wall, node, inc, hlc)
SELECT l.seq - c.log_seq, l.seq, l.tbl, l.pk, l.hlc, l.origin_node, l.origin_inc,
       l.seq - c.log_seq + MAX(c.hlc, MAX(l.hlc - l.seq + c.log_seq) OVER (ORDER BY l.seq))
FROM _repl_log AS l, _repl_clock AS c
WHERE c.id = 1 AND l.seq > c.log_seq AND l.seq <= :through
"""
# Otherwise (entries no trigger wrote, in a damaged file) the trigger entries are numbered.
_STAGE_NUMBERED = """
INSERT INTO temp.seal_batch (n, seq, tbl, pk, wall, node, inc)
SELECT ROW_NUMBER() OVER (ORDER BY l.seq), l.seq, l.tbl, l.pk, l.hlc, l.origin_node,
       l.origin_inc
FROM _repl_log AS l, _repl_clock AS c
WHERE c.id = 1 AND l.seq > c.log_seq AND l.seq <= :through AND l.origin_seq = 0 AND l.op != 0
"""
_STAMP_NUMBERED = """
UPDATE temp.seal_batch SET hlc = w.hlc
FROM (SELECT b.n, b.n + MAX(c.hlc, MAX(b.wall - b.n) OVER (ORDER BY b.n)) AS hlc
      FROM temp.seal_batch AS b, _repl_clock AS c WHERE c.id = 1) AS w
WHERE seal_batch.n = w.n
"""
_REPEATS = "SELECT EXISTS (SELECT 1 FROM temp.seal_batch GROUP BY tbl, pk HAVING count(*) > 1)"
# A key changed more than once in the batch: each later entry replaces the one before it.
_CHAIN_REPEATS = """
UPDATE temp.seal_batch SET k = r.k, last = r.last, before_hlc = r.before_hlc,
    before_node = r.before_node, before_inc = r.before_inc
FROM (SELECT b.n, ROW_NUMBER() OVER w AS k, LEAD(b.n) OVER w IS NULL AS last,
             LAG(b.hlc) OVER w AS before_hlc, LAG(b.node) OVER w AS before_node,
             LAG(b.inc) OVER w AS before_inc
      FROM temp.seal_batch AS b
      WHERE EXISTS (SELECT 1 FROM temp.seal_batch AS o
                    WHERE o.tbl = b.tbl AND o.pk = b.pk AND o.n != b.n)
      WINDOW w AS (PARTITION BY b.tbl, b.pk ORDER BY b.n)) AS r
WHERE seal_batch.n = r.n
"""
# A key's first entry in the batch replaces the version `_repl_rowmeta` holds (if any).
_STAMP_LOG = """
UPDATE _repl_log SET
    origin_seq = c.local_seq + b.n, hlc = b.hlc, generation = COALESCE(m.generation, 0) + b.k,
    prev_hlc = CASE WHEN b.k = 1 THEN m.hlc ELSE b.before_hlc END,
    prev_node = CASE WHEN b.k = 1 THEN m.node ELSE b.before_node END,
    prev_inc = CASE WHEN b.k = 1 THEN m.inc ELSE b.before_inc END,
    prev_gen = CASE WHEN b.k = 1 THEN m.generation ELSE COALESCE(m.generation, 0) + b.k - 1 END
FROM temp.seal_batch AS b JOIN _repl_clock AS c ON c.id = 1
     LEFT JOIN _repl_rowmeta AS m ON m.tbl = b.tbl AND m.pk = b.pk
WHERE _repl_log.seq = b.seq
"""
_VERSIONS = """
INSERT INTO _repl_rowmeta (tbl, pk, hlc, node, inc, generation, deleted,
                           prev_hlc, prev_node, prev_inc, prev_gen, hash, seq)
SELECT l.tbl, l.pk, l.hlc, l.origin_node, l.origin_inc, l.generation, l.op = 3,
       l.prev_hlc, l.prev_node, l.prev_inc, l.prev_gen, NULL, l.origin_seq
FROM temp.seal_batch AS b JOIN _repl_log AS l ON l.seq = b.seq
WHERE b.last
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
        _stamp(conn, end, contiguous=count == end - sealed)
    # Anything else past the sealed end was not a trigger's (a damaged file): left as it is,
    # for validation to judge.
    conn.execute(_CLOCK, (stamped or 0, count, end))
    return int(count)


def _stamp(conn: sqlite3.Connection, through: int, *, contiguous: bool) -> None:
    conn.execute(_STAGE_TABLE)
    conn.execute(_STAGE_INDEX)
    conn.execute("DELETE FROM temp.seal_batch")
    if contiguous:
        conn.execute(_STAGE_CONTIGUOUS, {"through": through})
    else:
        conn.execute(_STAGE_NUMBERED, {"through": through})
        conn.execute(_STAMP_NUMBERED)
    (repeats,) = conn.execute(_REPEATS).fetchone()
    if repeats:
        conn.execute(_CHAIN_REPEATS)
    conn.execute(_STAMP_LOG)
    conn.execute(_VERSIONS)
    conn.execute("DELETE FROM temp.seal_batch")


def pending_keys(conn: sqlite3.Connection) -> set[tuple[str, str]]:
    """(table, key) of the rows whose last change waits for its stamps: their content is newer
    than their recorded version (checks of content against versions leave them for later)."""
    return {
        (table, key)
        for table, key in conn.execute(
            f"SELECT tbl, pk FROM _repl_log WHERE seq > {SEALED_END_SQL} AND op != 0"
        )
    }
