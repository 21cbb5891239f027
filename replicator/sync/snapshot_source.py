"""The sending side of a snapshot: a consistent copy of the state file (``VACUUM INTO``, or a
read transaction on the live file for a repair of a few buckets) read out table by table in
primary-key order, in chunks bounded by rows and bytes."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator, Mapping

from protocol import (
    WITHHELD,
    Origin,
    RowVersion,
    SnapshotBegin,
    SnapshotChunk,
    SnapshotEnd,
    SnapshotRow,
    SnapshotTable,
)
from replicator.capture.bookkeeping import applied_progress, log_end, own_position
from replicator.capture.rows import parse_key, quote_identifier
from replicator.capture.sealing import seal_pending
from replicator.capture.store import StoreSettings, connect
from replicator.capture.tables import TableInfo
from replicator.capture.transactions import write_transaction
from replicator.log import get_logger
from replicator.sync.divergence import (
    TAMPERED,
    Checksums,
    compute,
    fold,
    key_bucket,
    row_hash,
    versioned_rows,
)
from replicator.sync.filters import RowFilter
from replicator.sync.snapshot import (
    CHUNK_BYTES,
    CHUNK_ROWS,
    bucket_bitmap,
    checksum_bytes,
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
    ):
        """``repair``: per table, the asker's bucket checksums; only the rows of buckets that
        differ from this node's are sent (a repair), and only of those tables."""
        self.settings = settings
        self.tables = dict(tables) if not repair else {t: tables[t] for t in repair if t in tables}
        self.ident = ident
        self.repair = dict(repair or {})
        self.view = view  # filters and transformations: peers get only what they share
        self.known = known  # this node's last checksum pass: reused if still at this vector
        self.ranges: dict[str, set[int]] = {}
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
        if self.repair:
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
                name: mine[name].differing(theirs) for name, theirs in self.repair.items()
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
        return SnapshotBegin(self.ident, dict(self.vector), tuple(described), ranges)

    def chunks(self) -> Iterator[SnapshotChunk]:
        """Every table's live rows then its tombstones, in chunks of rows and bytes."""
        for name in sorted(self.tables):
            index = 0
            batch: list[SnapshotRow] = []
            size = 0
            for row in self._rows_of(name):
                batch.append(row)
                size += _row_size(row)
                if len(batch) >= CHUNK_ROWS or size >= CHUNK_BYTES:
                    yield SnapshotChunk(self.ident, name, index, tuple(batch))
                    index, batch, size = index + 1, [], 0
            if batch:
                yield SnapshotChunk(self.ident, name, index, tuple(batch))

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

    def _rows_of(self, name: str) -> Iterator[SnapshotRow]:
        assert self._conn is not None
        assert self.origin is not None
        wanted = self.ranges.get(name)
        checksum = self._checksums.get(name, 0)
        for key, row in self._withheld(name):
            if wanted is None or key_bucket(name, key) in wanted:
                checksum = fold(checksum, row_hash(name, key, row))
                self._rows += 1
                yield row
        for stored_key, stored, recorded in versioned_rows(
            self._conn, self.tables[name], self.origin
        ):
            key, row = stored_key, stored
            if recorded == TAMPERED:
                continue  # named up front by _withheld
            if self.view is not None:
                shared, key = self.view.shared_row(name, stored, key, self._conn)
                if shared is None:
                    continue
                row = shared
            if wanted is not None and key_bucket(name, key) not in wanted:
                continue
            checksum = fold(checksum, row_hash(name, key, row))
            self._rows += 1
            yield row
        cursor = self._conn.execute(
            "SELECT pk, hlc, node, inc, generation, seq FROM _repl_rowmeta"
            " WHERE tbl = ? AND deleted ORDER BY pk",
            (name,),
        )
        while fetched := cursor.fetchmany(CHUNK_ROWS):
            for key, stamp, node, inc, generation, seq in fetched:
                if wanted is not None and key_bucket(name, key) not in wanted:
                    continue
                version = RowVersion(stamp, Origin(node, inc), generation)
                row = SnapshotRow(parse_key(key), None, version, seq or 0)
                checksum = fold(checksum, row_hash(name, key, row))
                self._rows += 1
                yield row
        self._checksums[name] = checksum

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


def _row_size(row: SnapshotRow) -> int:
    values = row.values or {}
    return 48 + sum(len(v) if isinstance(v, str | bytes) else 8 for v in values.values())
