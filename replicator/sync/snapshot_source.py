"""The sending side of a snapshot: a consistent copy of the state file (``VACUUM INTO``, or a
read transaction on the live file for a repair of a few buckets) read out table by table in
primary-key order, in chunks bounded by rows and bytes."""

from __future__ import annotations

import bisect
import contextlib
import os
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from itertools import accumulate
from typing import Any

from protocol import (
    WITHHELD,
    ColumnVersions,
    Origin,
    RowVersion,
    SnapshotBegin,
    SnapshotColumns,
    SnapshotEnd,
    SnapshotRow,
    SnapshotTable,
)
from replicator.capture.bookkeeping import applied_progress, log_end, own_position
from replicator.capture.rows import key_sql, parse_key, quote_identifier
from replicator.capture.sealing import seal_pending
from replicator.capture.store import StoreSettings, connect
from replicator.capture.tables import TableInfo
from replicator.capture.transactions import write_transaction
from replicator.log import get_logger
from replicator.sync.divergence import (
    TAMPERED,
    Checksums,
    compute,
    content_hash,
    fold,
    key_bucket,
    versioned_rows,
    versioned_rows_at,
)
from replicator.sync.filters import RowFilter
from replicator.sync.snapshot import (
    CHUNK_BYTES,
    CHUNK_ROWS,
    bucket_bitmap,
    checksum_bytes,
    chunk_digest,
    chunk_payload,
    columns_chunk,
    declared_bytes,
    nonzero,
)

__all__ = ["SnapshotSource"]

_log = get_logger("snapshot")


class SnapshotSource:
    """A consistent copy of the state file, read out in chunks (use from one thread at a time).

    ``open`` makes the copy; ``begin``, then `chunks`, then ``end`` give the messages; ``close``
    removes the copy. Memory stays at one chunk whatever the table sizes.
    """

    def __init__(
        self,
        settings: StoreSettings,
        tables: Mapping[str, TableInfo],
        ident: int,
        repair: Mapping[str, bytes] | None = None,
        view: RowFilter | None = None,
        known: Checksums | None = None,
        keys: Mapping[str, tuple[str, ...]] | None = None,
    ):
        """``repair``: per table, the asker's bucket checksums; only the rows of buckets that
        differ from this node's are sent (a repair), and only of those tables. ``keys``: per
        repaired table, the rows the asker named: exactly those are sent (no buckets)."""
        self.settings = settings
        self.tables = dict(tables) if not repair else {t: tables[t] for t in repair if t in tables}
        self.ident = ident
        self.repair = dict(repair or {})
        self.view = view  # filters and transformations: peers get only what they share
        self.known = known  # this node's last checksum pass: reused if still at this vector
        self.ranges: dict[str, set[int]] = {}
        self.named = {t: frozenset(k) for t, k in (keys or {}).items() if t in self.tables}
        self.path = f"{settings.path}.snapshot-{ident}"
        self._conn: sqlite3.Connection | None = None
        self._live = False
        self._checksums: dict[str, int] = {}
        self._rows = 0
        self.vector: dict[Origin, int] = {}
        self.log_position = 0
        self.origin: Origin | None = None

    def open(self) -> SnapshotBegin:
        if self.repair:
            # A repair reads few rows: one read transaction on the live file is a consistent
            # view without copying the whole file.
            conn = self._conn = connect(self.settings)
            conn.execute("BEGIN")
            self._live = True
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            live = connect(self.settings)
            try:
                live.execute("VACUUM INTO ?", (self.path,))
            finally:
                live.close()
            conn = self._conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False
            )
            # Changes the node had not stamped yet get the stamps it will give them.
            with write_transaction(conn):
                seal_pending(conn)
        progress = applied_progress(conn)
        own = own_position(conn)
        assert own is not None, "a node's file has its clock row"
        self.origin, local_seq = own
        if local_seq:
            progress[self.origin] = local_seq
        self.vector = progress
        self.log_position = log_end(conn)
        bucketed = {name: theirs for name, theirs in self.repair.items() if name not in self.named}
        if bucketed:
            known = self.known
            if (
                known is not None
                and nonzero(known.vector) == nonzero(self.vector)
                and all(name in known.tables for name in self.tables)
            ):
                mine = known.tables  # nothing changed since the last pass: no full scan
            else:
                mine = compute(conn, self.tables, self.vector, self.origin, self.view).tables
            self.ranges = {
                name: mine[name].differing(theirs) for name, theirs in bucketed.items()
                if name in mine
            }  # fmt: skip
        (pages,) = conn.execute("PRAGMA page_count").fetchone()
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
        described = []
        for name, info in sorted(self.tables.items()):
            (live_rows,) = conn.execute(f"SELECT count(*) FROM {quote_identifier(name)}").fetchone()
            (tombstones,) = conn.execute(
                "SELECT count(*) FROM _repl_rowmeta WHERE tbl = ? AND deleted", (name,)
            ).fetchone()
            rows = live_rows + tombstones
            bound = declared_bytes(info, rows, pages * page_size)
            described.append(SnapshotTable(name, info.columns, info.primary_key, rows, bound))
        ranges = {name: bucket_bitmap(buckets) for name, buckets in self.ranges.items()}
        named = {name: tuple(sorted(keys)) for name, keys in self.named.items()}
        return SnapshotBegin(self.ident, dict(self.vector), tuple(described), ranges, named)

    def chunks(self) -> Iterator[SnapshotColumns]:
        """Every table's withheld rows, live rows, then tombstones, in chunks of rows and
        bytes. A whole table with no filter is read and packed in columns, with no work per
        row in Python; filters and repairs look at each row."""
        for name in sorted(self.tables):
            if self.view is None and not self.repair:
                parts = self._columns_of(name)
            else:
                parts = self._row_chunks(name)
            checksum = self._checksums.get(name, 0)
            for index, chunk in enumerate(parts):
                checksum = fold(checksum, chunk_digest(index, chunk_payload(chunk)))
                self._rows += chunk.row_count
                yield chunk
            self._checksums[name] = checksum

    def _row_chunks(self, name: str) -> Iterator[SnapshotColumns]:
        info = self.tables[name]
        batch: list[tuple[SnapshotRow, bytes | None]] = []
        size = 0
        index = 0
        for row in self._rows_of(name):
            batch.append((row, None if row.values is None else content_hash(row.values)))
            size += _row_size(row)
            if len(batch) >= CHUNK_ROWS or size >= CHUNK_BYTES:
                yield columns_chunk(self.ident, name, index, info.columns, info.primary_key,
                                    batch)  # fmt: skip
                index, batch, size = index + 1, [], 0
        if batch:
            yield columns_chunk(self.ident, name, index, info.columns, info.primary_key, batch)

    def _columns_of(self, name: str) -> Iterator[SnapshotColumns]:
        """The chunks of a whole table, read in SQL with their versions joined and turned
        into columns by the batch."""
        assert self._conn is not None
        assert self.origin is not None
        conn, info, own = self._conn, self.tables[name], self.origin
        columns, primary_key = info.columns, info.primary_key
        width = len(columns)
        origins: dict[tuple[str, int], int] = {}
        index = 0

        def chunk(
            values: Sequence[Sequence[Any]],
            versions: Sequence[Sequence[Any]],
            hashes: Sequence[bytes | None],
            keys: Sequence[Sequence[Any]],
            keyed: Sequence[Sequence[Any]],
        ) -> SnapshotColumns:
            nonlocal index
            named = {i: o for o, i in origins.items()}
            made = SnapshotColumns(
                self.ident,
                name,
                index,
                tuple(Origin(*named[i]) for i in range(len(named))),
                tuple(tuple(column) for column in values),
                ColumnVersions(*(tuple(column) for column in versions)),
                tuple(hashes),
                tuple(tuple(column) for column in keys),
                ColumnVersions(*(tuple(column) for column in keyed)),
            )
            index += 1
            return made

        def split(
            rows: list[tuple[Any, ...]],
        ) -> tuple[list[tuple[Any, ...]], list[int], list[tuple[str, int]]]:
            cells = list(zip(*rows, strict=True))
            found = list(zip(cells[width + 1], cells[width + 2], strict=True))
            return cells, [origins.setdefault(o, len(origins)) for o in found], found

        no_values: list[list[Any]] = [[] for _ in columns]
        no_versions: list[list[Any]] = [[], [], [], []]
        no_keys: list[list[Any]] = [[] for _ in primary_key]
        # Rows edited behind replication's back here: named by key, never offered.
        withheld = conn.execute(
            "SELECT pk, hlc, node, inc, generation FROM _repl_rowmeta"
            " WHERE tbl = ? AND NOT deleted AND hash = ? ORDER BY pk",
            (name, TAMPERED),
        ).fetchall()
        for start in range(0, len(withheld), CHUNK_ROWS):
            part = withheld[start : start + CHUNK_ROWS]
            keys = list(zip(*(parse_key(row[0]) for row in part), strict=True))
            indexes = [origins.setdefault((row[2], row[3]), len(origins)) for row in part]
            versions: list[Sequence[Any]] = [
                [row[1] for row in part],
                indexes,
                [row[4] for row in part],
                [WITHHELD] * len(part),
            ]
            yield chunk(no_values, no_versions, [], keys, versions)
        # Live rows, versions joined in SQL (a row with none: hlc 0 under this node).
        key = key_sql("t", primary_key)
        names = ", ".join(f"t.{quote_identifier(c)}" for c in columns)
        order = ", ".join(f"t.{quote_identifier(c)}" for c in primary_key)
        size = " + ".join(f"coalesce(length(t.{quote_identifier(c)}), 0)" for c in columns)
        cursor = conn.execute(
            f"SELECT {names}, coalesce(m.hlc, 0), coalesce(m.node, ?), coalesce(m.inc, ?),"
            f" coalesce(m.generation, 0), coalesce(m.seq, 0), m.hash, {size}"
            f" FROM {quote_identifier(name)} AS t LEFT JOIN _repl_rowmeta AS m"
            f" ON m.tbl = ? AND m.pk = {key}"
            f" WHERE m.hash IS NOT ? ORDER BY {order}",
            (own.node_id, own.incarnation, name, TAMPERED),
        )
        while fetched := cursor.fetchmany(CHUNK_ROWS):
            for rows in _by_bytes(fetched, width + 6):
                cells, indexes, _ = split(rows)
                hashes = list(cells[width + 5])
                for n, digest in enumerate(hashes):
                    if digest is None:  # not recorded yet: the content as it is
                        hashes[n] = content_hash(dict(zip(columns, rows[n], strict=False)))
                versions = [
                    cells[width],
                    indexes,
                    cells[width + 3],
                    cells[width + 4],
                ]
                yield chunk(cells[:width], versions, hashes, no_keys, no_versions)
        # Tombstones.
        cursor = conn.execute(
            "SELECT pk, hlc, node, inc, generation, coalesce(seq, 0) FROM _repl_rowmeta"
            " WHERE tbl = ? AND deleted ORDER BY pk",
            (name,),
        )
        while part := cursor.fetchmany(CHUNK_ROWS):
            keys = list(zip(*(parse_key(row[0]) for row in part), strict=True))
            indexes = [origins.setdefault((row[2], row[3]), len(origins)) for row in part]
            versions = [[row[1] for row in part], indexes, [row[4] for row in part],
                        [row[5] for row in part]]  # fmt: skip
            yield chunk(no_values, no_versions, [], keys, versions)

    def _withheld(self, name: str) -> Iterator[tuple[str, SnapshotRow]]:
        """Rows found edited (or deleted) behind replication's back here: known to be wrong,
        so never offered as the truth, but named first, so that the receiver does not take
        their absence for a delete."""
        assert self._conn is not None
        for key, stamp, node, inc, generation in self._conn.execute(
            "SELECT pk, hlc, node, inc, generation FROM _repl_rowmeta"
            " WHERE tbl = ? AND NOT deleted AND hash = ? ORDER BY pk",
            (name, TAMPERED),
        ).fetchall():
            version = RowVersion(stamp, Origin(node, inc), generation)
            yield key, SnapshotRow(parse_key(key), None, version, WITHHELD)

    def _wants(self, name: str, key: str) -> bool:
        """Whether a repair carries this row (a whole snapshot carries every row)."""
        named = self.named.get(name)
        if named is not None:
            return key in named
        wanted = self.ranges.get(name)
        return wanted is None or key_bucket(name, key) in wanted

    def _rows_of(self, name: str) -> Iterator[SnapshotRow]:
        assert self._conn is not None
        assert self.origin is not None
        for key, row in self._withheld(name):
            if self._wants(name, key):
                yield row
        named = self.named.get(name)
        if named is not None and self.view is None:
            # A few named rows: read just those (a view may rename keys: then scan).
            rows = versioned_rows_at(self._conn, self.tables[name], self.origin, sorted(named))
        else:
            rows = versioned_rows(self._conn, self.tables[name], self.origin)
        for stored_key, stored, recorded in rows:
            key, row = stored_key, stored
            if recorded == TAMPERED:
                continue  # named up front by _withheld
            if self.view is not None:
                shared, key = self.view.shared_row(name, stored, key, self._conn)
                if shared is None:
                    continue
                row = shared
            if not self._wants(name, key):
                continue
            yield row
        cursor = self._conn.execute(
            "SELECT pk, hlc, node, inc, generation, seq FROM _repl_rowmeta"
            " WHERE tbl = ? AND deleted ORDER BY pk",
            (name,),
        )
        while fetched := cursor.fetchmany(CHUNK_ROWS):
            for key, stamp, node, inc, generation, seq in fetched:
                if not self._wants(name, key):
                    continue
                version = RowVersion(stamp, Origin(node, inc), generation)
                yield SnapshotRow(parse_key(key), None, version, seq or 0)

    def end(self) -> SnapshotEnd:
        checksums = {name: checksum_bytes(self._checksums.get(name, 0)) for name in self.tables}
        return SnapshotEnd(self.ident, checksums, self._rows)

    def close(self) -> None:
        if self._conn is not None:
            if self._live:
                self._conn.execute("COMMIT")
            self._conn.close()
            self._conn = None
        if not self._live:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def _by_bytes(rows: list[tuple[Any, ...]], size_at: int) -> Iterator[list[tuple[Any, ...]]]:
    """``rows`` cut where their sizes (column ``size_at``, plus a per-row allowance) reach
    `CHUNK_BYTES`."""
    sizes = list(accumulate(row[size_at] + 48 for row in rows))
    start = 0
    while start < len(rows):
        base = sizes[start - 1] if start else 0
        end = max(start + 1, bisect.bisect_left(sizes, base + CHUNK_BYTES, lo=start) + 1)
        yield rows[start:end]
        start = end


def _row_size(row: SnapshotRow) -> int:
    values = row.values or {}
    return 48 + sum(len(v) if isinstance(v, str | bytes) else 8 for v in values.values())
