"""Tails `_repl_log` and hands new entries to the node in batches, within milliseconds.

Applications commit from their own processes, so nothing wakes us: we poll. ``PRAGMA
data_version`` changes whenever another connection commits and costs a few microseconds, so
polling it every couple of milliseconds is cheap, and the log is only read when it moved. Each
read is one short transaction; no read snapshot is held between polls, so the WAL can always
be checkpointed. Batches are cut by count and by bytes, never held back to fill up.

The application may ``ALTER TABLE ... ADD COLUMN`` while we run: the poll notices the schema
version move, regenerates the triggers, and recaptures the rows written in between (see
`Store.refresh_triggers`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping
from typing import TypeVar

import trio

from replicator.capture.dbcall import WouldBlock
from replicator.capture.store import LogRecord, Store, StoreSettings
from replicator.capture.tables import TableInfo
from replicator.capture.transactions import read_transaction
from replicator.log import get_logger

__all__ = ["Detector"]

_log = get_logger("detector")
_T = TypeVar("_T")


class Detector:
    def __init__(
        self,
        settings: StoreSettings,
        *,
        after: int = 0,
        batch_size: int = 1000,
        max_batch_bytes: int = 4 << 20,
        poll_interval: float = 0.001,
    ) -> None:
        self.settings = settings
        self.position = after
        self.batch_size = batch_size
        self.max_batch_bytes = max_batch_bytes
        self.poll_interval = poll_interval
        self._store: Store | None = None
        self._data_version: int | None = None
        self._schema_version = -1
        self._pending = True  # read once at start: entries may be waiting already
        self._recapturing = False
        self._limiter = trio.CapacityLimiter(1)
        # How often the replicated tables changed shape: peers compare shapes at Hello, so
        # the node reads `tables` again when this moves.
        self.shape_changes = 0

    def poll(self) -> list[LogRecord]:
        """Blocking: the entries committed since the last call (at most one batch)."""
        read_from = self.position
        found = self._read_if_moved(
            lambda store: store.read_log(read_from, self.batch_size), even_if_unmoved=self._pending
        )
        if found is None:
            return []
        records = self._cut_by_bytes(found)
        # Read again next time if this batch may not be the last, or rows are being recaptured.
        self._pending = len(records) > 0 or self._recapturing
        if records:
            self.position = records[-1].position
        return records

    def poll_position(self, quick: bool = False) -> int | None:
        """Blocking: the new end of the log if it moved since the last call, else None.

        For callers that read the log themselves (each link does): nothing is decoded here.
        ``quick``: on the event loop, so anything more than the look raises `WouldBlock`.
        """
        position = self._read_if_moved(Store.log_position, even_if_unmoved=False, quick=quick)
        if position is None or position <= self.position:
            return None
        self.position = position
        return position

    @property
    def conn(self) -> sqlite3.Connection | None:
        return None if self._store is None else self._store.conn

    @property
    def tables(self) -> Mapping[str, TableInfo]:
        """The replicated tables' shapes as the triggers last matched them."""
        return {} if self._store is None else self._store.tables

    def _read_if_moved(
        self, read: Callable[[Store], _T], *, even_if_unmoved: bool, quick: bool = False
    ) -> _T | None:
        """Run ``read`` in one snapshot with the schema version, if another connection
        committed since the last look; regenerate the triggers if the schema moved.

        Nothing is remembered unless it all succeeds, so a failed call can simply be repeated.
        """
        store = self._store
        if store is None:
            if quick:
                raise WouldBlock
            store = Store.open(self.settings, prepare=False)
            try:
                # The application may have altered a table since the node prepared the file.
                self._refresh_triggers(store, recapture_after=self.position)
            except BaseException:
                store.close()
                raise
            self._store = store
        version = store.data_version()
        if version == self._data_version and not even_if_unmoved:
            return None
        read_from = self.position
        with read_transaction(store.conn):
            # Read in the same snapshot as the log, so an ALTER cannot slip between the two.
            schema_version = store.schema_version()
            result = read(store)
        recapturing = schema_version != self._schema_version
        if recapturing:
            if quick:
                raise WouldBlock
            # Entries after read_from may come from triggers older than the table: capture
            # those rows again, whole, with triggers that match it.
            self._refresh_triggers(store, recapture_after=read_from)
        self._recapturing = recapturing
        self._data_version = version
        return result

    def _refresh_triggers(self, store: Store, recapture_after: int) -> None:
        changed, self._schema_version = store.refresh_triggers(recapture_after=recapture_after)
        if changed:
            self.shape_changes += 1
            _log.info("replicated tables changed shape; capture triggers regenerated",
                      tables=changed)  # fmt: skip

    def _cut_by_bytes(self, records: list[LogRecord]) -> list[LogRecord]:
        total = 0
        for index, record in enumerate(records):
            entry = record.entry
            row = getattr(entry, "row", None) or {}
            old = getattr(entry, "old", None) or {}
            total += sum(_size(v) for v in row.values()) + sum(_size(v) for v in old.values())
            if total > self.max_batch_bytes and index > 0:
                return records[:index]
        return records

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    async def batches(self, send: trio.MemorySendChannel[list[LogRecord]]) -> None:
        """Run until cancelled, sending each batch (blocking when the receiver lags)."""
        async with send:
            while True:
                records = await trio.to_thread.run_sync(self.poll, limiter=self._limiter)
                if records:
                    await send.send(records)
                else:
                    await trio.sleep(self.poll_interval)


def _size(value: object) -> int:
    return len(value) if isinstance(value, str | bytes) else 8
