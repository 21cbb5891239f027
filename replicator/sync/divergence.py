"""Divergence: table checksums to compare with peers, and rows edited behind replication's back.

A table's checksum is the sum (mod 2**128) of a hash per versioned row (key, values, version),
so it does not depend on row order and two nodes holding the same rows at the same versions
agree. It is also kept per key bucket (a byte of a hash of the key), so two nodes that
disagree find the few buckets that differ and exchange only their rows (see `snapshot`).

Each row version also records the hash of the content it wrote (`_repl_rowmeta.hash`, filled
from the log entry that wrote it). A row whose content no longer matches was edited with the
capture triggers bypassed (dropped by hand, a direct file edit); a versioned row that is gone
was deleted that way. Both are marked ``TAMPERED`` and mended from a peer, whose copy of that
version wins over ours even though the versions are equal.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack

from protocol import BUCKETS, Origin, RowVersion, SnapshotRow
from protocol.checks import SqlValue
from replicator.capture.bookkeeping import log_end, logged_writes
from replicator.capture.rows import decode_row, key_sql, parse_key, quote_identifier
from replicator.capture.sealing import pending_keys
from replicator.capture.tables import TableInfo
from replicator.capture.transactions import write_transaction
from replicator.state import expiry

if TYPE_CHECKING:
    from replicator.sync.filters import RowFilter

__all__ = [
    "TAMPERED",
    "Checksums",
    "TableCheck",
    "bucket_bytes_to_sums",
    "compute",
    "content_hash",
    "fill_hashes",
    "fold",
    "key_bucket",
    "mark_tampered",
    "row_hash",
]

TAMPERED = b"tampered"
"""`_repl_rowmeta.hash` of a row found edited behind replication's back."""
_MODULUS = 1 << 128
_CHUNK = 1000


def content_hash(values: Mapping[str, SqlValue]) -> bytes:
    """What a version wrote. NULL columns are left out, so a column added since (NULL in
    old rows) does not make old rows look edited."""
    packed = msgpack.packb(
        sorted((k, v) for k, v in values.items() if v is not None), use_bin_type=True
    )
    return hashlib.blake2b(packed, digest_size=16).digest()


def row_hash(table: str, key: str, row: SnapshotRow) -> int:
    """A row's contribution to its table's checksum: order-independent when summed."""
    version = row.version
    values = None if row.values is None else sorted(row.values.items())
    origin = version.origin
    fields = [table, key, values, version.hlc, origin.node_id, origin.incarnation]
    packed = msgpack.packb([*fields, version.generation], use_bin_type=True)
    return int.from_bytes(hashlib.blake2b(packed, digest_size=16).digest(), "big")


def fold(checksum: int, contribution: int) -> int:
    return (checksum + contribution) % _MODULUS


def key_bucket(table: str, key: str) -> int:
    return hashlib.blake2b(f"{table}\x00{key}".encode(), digest_size=1).digest()[0]


def bucket_bytes_to_sums(data: bytes) -> list[int]:
    return [int.from_bytes(data[i * 16 : i * 16 + 16], "big") for i in range(BUCKETS)]


@dataclass(slots=True)
class TableCheck:
    checksum: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * BUCKETS)
    rows: int = 0
    unversioned: int = 0  # rows with no recorded version: written with capture bypassed
    tampered: list[str] = field(default_factory=list)  # found edited just now
    missing: list[str] = field(default_factory=list)  # found deleted just now
    marked: list[str] = field(default_factory=list)  # found earlier, not mended yet

    def add(self, table: str, key: str, row: SnapshotRow) -> None:
        contribution = row_hash(table, key, row)
        self.checksum = fold(self.checksum, contribution)
        bucket = key_bucket(table, key)
        self.buckets[bucket] = fold(self.buckets[bucket], contribution)
        self.rows += 1

    def bucket_bytes(self) -> bytes:
        return b"".join(total.to_bytes(16, "big") for total in self.buckets)

    def differing(self, other_buckets: bytes) -> set[int]:
        theirs = bucket_bytes_to_sums(other_buckets)
        return {n for n in range(BUCKETS) if self.buckets[n] != theirs[n]}


@dataclass(slots=True)
class Checksums:
    vector: dict[Origin, int]
    tables: dict[str, TableCheck]
    computed_at: float = field(default_factory=time.time)
    seconds: float = 0.0
    pending: int = 0
    """Rows whose last change waited for its stamps: their content is newer than ``vector``,
    so these checksums are not those of the vector (not to be compared with a peer's)."""

    def table_checksums(self) -> dict[str, bytes]:
        return {name: check.checksum.to_bytes(16, "big") for name, check in self.tables.items()}


def versioned_rows(
    conn: sqlite3.Connection, info: TableInfo, fallback: Origin
) -> Iterator[tuple[str, SnapshotRow, bytes | None]]:
    """Every row of a table in key order with its key, version and recorded content hash
    (version ``hlc`` 0 under ``fallback`` when none is recorded)."""
    columns = info.columns
    names = ", ".join(f"t.{quote_identifier(c)}" for c in columns)
    order = ", ".join(f"t.{quote_identifier(c)}" for c in info.primary_key)
    key_positions = [columns.index(c) for c in info.primary_key]
    cursor = conn.execute(
        f"SELECT {names}, {key_sql('t', info.primary_key)},"
        " m.hlc, m.node, m.inc, m.generation, m.seq, m.hash"
        f" FROM {quote_identifier(info.name)} AS t LEFT JOIN _repl_rowmeta AS m"
        f" ON m.tbl = ? AND m.pk = {key_sql('t', info.primary_key)}"
        f" ORDER BY {order}",
        (info.name,),
    )
    width = len(columns)
    unknown = RowVersion(0, fallback, 0)
    while fetched := cursor.fetchmany(_CHUNK):
        for record in fetched:
            yield record[width], *_versioned_row(record, columns, key_positions, unknown)


def versioned_rows_at(
    conn: sqlite3.Connection, info: TableInfo, fallback: Origin, keys: Iterable[str]
) -> Iterator[tuple[str, SnapshotRow, bytes | None]]:
    """As `versioned_rows`, for the rows under these stored keys only (those present), each
    found by its primary key: a repair of a few rows reads only them."""
    columns = info.columns
    names = ", ".join(f"t.{quote_identifier(c)}" for c in columns)
    select = (
        f"SELECT {names}, m.hlc, m.node, m.inc, m.generation, m.seq, m.hash"
        f" FROM {quote_identifier(info.name)} AS t LEFT JOIN _repl_rowmeta AS m"
        " ON m.tbl = ? AND m.pk = ? WHERE "
    )
    by_key = select + " AND ".join(f"t.{quote_identifier(c)} IS ?" for c in info.primary_key)
    # A real's printed form may not be its exact double: such keys are matched as printed.
    by_printed = select + f"{key_sql('t', info.primary_key)} = ?"
    key_positions = [columns.index(c) for c in info.primary_key]
    unknown = RowVersion(0, fallback, 0)
    for key in keys:
        try:
            pk = parse_key(key)
        except (ValueError, IndexError):
            continue  # not a key at all (the asker's mistake): nothing here answers it
        if len(pk) != len(info.primary_key):
            continue  # not a key of this table
        if any(type(value) is float for value in pk):
            record = conn.execute(by_printed, (info.name, key, key)).fetchone()
        else:
            record = conn.execute(by_key, (info.name, key, *pk)).fetchone()
        if record is not None:
            yield key, *_versioned_row(record, columns, key_positions, unknown)


def _versioned_row(
    record: Sequence[Any],
    columns: Sequence[str],
    key_positions: Sequence[int],
    unknown: RowVersion,
) -> tuple[SnapshotRow, bytes | None]:
    """A row read with its `_repl_rowmeta` columns last (hlc, node, inc, generation, seq,
    hash): the row with its version, and the content hash recorded for it."""
    values = dict(zip(columns, record[: len(columns)], strict=True))
    stamp, node, inc, generation, seq, recorded = record[-6:]
    version = unknown if stamp is None else RowVersion(stamp, Origin(node, inc), generation)
    pk = tuple(record[i] for i in key_positions)
    return SnapshotRow(pk, values, version, seq or 0), recorded


def compute(
    conn: sqlite3.Connection,
    tables: Mapping[str, TableInfo],
    vector: dict[Origin, int],
    origin: Origin,
    view: RowFilter | None = None,
) -> Checksums:
    """Checksums of every table, and the rows found edited or deleted with capture bypassed.

    Call inside one read transaction, with ``vector`` read in it, so the checksums are those
    of that vector. With ``view`` (filters or transformations on), the checksums are of the
    rows as peers see them: only what links carry is compared.
    """
    started = time.monotonic()
    found: dict[str, TableCheck] = {}
    pending = pending_keys(conn)  # newer than their versions, but not edited behind our back
    for name, info in sorted(tables.items()):
        check = found[name] = TableCheck()
        versioned = 0
        # Expired state-store keys some node may have purged: replicated data says which.
        expired_before = expiry.checksum_cutoff(conn, info)
        for stored_key, stored, recorded in versioned_rows(conn, info, origin):
            key, row = stored_key, stored
            if row.version.hlc == 0:
                check.unversioned += 1
                continue
            versioned += 1
            assert row.values is not None
            if (name, key) in pending:
                pass
            elif recorded == TAMPERED:
                check.marked.append(key)
            elif recorded is not None and recorded != content_hash(row.values):
                check.tampered.append(key)
            if expired_before is not None and expiry.left_out(row.values, expired_before):
                continue
            if view is not None:
                shared, key = view.shared_row(name, stored, key, conn)
                if shared is None:
                    continue
                row = shared
            check.add(name, key, row)
        (live,) = conn.execute(
            "SELECT count(*) FROM _repl_rowmeta WHERE tbl = ? AND NOT deleted", (name,)
        ).fetchone()
        if live > versioned:
            gone = [entry for entry in _missing_rows(conn, info) if (name, entry[0]) not in pending]
            check.missing = [key for key, recorded in gone if recorded != TAMPERED]
            check.marked += [key for key, recorded in gone if recorded == TAMPERED]
    return Checksums(dict(vector), found, seconds=time.monotonic() - started, pending=len(pending))


def _missing_rows(conn: sqlite3.Connection, info: TableInfo) -> list[tuple[str, bytes | None]]:
    """Keys (and recorded hashes) whose version is live but whose row is gone."""
    where = " AND ".join(f"{quote_identifier(c)} IS ?" for c in info.primary_key)
    probe = f"SELECT 1 FROM {quote_identifier(info.name)} WHERE {where}"
    missing = []
    for key, recorded in conn.execute(
        "SELECT pk, hash FROM _repl_rowmeta WHERE tbl = ? AND NOT deleted", (info.name,)
    ).fetchall():
        if conn.execute(probe, parse_key(key)).fetchone() is None:
            missing.append((key, recorded))
    return missing


def mark_tampered(conn: sqlite3.Connection, table: str, keys: list[str]) -> None:
    conn.executemany(
        "UPDATE _repl_rowmeta SET hash = ? WHERE tbl = ? AND pk = ?",
        [(TAMPERED, table, key) for key in keys],
    )


def fill_hashes(conn: sqlite3.Connection, after: int, limit: int = 5000) -> tuple[int, int]:
    """Record the content hash of versions written by log entries after ``after``, where
    that version is still the row's current one. Returns (new position, hashes recorded).
    ``conn`` is in autocommit mode; one short write transaction."""
    rows = logged_writes(conn, after, limit)
    if not rows:
        return log_end(conn, empty=after), 0
    updates: list[tuple[Any, ...]] = []
    for _seq, table, key, new_row, stamp, node, inc in rows:
        values = decode_row(new_row)
        if values is not None:
            updates.append((content_hash(values), table, key, stamp, node, inc))
    with write_transaction(conn):
        recorded = conn.executemany(
            "UPDATE _repl_rowmeta SET hash = ? WHERE tbl = ? AND pk = ? AND hlc = ?"
            " AND node = ? AND inc = ? AND hash IS NULL",
            updates,
        ).rowcount
    return int(rows[-1][0]), recorded
