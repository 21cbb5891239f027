"""What both sides of a snapshot share: its error, its progress as status shows it, and the
bucket bitmaps and checksums a partial snapshot is described with.

How a snapshot works: a consistent copy of the replicated tables, streamed in chunks and merged.

The sender copies the state file with ``VACUUM INTO`` (one bounded read; the application keeps
writing) and reads the copy out table by table in primary-key order: live rows with their
versions, then tombstones. The copy also gives the version vector the rows correspond to and
the log position the incremental stream resumes from, so nothing is sent twice or skipped.

The receiver merges each chunk in one short transaction with capture suppressed, under the same
version order as any change: a row is replaced only by a greater version, so its own newer,
unshipped writes survive (and keep shipping). Tables are never dropped or recreated. Rows the
receiver holds that the snapshot lacks are deleted only when the sender had seen their version
(the row was deleted there and its tombstone collected); a version the sender never saw is
kept. Only when every chunk arrived and each table's checksum matches does the receiver's
version vector move to the snapshot's. An interrupted merge leaves every row at a version at
least as new as before, and the next snapshot finishes the job.

The sender is `snapshot_source`, the receiver `snapshot_merge`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from protocol import (
    BUCKETS,
    ColumnVersions,
    Origin,
    RowVersion,
    SnapshotColumns,
    SnapshotRow,
)
from protocol.checks import SqlValue
from replicator.capture.tables import TableInfo
from replicator.errors import ReplicationError

__all__ = [
    "CHUNK_BYTES",
    "CHUNK_ROWS",
    "SnapshotError",
    "SnapshotProgress",
    "Staged",
    "bitmap_buckets",
    "bucket_bitmap",
    "checksum_bytes",
    "chunk_digest",
    "chunk_payload",
    "columns_chunk",
    "declared_bytes",
    "nonzero",
    "unstage",
]

CHUNK_ROWS = 2000  # rows per chunk, and per read of a table
CHUNK_BYTES = 1 << 20


class SnapshotError(ReplicationError):
    """A snapshot that cannot be taken or merged: mismatched tables, a failed checksum."""


def checksum_bytes(checksum: int) -> bytes:
    return checksum.to_bytes(16, "big")


@dataclass(slots=True)
class SnapshotProgress:
    """What status shows of a snapshot being sent or received."""

    peer: str
    direction: str  # "sending" | "receiving"
    reason: str
    started_at: float = field(default_factory=time.time)
    rows: int = 0
    total_rows: int = 0
    bytes: int = 0
    state: str = "running"  # running | done | failed
    finished_at: float | None = None
    error: str | None = None

    def finish(self, error: str | None = None) -> None:
        self.state = "failed" if error else "done"
        self.error = error
        self.finished_at = time.time()

    def as_dict(self) -> dict[str, Any]:
        percent = 100.0 if self.total_rows == 0 else 100.0 * self.rows / self.total_rows
        end = self.finished_at or time.time()
        return {
            "peer": self.peer,
            "direction": self.direction,
            "reason": self.reason,
            "state": self.state,
            "rows": self.rows,
            "total_rows": self.total_rows,
            "bytes": self.bytes,
            "percent": round(min(percent, 100.0), 1),
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "seconds": round(end - self.started_at, 3),
            "error": self.error,
        }


def bucket_bitmap(buckets: set[int]) -> bytes:
    bits = bytearray(BUCKETS // 8)
    for bucket in buckets:
        bits[bucket // 8] |= 1 << (bucket % 8)
    return bytes(bits)


def bitmap_buckets(bitmap: bytes) -> set[int]:
    return {n for n in range(BUCKETS) if n // 8 < len(bitmap) and bitmap[n // 8] >> (n % 8) & 1}


def declared_bytes(info: TableInfo, rows: int, file_size: int) -> int:
    """An upper bound on what ``rows`` rows of a table take staged: their values cannot hold
    more than the file they come from (counted twice: key values travel twice), and each
    row adds its column names and msgpack's headers (a generous per-row allowance)."""
    per_row = 512 + sum(len(column.encode()) + 16 for column in info.columns)
    return 2 * file_size + rows * per_row


def nonzero(vector: Mapping[Origin, int]) -> dict[Origin, int]:
    """The origins of ``vector`` that hold anything (a zero entry says nothing)."""
    return {origin: seq for origin, seq in vector.items() if seq}


# -- chunks in columns -----------------------------------------------------------------------
#
# A chunk travels as `SnapshotColumns`. Its canonical bytes (``chunk_payload``: the columns
# msgpack-encoded) are what the receiver stages and later merges, and what each table's
# checksum covers: the sender hashes the chunks it built from its copy, the receiver the
# chunks it decoded and checked, so the checksum says that what will be merged is what was
# read, with no work per row on either side.


def chunk_payload(chunk: SnapshotColumns) -> bytes:
    """The canonical bytes of a chunk's rows: what is staged and what the checksum covers."""
    packed: bytes = msgpack.packb(chunk.to_wire()[3:], use_bin_type=True)
    return packed


def chunk_digest(index: int, payload: bytes) -> int:
    """A chunk's contribution to its table's checksum (summed, as `divergence.fold` does)."""
    digest = hashlib.blake2b(index.to_bytes(8, "big") + payload, digest_size=16).digest()
    return int.from_bytes(digest, "big")


@dataclass(frozen=True, slots=True)
class Staged:
    """A staged chunk read back: columns as `SnapshotColumns` has them, origins resolved."""

    origins: list[Origin]
    columns: list[list[SqlValue]]
    live: list[list[int]]  # hlcs, origin indexes, generations, seqs
    hashes: list[bytes | None]
    keys: list[list[SqlValue]]
    keyed: list[list[int]]

    @property
    def live_rows(self) -> int:
        return len(self.live[0])

    @property
    def keyed_rows(self) -> int:
        return len(self.keyed[0])

    def rows(
        self, columns: Sequence[str], primary_key: Sequence[str]
    ) -> tuple[list[SnapshotRow], list[bytes | None], list[SnapshotRow]]:
        """The per-row form (for the merges that cannot be done in SQL): live rows with
        their content hashes, then the rows sent by key (withheld rows and tombstones)."""
        origins = self.origins
        positions = [list(columns).index(c) for c in primary_key]
        live = []
        hlcs, indexes, generations, seqs = self.live
        for n, values in enumerate(zip(*self.columns, strict=True)):
            row = dict(zip(columns, values, strict=True))
            pk = tuple(values[p] for p in positions)
            version = RowVersion(hlcs[n], origins[indexes[n]], generations[n])
            live.append(SnapshotRow(pk, row, version, seqs[n]))
        keyed = []
        hlcs, indexes, generations, seqs = self.keyed
        for n, pk in enumerate(zip(*self.keys, strict=True)):
            version = RowVersion(hlcs[n], origins[indexes[n]], generations[n])
            keyed.append(SnapshotRow(tuple(pk), None, version, seqs[n]))
        return live, list(self.hashes), keyed


def unstage(payload: bytes) -> Staged:
    """A chunk as `chunk_payload` staged it (checked when it arrived)."""
    origins, columns, live, hashes, keys, keyed = msgpack.unpackb(payload, raw=False)
    return Staged([Origin(node, inc) for node, inc in origins], columns, live, hashes, keys, keyed)


def columns_chunk(
    snapshot_id: int,
    table: str,
    index: int,
    columns: Sequence[str],
    primary_key: Sequence[str],
    rows: Iterable[tuple[SnapshotRow, bytes | None]],
) -> SnapshotColumns:
    """A chunk in columns from rows one by one (with the content hash of each live row), for
    the paths that look at each row anyway (filters, repairs, a peer's chunk of rows)."""
    origins: dict[Origin, int] = {}
    live: list[tuple[SnapshotRow, bytes | None]] = []
    keyed: list[SnapshotRow] = []
    for row, digest in rows:
        origins.setdefault(row.version.origin, len(origins))
        if row.values is None:
            keyed.append(row)
        else:
            live.append((row, digest))
    values = tuple(
        tuple(row.values.get(column) if row.values is not None else None for row, _ in live)
        for column in columns
    )
    keys = tuple(tuple(row.pk[n] for row in keyed) for n in range(len(primary_key)))

    def versions(of: Sequence[SnapshotRow]) -> ColumnVersions:
        return ColumnVersions(
            tuple(row.version.hlc for row in of),
            tuple(origins[row.version.origin] for row in of),
            tuple(row.version.generation for row in of),
            tuple(row.seq for row in of),
        )

    return SnapshotColumns(
        snapshot_id,
        table,
        index,
        tuple(origins),
        values,
        versions([row for row, _ in live]),
        tuple(digest for _, digest in live),
        keys,
        versions(keyed),
    )
