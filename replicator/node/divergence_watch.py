"""The divergence watch: table checksums at start, every ``checksum_interval`` and on demand,
compared with peers' in heartbeats; rows edited behind replication's back are marked and
repaired from a peer."""

from __future__ import annotations

import threading
from collections.abc import Callable

import trio

from protocol import MAX_REPAIR_KEYS, Origin
from protocol.checks import MAX_TEXT_LENGTH
from replicator.capture.store import Store
from replicator.capture.transactions import read_transaction, write_transaction
from replicator.log import get_logger
from replicator.sync import divergence
from replicator.sync.filters import RowFilter
from replicator.sync.resync import Resync

__all__ = ["DivergenceWatch"]

_log = get_logger("node")
_NAMED_CHARS = 1 << 20  # key text one repair request may name, all tables together


class DivergenceWatch:
    def __init__(
        self,
        *,
        resync: Resync,
        open_store: Callable[[], Store],
        origin: Callable[[], Origin | None],
        interval: float,
    ) -> None:
        self._resync = resync
        self._open_store = open_store
        self._origin = origin
        self._interval = interval
        self.view: RowFilter | None = None  # what peers are sent, set once the file is open
        self.lock = threading.Lock()  # the periodic pass, validate and a restore take turns
        self._hashed_through = 0

    async def run(self) -> None:
        """Checksums at start and every ``checksum_interval`` (sooner when a peer's heartbeat
        shows it at this node's vector)."""
        store = await trio.to_thread.run_sync(self._open_store)
        try:
            while True:
                await trio.to_thread.run_sync(self._check, store)
                with trio.move_on_after(self._interval):
                    await self._resync.recompute.wait()
                self._resync.recompute = trio.Event()
                await trio.sleep(0.2)  # let a burst of heartbeats settle
        finally:
            store.close()

    async def check_now(self) -> None:
        """Checksums computed now (for validate), on a connection of its own."""
        store = await trio.to_thread.run_sync(self._open_store)
        try:
            await trio.to_thread.run_sync(self._check, store)
        finally:
            store.close()

    def forget_row_hashes(self) -> None:
        """The file's contents were replaced: hash every row again (the lock held)."""
        self._hashed_through = 0

    def _check(self, store: Store) -> None:
        """Blocking: record content hashes, compute checksums, mark rows edited behind
        replication's back."""
        with self.lock:
            self._hashed_through = self._check_locked(store, self._hashed_through)

    def _check_locked(self, store: Store, hashed_through: int) -> int:
        conn = store.conn
        while True:
            position, _ = divergence.fill_hashes(conn, hashed_through)
            if position == hashed_through:
                break
            hashed_through = position
        origin = self._origin()
        assert origin is not None
        store.seal()  # so that, mostly, no row is newer than its version in the pass
        with read_transaction(conn):
            vector = store.version_vector()
            checksums = divergence.compute(conn, store.tables, vector, origin, self.view)
        found = {
            name: check.tampered + check.missing
            for name, check in checksums.tables.items()
            if check.tampered or check.missing
        }
        if found:
            with write_transaction(store):
                for name, keys in found.items():
                    divergence.mark_tampered(conn, name, keys)
            count = sum(len(keys) for keys in found.values())
            self._resync.tampered_found += count
            _log.warning("rows edited behind replication's back: repairing from a peer",
                         rows=count, tables=sorted(found))  # fmt: skip
        if not checksums.pending:  # else they are not the vector's: compare the next pass
            self._resync.checksums = checksums
        wrong = {
            name: tuple(sorted({*check.tampered, *check.missing, *check.marked}))
            for name, check in checksums.tables.items()
            if check.tampered or check.missing or check.marked
        }
        if wrong:
            trio.from_thread.run(self._resync.repair_tampered, sorted(wrong), _nameable(wrong))
        return hashed_through


def _nameable(wrong: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """The tables whose wrong rows the repair request names (the peer sends just those): not
    so many, nor keys so long, that the request would be refused or outgrow a message; the
    others are repaired by bucket."""
    named: dict[str, tuple[str, ...]] = {}
    room = _NAMED_CHARS
    for name, keys in sorted(wrong.items()):
        size = sum(len(key) for key in keys)
        fits = len(keys) <= MAX_REPAIR_KEYS and size <= room
        if fits and all(len(key) <= MAX_TEXT_LENGTH for key in keys):
            named[name] = keys
            room -= size
    return named
