"""The store's usage figures, across processes.

Applications and the node are different processes, so each `StateStore` counts its own reads,
writes, deletes, hits and misses in memory and now and then copies them into the node-local
table `_repl_store_metrics` (one row per store instance; not replicated, as no `_repl_*` table
is). A store that closes folds its row into the row of instance ``""``, so the table holds one
row per running (or crashed) process, and totals never go back. The node sums the rows and
counts keys and bytes in the state table when it is scraped (`node_figures`).
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass, field
from typing import Any

from replicator.capture.transactions import write_transaction
from replicator.state.schema import EXPIRY_SCOPE, TABLE

__all__ = ["Counters", "figures", "fold", "node_figures", "publish", "stored"]

_FIELDS = ("reads", "writes", "deletes", "hits", "misses")
_CLOSED = ""  # the instance closed stores fold their counts into


@dataclass(slots=True)
class Counters:
    reads: int = 0
    writes: int = 0
    deletes: int = 0
    hits: int = 0
    misses: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(
        self, *, reads: int = 0, writes: int = 0, deletes: int = 0, hits: int = 0, misses: int = 0
    ) -> None:
        with self.lock:
            self.reads += reads
            self.writes += writes
            self.deletes += deletes
            self.hits += hits
            self.misses += misses

    def values(self) -> tuple[int, int, int, int, int]:
        with self.lock:
            return self.reads, self.writes, self.deletes, self.hits, self.misses


def has_table(conn: sqlite3.Connection) -> bool:
    """Only a file a node has prepared (its `_repl_*` schema migrated) has the table."""
    row = conn.execute(
        "SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = '_repl_store_metrics'"
    ).fetchone()
    return row is not None


def publish(
    conn: sqlite3.Connection, instance: str, pid: int, counts: Counters, now: float
) -> None:
    """Record this instance's totals so far (idempotent). ``conn`` autocommits."""
    conn.execute(
        "INSERT INTO _repl_store_metrics"
        " (instance, pid, reads, writes, deletes, hits, misses, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (instance) DO UPDATE SET reads = excluded.reads,"
        " writes = excluded.writes, deletes = excluded.deletes, hits = excluded.hits,"
        " misses = excluded.misses, updated_at = excluded.updated_at",
        (instance, pid, *counts.values(), now),
    )


def fold(conn: sqlite3.Connection, instance: str, counts: Counters, now: float) -> None:
    """A closing instance: add its totals to the closed stores' row and drop its own, in one
    transaction (the totals never count twice nor go back)."""
    with write_transaction(conn):
        conn.execute(
            "INSERT INTO _repl_store_metrics"
            " (instance, pid, reads, writes, deletes, hits, misses, updated_at)"
            " VALUES (?, 0, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (instance) DO UPDATE SET reads = reads + excluded.reads,"
            " writes = writes + excluded.writes, deletes = deletes + excluded.deletes,"
            " hits = hits + excluded.hits, misses = misses + excluded.misses,"
            " updated_at = excluded.updated_at",
            (_CLOSED, *counts.values(), now),
        )
        conn.execute("DELETE FROM _repl_store_metrics WHERE instance = ?", (instance,))


def stored(conn: sqlite3.Connection, now_ms: int) -> tuple[int, int]:
    """Live keys (every scope, expired ones left out) and the bytes of their values."""
    keys, size = conn.execute(
        f"SELECT count(*), COALESCE(SUM(length(value)), 0) FROM {TABLE}"
        " WHERE scope != ? AND (expires_at IS NULL OR expires_at > ?)",
        (EXPIRY_SCOPE, now_ms),
    ).fetchone()
    return int(keys), int(size)


def figures(counts: tuple[int, ...], keys: int | None, size: int | None) -> dict[str, Any]:
    """The figures as `StateStore.metrics` and the node's status show them; ``counts`` are
    reads, writes, deletes, hits and misses."""
    reads, writes, deletes, hits, misses = counts
    return {
        "reads": reads,
        "writes": writes,
        "deletes": deletes,
        "hits": hits,
        "misses": misses,
        "hit_ratio": hits / (hits + misses) if hits + misses else None,
        "keys": keys,
        "bytes": size,
    }


def node_figures(conn: sqlite3.Connection, now_ms: int) -> dict[str, Any] | None:
    """Every store's counters summed, with keys and bytes counted now (None: this file has
    no state table and no store ever reported)."""
    table = conn.execute(
        "SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?", (TABLE,)
    ).fetchone()
    totals: tuple[int, ...] = (0, 0, 0, 0, 0)
    instances = 0
    if has_table(conn):
        *sums, instances = conn.execute(
            "SELECT " + ", ".join(f"COALESCE(SUM({f}), 0)" for f in _FIELDS) + ","
            f" SUM(instance != '{_CLOSED}') FROM _repl_store_metrics"
        ).fetchone()
        totals = tuple(int(value) for value in sums)
    if table is None and not any(totals):
        return None
    keys, size = stored(conn, now_ms) if table is not None else (None, None)
    return {**figures(totals, keys, size), "open_stores": int(instances or 0)}
