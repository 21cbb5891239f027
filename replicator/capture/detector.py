"""Notices within milliseconds that `_repl_log` grew, and says where it ends now: the one
signal that wakes the senders, which read, filter and cut batches themselves (`LogReader`).

Applications commit from their own processes, so nothing wakes us: we poll. ``PRAGMA
data_version`` changes whenever another connection commits and costs a few microseconds, so
polling it every millisecond is cheap, and the log's end is only read when it moved. Each look
is one short transaction; no read snapshot is held between polls, so the WAL can always be
checkpointed. When the triggers logged changes, the detector stamps them (`Store.seal`, one
short write transaction) before it reports the new end: senders only read stamped entries.

The application may ``ALTER TABLE ... ADD COLUMN`` while we run: the poll notices the schema
version move, regenerates the triggers, and recaptures the rows written in between (see
`Store.refresh_triggers`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping

from replicator.capture.dbcall import WouldBlock
from replicator.capture.store import Store, StoreSettings
from replicator.capture.tables import TableInfo
from replicator.capture.transactions import read_transaction
from replicator.log import get_logger

__all__ = ["Detector"]

_log = get_logger("detector")


class Detector:
    def __init__(
        self,
        settings: StoreSettings,
        *,
        after: int = 0,
        poll_interval: float = 0.001,
    ) -> None:
        self.settings = settings
        self.position = after
        self.poll_interval = poll_interval
        self._store: Store | None = None
        self._data_version: int | None = None
        self._schema_version = -1
        # How often the replicated tables changed shape: peers compare shapes at Hello, so
        # the node reads `tables` again when this moves.
        self.shape_changes = 0

    def poll_position(self, quick: bool = False) -> int | None:
        """Blocking: the new end of the log if it moved since the last call, else None.

        For callers that read the log themselves (each link does): nothing is decoded here.
        ``quick``: on the event loop, so anything more than the look raises `WouldBlock`.
        """
        position = self._position_if_moved(quick=quick)
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

    def _position_if_moved(self, *, quick: bool = False) -> int | None:
        """The log's end, read in one snapshot with the schema version, if another connection
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
        if version == self._data_version:
            return None
        read_from = self.position
        with read_transaction(store.conn):
            # Read in the same snapshot as the log, so an ALTER cannot slip between the two.
            schema_version = store.schema_version()
            sealed, seen = store.unsealed()
        logged: int | None = seen
        recapturing = schema_version != self._schema_version
        if recapturing:
            if quick:
                raise WouldBlock
            # Entries after read_from may come from triggers older than the table: capture
            # those rows again, whole, with triggers that match it.
            self._refresh_triggers(store, recapture_after=read_from)
            logged = None  # the recaptured rows too: senders read them now
        if logged is None or logged > sealed:
            if quick:
                raise WouldBlock
            # Only what this look saw: an entry committed since may come from triggers older
            # than its table, and the next look, seeing the schema move, recaptures it.
            store.seal(through=logged)
            sealed = store.log_position()
        self._data_version = version  # (our own seal does not move it)
        return sealed

    def _refresh_triggers(self, store: Store, recapture_after: int) -> None:
        changed, self._schema_version = store.refresh_triggers(recapture_after=recapture_after)
        if changed:
            self.shape_changes += 1
            _log.info("replicated tables changed shape; capture triggers regenerated",
                      tables=changed)  # fmt: skip

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
