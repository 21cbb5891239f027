"""Forgetting: truncating the change log and collecting tombstones, only when it is safe.

The log is cut as a prefix (positions only grow, so a prefix is one range delete): up to the
first entry some node still lacks according to the cluster-wide floor, or further when entries
are older than the retention bound (a peer that then asks for them gets a snapshot). Each
origin's truncation point is recorded in `_repl_log_floor`.

A tombstone (the version of a deleted row) may go once no change it could still beat can
arrive: under the timestamp order, when every change some node may still receive is stamped
later than the tombstone, the tombstone would lose to each of them anyway, so forgetting it
changes no outcome. Orders that rank something above the stamp (priority, plugins) keep their
tombstones until the retention bound.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from protocol import Origin
from replicator.capture import hlc
from replicator.capture.sealing import SEALED_END_SQL
from replicator.capture.transactions import write_transaction

__all__ = [
    "CHUNK",
    "TruncationResult",
    "collect_tombstones",
    "stable_bound",
    "truncate_chunk",
    "truncate_log",
    "truncation_range",
]

CHUNK = 1000
"""Entries or tombstones forgotten per write transaction."""


@dataclass(frozen=True, slots=True)
class TruncationResult:
    removed: int
    past_floor: int  # entries some node still lacked, forgotten by the retention bound


def _floor_values(floor: Mapping[Origin, int]) -> tuple[str, list[object]]:
    """A VALUES list of the floor (one impossible row when empty: VALUES needs a row)."""
    rows = [(o.node_id, o.incarnation, seq) for o, seq in floor.items()] or [("", -1, 0)]
    sql = ", ".join("(?, ?, ?)" for _ in rows)
    return sql, [value for row in rows for value in row]


def truncation_range(
    conn: sqlite3.Connection,
    floor: Mapping[Origin, int],
    retention_hlc: int | None = None,
) -> tuple[int, int]:
    """The log positions ``[first, cut)`` to forget: the prefix every node holds, extended to
    entries stamped before ``retention_hlc``. Empty when ``first >= cut``."""
    values, params = _floor_values(floor)
    lacking = conn.execute(
        f"WITH f(node, inc, seq) AS (VALUES {values})"
        " SELECT l.seq FROM _repl_log l"
        " WHERE l.origin_seq > COALESCE((SELECT f.seq FROM f"
        "  WHERE f.node = l.origin_node AND f.inc = l.origin_inc), 0)"
        " ORDER BY l.seq LIMIT 1",
        params,
    ).fetchone()
    first, last = conn.execute(
        f"SELECT MIN(seq), MIN(MAX(seq), {SEALED_END_SQL}) FROM _repl_log"
    ).fetchone()  # entries waiting for their stamps stay, whatever the peers hold
    if first is None:
        return 0, 0
    cut = lacking[0] if lacking is not None else last + 1
    if retention_hlc is not None:
        young = conn.execute(
            "SELECT seq FROM _repl_log WHERE hlc >= ? ORDER BY seq LIMIT 1", (retention_hlc,)
        ).fetchone()
        cut = max(cut, young[0] if young is not None else last + 1)
    return first, min(cut, last + 1)


def truncate_chunk(
    conn: sqlite3.Connection, floor: Mapping[Origin, int], start: int, end: int
) -> TruncationResult:
    """Forget log positions ``[start, end)`` in one short write transaction, recording each
    origin's new floor and stable stamp. ``conn`` is in autocommit mode."""
    values, params = _floor_values(floor)
    with write_transaction(conn):
        origins = conn.execute(
            f"WITH f(node, inc, seq) AS (VALUES {values})"
            " SELECT l.origin_node, l.origin_inc, MAX(l.origin_seq),"
            "  MAX(CASE WHEN l.origin_seq <= f.seq THEN l.hlc END),"
            "  SUM(f.seq IS NULL OR l.origin_seq > f.seq)"
            " FROM _repl_log l LEFT JOIN f"
            "  ON f.node = l.origin_node AND f.inc = l.origin_inc"
            " WHERE l.seq >= ? AND l.seq < ? GROUP BY 1, 2",
            [*params, start, end],
        ).fetchall()
        removed = conn.execute(
            "DELETE FROM _repl_log WHERE seq >= ? AND seq < ?", (start, end)
        ).rowcount
        past_floor = 0
        for node, inc, seq, stable, lacked in origins:
            past_floor += lacked
            conn.execute(
                "INSERT INTO _repl_log_floor (origin_node, origin_inc, seq, stable_hlc)"
                " VALUES (?, ?, ?, COALESCE(?, 0))"
                " ON CONFLICT (origin_node, origin_inc) DO UPDATE"
                " SET seq = MAX(seq, excluded.seq),"
                "  stable_hlc = MAX(stable_hlc, excluded.stable_hlc)",
                (node, inc, seq, stable),
            )
    return TruncationResult(removed, past_floor)


def truncate_log(
    conn: sqlite3.Connection,
    floor: Mapping[Origin, int],
    retention_hlc: int | None = None,
) -> TruncationResult:
    """`truncation_range` then every chunk of it (the node runs the chunks one by one, so
    batches from peers are applied in between)."""
    first, cut = truncation_range(conn, floor, retention_hlc)
    removed = past_floor = 0
    for start in range(first, cut, CHUNK):
        done = truncate_chunk(conn, floor, start, min(cut, start + CHUNK))
        removed += done.removed
        past_floor += done.past_floor
    return TruncationResult(removed, past_floor)


def stable_bound(
    conn: sqlite3.Connection,
    reports: Mapping[str, tuple[int, Mapping[Origin, int]]],
    floor: Mapping[Origin, int],
) -> int:
    """A stamp below every change that some node of the cluster may still receive.

    ``reports``: each node's version vector and the wall time (ms) it reported it, this node
    included. A node's future writes are stamped at or after its wall time, so a report bounds
    them; what an origin wrote before that and some node lacks is above the origin's
    ``stable_hlc`` (or still in this log, if nothing of it was truncated). 0: no bound known.
    """
    if not reports or any(reported_at <= 0 for reported_at, _ in reports.values()):
        return 0
    bound = min(hlc.pack(reported_at, 0) for reported_at, _ in reports.values())
    stable = {
        Origin(node, inc): value
        for node, inc, value in conn.execute(
            "SELECT origin_node, origin_inc, stable_hlc FROM _repl_log_floor"
        )
    }
    (oldest_logged,) = conn.execute("SELECT MIN(hlc) FROM _repl_log").fetchone()
    origins = {origin for _, vector in reports.values() for origin in vector}
    for origin in origins:
        report = reports.get(origin.node_id)
        written = report[1].get(origin, 0) if report is not None else None
        if written is not None and floor.get(origin, 0) >= written:
            continue  # every node held all it had written when it reported: bounded above
        if origin in stable:
            lower = stable[origin]
        elif floor.get(origin, 0) > 0 and oldest_logged is not None:
            lower = oldest_logged  # nothing of it truncated, and this node has some of it
        else:
            return 0  # some node may receive writes of it this node has never seen
        bound = min(bound, lower)
    return bound


def collect_tombstones(
    conn: sqlite3.Connection,
    stable_hlc: int,
    retention_hlc: int | None,
    timestamp_tables: Collection[str],
    limit: int = CHUNK,
) -> int:
    """Forget up to ``limit`` tombstones no change can still beat (timestamp order) or past
    retention, in one short write transaction; returns how many went."""
    placeholders = ", ".join("?" for _ in timestamp_tables) or "NULL"
    with write_transaction(conn):
        removed = conn.execute(
            "DELETE FROM _repl_rowmeta WHERE (tbl, pk) IN ("
            " SELECT tbl, pk FROM _repl_rowmeta WHERE deleted AND ("
            f"  (hlc < ? AND tbl IN ({placeholders})) OR hlc < ?)"
            " LIMIT ?)",
            [stable_hlc, *timestamp_tables, retention_hlc or 0, limit],
        ).rowcount
    return removed
