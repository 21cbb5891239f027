"""Each link's reading of the log: its own connection, a few entries on the event loop and
more in a worker thread, skipping the changes its peer sent (they go back only as echoes)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import trio

from protocol import Origin
from replicator.capture import dbcall
from replicator.capture.store import LogRecord, Store, StoreSettings
from replicator.capture.transactions import read_transaction

__all__ = ["LogReader"]


class LogReader:
    """A link's own connection for reading the log: a few entries on the event loop, more in
    a worker thread."""

    def __init__(
        self, settings: StoreSettings, skip_origin: Origin, log_end: Callable[[], int]
    ) -> None:
        self._settings = settings
        self._skip_origin = skip_origin
        self._log_end = log_end
        self._store: Store | None = None
        self._limiter = trio.CapacityLimiter(1)

    async def __call__(self, after: int, limit: int) -> tuple[list[LogRecord], int]:
        conn = None if self._store is None else self._store.conn
        few = self._log_end() - after <= dbcall.INLINE_ENTRIES
        return await dbcall.call(
            conn, self._limiter, functools.partial(self.read, after, limit), inline=few
        )

    def read(self, after: int, limit: int, quick: bool = False) -> tuple[list[LogRecord], int]:
        """Blocking: up to ``limit`` entries after ``after`` (the peer's own skipped), and the
        position read through."""
        if self._store is None:
            self._store = Store.open(self._settings, prepare=False)
        store = self._store
        with read_transaction(store.conn):
            end = store.log_position()
            records = store.read_log(after, limit, skip_origin=self._skip_origin, through=end)
        # Fewer than asked for: every entry up to the end was looked at.
        return records, (end if len(records) < limit else records[-1].position)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
