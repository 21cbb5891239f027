"""The receiving side of a snapshot: chunks staged and merged in short transactions under the
same version order as any change, rows the sender had seen deleted removed, and the vector
moved only once every table's checksum matched."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator, Sequence
from itertools import repeat
from typing import Any

from protocol import (
    WITHHELD,
    Origin,
    RowVersion,
    SnapshotBegin,
    SnapshotChunk,
    SnapshotColumns,
    SnapshotEnd,
    SnapshotRow,
    SnapshotTable,
)
from protocol.checks import SqlValue
from replicator.apply.applier import Applier, delete_sql, unless_row_error, upsert_sql
from replicator.apply.resolvers import (
    ManualResolver,
    PriorityResolver,
    Resolver,
    TimestampResolver,
)
from replicator.capture.bookkeeping import advance_clock, raise_log_floor, raise_progress
from replicator.capture.pacing import WritePacer
from replicator.capture.rows import key_sql, quote_identifier, quote_literal
from replicator.capture.store import Store
from replicator.capture.tables import TableInfo, resume_capture, suppress_capture
from replicator.capture.transactions import write_transaction
from replicator.log import KEY_PEER, get_logger
from replicator.sync.divergence import (
    TAMPERED,
    content_hash,
    fold,
    key_bucket,
    versioned_rows_at,
)
from replicator.sync.filters import RowFilter
from replicator.sync.snapshot import (
    CHUNK_ROWS,
    SnapshotError,
    Staged,
    bitmap_buckets,
    checksum_bytes,
    chunk_digest,
    chunk_payload,
    columns_chunk,
    unstage,
)

__all__ = ["SnapshotMerge", "discard_staged"]

_log = get_logger("snapshot")
MERGE_ROWS = 250  # rows merged per transaction, row by row
SET_MERGE_ROWS = 1000  # rows merged per transaction in SQL
_INCOMING = "snapshot_incoming"  # temp tables of the applier's connection, during a merge
_PROTECTED = "snapshot_protected"
_VECTOR = "snapshot_vector"


class SnapshotMerge:
    """Merges one snapshot into the applier's database (use from one thread at a time)."""

    def __init__(
        self,
        applier: Applier,
        begin: SnapshotBegin,
        peer: str,
        view: RowFilter | None = None,
        pacer: WritePacer | None = None,
        *,
        row_by_row: bool = False,
    ) -> None:
        """``row_by_row``: merge every table as the strategies' order keys rank each row in
        Python (what a plugin strategy, a filter and a repair need), never in SQL."""
        self.applier = applier
        self.row_by_row = row_by_row
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
        # A repair of named rows: per table, the keys carried (the other rows are not swept).
        self.named = {name: frozenset(keys) for name, keys in begin.keys.items()}
        self._named_seen: dict[str, set[str]] = {}
        # A repair: rows mended, the vector left alone.
        self.partial = bool(begin.ranges) or bool(begin.keys)
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

    def chunk(self, chunk: SnapshotColumns | SnapshotChunk) -> None:
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
        declared = self.declared[chunk.table]
        if isinstance(chunk, SnapshotChunk):
            for row in chunk.rows:
                problem = _malformed_row(info, row)
                if problem is not None:
                    raise SnapshotError(f"snapshot from {self.peer}: a row of {chunk.table!r}: "
                                        f"{problem}", op="snapshot", peer=self.peer)  # fmt: skip
            chunk = columns_chunk(
                chunk.snapshot_id, chunk.table, chunk.index, declared.columns,
                declared.primary_key,
                ((row, None if row.values is None else content_hash(row.values))
                 for row in chunk.rows),
            )  # fmt: skip
        problem = _malformed_columns(declared, chunk)
        if problem is not None:
            raise SnapshotError(f"snapshot from {self.peer}: a chunk of {chunk.table!r}: "
                                f"{problem}", op="snapshot", peer=self.peer)  # fmt: skip
        staged = chunk_payload(chunk)
        rows = self.staged_rows[chunk.table] = (
            self.staged_rows.get(chunk.table, 0) + chunk.row_count
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
        self.checksums[chunk.table] = fold(checksum, chunk_digest(chunk.index, staged))
        self.rows += chunk.row_count
        with write_transaction(store) as conn:
            conn.execute(
                "INSERT INTO _repl_snapshot_stage (snapshot, tbl, row) VALUES (?, ?, ?)",
                (self.begin.snapshot_id, chunk.table, staged),
            )

    def _merge_staged(self) -> None:
        """Merge the verified chunks in the sender's order, in short transactions."""
        conn = self.applier.store.conn
        after = 0
        while True:
            found = conn.execute(
                "SELECT id, tbl, row FROM _repl_snapshot_stage WHERE snapshot = ? AND id > ?"
                " ORDER BY id LIMIT 1",
                (self.begin.snapshot_id, after),
            ).fetchone()
            if found is None:
                return
            after, table, data = found
            staged = unstage(data)
            if self._current != table:
                if self._current is not None:
                    self._end_live_rows(self._current)
                self._incoming_for(table)
            self._current = table
            if self._in_sql(table):
                self._merge_in_sql(table, staged)
            else:
                self._merge_row_by_row(table, staged)

    def _in_sql(self, table: str) -> bool:
        """Whether SQL can rank ``table``'s versions and sweep it (see `_order_sql`)."""
        if self.row_by_row or self.partial or self.view is not None:
            return False
        return _order_sql(self.applier.resolver_for(table)) is not None

    def _merge_row_by_row(self, table: str, staged: Staged) -> None:
        declared = self.declared[table]
        live, hashes, keyed = staged.rows(declared.columns, declared.primary_key)
        rows: list[tuple[SnapshotRow, bytes | None]]
        rows = [(row, None) for row in keyed if row.seq == WITHHELD]
        rows += list(zip(live, hashes, strict=True))
        rows += [(row, None) for row in keyed if row.seq != WITHHELD]
        # A staged chunk is merged in a few short transactions: the application's own
        # writers wait for none of them long.
        for start in range(0, len(rows), MERGE_ROWS):
            if self.pacer is not None:
                self.pacer.wait_turn_blocking()
            self._merge_chunk(table, rows[start : start + MERGE_ROWS])

    def _merge_chunk(self, table: str, rows: Sequence[tuple[SnapshotRow, bytes | None]]) -> None:
        store = self.applier.store
        info = store.tables[table]
        keyed = [(store.key(row.pk), row, digest) for row, digest in rows]
        withheld = {key for key, row, _ in keyed if row.seq == WITHHELD}
        self._protected.setdefault(table, set()).update(withheld)
        keyed = [entry for entry in keyed if entry[0] not in withheld]
        live = [(key, row) for key, row, _ in keyed if row.values is not None]
        with self._transaction() as conn:
            self._merge(conn, info, keyed)
            if table in self.named:
                self._named_seen.setdefault(table, set()).update(key for key, _ in live)
            elif live:
                self._sweep(conn, info, self._last_live.get(table), live[-1][1].pk,
                            {key for key, _ in live})  # fmt: skip
                self._last_live[table] = live[-1][1].pk
        if len(live) < len(keyed):  # tombstones come after the live rows
            self._end_live_rows(table)

    def _merge(
        self,
        conn: sqlite3.Connection,
        info: TableInfo,
        keyed: Sequence[tuple[str, SnapshotRow, bytes | None]],
    ) -> None:
        order = self.applier.resolver_for(info.name).order_key
        current = _load_versions(conn, info.name, [key for key, _, _ in keyed])
        columns = info.columns
        delete = delete_sql(info)
        upsert = upsert_sql(info, columns)
        winners: list[tuple[str, SnapshotRow, bytes | None]] = []
        for key, row, digest in keyed:
            mine, recorded = current.get(key, (None, None))
            if mine is not None:
                ours, theirs = order(mine), order(row.version)
                if theirs < ours:
                    continue
                if theirs == ours and not self._mend(conn, info, row, recorded):
                    continue
            winners.append((key, row, digest))
        deletes = [row.pk for _, row, _ in winners if row.values is None]
        upserts = [
            [row.values.get(c) for c in columns] for _, row, _ in winners if row.values is not None
        ]
        try:
            conn.executemany(delete, deletes)
            conn.executemany(upsert, upserts)
            written = winners
        except sqlite3.Error as error:
            unless_row_error(conn, error)
            # Some row here holds one of a row's UNIQUE values (or cannot be written for
            # another reason of its own): find which, keep ours.
            written = [entry for entry in winners if self._write_one(conn, info, *entry[:2])]
        conn.executemany(_SAVE_VERSION, [_version_params(info.name, *entry) for entry in written])
        highest = max((row.version.hlc for _, row, _ in written), default=0)
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
        keys, where, params = _key_range(info, after, through)
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
        if table in self.named:
            self._sweep_named(info)
            return
        after = self._last_live.get(table)
        if self._in_sql(table):
            self._sweep_rest_in_sql(info, after)
            return
        while True:
            with self._transaction() as conn:
                looked, last = self._sweep(conn, info, after, None, set())
            if looked < CHUNK_ROWS:
                return
            after = last

    def _sweep_named(self, info: TableInfo) -> None:
        """A repair of named rows: delete those the sender sent nothing for (no row, no
        tombstone) if it had seen their version; only the named rows are looked at."""
        named = self.named[info.name]
        absent = named - self._named_seen.get(info.name, set())
        absent -= self._protected.get(info.name, set())
        if not absent:
            return
        own = self.applier.store.clock().origin
        with self._transaction() as conn:
            for key, row, _ in list(versioned_rows_at(conn, info, own, sorted(absent))):
                if not row.seq or row.seq > self.vector.get(row.version.origin, 0):
                    continue  # no version recorded, or one the sender never saw: kept
                shared = self.view is None or self.view.shares(info.name, dict(row.values or {}))
                if not shared:
                    continue  # not shared: the sender never had it to send
                conn.execute(delete_sql(info), row.pk)
                conn.execute("DELETE FROM _repl_rowmeta WHERE tbl = ? AND pk = ?", (info.name, key))
                self.removed += 1

    # -- the merge in SQL ------------------------------------------------------------------
    #
    # A chunk goes into a temp table of the applier's connection in one executemany; one
    # statement marks the rows whose version ranks above ours (the strategy's order key as a
    # row value, compared inside SQLite), and one statement each writes the winners into the
    # table and their versions into the row metadata. The sweep picks the rows the chunk
    # skipped in one query. The result is the same as the row-by-row merge above, which the
    # strategies SQL cannot rank (plugins), filters and repairs still take.

    def _merge_in_sql(self, table: str, staged: Staged) -> None:
        store = self.applier.store
        info = store.tables[table]
        declared = self.declared[table]
        width = len(declared.columns)
        origins = staged.origins
        hlcs, indexes, generations, seqs = staged.keyed
        withheld = [n for n, seq in enumerate(seqs) if seq == WITHHELD]
        if withheld:
            keys = [store.key([column[n] for column in staged.keys]) for n in withheld]
            self._protected.setdefault(table, set()).update(keys)
            store.conn.executemany(
                f"INSERT OR IGNORE INTO temp.{_PROTECTED} (tbl, pk) VALUES (?, ?)",
                [(table, key) for key in keys],
            )
        hlcs, indexes, generations, seqs = staged.live
        live = list(zip(
            hlcs, [origins[i].node_id for i in indexes], [origins[i].incarnation for i in indexes],
            generations, seqs, repeat(0), staged.hashes, *staged.columns,
        ))  # fmt: skip
        positions = [declared.columns.index(c) for c in declared.primary_key]
        for start in range(0, len(live), SET_MERGE_ROWS):
            piece = live[start : start + SET_MERGE_ROWS]
            through = tuple(piece[-1][7 + p] for p in positions)
            self._merge_piece(info, declared, piece, through)
        hlcs, indexes, generations, seqs = staged.keyed
        columns: list[Any] = [repeat(None)] * width
        for position, key_column in zip(positions, staged.keys, strict=True):
            columns[position] = key_column
        tombstones = [
            row for row in zip(
                hlcs, [origins[i].node_id for i in indexes],
                [origins[i].incarnation for i in indexes], generations, seqs, repeat(1),
                repeat(None), *columns,
            ) if row[4] != WITHHELD
        ]  # fmt: skip
        for start in range(0, len(tombstones), SET_MERGE_ROWS):
            self._merge_piece(info, declared, tombstones[start : start + SET_MERGE_ROWS], None)
        if tombstones:  # tombstones come after the live rows
            self._end_live_rows(table)

    def _merge_piece(
        self,
        info: TableInfo,
        declared: SnapshotTable,
        rows: Sequence[tuple[Any, ...]],
        through: tuple[SqlValue, ...] | None,
    ) -> None:
        """Merge rows (hlc, node, inc, generation, seq, deleted, hash, values...) in one
        transaction; ``through``: they are live rows, up to that key (then sweep)."""
        if self.pacer is not None:
            self.pacer.wait_turn_blocking()
        table = info.name
        order = _order_sql(self.applier.resolver_for(table))
        assert order is not None
        sql = _MergeSql(info, declared, order)
        with self._transaction() as conn:
            conn.execute(f"DELETE FROM temp.{_INCOMING}")
            conn.executemany(sql.stage, rows)
            conn.execute(sql.decide, (table, TAMPERED))
            conn.execute("SAVEPOINT snapshot_rows")
            try:
                conn.execute(sql.upsert)
                conn.executemany(delete_sql(info), conn.execute(sql.deleted).fetchall())
            except sqlite3.Error as error:
                unless_row_error(conn, error)
                conn.execute("ROLLBACK TO snapshot_rows")
                self._write_winners_one_by_one(conn, info, sql)
            conn.execute("RELEASE snapshot_rows")
            conn.execute(sql.versions, (table,))
            highest, written = conn.execute(
                f"SELECT max(hlc), count(*) FROM temp.{_INCOMING} WHERE win"
            ).fetchone()
            self.written += written
            if highest:
                advance_clock(conn, highest)
            if through is not None:
                self._sweep_in_sql(conn, info, self._last_live.get(table), through)
                self._last_live[table] = through

    def _write_winners_one_by_one(
        self, conn: sqlite3.Connection, info: TableInfo, sql: _MergeSql
    ) -> None:
        """Some winner cannot be written here (one of its UNIQUE values is another row's
        here): write them one by one, keep ours where one fails, and record no version for
        it."""
        width = len(sql.columns)
        refused = []
        for record in conn.execute(sql.winners).fetchall():
            pk, deleted, values = record[0], record[1], record[2:]
            row = SnapshotRow(
                tuple(values[p] for p in sql.positions),
                None if deleted else dict(zip(sql.columns, values[:width], strict=True)),
                RowVersion(0, Origin("", 0), 0),
            )
            if not self._write_one(conn, info, pk, row):
                refused.append((pk,))
        conn.executemany(f"UPDATE temp.{_INCOMING} SET win = 0 WHERE pk = ?", refused)

    def _sweep_in_sql(
        self,
        conn: sqlite3.Connection,
        info: TableInfo,
        after: tuple[SqlValue, ...] | None,
        through: tuple[SqlValue, ...] | None,
    ) -> None:
        """`_sweep` in one query: the rows between two keys that the chunk in the temp table
        skipped, whose version the sender had seen."""
        keys, where, params = _key_range(info, after, through)
        key_expr = key_sql("t", info.primary_key)
        found = conn.execute(
            f"SELECT {keys}, m.pk FROM {quote_identifier(info.name)} AS t"
            # CROSS JOIN: the table's rows in the key range outside, each version looked up
            # by its key (the other way round scans the table once per version).
            f" CROSS JOIN _repl_rowmeta AS m ON m.tbl = ? AND m.pk = {key_expr}"
            " WHERE m.seq IS NOT NULL"
            f" AND m.seq <= coalesce((SELECT v.seq FROM temp.{_VECTOR} AS v"
            " WHERE v.node = m.node AND v.inc = m.inc), 0)"
            f" AND m.pk NOT IN (SELECT pk FROM temp.{_INCOMING} WHERE NOT deleted)"
            f" AND m.pk NOT IN (SELECT pk FROM temp.{_PROTECTED} WHERE tbl = ?)"
            + "".join(f" AND {condition}" for condition in where),
            [info.name, info.name, *params],
        ).fetchall()
        if not found:
            return
        width = len(info.primary_key)
        conn.executemany(delete_sql(info), [record[:width] for record in found])
        conn.executemany(
            "DELETE FROM _repl_rowmeta WHERE tbl = ? AND pk = ?",
            [(info.name, record[width]) for record in found],
        )
        self.removed += len(found)

    def _sweep_rest_in_sql(self, info: TableInfo, after: tuple[SqlValue, ...] | None) -> None:
        """Sweep past the last live row, in transactions of `CHUNK_ROWS` rows looked at."""
        keys = ", ".join(quote_identifier(c) for c in info.primary_key)
        marks = ", ".join("?" for _ in info.primary_key)
        conn = self.applier.store.conn
        while True:
            params = [] if after is None else list(after)
            boundary = conn.execute(
                f"SELECT {keys} FROM {quote_identifier(info.name)}"
                + ("" if after is None else f" WHERE ({keys}) > ({marks})")
                + f" ORDER BY {keys} LIMIT 1 OFFSET {CHUNK_ROWS - 1}",
                params,
            ).fetchone()
            with self._transaction() as conn:
                conn.execute(f"DELETE FROM temp.{_INCOMING}")
                self._sweep_in_sql(conn, info, after, None if boundary is None else boundary)
            if boundary is None:
                return
            after = tuple(boundary)

    def _prepare_sql(self) -> None:
        """The temp tables the merge in SQL uses (of this connection alone, gone with it)."""
        conn = self.applier.store.conn
        conn.execute(f"DROP TABLE IF EXISTS temp.{_PROTECTED}")
        conn.execute(f"CREATE TEMP TABLE {_PROTECTED} (tbl TEXT, pk TEXT, PRIMARY KEY (tbl, pk))")
        conn.execute(f"DROP TABLE IF EXISTS temp.{_VECTOR}")
        conn.execute(
            f"CREATE TEMP TABLE {_VECTOR} (node TEXT, inc INTEGER, seq INTEGER,"
            " PRIMARY KEY (node, inc))"
        )
        conn.executemany(
            f"INSERT INTO temp.{_VECTOR} (node, inc, seq) VALUES (?, ?, ?)",
            [(origin.node_id, origin.incarnation, seq) for origin, seq in self.vector.items()],
        )
        self._incoming_for(None)

    def _incoming_for(self, table: str | None) -> None:
        """The temp table a chunk of ``table`` is staged in, one value column per column."""
        conn = self.applier.store.conn
        width = 0 if table is None else len(self.declared[table].columns)
        values = "".join(f", v{n}" for n in range(width))
        conn.execute(f"DROP TABLE IF EXISTS temp.{_INCOMING}")
        conn.execute(
            f"CREATE TEMP TABLE {_INCOMING} (pk TEXT, hlc INTEGER, node TEXT, inc INTEGER,"
            f" gen INTEGER, seq INTEGER, deleted INTEGER, hash BLOB, win INTEGER{values})"
        )

    def _drop_sql(self) -> None:
        conn = self.applier.store.conn
        for name in (_INCOMING, _PROTECTED, _VECTOR):
            conn.execute(f"DROP TABLE IF EXISTS temp.{name}")

    # -- the end ---------------------------------------------------------------------------

    def finish(self, end: SnapshotEnd, *, verify: bool = True) -> dict[Origin, int]:
        """Check what arrived, sweep the rest, and move the version vector to the snapshot's.
        Returns the vector this node holds now."""
        try:
            self._verify(end, verify)
        except SnapshotError:
            self.discard()
            raise
        self._prepare_sql()
        try:
            self._merge_staged()
            for name in sorted(self.expected):
                self._end_live_rows(name)
        finally:
            self._drop_sql()
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


def _key_range(
    info: TableInfo, after: tuple[SqlValue, ...] | None, through: tuple[SqlValue, ...] | None
) -> tuple[str, list[str], list[SqlValue]]:
    """The table's key columns (of ``t``), and the conditions and parameters selecting keys
    after ``after`` and up to ``through`` (either may be open)."""
    keys = ", ".join(f"t.{quote_identifier(c)}" for c in info.primary_key)
    marks = ", ".join("?" for _ in info.primary_key)
    where: list[str] = []
    params: list[SqlValue] = []
    if after is not None:
        where.append(f"({keys}) > ({marks})")
        params += list(after)
    if through is not None:
        where.append(f"({keys}) <= ({marks})")
        params += list(through)
    return keys, where, params


def discard_staged(store: Store, snapshot_id: int | None = None) -> None:
    """Delete the staged chunks of one snapshot (all of them: ``None``, as at start, when
    whatever a crash left staged belongs to snapshots that will never finish)."""
    with write_transaction(store) as conn:
        if snapshot_id is None:
            conn.execute("DELETE FROM _repl_snapshot_stage")
        else:
            conn.execute("DELETE FROM _repl_snapshot_stage WHERE snapshot = ?", (snapshot_id,))


def _malformed_columns(declared: SnapshotTable, chunk: SnapshotColumns) -> str | None:
    """Why a chunk cannot hold rows of the table its snapshot declared (None: it can)."""
    if len(chunk.columns) != len(declared.columns) and (chunk.columns or len(chunk.live)):
        return f"{len(chunk.columns)} columns, the table has {len(declared.columns)}"
    if len(chunk.keys) != len(declared.primary_key) and (chunk.keys or len(chunk.keyed)):
        return f"keys of {len(chunk.keys)} values, the table's key has {len(declared.primary_key)}"
    return None


def _order_sql(resolver: Resolver) -> tuple[str, ...] | None:
    """A strategy's order key as SQL expressions over a version's columns (``{hlc}``,
    ``{node}``, ``{inc}``, ``{gen}``), compared as a row value; None: SQL cannot rank it."""
    if type(resolver) in (TimestampResolver, ManualResolver):
        return ("{hlc}", "{node}", "{inc}")
    if type(resolver) is PriorityResolver:
        assert isinstance(resolver, PriorityResolver)
        cases = " ".join(
            f"WHEN {quote_literal(node)} THEN {int(priority)}"
            for node, priority in sorted(resolver.priorities.items())
        )
        priority = f"CASE {{node}} {cases} ELSE 0 END" if cases else "0"
        return ("{gen}", priority, "{hlc}", "{node}", "{inc}")
    return None


class _MergeSql:
    """The statements that merge one table's chunk from the temp table."""

    def __init__(self, info: TableInfo, declared: SnapshotTable, order: tuple[str, ...]) -> None:
        self.columns = declared.columns
        self.positions = [declared.columns.index(c) for c in declared.primary_key]
        width = len(self.columns)
        values = [f"v{n}" for n in range(width)]
        key_marks = [f"?{8 + p}" for p in self.positions]
        marks = ", ".join(f"?{n}" for n in range(1, 8 + width))
        self.stage = (
            f"INSERT INTO temp.{_INCOMING} (hlc, node, inc, gen, seq, deleted, hash,"
            f" {', '.join(values)}, pk) VALUES ({marks}, {_key_of_params(key_marks)})"
        )

        def key(prefix: str, names: dict[str, str]) -> str:
            return "(" + ", ".join(part.format(**{k: f"{prefix}.{v}" for k, v in names.items()})
                                   for part in order) + ")"  # fmt: skip

        theirs = key(_INCOMING, {"hlc": "hlc", "node": "node", "inc": "inc", "gen": "gen"})
        ours = key("m", {"hlc": "hlc", "node": "node", "inc": "inc", "gen": "generation"})
        self.decide = (
            f"UPDATE temp.{_INCOMING} SET win = NOT EXISTS (SELECT 1 FROM _repl_rowmeta AS m"
            f" WHERE m.tbl = ?1 AND m.pk = {_INCOMING}.pk AND NOT ({theirs} > {ours}"
            f" OR ({theirs} = {ours} AND m.hash IS ?2)))"
        )
        names = ", ".join(quote_identifier(c) for c in self.columns)
        keys = ", ".join(quote_identifier(c) for c in info.primary_key)
        others = [c for c in self.columns if c not in info.primary_key]
        action = (
            "DO UPDATE SET " + ", ".join(f"{quote_identifier(c)} = excluded.{quote_identifier(c)}"
                                         for c in others)
            if others else "DO NOTHING"
        )  # fmt: skip
        self.upsert = (
            f"INSERT INTO {quote_identifier(info.name)} ({names})"
            f" SELECT {', '.join(values)} FROM temp.{_INCOMING} WHERE win AND NOT deleted"
            f" ON CONFLICT ({keys}) {action}"
        )
        key_values = ", ".join(values[p] for p in self.positions)
        self.deleted = f"SELECT {key_values} FROM temp.{_INCOMING} WHERE win AND deleted"
        self.winners = f"SELECT pk, deleted, {', '.join(values)} FROM temp.{_INCOMING} WHERE win"
        self.versions = (
            "INSERT INTO _repl_rowmeta (tbl, pk, hlc, node, inc, generation, deleted, prev_hlc,"
            " prev_node, prev_inc, prev_gen, hash, seq)"
            " SELECT ?, pk, hlc, node, inc, gen, deleted, NULL, NULL, NULL, NULL,"
            f" CASE WHEN deleted THEN NULL ELSE hash END, nullif(seq, 0)"
            f" FROM temp.{_INCOMING} WHERE win"
            " ON CONFLICT (tbl, pk) DO UPDATE SET hlc = excluded.hlc, node = excluded.node,"
            " inc = excluded.inc, generation = excluded.generation, deleted = excluded.deleted,"
            " prev_hlc = NULL, prev_node = NULL, prev_inc = NULL, prev_gen = NULL,"
            " hash = excluded.hash, seq = excluded.seq"
        )


def _key_of_params(marks: Sequence[str]) -> str:
    """`key_sql` over numbered parameters instead of columns."""
    return " || ',' || ".join(
        f"CASE WHEN typeof({m}) = 'text' AND instr(CAST({m} AS BLOB), x'00')"
        f" THEN 'T' || hex({m}) ELSE quote({m}) END"
        for m in marks
    )


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


def _version_params(
    table: str, key: str, row: SnapshotRow, digest: bytes | None
) -> tuple[Any, ...]:
    version = row.version
    return (
        table,
        key,
        version.hlc,
        version.origin.node_id,
        version.origin.incarnation,
        version.generation,
        int(row.values is None),
        None if row.values is None else digest,
        row.seq or None,
    )
