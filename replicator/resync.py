"""The node's side of full resyncs: sending and merging snapshots over links, with progress.

`replicator.snapshot` does the database work; this runs it in worker threads (merges on the
applier's connection, behind its limiter), streams the messages, keeps what status shows, and
raises or clears the alarms.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, MutableMapping

import trio

from protocol import Origin, SnapshotBegin, SnapshotChunk, SnapshotEnd
from replicator.applier import Applier
from replicator.config import ResyncConfig
from replicator.log import KEY_PEER, get_logger
from replicator.peer import PeerConnection, PeerDisconnected
from replicator.snapshot import SnapshotError, SnapshotMerge, SnapshotProgress, SnapshotSource
from replicator.store import StoreSettings

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
    ) -> None:
        self.settings = settings
        self.recovery = recovery
        self._applier = applier
        self._limiter = apply_limiter
        self._alarms = alarms
        self._on_merged = on_merged
        self.progress: dict[tuple[str, str], SnapshotProgress] = {}
        self._merges: dict[str, SnapshotMerge] = {}
        self._floor: dict[Origin, int] = {}

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
        self, connection: PeerConnection, peer: str, reason: str
    ) -> tuple[int, dict[Origin, int]]:
        progress = SnapshotProgress(peer, "sending", reason)
        self.progress[peer, "sending"] = progress
        source = SnapshotSource(self.settings, self._applier().store.tables, random.getrandbits(62))
        _log.info("sending a snapshot", reason=reason, **{KEY_PEER: peer})
        try:
            begin = await trio.to_thread.run_sync(source.open)
            progress.total_rows = sum(table.row_count for table in begin.tables)
            await connection.send(begin)
            chunks = source.chunks()
            while (chunk := await trio.to_thread.run_sync(next, chunks, None)) is not None:
                await connection.send(chunk)
                progress.rows += len(chunk.rows)
                progress.bytes = connection.bytes_sent
            await connection.send(source.end())
        except BaseException as error:
            progress.finish(str(error) or type(error).__name__)
            raise
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(source.close)
        progress.finish()
        _log.info("snapshot sent", rows=progress.rows, seconds=progress.as_dict()["seconds"],
                  **{KEY_PEER: peer})  # fmt: skip
        return source.log_position, dict(source.vector)

    # -- receiving -------------------------------------------------------------------------

    async def begin(self, peer: str, message: SnapshotBegin) -> None:
        progress = SnapshotProgress(peer, "receiving", "sent by the peer")
        progress.total_rows = sum(table.row_count for table in message.tables)
        self.progress[peer, "receiving"] = progress
        _log.info("receiving a snapshot", rows=progress.total_rows, **{KEY_PEER: peer})
        try:
            self._merges[peer] = await trio.to_thread.run_sync(
                SnapshotMerge, self._applier(), message, peer, limiter=self._limiter
            )
        except SnapshotError as error:
            self._fail(peer, error)

    async def chunk(self, peer: str, message: SnapshotChunk) -> None:
        merge = self._merges.get(peer)
        if merge is None:
            raise PeerDisconnected("snapshot chunk without a snapshot", op="snapshot", peer=peer)
        try:
            await trio.to_thread.run_sync(merge.chunk, message, limiter=self._limiter)
        except SnapshotError as error:
            self._fail(peer, error)
        progress = self.progress[peer, "receiving"]
        progress.rows = merge.rows

    async def end(self, peer: str, message: SnapshotEnd) -> dict[Origin, int]:
        merge = self._merges.pop(peer, None)
        if merge is None:
            raise PeerDisconnected("snapshot end without a snapshot", op="snapshot", peer=peer)
        verify = self.recovery.checksum_verification
        try:
            vector = await trio.to_thread.run_sync(
                lambda: merge.finish(message, verify=verify), limiter=self._limiter
            )
        except SnapshotError as error:
            self._fail(peer, error)
        await trio.to_thread.run_sync(self.refresh_floor, limiter=self._limiter)
        progress = self.progress[peer, "receiving"]
        progress.finish()
        self._alarms.pop(f"snapshot_failed:{peer}", None)
        self._on_merged(vector)
        return vector

    def abandon(self, peer: str) -> None:
        """The link to ``peer`` ended: a snapshot it was sending will not finish."""
        if self._merges.pop(peer, None) is not None:
            self.progress[peer, "receiving"].finish("connection ended")
        sending = self.progress.get((peer, "sending"))
        if sending is not None and sending.state == "running":
            sending.finish("connection ended")

    def _fail(self, peer: str, error: SnapshotError) -> None:
        self._merges.pop(peer, None)
        progress = self.progress.get((peer, "receiving"))
        if progress is not None:
            progress.finish(error.message)
        self._alarms[f"snapshot_failed:{peer}"] = f"snapshot from {peer} failed: {error.message}"
        _log.error("snapshot refused", reason=error.message, **{KEY_PEER: peer})
        raise PeerDisconnected(error.message, op="snapshot", peer=peer) from None

    def report(self) -> list[dict[str, object]]:
        return [progress.as_dict() for _, progress in sorted(self.progress.items())]
