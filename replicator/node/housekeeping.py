"""The node's periodic jobs that keep the file, the log and the operator's view in shape: WAL
checkpoints, manual-conflict expiry, log truncation and tombstone collection, position
checkpoints, the vector refresh and scheduled full resyncs."""

from __future__ import annotations

import contextlib
import datetime
import functools
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import trio
from croniter import croniter

from replicator.apply import conflicts
from replicator.apply.resolvers import ManualResolver, TimestampResolver
from replicator.capture import hlc, wal
from replicator.capture.store import Store
from replicator.capture.transactions import write_transaction
from replicator.clock import Clock
from replicator.config import Config
from replicator.log import KEY_PEER, get_logger
from replicator.node.applying import WAL_BOUND, ApplyHandle
from replicator.node.vectors import VectorCache
from replicator.sync import retention
from replicator.sync.checkpoints import list_checkpoints, take_checkpoint
from replicator.sync.link import Link, PeerStatus
from replicator.sync.membership import ClusterView
from replicator.sync.peer import PeerDisconnected
from replicator.sync.resync import Resync

__all__ = ["CHECKPOINTS_SHOWN", "Housekeeping"]

_log = get_logger("node")
_T = TypeVar("_T")
CHECKPOINTS_SHOWN = 10
_WAL_CHECK_INTERVAL = 0.5


class Housekeeping:
    def __init__(
        self,
        *,
        config: Config,
        applying: ApplyHandle,
        vectors: VectorCache,
        cluster: ClusterView,
        resync: Resync,
        links: Mapping[str, Link],
        status: Mapping[str, PeerStatus],
        open_store: Callable[[], Store],
        heartbeat_interval: float,
        clock: Clock,
    ) -> None:
        self._config = config
        self._applying = applying
        self._vectors = vectors
        self._cluster = cluster
        self._resync = resync
        self._links = links
        self._status = status
        self._open_store = open_store
        self._heartbeat_interval = heartbeat_interval
        self._clock = clock
        self.checkpoints: list[dict[str, Any]] = []  # the newest position checkpoints, shown

    def jobs(self) -> list[Callable[[], Any]]:
        """The periodic jobs this configuration asks for, to run for the node's lifetime."""
        database = self._config.state.database
        jobs: list[Callable[[], Any]] = [
            self._expire_conflicts_periodically,
            self._refresh_vector_periodically,
            self._truncate_log_periodically,
            self._checkpoint_positions_periodically,
        ]
        if database.journal_mode.upper() == "WAL":
            jobs.append(self._checkpoint_wal_periodically)
        return jobs

    def read_checkpoints(self, store: Store) -> None:
        """Blocking: the newest position checkpoints, as the file holds them."""
        self.checkpoints = list_checkpoints(store.conn, CHECKPOINTS_SHOWN)

    async def take_checkpoint(self, reason: str) -> dict[str, Any]:
        """Record where every peer stands and what this node holds (for a later restore)."""
        recovery = self._config.replication.recovery
        peers = {
            peer_id: {
                "state": status.state,
                "acked_position": status.acked_position,
                "peer_vector": {str(o): seq for o, seq in status.peer_vector.items()},
            }
            for peer_id, status in sorted(self._status.items())
        }

        def take() -> dict[str, Any]:
            store = self._applying.store
            return take_checkpoint(
                store.conn, reason, store.version_vector(), peers, recovery.max_checkpoints
            )

        checkpoint = await self._applying.run(take)
        self.checkpoints = [checkpoint, *self.checkpoints][:CHECKPOINTS_SHOWN]
        return checkpoint

    async def forget(self) -> int:
        """Truncate the log and collect tombstones below what the whole cluster holds, one
        short transaction at a time so batches from peers are applied in between."""
        applier = self._applying.the_applier()
        conn = applier.store.conn

        async def step(function: Callable[..., _T], *args: Any) -> _T:
            return await self._applying.run(function, conn, *args)

        await self._applying.read_vector()
        now_ms = self._clock.wall_ms()
        retention_ms = int(self._config.replication.sync.log_retention * 1000)
        retention_hlc = hlc.pack(max(0, now_ms - retention_ms))
        floor = self._cluster.floor(self._vectors.held)
        first, cut = await step(retention.truncation_range, floor, retention_hlc)
        removed = past_floor = 0
        for start in range(first, cut, retention.CHUNK):
            done = await step(
                retention.truncate_chunk, floor, start, min(cut, start + retention.CHUNK)
            )
            removed, past_floor = removed + done.removed, past_floor + done.past_floor
        if past_floor:
            _log.warning("log entries past log_retention forgotten before every peer had them",
                         entries=past_floor)  # fmt: skip
        if removed:
            _log.info("log truncated below the cluster-wide floor", entries=removed)
            await self._applying.run(self._resync.refresh_floor)
        reports = self._cluster.snapshot(self._vectors.held, now_ms)
        bound = await step(retention.stable_bound, reports, floor)
        stamp_ordered = [
            table
            for table in applier.store.settings.tables
            if isinstance(applier.resolver_for(table), (TimestampResolver, ManualResolver))
        ]
        collected = 0
        while True:
            count = await step(retention.collect_tombstones, bound, retention_hlc, stamp_ordered)
            collected += count
            if count < retention.CHUNK:
                break
        if collected:
            _log.info("tombstones collected", tombstones=collected)
        return removed

    async def full_resync_on_schedule(self, schedule: str) -> None:
        """At each time of ``full_resync.schedule`` (cron, local time), pull a full snapshot
        from the connected peers in turn."""
        turn = 0
        while True:
            now = self._clock.time()
            due = croniter(schedule, datetime.datetime.fromtimestamp(now)).get_next(float)
            await trio.sleep(max(0.0, due - now))
            connected = sorted(self._links)
            if not connected:
                _log.warning("scheduled full resync skipped: no peer is connected")
                continue
            peer = connected[turn % len(connected)]
            turn += 1
            with contextlib.suppress(PeerDisconnected):
                await self._links[peer].pull(full=True, reason="full_resync.schedule")
                _log.info("scheduled full resync requested", **{KEY_PEER: peer})

    async def _checkpoint_wal_periodically(self) -> None:
        """Copy the WAL back into the database file off the apply path, and give its space
        back once it has grown (see `wal.checkpoint`)."""
        store = await trio.to_thread.run_sync(self._open_store)
        state = self._config.state
        path = store.settings.path
        saved_at = self._clock.monotonic()
        try:
            while True:
                await trio.sleep(_WAL_CHECK_INTERVAL)
                truncate = wal.size(path) > WAL_BOUND
                if state.auto_save and self._clock.monotonic() - saved_at >= state.save_interval:
                    truncate, saved_at = True, self._clock.monotonic()  # auto_save: all in the file
                await trio.to_thread.run_sync(
                    functools.partial(wal.checkpoint, store.conn, truncate)
                )
        finally:
            store.close()

    async def _expire_conflicts_periodically(self) -> None:
        """Manual conflicts left open past their timeout: the provisional winner stands."""
        timeout_ms = int(self._config.replication.conflict_resolution.manual_timeout * 1000)
        while True:
            await trio.sleep(min(10.0, timeout_ms / 2000))

            def expire() -> int:
                store = self._applying.store
                with write_transaction(store):
                    return conflicts.expire(store.conn, timeout_ms)

            expired = await self._applying.run(expire)
            if expired:
                _log.info("conflicts timed out: provisional winners kept", conflicts=expired)

    async def _refresh_vector_periodically(self) -> None:
        """Heartbeats carry the cached vector; applies refresh it, local commits do not. Read
        it once per heartbeat so a node that only writes locally still shows where it is (peers
        compare checksums only at equal vectors)."""
        while True:
            await trio.sleep(self._heartbeat_interval)
            await self._applying.read_vector()

    async def _truncate_log_periodically(self) -> None:
        while True:
            await trio.sleep(self._config.replication.sync.truncate_interval)
            await self.forget()

    async def _checkpoint_positions_periodically(self) -> None:
        while True:
            await trio.sleep(self._config.replication.recovery.checkpoint_interval)
            await self.take_checkpoint("checkpoint_interval")
