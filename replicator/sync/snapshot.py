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

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from protocol import (
    BUCKETS,
    Origin,
)
from replicator.capture.tables import TableInfo
from replicator.errors import ReplicationError

__all__ = [
    "CHUNK_BYTES",
    "CHUNK_ROWS",
    "SnapshotError",
    "SnapshotProgress",
    "bitmap_buckets",
    "bucket_bitmap",
    "checksum_bytes",
    "declared_bytes",
    "nonzero",
]

CHUNK_ROWS = 1000  # rows per chunk, and per read of a table
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
