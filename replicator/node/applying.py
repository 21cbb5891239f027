"""The one door to the applier's connection: peers' batches applied in paced pieces, and any
other work on that connection taking its turn behind the same limiter."""

from __future__ import annotations

import contextlib
import functools
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import trio

from protocol import Change, Origin, Skip
from replicator.apply import quarantine
from replicator.apply.applier import Applier, ApplyResult
from replicator.capture import dbcall, wal
from replicator.capture.pacing import WritePacer
from replicator.capture.sqlite_errors import is_locked
from replicator.capture.store import Store
from replicator.clock import Clock
from replicator.log import Throttle, get_logger
from replicator.node.alarms import Alarms
from replicator.node.vectors import VectorCache
from replicator.sync.faults import Faults
from replicator.sync.peer import PeerDisconnected

__all__ = ["WAL_BOUND", "ApplyHandle"]

_log = get_logger("node")
_T = TypeVar("_T")
WAL_BOUND = 1 << 20  # bytes of WAL past which its space is given back


class ApplyHandle:
    """The applier (set once the file is prepared), its limiter of one, and the pacer that
    keeps its write transactions short; also what applying has refused so far."""

    def __init__(
        self,
        *,
        path: str,
        wal_mode: bool,
        commit_is_quick: bool,
        vectors: VectorCache,
        alarms: Alarms,
        faults: Faults,
        throttle: Throttle,
        write_failed: Callable[[BaseException, str], bool],
        clock: Clock,
    ) -> None:
        self.limiter = trio.CapacityLimiter(1)
        self.pacer = WritePacer(clock=clock.monotonic)
        self.applier: Applier | None = None
        self.counts: dict[str, Any] = {"open": 0, "by_table": {}, "quarantined": 0}
        self._path = path
        self.wal_mode = wal_mode
        self._commit_is_quick = commit_is_quick
        self._vectors = vectors
        self._alarms = alarms
        self._faults = faults
        self._throttle = throttle
        self._write_failed = write_failed

    def the_applier(self) -> Applier:
        assert self.applier is not None, "the node is not prepared yet"
        return self.applier

    @property
    def store(self) -> Store:
        return self.the_applier().store

    async def run(self, function: Callable[..., _T], *args: Any) -> _T:
        """``function(*args)`` in a worker thread, in turn with every other use of the
        applier's connection."""
        return await trio.to_thread.run_sync(
            functools.partial(function, *args), limiter=self.limiter
        )

    async def read_vector(self) -> dict[Origin, int]:
        return await self.run(self._vectors.read, self.store)

    async def apply(
        self, changes: Sequence[Change], skips: Sequence[Skip]
    ) -> tuple[ApplyResult, dict[Origin, int]]:
        """Apply a batch in transactions the pacer sizes (each short, each followed by a rest
        that lets the application's writers in); acknowledged once all committed."""
        total = ApplyResult()
        start = 0
        while True:
            size = self.pacer.piece_size()
            final = start + size >= len(changes)
            await self.pacer.wait_turn()
            result = await self._apply_piece(changes[start : start + size], skips, final=final)
            total.add(result)
            if final:
                self._note_refused(total)
                if self.wal_mode and wal.size(self._path) > WAL_BOUND:
                    await self._reset_wal()
                return total, total.held
            start += size

    def quarantine_alarm(self) -> None:
        """Keep the quarantine alarms true to the count held and dropped."""
        held = self.counts["quarantined"]
        dropped = self.applier.quarantine_dropped if self.applier is not None else 0
        if held:
            self._alarms.sound(
                "quarantine",
                f"{held} changes from peers could not be applied here and are quarantined "
                f"(table {quarantine.TABLE})",
            )
        else:
            self._alarms.silence("quarantine")
        if dropped:
            self._alarms.sound(
                "quarantine_full",
                f"the quarantine is full: {dropped} more changes that could not be applied "
                "were dropped",
            )

    def quarantine_report(self) -> dict[str, Any]:
        return {
            "held": self.counts["quarantined"],
            "limit": self.applier.quarantine_limit if self.applier is not None else None,
            "dropped": self.applier.quarantine_dropped if self.applier is not None else 0,
        }

    async def _reset_wal(self) -> None:
        """A catch-up's short transactions rewrite the same pages, so the WAL grows to several
        times the data they bring: on a disk with little room it would fill it, and then no
        checkpoint could grow the file to empty the WAL. Give its space back once it is large
        (without waiting for anyone: if readers hold it, the next batch tries again)."""
        conn = self.store.conn

        def reset() -> None:
            with contextlib.suppress(sqlite3.OperationalError):  # refused: the pause handles it
                wal.checkpoint(conn, truncate=True)

        await self.run(reset)

    def _note_refused(self, result: ApplyResult) -> None:
        """Count what a batch held that could not be applied, and keep the alarms true."""
        if result.not_replicated:
            self._faults.count("not_replicated_table", result.not_replicated)
        if result.malformed:
            self._faults.count("malformed_change", result.malformed)
        if result.quarantined:
            self.counts["quarantined"] += result.quarantined
            self.quarantine_alarm()

    async def _apply_piece(
        self, changes: Sequence[Change], skips: Sequence[Skip], *, final: bool
    ) -> ApplyResult:
        conn = self.store.conn
        # A commit that waits for the disk (synchronous FULL) is never made on the loop.
        few = len(changes) + len(skips) <= dbcall.INLINE_ENTRIES and self._commit_is_quick
        while True:
            try:
                return await dbcall.call(
                    conn,
                    self.limiter,
                    functools.partial(self._apply_sync, changes, skips, final),
                    inline=few,
                )
            except sqlite3.OperationalError as error:
                if self._write_failed(error, "applying a batch"):
                    # Not acknowledged: the peer sends it again once this node takes writes.
                    raise PeerDisconnected(f"state database refuses writes: {error}",
                                           op="apply") from None  # fmt: skip
                if not is_locked(error):
                    raise
                if self._throttle.allow("busy") is not None:
                    _log.warning("state database busy; retrying the batch", error=str(error))
                await trio.sleep(0.05)

    def _apply_sync(
        self, changes: Sequence[Change], skips: Sequence[Skip], final: bool, quick: bool = False
    ) -> ApplyResult:
        applier = self.the_applier()
        result = applier.apply(changes, skips, final=final)
        self.pacer.applied(len(changes) + len(skips), applier.store.last_hold)
        self._vectors.set(result.held)
        return result
