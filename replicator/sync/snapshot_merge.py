"""The receiving side of a snapshot: chunks staged and merged in short transactions under the
same version order as any change, rows the sender had seen deleted removed, and the vector
moved only once every table's checksum matched."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator, Sequence
from typing import Any

import msgpack

from protocol import (
    WITHHELD,
    Origin,
    RowVersion,
    SnapshotBegin,
    SnapshotChunk,
    SnapshotEnd,
    SnapshotRow,
)
from protocol.checks import SqlValue
from replicator.apply.applier import Applier, delete_sql, unless_row_error, upsert_sql
from replicator.capture.bookkeeping import advance_clock, raise_log_floor, raise_progress
from replicator.capture.pacing import WritePacer
from replicator.capture.rows import key_sql, quote_identifier
from replicator.capture.store import Store
from replicator.capture.tables import TableInfo, resume_capture, suppress_capture
from replicator.capture.transactions import write_transaction
from replicator.log import KEY_PEER, get_logger
from replicator.sync.divergence import (
    TAMPERED,
    content_hash,
    fold,
    key_bucket,
    row_hash,
)
from replicator.sync.filters import RowFilter
from replicator.sync.snapshot import (
    CHUNK_ROWS,
    SnapshotError,
    bitmap_buckets,
    checksum_bytes,
)

__all__ = ["SnapshotMerge", "discard_staged"]

_log = get_logger("snapshot")
MERGE_ROWS = 250  # rows merged per transaction


class SnapshotMerge:
    """Merges one snapshot into the applier's database (use from one thread at a time)."""

    def __init__(
        self,
        applier: Applier,
        begin: SnapshotBegin,
        peer: str,
        view: RowFilter | None = None,
        pacer: WritePacer | None = None,
    ) -> None:
        self.applier = applier
        self.pacer = pacer  # spaces the merge's transactions out (see `replicator.capture.pacing`)
        self.view = view  # the rows this node shares: the others never came from the sender
        self.begin = begin
        self.peer = peer
        self.vector = dict(begin.version_vector)
        tables = applier.store.tables
        for table in begin.tables:
            info = tables.get(table.name)
            if info is None:
                raise SnapshotError(
                    f"snapshot from {peer} carries table {table.name!r}, not replicated here",
                    op="snapshot",
                    peer=peer,
                )
            if set(table.columns) != set(info.columns) or table.primary_key != info.primary_key:
                raise SnapshotError(
                    f"table {table.name!r} differs from {peer}'s: columns "
                    f"{sorted(table.columns)} key {list(table.primary_key)} there, "
                    f"{sorted(info.columns)} key {list(info.primary_key)} here",
                    op="snapshot",
                    peer=peer,
                )
        self.expected = {table.name for table in begin.tables}
        # What the sender declared: staged rows and bytes never go beyond it.
        self.declared = {table.name: table for table in begin.tables}
        self.staged_rows: dict[str, int] = {}
        self.staged_bytes: dict[str, int] = {}
        self.ranges = {name: bitmap_buckets(bitmap) for name, bitmap in begin.ranges.items()}
        self.partial = bool(begin.ranges)  # a repair: rows mended, the vector left alone
        self.checksums: dict[str, int] = {}
        self.rows = 0
        self.written = 0
        self.removed = 0
        self.refused = 0
        self._last_live: dict[str, tuple[SqlValue, ...]] = {}
        self._live_done: set[str] = set()
        self._current: str | None = None
        self._next_index: dict[str, int] = {}
        # Per table, keys the sender holds but withheld: never swept away here.
        self._protected: dict[str, set[str]] = {}

    # -- chunks ----------------------------------------------------------------------------

    def chunk(self, chunk: SnapshotChunk) -> None:
        """Check and hold one chunk; nothing is merged before the whole snapshot verified."""
        if chunk.snapshot_id != self.begin.snapshot_id or chunk.table not in self.expected:
            raise SnapshotError(f"unexpected chunk for {chunk.table!r} from {self.peer}",
                                op="snapshot", peer=self.peer)  # fmt: skip
        if chunk.index != self._next_index.get(chunk.table, 0):
            raise SnapshotError(f"chunk {chunk.index} of {chunk.table!r} out of order",
                                op="snapshot", peer=self.peer)  # fmt: skip
        self._next_index[chunk.table] = chunk.index + 1
        store = self.applier.store
        info = store.tables[chunk.table]
        for row in chunk.rows:
            problem = _malformed_row(info, row)
            if problem is not None:
                raise SnapshotError(f"snapshot from {self.peer}: a row of {chunk.table!r}: "
                                    f"{problem}", op="snapshot", peer=self.peer)  # fmt: skip
        staged = _stage_rows(chunk.rows)
        declared = self.declared[chunk.table]
        rows = self.staged_rows[chunk.table] = self.staged_rows.get(chunk.table, 0) + len(
            chunk.rows
        )
        size = self.staged_bytes[chunk.table] = self.staged_bytes.get(chunk.table, 0) + len(staged)
        if rows > declared.row_count or size > declared.max_bytes:
            raise SnapshotError(
                f"snapshot from {self.peer} sends more of {chunk.table!r} than it declared "
                f"({rows} rows, {size} bytes; declared {declared.row_count} rows, "
                f"{declared.max_bytes} bytes)",
                op="snapshot",
                peer=self.peer,
            )
        checksum = self.checksums.get(chunk.table, 0)
        for row in chunk.rows:
            checksum = fold(checksum, row_hash(chunk.table, store.key(row.pk), row))
        self.checksums[chunk.table] = checksum
        self.rows += len(chunk.rows)
        with write_transaction(store) as conn:
            conn.execute(
                "INSERT INTO _repl_snapshot_stage (snapshot, tbl, row) VALUES (?, ?, ?)",
                (self.begin.snapshot_id, chunk.table, staged),
            )

    def _merge_staged(self) -> None:
        """Merge the verified chunks, one per transaction, in the sender's order."""
        conn = self.applier.store.conn
        after = 0
        while True:
            staged = conn.execute(
                "SELECT id, tbl, row FROM _repl_snapshot_stage WHERE snapshot = ? AND id > ?"
                " ORDER BY id LIMIT 1",
                (self.begin.snapshot_id, after),
            ).fetchone()
            if staged is None:
                return
            after, table, data = staged
            rows = _unstage_rows(data)
            # A staged chunk is merged in a few short transactions: the application's own
            # writers wait for none of them long.
            for start in range(0, len(rows), MERGE_ROWS):
                if self.pacer is not None:
                    self.pacer.wait_turn_blocking()
                self._merge_chunk(table, rows[start : start + MERGE_ROWS])

    def _merge_chunk(self, table: str, rows: Sequence[SnapshotRow]) -> None:
        if self._current is not None and self._current != table:
            self._end_live_rows(self._current)
        self._current = table
        store = self.applier.store
        info = store.tables[table]
        keyed = [(store.key(row.pk), row) for row in rows]
        withheld = {key for key, row in keyed if row.seq == WITHHELD}
        self._protected.setdefault(table, set()).update(withheld)
        keyed = [(key, row) for key, row in keyed if key not in withheld]
        live = [(key, row) for key, row in keyed if row.values is not None]
        with self._transaction() as conn:
            self._merge(conn, info, keyed)
            if live:
                self._sweep(conn, info, self._last_live.get(table), live[-1][1].pk,
                            {key for key, _ in live})  # fmt: skip
                self._last_live[table] = live[-1][1].pk
        if len(live) < len(keyed):  # tombstones come after the live rows
            self._end_live_rows(table)

    def _merge(
        self, conn: sqlite3.Connection, info: TableInfo, keyed: Sequence[tuple[str, SnapshotRow]]
    ) -> None:
        order = self.applier.resolver_for(info.name).order_key
        current = _load_versions(conn, info.name, [key for key, _ in keyed])
        columns = info.columns
        delete = delete_sql(info)
        upsert = upsert_sql(info, columns)
        winners: list[tuple[str, SnapshotRow]] = []
        for key, row in keyed:
            mine, recorded = current.get(key, (None, None))
            if mine is not None:
                ours, theirs = order(mine), order(row.version)
                if theirs < ours:
                    continue
                if theirs == ours and not self._mend(conn, info, row, recorded):
                    continue
            winners.append((key, row))
        deletes = [row.pk for _, row in winners if row.values is None]
        upserts = [
            [row.values.get(c) for c in columns] for _, row in winners if row.values is not None
        ]
        try:
            conn.executemany(delete, deletes)
            conn.executemany(upsert, upserts)
            written = winners
        except sqlite3.Error as error:
            unless_row_error(conn, error)
            # Some row here holds one of a row's UNIQUE values (or cannot be written for
            # another reason of its own): find which, keep ours.
            written = [(key, row) for key, row in winners if self._write_one(conn, info, key, row)]
        conn.executemany(_SAVE_VERSION, [_version_params(info.name, k, r) for k, r in written])
        highest = max((row.version.hlc for _, row in written), default=0)
        self.written += len(written)
        if highest:
            advance_clock(conn, highest)

    def _write_one(
        self, conn: sqlite3.Connection, info: TableInfo, key: str, row: SnapshotRow
    ) -> bool:
        try:
            if row.values is None:
                conn.execute(delete_sql(info), row.pk)
            else:
                conn.execute(
                    upsert_sql(info, info.columns), [row.values.get(c) for c in info.columns]
                )
        except sqlite3.Error as error:
            unless_row_error(conn, error)
            self.refused += 1
            _log.warning("snapshot row refused here", reason=str(error), key=key,
                         table=info.name, **{KEY_PEER: self.peer})  # fmt: skip
            return False
        return True

    def _mend(
        self, conn: sqlite3.Connection, info: TableInfo, row: SnapshotRow, recorded: bytes | None
    ) -> bool:
        """The same version on both sides: take the sender's copy if ours was edited behind
        replication's back, or (in a repair) if the contents differ and theirs ranks higher by
        content hash, a rule both sides apply alike so they settle on one copy."""
        if recorded == TAMPERED:
            return True
        if not self.partial or row.values is None:
            return False
        found = _stored_row(conn, info, row.pk)
        if found is None:
            return True
        if self.view is not None:
            found = self.view.transform(info.name, found)
        ours = content_hash(found)
        theirs = content_hash(row.values)
        return theirs != ours and theirs > ours

    def _sweep(
        self,
        conn: sqlite3.Connection,
        info: TableInfo,
        after: tuple[SqlValue, ...] | None,
        through: tuple[SqlValue, ...] | None,
        seen: set[str],
    ) -> tuple[int, tuple[SqlValue, ...] | None]:
        """Delete the rows between two keys the snapshot skipped, if the sender had seen their
        version (they were deleted there); keep those it never saw. Without ``through``, looks
        at one chunk of rows. Returns how many rows it looked at and the last one's key."""
        keys = ", ".join(f"t.{quote_identifier(c)}" for c in info.primary_key)
        marks = ", ".join("?" for _ in info.primary_key)
        where, params = [], []
        if after is not None:
            where.append(f"({keys}) > ({marks})")
            params += list(after)
        if through is not None:
            where.append(f"({keys}) <= ({marks})")
            params += list(through)
        key_expr = key_sql("t", info.primary_key)
        rows = conn.execute(
            f"SELECT {keys}, {key_expr}, m.node, m.inc, m.seq"
            f" FROM {quote_identifier(info.name)} AS t"
            f" LEFT JOIN _repl_rowmeta AS m ON m.tbl = ? AND m.pk = {key_expr}"
            + (" WHERE " + " AND ".join(where) if where else "")
            + f" ORDER BY {keys}"
            + (f" LIMIT {CHUNK_ROWS}" if through is None else ""),
            [info.name, *params],
        ).fetchall()
        width = len(info.primary_key)
        delete = delete_sql(info)
        wanted = self.ranges.get(info.name)
        protected = self._protected.get(info.name, set())
        for record in rows:
            key, node, inc, seq = record[width:]
            if key in seen or key in protected or seq is None:
                continue
            if wanted is not None and key_bucket(info.name, key) not in wanted:
                continue  # a repair carries only some buckets: the others were not sent
            if seq <= self.vector.get(Origin(node, inc), 0):
                if self.view is not None:
                    stored = _stored_row(conn, info, tuple(record[:width]))
                    if stored is not None and not self.view.shares(info.name, stored):
                        continue  # not shared: the sender never had it to send
                conn.execute(delete, record[:width])
                conn.execute("DELETE FROM _repl_rowmeta WHERE tbl = ? AND pk = ?", (info.name, key))
                self.removed += 1
        return len(rows), (tuple(rows[-1][:width]) if rows else None)

    def _end_live_rows(self, table: str) -> None:
        """No more live rows of ``table`` will come: sweep past the last one, in chunks."""
        if table in self._live_done:
            return
        self._live_done.add(table)
        info = self.applier.store.tables[table]
        after = self._last_live.get(table)
        while True:
            with self._transaction() as conn:
                looked, last = self._sweep(conn, info, after, None, set())
            if looked < CHUNK_ROWS:
                return
            after = last

    # -- the end ---------------------------------------------------------------------------

    def finish(self, end: SnapshotEnd, *, verify: bool = True) -> dict[Origin, int]:
        """Check what arrived, sweep the rest, and move the version vector to the snapshot's.
        Returns the vector this node holds now."""
        try:
            self._verify(end, verify)
        except SnapshotError:
            self.discard()
            raise
        self._merge_staged()
        for name in sorted(self.expected):
            self._end_live_rows(name)
        store = self.applier.store
        own = store.clock().origin
        if self.partial:
            _log.info("rows repaired from a peer", rows=self.rows, written=self.written,
                      removed=self.removed, tables=sorted(self.expected),
                      **{KEY_PEER: self.peer})  # fmt: skip
            self.discard()
            return store.version_vector()
        with self._transaction() as conn:
            held = store.version_vector()
            for origin, seq in self.vector.items():
                if origin == own or held.get(origin, 0) >= seq:
                    continue
                raise_progress(conn, origin, seq)
                # This node's log never held those entries: a peer lacking them needs a
                # snapshot too.
                raise_log_floor(conn, origin, seq)
            vector = store.version_vector()
            conn.execute(
                "DELETE FROM _repl_snapshot_stage WHERE snapshot = ?", (self.begin.snapshot_id,)
            )
        _log.info("snapshot merged", rows=self.rows, written=self.written, removed=self.removed,
                  **{KEY_PEER: self.peer})  # fmt: skip
        return vector

    def _verify(self, end: SnapshotEnd, checksums: bool) -> None:
        if end.snapshot_id != self.begin.snapshot_id:
            raise SnapshotError("snapshot end for another snapshot", op="snapshot", peer=self.peer)
        if end.row_count != self.rows:
            raise SnapshotError(f"snapshot from {self.peer} announced {end.row_count} rows, "
                                f"{self.rows} arrived", op="snapshot", peer=self.peer)  # fmt: skip
        if not checksums:
            return
        for name in sorted(self.expected):
            if end.table_checksums.get(name) != checksum_bytes(self.checksums.get(name, 0)):
                raise SnapshotError(
                    f"checksum of {name!r} from {self.peer} does not match what arrived",
                    op="snapshot",
                    peer=self.peer,
                )

    def discard(self) -> None:
        """Forget the rows held for this snapshot (it failed or was abandoned)."""
        discard_staged(self.applier.store, self.begin.snapshot_id)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction with capture suppressed (the applier's marker row)."""
        with write_transaction(self.applier.store) as conn:
            suppress_capture(conn)
            yield conn
            resume_capture(conn)


def discard_staged(store: Store, snapshot_id: int | None = None) -> None:
    """Delete the staged chunks of one snapshot (all of them: ``None``, as at start, when
    whatever a crash left staged belongs to snapshots that will never finish)."""
    with write_transaction(store) as conn:
        if snapshot_id is None:
            conn.execute("DELETE FROM _repl_snapshot_stage")
        else:
            conn.execute("DELETE FROM _repl_snapshot_stage WHERE snapshot = ?", (snapshot_id,))


def _malformed_row(info: TableInfo, row: SnapshotRow) -> str | None:
    """Why a snapshot row cannot be a row of this table (None: it can)."""
    key = info.primary_key
    if len(row.pk) != len(key):
        return f"key has {len(row.pk)} values, the table's key has {len(key)} columns"
    if row.values is None:
        return None
    unknown = row.values.keys() - set(info.columns)
    if unknown:
        return f"unknown columns {sorted(unknown)}"
    for column, value in zip(key, row.pk, strict=True):
        if column not in row.values:
            return f"row lacks key column {column!r}"
        stored = row.values[column]
        if stored != value or type(stored) is not type(value):
            return f"row's {column!r} contradicts its key"
    return None


def _stage_rows(rows: Sequence[SnapshotRow]) -> bytes:
    packed: bytes = msgpack.packb(
        [
            [list(r.pk), r.values, r.version.hlc, r.version.origin.node_id,
             r.version.origin.incarnation, r.version.generation, r.seq]
            for r in rows
        ],
        use_bin_type=True,
    )  # fmt: skip
    return packed


def _unstage_rows(data: bytes) -> list[SnapshotRow]:
    origins: dict[tuple[str, int], Origin] = {}
    rows = []
    for pk, values, stamp, node, inc, generation, seq in msgpack.unpackb(data, raw=False):
        origin = origins.get((node, inc))
        if origin is None:
            origin = origins[node, inc] = Origin(node, inc)
        rows.append(SnapshotRow(tuple(pk), values, RowVersion(stamp, origin, generation), seq))
    return rows


def _stored_row(
    conn: sqlite3.Connection, info: TableInfo, pk: Sequence[SqlValue]
) -> dict[str, SqlValue] | None:
    where = " AND ".join(f"{quote_identifier(c)} IS ?" for c in info.primary_key)
    names = ", ".join(quote_identifier(c) for c in info.columns)
    found = conn.execute(
        f"SELECT {names} FROM {quote_identifier(info.name)} WHERE {where}", list(pk)
    ).fetchone()
    return None if found is None else dict(zip(info.columns, found, strict=True))


def _load_versions(
    conn: sqlite3.Connection, table: str, keys: Sequence[str]
) -> dict[str, tuple[RowVersion, bytes | None]]:
    if not keys:
        return {}
    return {
        key: (RowVersion(stamp, Origin(node, inc), generation), recorded)
        for key, stamp, node, inc, generation, recorded in conn.execute(
            "SELECT pk, hlc, node, inc, generation, hash FROM _repl_rowmeta"
            " WHERE tbl = ? AND pk IN (SELECT value FROM json_each(?))",
            (table, json.dumps(list(keys))),
        )
    }


_SAVE_VERSION = (
    "INSERT INTO _repl_rowmeta (tbl, pk, hlc, node, inc, generation, deleted, prev_hlc,"
    " prev_node, prev_inc, prev_gen, hash, seq)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, NULL, NULL, NULL, NULL, ?, ?)"
    " ON CONFLICT (tbl, pk) DO UPDATE SET hlc = excluded.hlc, node = excluded.node,"
    " inc = excluded.inc, generation = excluded.generation, deleted = excluded.deleted,"
    " prev_hlc = NULL, prev_node = NULL, prev_inc = NULL, prev_gen = NULL,"
    " hash = excluded.hash, seq = excluded.seq"
)


def _version_params(table: str, key: str, row: SnapshotRow) -> tuple[Any, ...]:
    version = row.version
    return (
        table,
        key,
        version.hlc,
        version.origin.node_id,
        version.origin.incarnation,
        version.generation,
        int(row.values is None),
        None if row.values is None else content_hash(row.values),
        row.seq or None,
    )
