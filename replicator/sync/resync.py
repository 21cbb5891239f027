"""The node's side of full resyncs: sending and merging snapshots over links, with progress.

`replicator.sync.snapshot` does the database work; this runs it in worker threads (merges on the
applier's connection, behind its limiter), streams the messages, keeps what status shows, and
raises or clears the alarms.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, NoReturn

import trio

from protocol import Origin, SnapshotBegin, SnapshotChunk, SnapshotColumns, SnapshotEnd
from replicator.apply.applier import Applier
from replicator.capture.pacing import WritePacer
from replicator.capture.store import StoreSettings
from replicator.clock import Clock, SystemClock
from replicator.config import ResyncConfig
from replicator.log import KEY_PEER, get_logger
from replicator.sync.divergence import Checksums
from replicator.sync.filters import RowFilter
from replicator.sync.peer import PeerConnection, PeerDisconnected
from replicator.sync.snapshot import SnapshotError, SnapshotProgress
from replicator.sync.snapshot_merge import SnapshotMerge, discard_staged
from replicator.sync.snapshot_source import SnapshotSource

if TYPE_CHECKING:
    from replicator.sync.link import Link

__all__ = ["Resync"]

_log = get_logger("resync")


class Resync:
    def __init__(
        self,
        settings: StoreSettings,
        recovery: ResyncConfig,
        applier: Callable[[], Applier],
        apply_limiter: trio.CapacityLimiter,
        alarms: MutableMapping[str, str],
        on_merged: Callable[[dict[Origin, int]], None],
        links: Mapping[str, Link],
        current_vector: Callable[[], dict[Origin, int]],
        view: Callable[[], RowFilter | None] = lambda: None,
        before_full_merge: Callable[[str], Awaitable[None]] | None = None,
        pacer: WritePacer | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._pacer = pacer
        self._clock: Clock = clock or SystemClock()
        self._rng = rng or random.Random()  # noqa: S311 (snapshot ids, not secrets)
        self.settings = settings
        self.recovery = recovery
        self._applier = applier
        self._limiter = apply_limiter
        self._alarms = alarms
        self._on_merged = on_merged
        self.progress: dict[tuple[str, str], SnapshotProgress] = {}
        self._merges: dict[str, SnapshotMerge] = {}
        self._floor: dict[Origin, int] = {}
        self._links = links
        self._sent_at: dict[str, float] = {}
        self._view = view  # a fresh copy of the outgoing view per snapshot (its own thread)
        self._vector_now = current_vector
        self._before_full_merge = before_full_merge
        self.checksums: Checksums | None = None
        self.recompute = trio.Event()
        self.divergent: dict[str, list[str]] = {}
        self.peer_sums: dict[str, tuple[dict[Origin, int], dict[str, bytes]]] = {}
        self._asked: dict[tuple[str, str], float] = {}
        self._cooldown = max(5.0, recovery.checksum_interval / 2)
        self.repairs_requested = 0
        self.rows_repaired = 0
        self.tampered_found = 0

    # -- the log floor ---------------------------------------------------------------------

    def log_floor(self) -> Mapping[Origin, int]:
        return self._floor

    def refresh_floor(self) -> None:
        """Blocking: read the floor again (after truncation or a merge)."""
        self._floor = self._applier().store.log_floor()

    def wanted(self, peer: str, missing: list[str]) -> bool:
        if self.recovery.auto_resync:
            return True
        message = (
            f"{peer} lacks entries this node's log no longer holds ({', '.join(missing)}); "
            "it needs a full resync (auto_resync is off: POST /api/replication/resync)"
        )
        self._alarms[f"needs_snapshot:{peer}"] = message
        _log.error("peer below the log floor", origins=missing, **{KEY_PEER: peer})
        return False

    # -- sending ---------------------------------------------------------------------------

    async def send(
        self,
        connection: PeerConnection,
        peer: str,
        reason: str,
        repair: Mapping[str, bytes],
        keys: Mapping[str, tuple[str, ...]] | None = None,
    ) -> tuple[int, dict[Origin, int]]:
        progress = SnapshotProgress(peer, "sending", reason)
        self.progress[peer, "sending"] = progress
        source = SnapshotSource(
            self.settings,
            self._applier().store.tables,
            self._rng.getrandbits(62),
            repair,
            self._view(),
            known=self.checksums if repair else None,
            keys=keys,
        )
        _log.info("sending a snapshot", reason=reason, **{KEY_PEER: peer})
        try:
            begin = await trio.to_thread.run_sync(source.open)
            progress.total_rows = sum(table.row_count for table in begin.tables)
            await connection.send(begin)
            chunks = source.chunks()
            while (chunk := await trio.to_thread.run_sync(next, chunks, None)) is not None:
                await connection.send(chunk)
                progress.rows += chunk.row_count
                progress.bytes = connection.bytes_sent
            await connection.send(source.end())
        except BaseException as error:
            progress.finish(str(error) or type(error).__name__)
            raise
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(source.close)
        progress.finish()
        if not repair:
            self._sent_at[peer] = self._clock.time()
        _log.info("snapshot sent", rows=progress.rows, seconds=progress.as_dict()["seconds"],
                  **{KEY_PEER: peer})  # fmt: skip
        return source.log_position, dict(source.vector)

    # -- receiving -------------------------------------------------------------------------

    async def begin(self, peer: str, message: SnapshotBegin) -> None:
        await self.abandon(peer)  # a new snapshot replaces one the peer did not finish
        progress = SnapshotProgress(peer, "receiving", "sent by the peer")
        progress.total_rows = sum(table.row_count for table in message.tables)
        self.progress[peer, "receiving"] = progress
        _log.info("receiving a snapshot", rows=progress.total_rows, **{KEY_PEER: peer})
        try:
            self._merges[peer] = await trio.to_thread.run_sync(
                SnapshotMerge,
                self._applier(),
                message,
                peer,
                self._view(),
                self._pacer,
                limiter=self._limiter,
            )
        except SnapshotError as error:
            await self._fail(peer, error)

    async def chunk(self, peer: str, message: SnapshotChunk | SnapshotColumns) -> None:
        merge = self._merges.get(peer)
        if merge is None:
            raise PeerDisconnected("snapshot chunk without a snapshot", op="snapshot", peer=peer)
        try:
            await trio.to_thread.run_sync(merge.chunk, message, limiter=self._limiter)
        except SnapshotError as error:
            await self._fail(peer, error, merge)
        progress = self.progress[peer, "receiving"]
        progress.rows = merge.rows

    async def end(self, peer: str, message: SnapshotEnd) -> dict[Origin, int]:
        merge = self._merges.pop(peer, None)
        if merge is None:
            raise PeerDisconnected("snapshot end without a snapshot", op="snapshot", peer=peer)
        verify = self.recovery.checksum_verification
        try:
            if not merge.partial and self._before_full_merge is not None:
                await self._before_full_merge(peer)
            vector = await trio.to_thread.run_sync(
                lambda: merge.finish(message, verify=verify), limiter=self._limiter
            )
        except SnapshotError as error:
            await self._fail(peer, error, merge)
        await trio.to_thread.run_sync(self.refresh_floor, limiter=self._limiter)
        progress = self.progress[peer, "receiving"]
        progress.finish()
        self._alarms.pop(f"snapshot_failed:{peer}", None)
        if merge.partial:
            self.rows_repaired += merge.written + merge.removed
            self.recompute.set()  # see whether the repair closed the difference
        else:
            self._on_merged(vector)
        return vector

    async def abandon(self, peer: str) -> None:
        """The link to ``peer`` ended: a snapshot it was sending will not finish, and what
        was staged of it is deleted (it would only take space)."""
        merge = self._merges.pop(peer, None)
        if merge is not None:
            self.progress[peer, "receiving"].finish("connection ended")
            await trio.to_thread.run_sync(merge.discard, limiter=self._limiter)
        sending = self.progress.get((peer, "sending"))
        if sending is not None and sending.state == "running":
            sending.finish("connection ended")

    def clear_staging(self) -> None:
        """Blocking, at start: nothing staged before can finish now."""
        discard_staged(self._applier().store)

    async def _fail(
        self, peer: str, error: SnapshotError, merge: SnapshotMerge | None = None
    ) -> NoReturn:
        self._merges.pop(peer, None)
        if merge is not None:
            await trio.to_thread.run_sync(merge.discard, limiter=self._limiter)
        progress = self.progress.get((peer, "receiving"))
        if progress is not None:
            progress.finish(error.message)
        self._alarms[f"snapshot_failed:{peer}"] = f"snapshot from {peer} failed: {error.message}"
        _log.error("snapshot refused", reason=error.message, **{KEY_PEER: peer})
        raise PeerDisconnected(error.message, op="snapshot", peer=peer) from None

    def last_sent(self, peer: str) -> float | None:
        """When the last full snapshot sent to ``peer`` finished (None: none finished)."""
        return self._sent_at.get(peer)

    def report(self) -> list[dict[str, object]]:
        return [progress.as_dict() for _, progress in sorted(self.progress.items())]

    # -- divergence ------------------------------------------------------------------------

    def local_checksums(self) -> tuple[dict[Origin, int], dict[str, bytes]]:
        if self.checksums is None:
            return {}, {}
        return self.checksums.vector, self.checksums.table_checksums()

    async def peer_checksums(
        self, peer: str, vector: Mapping[Origin, int], checksums: Mapping[str, bytes]
    ) -> None:
        self.peer_sums[peer] = (_nonzero(vector), dict(checksums))
        mine = self.checksums
        theirs = _nonzero(vector)
        if mine is None or _nonzero(mine.vector) != theirs:
            if _nonzero(self._vector_now()) == theirs:
                self.recompute.set()  # we are where they were: compare soon
            return
        differing = sorted(
            table
            for table, digest in mine.table_checksums().items()
            if table in checksums and checksums[table] != digest
        )
        self.divergent[peer] = differing
        if not differing:
            return
        now = self._clock.monotonic()
        due = [t for t in differing if self._asked.get((peer, t), -1e9) + self._cooldown <= now]
        link = self._links.get(peer)
        if not due or link is None:
            return
        for table in due:
            self._asked[peer, table] = now
        self.repairs_requested += 1
        _log.warning("table checksums differ from a peer's at the same version vector",
                     tables=due, **{KEY_PEER: peer})  # fmt: skip
        buckets = {table: mine.tables[table].bucket_bytes() for table in due}
        await link.ask_repair("table checksums differ", buckets)

    def comparable(self, peer: str) -> bool:
        """The peer's last checksums are at the vector of ours."""
        seen = self.peer_sums.get(peer)
        mine = self.checksums
        return seen is not None and mine is not None and seen[0] == _nonzero(mine.vector)

    async def repair_tampered(
        self, tables: list[str], keys: Mapping[str, tuple[str, ...]] | None = None
    ) -> None:
        """Rows here were edited behind replication's back: ask a connected peer for them
        (for exactly the rows ``keys`` names, where it names them: no whole buckets)."""
        mine = self.checksums
        if mine is None or not self._links:
            return
        peer = sorted(self._links)[0]
        now = self._clock.monotonic()
        # One request per cooldown: a repair under way is not asked for again each pass.
        tables = [t for t in tables if self._asked.get((peer, t), -1e9) + self._cooldown <= now]
        if not tables:
            return
        for table in tables:
            self._asked[peer, table] = now
        self.repairs_requested += 1
        buckets = {table: mine.tables[table].bucket_bytes() for table in tables}
        named = {table: keys[table] for table in tables if keys and table in keys}
        await self._links[peer].ask_repair("rows edited behind replication's back", buckets, named)

    def divergence_report(self) -> dict[str, Any]:
        mine = self.checksums
        tables = {} if mine is None else {
            name: {
                "rows": check.rows,
                "checksum": check.checksum.to_bytes(16, "big").hex(),
                "unversioned_rows": check.unversioned,
            }
            for name, check in mine.tables.items()
        }  # fmt: skip
        return {
            "enabled": self.recovery.divergence_check,
            "checked_at": None if mine is None else mine.computed_at,
            "check_seconds": None if mine is None else round(mine.seconds, 3),
            "vector": {} if mine is None else {str(o): s for o, s in mine.vector.items()},
            "tables": tables,
            "edited_behind_replication": self.tampered_found,
            "divergent_tables": {peer: tables for peer, tables in self.divergent.items() if tables},
            "repairs_requested": self.repairs_requested,
            "rows_repaired": self.rows_repaired,
        }


def _nonzero(vector: Mapping[Origin, int]) -> dict[Origin, int]:
    return {origin: seq for origin, seq in vector.items() if seq}
