"""The node: one trio process, a tree of tasks you can read top-down in `Node.run`.

    run
    ├── detector      notices commits (any process) and wakes the senders
    ├── listener      accepts peers: handshake, Hello, then a Link
    └── dialer (each) one per configured peer: connect, Hello, Link; reconnect with backoff

SQLite calls block, so they run in worker threads, one connection per concern (the applier,
each link's log reader), each behind a limiter of one so a connection is never used by two
threads at once. A connection between two configured peers is kept once: when both dial each
other, both sides keep the one dialled by the node with the smaller id; a link whose peer has
been heard from lately is never displaced by a newcomer claiming the same id.

Nothing a peer does ends the process: every connection's task turns a failure into a logged
disconnect (peer id, reason) and, for dialled peers, a redial with backoff. Only the
configuration and the local database may stop the node, each with one line saying why.
Unknown connections are budgeted: a few handshakes in progress per source address and in all,
the rest closed at once, with the refusals logged at a throttled rate.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import functools
import os
import random
import resource
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio
from croniter import croniter

from protocol import (
    Change,
    Goodbye,
    Hello,
    Keyring,
    Origin,
    SessionSettings,
    Skip,
    stretch_passphrase,
)
from replicator.apply import conflicts
from replicator.apply.applier import Applier, ApplyResult
from replicator.apply.resolvers import ManualResolver, Resolver, TimestampResolver, make_resolver
from replicator.capture import dbcall, hlc, sqlite_errors, wal
from replicator.capture.detector import Detector
from replicator.capture.log_reader import LogReader
from replicator.capture.migrations import SCHEMA_VERSION
from replicator.capture.pacing import WritePacer
from replicator.capture.sqlite_errors import is_locked
from replicator.capture.store import Store, StoreSettings
from replicator.capture.tables import TableInfo
from replicator.config import Config
from replicator.durability.backup import BackupStore
from replicator.durability.history import record_config
from replicator.durability.persistence import RESYNC_BACKUP, Persistence
from replicator.durability.recovery import (
    StateInUse,
    StateRefusesWrites,
    open_state,
    refuse_if_in_use,
)
from replicator.errors import ConfigError, first_leaf
from replicator.log import KEY_PEER, Throttle, get_logger
from replicator.ops.api import ControlApi
from replicator.ops.control import serve_control
from replicator.ops.metrics import NodeMetrics
from replicator.state.counters import node_figures
from replicator.sync import divergence, retention
from replicator.sync.checkpoints import list_checkpoints, take_checkpoint
from replicator.sync.faults import Faults
from replicator.sync.filters import RowFilter
from replicator.sync.link import Link, LinkSettings, PauseSwitch, PeerStatus
from replicator.sync.membership import (
    ClusterView,
    HelloRefused,
    check_hello,
    fingerprint,
    shared_settings,
)
from replicator.sync.network import Listener, Network, TcpNetwork
from replicator.sync.peer import PeerClosed, PeerConnection, PeerDisconnected, PeerSettings
from replicator.sync.resync import Resync
from replicator.sync.snapshot import SnapshotError

__all__ = ["Node", "NodeOptions", "unbuilt_settings"]

_log = get_logger("node")
_T = TypeVar("_T")
CAPABILITIES = frozenset({"changes", "skips", "resend"})
_CHECKPOINTS_SHOWN = 10
_CHECKPOINT_INTERVAL = 0.5
_WAL_BOUND = 1 << 20  # bytes of WAL past which its space is given back
# Nodes beyond the configured peers kept in the cluster view: in a chain, the far ends.
_RELAYED_MEMBERS = 64
# accept() errors that mean "out of descriptors or memory for now": wait, do not crash.
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


# A connection that has sent nothing for this long may lose its place to a newcomer when the
# handshake limits are reached (a real peer speaks first, within a round trip of connecting),
# or sooner when the node runs out of descriptors.
_IDLE_SECONDS = 0.5
_IDLE_UNDER_PRESSURE = 0.2


@dataclass(slots=True)
class _Handshake:
    """An incoming connection between accept and Hello."""

    source: str
    started: float
    cancel: trio.CancelScope
    connection: PeerConnection


@dataclass(frozen=True, slots=True)
class NodeOptions:
    """Timing knobs tests may tighten; defaults suit production."""

    handshake_timeout: float = 5.0
    hello_timeout: float = 5.0
    backoff_initial: float = 0.1
    backoff_max: float = 5.0
    link: LinkSettings = field(default_factory=LinkSettings)
    max_handshakes: int = 64
    """Incoming connections allowed between accept and Hello, in all."""
    max_handshakes_per_source: int = 8
    """The same, from one source address."""
    log_interval: float = 30.0
    """Repeated log lines of one kind (refused connections, failed dials) at most this often."""
    network: Network = field(default_factory=TcpNetwork)
    """Where the node listens and dials: TCP, or in-memory streams in a test."""
    rng: random.Random = field(default_factory=random.Random)
    """The jitter of redials, seeded where a run must replay."""


def unbuilt_settings(config: Config) -> list[str]:
    """Settings that ask for a feature this version does not have: the node refuses to start
    with them rather than silently ignore them."""
    r, s = config.replication, config.state
    found = [
        f"{block} (an appliance block, not a replicator setting)" for block in config.foreign_blocks
    ]
    checks = {
        "replication.transformations.compress_data = false": not r.transformations["compress_data"],
        "replication.transformations.encrypt_data = false": not r.transformations["encrypt_data"],
        "replication.transport.tls": bool(r.transport.tls),
        "replication.transport.encryption = false": not r.transport.encryption,
        "replication.auth.key_rotation": r.auth.key_rotation is not None,
        'replication.sync.mode = "full"': r.sync.mode == "full",
        "replication.recovery.incremental.enabled = false": not r.recovery.incremental_enabled,
        "replication.recovery.full_resync.compression = false": (
            not r.recovery.full_resync_compression
        ),
        "replication.conflict_resolution.manual_resolution.require_approval": (
            r.conflict_resolution.require_approval
        ),
        "state.compression": s.compression,
        'state.sync.mode = "full"': s.sync_mode == "full",
        "state.sync.batch_size (replication.sync.batch_size sizes batches)": (
            s.sync_batch_size != 1000
        ),
        "state.sync.sync_timeout": s.sync_timeout != 10.0,
        "replication.conflict_resolution.manual_resolution.approvers": bool(
            r.conflict_resolution.approvers
        ),
        "replication.primary_addr / peer_addr (name peers: peers = [{ id, address }])": any(
            "@" in peer.id for peer in r.peers
        ),
    }
    found += [name for name, present in checks.items() if present]
    return found


class Node:
    def __init__(self, config: Config, options: NodeOptions | None = None) -> None:
        self.config = config
        sync = config.replication.sync
        self.options = options or NodeOptions(
            link=LinkSettings(
                batch_size=sync.batch_size,
                heartbeat_interval=sync.heartbeat_interval,
                liveness_timeout=sync.liveness_timeout,
            )
        )
        replication = config.replication
        self.node_id = replication.node_id
        self.peers = {peer.id: peer for peer in replication.peers}
        self.status = {peer.id: PeerStatus(peer.id, peer.address) for peer in replication.peers}
        self.store_settings = StoreSettings(
            path=config.state.path,
            node_id=self.node_id,
            tables=replication.replicated_tables(),
            pragmas=config.state.database.pragmas(),
            busy_timeout_ms=int(config.state.database.busy_timeout * 1000),
            schema_sql=_read_schema(config.state.schema),
        )
        self.links: dict[str, Link] = {}
        self.cluster = ClusterView(
            self.node_id,
            self.peers,
            max_clock_offset_ms=int(replication.conflict_resolution.max_clock_offset * 1000),
            relayed_limit=_RELAYED_MEMBERS,
        )
        self.faults = Faults()
        self._throttle = Throttle(self.options.log_interval)
        self._handshakes: dict[int, _Handshake] = {}  # between accept and Hello, oldest first
        self._listeners: list[Listener] = []
        self._pacer = WritePacer()
        self._log_changed = trio.Event()
        self._apply_limiter = trio.CapacityLimiter(1)
        self._applier: Applier | None = None
        self._settings: dict[str, str] = {}
        self._peer_settings: PeerSettings | None = None
        self._vector_cache: dict[Origin, int] = {}
        self._detector: Detector | None = None
        self.pause_switch = PauseSwitch()
        self.promoted = False
        self.alarms: dict[str, str] = {}
        self._peer_roles: dict[str, str] = {}
        self.started_at = time.time()
        self.origin: Origin | None = None
        self.row_filter: RowFilter | None = None
        self.resync = Resync(
            self.store_settings,
            replication.recovery,
            self._the_applier,
            self._apply_limiter,
            self.alarms,
            self._merged_snapshot,
            self.links,
            self._last_vector,
            self.filter_copy,
            before_full_merge=self._back_up_before_resync,
            pacer=self._pacer,
        )
        self._commit_is_quick = config.state.database.synchronous in ("OFF", "NORMAL")
        self._divergence_filter: RowFilter | None = None
        self._hashed_through = 0
        self._stopping = False
        self._divergence_lock = threading.Lock()
        self._counts: dict[str, Any] = {"open": 0, "by_table": {}, "quarantined": 0}
        self._state_store: dict[str, Any] | None = None  # the applications' key-value store
        self.last_validation: dict[str, Any] | None = None
        self.metrics = NodeMetrics(self.status_report)
        self._checkpoints: list[dict[str, Any]] = []
        self._wal = config.state.database.journal_mode.upper() == "WAL"
        self.persistence = Persistence(self, None)
        self._pull_full_from_a_peer: str | None = None
        self._link_ended = trio.Event()
        self._lacking_since: dict[str, float] = {}  # peers not connected and missing changes

    # -- the tree --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        unbuilt = unbuilt_settings(self.config)
        if unbuilt:
            raise ConfigError(
                f"{self.config.file}: not supported by this version: {', '.join(unbuilt)}",
                op="start",
                hint="remove these settings; replicator never ignores a setting silently",
            )
        _raise_descriptor_limit()
        # Before anything is written: a key file others can read, or a busy port, is a
        # one-line error, with no backup taken and no configuration recorded on the way.
        self.config.replication.auth.passphrases()
        self._listeners = await self._listen()
        try:
            await self._run(task_status)
        finally:
            for listener in self._listeners:
                with contextlib.suppress(OSError, trio.ClosedResourceError):
                    await trio.aclose_forcefully(listener)

    async def _listen(self) -> list[Listener]:
        replication = self.config.replication
        host, port = replication.listen_host, replication.listen_port
        try:
            return await self.options.network.listen(host, port)
        except OSError as error:
            raise ConfigError(
                f"{self.config.file}: replication.listen_addr: cannot listen on {host}:{port}: "
                f"{error.strerror or error}",
                op="start",
                hint="another process (another node with this configuration?) holds the port",
            ) from None

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        store = await self._prepare_when_writable()
        self._divergence_filter = self.filter_copy()
        self._peer_settings = await trio.to_thread.run_sync(self._peer_settings_from_config)
        self.origin = store.origin
        detector = Detector(self.store_settings, after=0, batch_size=self.options.link.batch_size)
        detector.position = await trio.to_thread.run_sync(store.log_position)
        replication = self.config.replication
        self._detector = detector
        self.started_at = time.time()
        async with trio.open_nursery() as nursery:
            await nursery.start(self.persistence.run)
            await nursery.start(
                serve_control, replication.control_socket, ControlApi(self).routes()
            )
            keep_running = self.persistence.keep_running
            nursery.start_soon(keep_running, self._expire_conflicts_periodically)
            nursery.start_soon(keep_running, functools.partial(self._watch_log, detector))
            nursery.start_soon(keep_running, self._refresh_vector_periodically)
            nursery.start_soon(keep_running, self._truncate_log_periodically)
            if self._wal:
                nursery.start_soon(keep_running, self._checkpoint_periodically)
            if replication.recovery.divergence_check:
                nursery.start_soon(keep_running, self._check_divergence_periodically)
            nursery.start_soon(keep_running, self._checkpoint_positions_periodically)
            if self._pull_full_from_a_peer is not None:
                nursery.start_soon(self._pull_full_snapshot, self._pull_full_from_a_peer)
            if replication.recovery.full_resync_schedule is not None:
                nursery.start_soon(self._full_resync_on_schedule)
            nursery.start_soon(self._watch_lag)
            for listener in self._listeners:
                nursery.start_soon(self._accept_loop, listener, nursery)
            for peer_id in self.peers:
                nursery.start_soon(self._dial_loop, peer_id)
            _log.info(
                "node started",
                node=self.node_id,
                mode=replication.mode,
                listen=f"{replication.listen_host}:{replication.listen_port}",
                tables=list(self.store_settings.tables),
                peers=list(self.peers),
            )
            task_status.started()

    async def _prepare_when_writable(self) -> Store:
        """A disk that refuses writes at start, or an application holding the write lock past
        the busy timeout, is waited out (the file is not damaged): the node comes up by itself
        once it can write, and SIGTERM still stops it meanwhile."""
        since: float | None = None
        while True:
            try:
                store = await trio.to_thread.run_sync(self._prepare)
            except (StateRefusesWrites, StateInUse) as error:
                if since is None:
                    since = time.monotonic()
                    if isinstance(error, StateInUse):
                        _log.warning("state database locked by another connection at start: "
                                     "waiting", error=error.message)  # fmt: skip
                    else:
                        _log.error("state database refuses writes at start: waiting for room",
                                   error=error.message)  # fmt: skip
                await trio.sleep(1.0)
                continue
            if since is not None:
                _log.warning("state database takes writes again: starting",
                             waited_seconds=round(time.monotonic() - since, 1))  # fmt: skip
            return store

    def _prepare(self) -> Store:
        os.makedirs(os.path.dirname(self.store_settings.path) or ".", mode=0o750, exist_ok=True)
        state = self.config.state
        backups = None
        if state.backup.enabled:
            backups = BackupStore(state.backup, self.node_id)
        elif self.config.replication.backup_before_resync:
            raise ConfigError(
                f"{self.config.file}: replication.backup_before_resync: needs state.backup "
                "(enabled = true and a directory)",
                op="start",
            )
        self.persistence.backups = backups
        store, self.last_validation, report = open_state(
            self.store_settings,
            state.recovery,
            backups,
            self._check_persistence,
            has_peers=bool(self.peers),
        )
        if report is not None:  # kept when a later step finds the file locked and retries
            self.persistence.recovery = report
            if report.needs_full_resync:
                self._pull_full_from_a_peer = f"recovery at start: {report.problem}"
        try:
            self._set_up(store)
        except sqlite3.OperationalError as error:
            store.close()
            if self._applier is not None:
                self._applier.store.close()
                self._applier = None
            refuse_if_in_use(self.store_settings.path, error)
            raise
        return store

    def _set_up(self, store: Store) -> None:
        """Role, configuration history, the applier and the filters, on the opened file."""
        mode = self.config.replication.mode
        clock = store.clock()
        self.promoted = clock.promoted
        if mode == "replica" and not clock.promoted:
            store.set_read_only(True)
        elif mode == "replica":
            _log.warning("configured as replica but promoted earlier: running as primary")
            store.set_read_only(False)
        else:
            store.set_read_only(False)
        if self.role != "replica":  # a replica's own rows would be refused by its triggers
            record_config(store.conn, self.config, self.node_id)
        conflicts = self.config.replication.conflict_resolution

        def resolver(strategy: str) -> Resolver:
            return make_resolver(
                strategy,
                clock_skew_tolerance_ms=int(conflicts.clock_skew_tolerance * 1000),
                near_tie=conflicts.near_tie,
                priorities=conflicts.priorities,
            )

        applier_store = self._open_store()
        if self._wal:
            # Checkpoints (and their fsyncs) run in a background task, not in an apply.
            applier_store.conn.execute("PRAGMA wal_autocheckpoint = 0")
        self._applier = Applier(
            applier_store,
            {table: resolver(strategy) for table, strategy in conflicts.tables.items()},
            resolver(conflicts.strategy),
            max_clock_offset_ms=int(conflicts.max_clock_offset * 1000),
        )
        replication = self.config.replication
        passphrase, _ = replication.auth.passphrases()
        self.row_filter = RowFilter(
            replication,
            store.tables,
            store.conn,
            f"{replication.cluster_id}\x00{passphrase}".encode(),
            self.config.file,
        )
        self._settings = self._offered_settings(store.tables)
        self.resync.refresh_floor()
        self.resync.clear_staging()
        self._checkpoints = list_checkpoints(store.conn, _CHECKPOINTS_SHOWN)

    def _offered_settings(self, tables: Mapping[str, TableInfo]) -> dict[str, str]:
        """What this node offers at Hello for peers to compare: the shared configuration and
        the replicated tables' current shapes."""
        filters = None if self.row_filter is None else self.row_filter.describe()
        return shared_settings(self.config.replication, tables, filters)

    def _peer_settings_from_config(self) -> PeerSettings:
        """Stretch the passphrases once (Argon2id is slow on purpose)."""
        replication = self.config.replication
        current, previous = replication.auth.passphrases()
        try:
            keyring = Keyring(
                stretch_passphrase(current, replication.cluster_id),
                None if previous is None else stretch_passphrase(previous, replication.cluster_id),
            )
        except ValueError as error:
            raise ConfigError(f"{self.config.file}: replication.auth.secret_key: {error}",
                              op="start") from None  # fmt: skip
        session = SessionSettings(compress=replication.transport.compression)
        return PeerSettings(
            replication.cluster_id, keyring, session, self.options.handshake_timeout
        )

    async def _watch_log(self, detector: Detector) -> None:
        """Wake every sender whenever the log grows (local commits or applied batches)."""
        limiter = trio.CapacityLimiter(1)
        shape_changes = detector.shape_changes
        while True:
            moved = await dbcall.call(detector.conn, limiter, detector.poll_position, inline=True)
            if detector.shape_changes != shape_changes:
                # An ALTER TABLE: the next Hello offers the new columns, so a peer that has
                # migrated too is taken back without a restart of this node.
                shape_changes = detector.shape_changes
                self._settings = self._offered_settings(detector.tables)
            if moved is not None:
                self._announce_log_change()
                if len(self.links) < len(self.peers):  # lag of a peer that is down starts now
                    for peer_id in self.peers.keys() - self.links.keys():
                        self._lag_seconds(peer_id)
                continue
            with trio.move_on_after(detector.poll_interval):
                await self._log_changed.wait()

    async def _refresh_vector_periodically(self) -> None:
        """Heartbeats carry the cached vector; applies refresh it, local commits do not. Read
        it once per heartbeat so a node that only writes locally still shows where it is (peers
        compare checksums only at equal vectors)."""
        while True:
            await trio.sleep(self.options.link.heartbeat_interval)
            await trio.to_thread.run_sync(self._vector_now, limiter=self._apply_limiter)

    def _announce_log_change(self) -> None:
        changed, self._log_changed = self._log_changed, trio.Event()
        changed.set()

    async def _wait_for_log(self, position: int) -> None:
        with trio.move_on_after(self.config.replication.sync.interval):
            await self._log_changed.wait()

    @property
    def role(self) -> str:
        """primary, replica, or peer (the multi-writer modes)."""
        mode = self.config.replication.mode
        if mode == "primary" or (mode == "replica" and self.promoted):
            return "primary"
        return "replica" if mode == "replica" else "peer"

    def _check_split_brain(self) -> None:
        primaries = sorted(peer for peer, role in self._peer_roles.items() if role == "primary")
        if self.role == "primary" and primaries:
            message = f"split brain: {self.node_id} and {', '.join(primaries)} are all primary"
            if self.alarms.get("split_brain") != message:
                _log.error("split-brain alarm", primaries=[self.node_id, *primaries])
            self.alarms["split_brain"] = message
        else:
            self.alarms.pop("split_brain", None)

    async def _watch_lag(self) -> None:
        """Raise (and log) an alarm while a peer leaves a batch unacknowledged past max_lag."""
        max_lag = self.config.replication.sync.max_lag
        while True:
            for peer_id in self.peers:
                lag = self._lag_seconds(peer_id)
                name = f"max_lag:{peer_id}"
                if lag > max_lag:
                    if name not in self.alarms:
                        _log.warning("replication lag above max_lag", lag_seconds=round(lag, 1),
                                     max_lag=max_lag, **{KEY_PEER: peer_id})  # fmt: skip
                    self.alarms[name] = (
                        f"{peer_id} has not acknowledged for {lag:.1f}s (max_lag {max_lag:g}s)"
                    )
                elif self.alarms.pop(name, None) is not None:
                    _log.info("replication lag back under max_lag", **{KEY_PEER: peer_id})
            await trio.sleep(min(1.0, max_lag / 2))

    def _lag_seconds(self, peer_id: str) -> float:
        """How long the peer has been missing changes: while connected, the oldest batch it
        is not known to hold; while not, since this node first saw it lacking something it
        holds (by what the peer last said it holds, itself or through gossip)."""
        link = self.links.get(peer_id)
        if link is not None:
            self._lacking_since.pop(peer_id, None)
            return link.lag_seconds
        position = self._detector.position if self._detector is not None else 0
        if position <= self.status[peer_id].acked_position or not self._peer_lacks(peer_id):
            self._lacking_since.pop(peer_id, None)
            return 0.0
        return time.monotonic() - self._lacking_since.setdefault(peer_id, time.monotonic())

    def _peer_lacks(self, peer_id: str) -> bool:
        status = self.status[peer_id]
        reported = self.cluster.report_of(peer_id)
        own = Origin(peer_id, status.incarnation) if status.incarnation is not None else None
        for origin, seq in self._vector_cache.items():
            if origin != own and seq > max(
                status.peer_vector.get(origin, 0), reported.get(origin, 0)
            ):
                return True
        return False

    async def _checkpoint_periodically(self) -> None:
        """Copy the WAL back into the database file off the apply path, and give its space
        back once it has grown (see `_checkpoint`)."""
        store = await trio.to_thread.run_sync(self._open_store)
        state = self.config.state
        saved_at = time.monotonic()
        try:
            while True:
                await trio.sleep(_CHECKPOINT_INTERVAL)
                truncate = wal.size(self.store_settings.path) > _WAL_BOUND
                if state.auto_save and time.monotonic() - saved_at >= state.save_interval:
                    truncate, saved_at = True, time.monotonic()  # auto_save: all in the file
                await trio.to_thread.run_sync(
                    functools.partial(wal.checkpoint, store.conn, truncate)
                )
        finally:
            store.close()

    async def _check_divergence_periodically(self) -> None:
        """Table checksums at start and every ``checksum_interval`` (sooner when a peer's
        heartbeat shows it at this node's vector): compared with peers' in heartbeats."""
        store = await trio.to_thread.run_sync(self._open_store)
        interval = self.config.replication.recovery.checksum_interval
        try:
            while True:
                await trio.to_thread.run_sync(self._check_divergence, store)
                with trio.move_on_after(interval):
                    await self.resync.recompute.wait()
                self.resync.recompute = trio.Event()
                await trio.sleep(0.2)  # let a burst of heartbeats settle
        finally:
            store.close()

    def _check_divergence(self, store: Store) -> None:
        """Blocking: record content hashes, compute checksums, mark rows edited behind
        replication's back."""
        with self._divergence_lock:  # the periodic pass, validate and a restore take turns
            self._hashed_through = self._check_divergence_locked(store, self._hashed_through)

    def _check_divergence_locked(self, store: Store, hashed_through: int) -> int:
        conn = store.conn
        while True:
            position, _ = divergence.fill_hashes(conn, hashed_through)
            if position == hashed_through:
                break
            hashed_through = position
        assert self.origin is not None
        conn.execute("BEGIN")
        try:
            vector = store.version_vector()
            checksums = divergence.compute(
                conn, store.tables, vector, self.origin, self._divergence_filter
            )
        finally:
            conn.execute("COMMIT")
        found = {
            name: check.tampered + check.missing
            for name, check in checksums.tables.items()
            if check.tampered or check.missing
        }
        if found:
            store.begin_immediate()
            try:
                for name, keys in found.items():
                    divergence.mark_tampered(conn, name, keys)
                store.commit()
            except BaseException:
                store.rollback()
                raise
            count = sum(len(keys) for keys in found.values())
            self.resync.tampered_found += count
            _log.warning("rows edited behind replication's back: repairing from a peer",
                         rows=count, tables=sorted(found))  # fmt: skip
        self.resync.checksums = checksums
        unmended = sorted(name for name, check in checksums.tables.items()
                          if check.tampered or check.missing or check.marked)  # fmt: skip
        if unmended:
            trio.from_thread.run(self.resync.repair_tampered, unmended)
        return hashed_through

    async def _full_resync_on_schedule(self) -> None:
        """At each time of ``full_resync.schedule`` (cron, local time), pull a full snapshot
        from the connected peers in turn."""
        schedule = self.config.replication.recovery.full_resync_schedule
        assert schedule is not None
        turn = 0
        while True:
            due = croniter(schedule, datetime.datetime.now()).get_next(float)
            await trio.sleep(max(0.0, due - time.time()))
            connected = sorted(self.links)
            if not connected:
                _log.warning("scheduled full resync skipped: no peer is connected")
                continue
            peer = connected[turn % len(connected)]
            turn += 1
            with contextlib.suppress(PeerDisconnected):
                await self.links[peer].pull(full=True, reason="full_resync.schedule")
                _log.info("scheduled full resync requested", **{KEY_PEER: peer})

    async def _checkpoint_positions_periodically(self) -> None:
        while True:
            await trio.sleep(self.config.replication.recovery.checkpoint_interval)
            await self.take_checkpoint("checkpoint_interval")

    async def take_checkpoint(self, reason: str) -> dict[str, Any]:
        recovery = self.config.replication.recovery
        peers = {
            peer_id: {
                "state": status.state,
                "acked_position": status.acked_position,
                "peer_vector": {str(o): seq for o, seq in status.peer_vector.items()},
            }
            for peer_id, status in sorted(self.status.items())
        }

        def take() -> dict[str, Any]:
            assert self._applier is not None
            store = self._applier.store
            return take_checkpoint(
                store.conn, reason, store.version_vector(), peers, recovery.max_checkpoints
            )

        checkpoint = await trio.to_thread.run_sync(take, limiter=self._apply_limiter)
        self._checkpoints = [checkpoint, *self._checkpoints][:_CHECKPOINTS_SHOWN]
        return checkpoint

    async def _expire_conflicts_periodically(self) -> None:
        """Manual conflicts left open past their timeout: the provisional winner stands."""
        timeout_ms = int(self.config.replication.conflict_resolution.manual_timeout * 1000)
        while True:
            await trio.sleep(min(10.0, timeout_ms / 2000))

            def expire() -> int:
                store = self.applier_store()
                store.begin_immediate()
                try:
                    expired = conflicts.expire(store.conn, timeout_ms)
                    store.commit()
                except BaseException:
                    store.rollback()
                    raise
                return expired

            expired = await trio.to_thread.run_sync(expire, limiter=self._apply_limiter)
            if expired:
                _log.info("conflicts timed out: provisional winners kept", conflicts=expired)

    async def _truncate_log_periodically(self) -> None:
        while True:
            await trio.sleep(self.config.replication.sync.truncate_interval)
            await self.forget()

    async def forget(self) -> int:
        """Truncate the log and collect tombstones below what the whole cluster holds, one
        short transaction at a time so batches from peers are applied in between."""
        assert self._applier is not None
        conn = self._applier.store.conn

        async def step(function: Callable[..., _T], *args: Any) -> _T:
            return await trio.to_thread.run_sync(
                functools.partial(function, conn, *args), limiter=self._apply_limiter
            )

        await trio.to_thread.run_sync(self._vector_now, limiter=self._apply_limiter)
        now_ms = hlc.wall_clock_ms()
        retention_ms = int(self.config.replication.sync.log_retention * 1000)
        retention_hlc = hlc.pack(max(0, now_ms - retention_ms))
        floor = self.cluster.floor(self._vector_cache)
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
            await trio.to_thread.run_sync(self.resync.refresh_floor, limiter=self._apply_limiter)
        reports = self.cluster.snapshot(self._vector_cache, now_ms)
        bound = await step(retention.stable_bound, reports, floor)
        stamp_ordered = [
            table
            for table in self.store_settings.tables
            if isinstance(self._applier.resolver_for(table), (TimestampResolver, ManualResolver))
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

    # -- operator view -----------------------------------------------------------------------

    # -- for the operator API (replicator.ops.api) -------------------------------------------

    @property
    def apply_limiter(self) -> trio.CapacityLimiter:
        return self._apply_limiter

    def applier_store(self) -> Store:
        return self._the_applier().store

    async def fresh_status(self) -> dict[str, Any]:
        """The status report, with the version vector and the counts read just now."""

        def read() -> None:
            self._vector_now()
            conn = self.applier_store().conn
            self._counts = conflicts.summary(conn)
            self._state_store = node_figures(conn, hlc.wall_clock_ms())

        await trio.to_thread.run_sync(read, limiter=self._apply_limiter)
        self._quarantine_alarm()
        return self.status_report()

    async def promote(self) -> dict[str, Any]:
        if self.role == "primary":
            return {"role": self.role, "changed": False}

        def promote() -> None:
            self.applier_store().set_read_only(False, promoted=True)

        await trio.to_thread.run_sync(promote, limiter=self._apply_limiter)
        self.promoted = True
        _log.warning("promoted: this node now accepts local writes", node=self.node_id)
        self._check_split_brain()
        return {"role": self.role, "changed": True}

    async def check_divergence_now(self) -> None:
        """Checksums computed now (for validate), on a connection of its own."""
        store = await trio.to_thread.run_sync(self._open_store)
        try:
            await trio.to_thread.run_sync(self._check_divergence, store)
        finally:
            store.close()

    def announce_log_change(self) -> None:
        self._announce_log_change()

    # -- for persistence (backups, restores, a disk refusing writes) -------------------------

    @property
    def divergence_lock(self) -> threading.Lock:
        return self._divergence_lock

    def forget_row_hashes(self) -> None:
        """The file's contents were replaced: hash every row again (divergence lock held)."""
        self._hashed_through = 0

    def _state_unavailable(self) -> str | None:
        """Why links are refused just now (None: they are not)."""
        persistence = self.persistence
        if persistence.restoring is not None:
            return f"restoring backup {persistence.restoring}"
        if persistence.degraded is not None:
            return "this node's state database refuses writes"
        return None

    async def close_links(self, reason: str) -> None:
        """Close every link and wait until each has stopped applying (a few seconds at most)."""
        for link in list(self.links.values()):
            with contextlib.suppress(PeerDisconnected, trio.BrokenResourceError,
                                     trio.ClosedResourceError):  # fmt: skip
                await link.close(reason)
        with trio.move_on_after(5.0):
            while self.links:
                await self._link_ended.wait()
        for link in list(self.links.values()):
            await link.connection.abort()

    async def after_restore(self, origin: Origin) -> None:
        """The file now holds a backup under a new incarnation: forget what described the
        old contents, so senders scan the restored log and peers are asked for the rest."""
        assert self._detector is not None
        self.origin = origin

        def reread() -> tuple[int, list[dict[str, Any]]]:
            store = self.applier_store()
            store.set_read_only(self.role == "replica", promoted=self.promoted)
            self._vector_now()
            self.resync.refresh_floor()
            self._counts = conflicts.summary(store.conn)
            return store.log_position(), list_checkpoints(store.conn, _CHECKPOINTS_SHOWN)

        position, self._checkpoints = await trio.to_thread.run_sync(
            reread, limiter=self._apply_limiter
        )
        self._detector.position = position
        for status in self.status.values():
            status.sent_position = status.acked_position = 0
            status.peer_vector = {}
        self.resync.recompute.set()
        self._announce_log_change()

    async def _pull_full_snapshot(self, reason: str) -> None:
        """After recovery emptied the file: a full snapshot from the first peer that answers."""
        while True:
            for peer_id, link in sorted(self.links.items()):
                with contextlib.suppress(PeerDisconnected):
                    await link.pull(full=True, reason=reason)
                    _log.warning("full resync requested after recovery", **{KEY_PEER: peer_id})
                    return
            await trio.sleep(0.2)

    async def _back_up_before_resync(self, peer: str) -> None:
        """``backup_before_resync``: the state as it was, before a full snapshot merges in."""
        if not self.config.replication.backup_before_resync:
            return
        try:
            info = await self.persistence.create(f"{RESYNC_BACKUP} from {peer}")
            await self.persistence.expire_resync_backups()
        except Exception as error:  # no merge without the backup the operator asked for
            raise SnapshotError(f"backup_before_resync failed: {error}") from error
        _log.info("backup taken before a full resync", backup=info.name, **{KEY_PEER: peer})

    def status_report(self) -> dict[str, Any]:
        replication = self.config.replication
        position = self._detector.position if self._detector is not None else 0
        now = time.time()
        peers = []
        for peer_id, status in self.status.items():
            link = self.links.get(peer_id)
            lag = self._lag_seconds(peer_id)
            peers.append(
                {
                    "id": peer_id,
                    "address": status.address,
                    "state": status.state,
                    "last_contact": status.last_contact,
                    "seconds_since_contact": None
                    if status.last_contact is None
                    else round(now - status.last_contact, 3),
                    "sent_position": status.sent_position,
                    "acked_position": status.acked_position,
                    "lag_changes": max(0, position - status.acked_position),
                    "lag_seconds": round(lag, 3),
                    "skew_ms": status.skew_ms,
                    "bytes_in": status.bytes_in,
                    "bytes_out": status.bytes_out,
                    "changes_sent": status.changes_sent,
                    "changes_received": status.changes_received,
                    "in_flight_batches": link.in_flight if link is not None else 0,
                    "last_error": status.last_error,
                    "last_error_at": status.last_error_at,
                }
            )
        return {
            "node_id": self.node_id,
            "mode": replication.mode,
            "role": self.role,
            "paused": self.pause_switch.paused,
            "alarms": sorted(self.alarms.values()),
            "cluster_id": replication.cluster_id,
            "origin": str(self.origin),
            "listen": f"{replication.listen_host}:{replication.listen_port}",
            "uptime_seconds": round(now - self.started_at, 3),
            "log_position": position,
            "version_vector": {str(o): seq for o, seq in self._vector_cache.items()},
            "peers": peers,
            "snapshots": self.resync.report(),
            "divergence": self.resync.divergence_report(),
            "checkpoints": self._checkpoints,
            "conflicts": {"open": self._counts["open"], "by_table": self._counts["by_table"]},
            "quarantined": self._counts["quarantined"],
            "quarantine": {
                "held": self._counts["quarantined"],
                "limit": self._applier.quarantine_limit if self._applier is not None else None,
                "dropped": self._applier.quarantine_dropped if self._applier is not None else 0,
            },
            "peer_faults": self.faults.as_dict(),
            "write_lock": self._pacer.report(),
            "state_store": self._state_store,
            "persistence": self.persistence.status(),
        }

    async def shutdown(self) -> None:
        """Say goodbye to every peer (briefly: a dead peer must not hold up the stop)."""
        self._stopping = True
        with trio.move_on_after(2):
            async with trio.open_nursery() as nursery:
                for link in list(self.links.values()):
                    nursery.start_soon(link.close, "node shutting down")

    # -- connections -----------------------------------------------------------------------

    async def _accept_loop(self, listener: Listener, nursery: trio.Nursery) -> None:
        """Accept peers until cancelled. Running out of descriptors never crashes: a
        connection that has said nothing for a while gives its descriptor up, or the loop
        waits (and says so, at a throttled rate)."""
        while True:
            try:
                stream = await listener.accept()
            except OSError as error:
                if error.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                self.faults.count("accept_errors")
                suppressed = self._throttle.allow("accept")
                if suppressed is not None:
                    _log.warning("cannot accept connections for now", reason=error.strerror,
                                 suppressed=suppressed)  # fmt: skip
                await trio.sleep(0.01 if self._evict_idle(None, _IDLE_UNDER_PRESSURE) else 0.1)
                continue
            nursery.start_soon(self._accept, stream)

    async def _accept(self, stream: trio.abc.Stream) -> None:
        label, source = self.options.network.remote(stream)
        if not self._room_for(source):
            self.faults.count("handshake_limit")
            await trio.aclose_forcefully(stream)
            suppressed = self._throttle.allow("handshake_limit")
            if suppressed is not None:
                _log.warning("incoming connection refused: too many handshakes in progress",
                             remote=label, suppressed=suppressed)  # fmt: skip
            return
        assert self._peer_settings is not None
        connection = PeerConnection.responder(stream, self._peer_settings, label)
        pending = _Handshake(source, time.monotonic(), trio.CancelScope(), connection)
        self._handshakes[id(pending)] = pending
        hello = None
        try:
            with pending.cancel:
                try:
                    await connection.handshake(self._peer_settings.handshake_timeout)
                except PeerDisconnected as error:
                    self.faults.count("handshake")
                    suppressed = self._throttle.allow("handshake_failed")
                    if suppressed is not None:
                        _log.warning("incoming connection refused", remote=label,
                                     reason=error.message, suppressed=suppressed)  # fmt: skip
                    return
                hello = await self._greet(connection, dialled=None)
            if pending.cancel.cancelled_caught:  # evicted: it had said nothing for too long
                self.faults.count("handshake_evicted")
                await connection.abort()
                return
        finally:
            self._handshakes.pop(id(pending), None)
        if hello is not None:
            await self._serve(connection, hello, initiator=None)

    def _room_for(self, source: str) -> bool:
        """Whether a connection from ``source`` may start a handshake now: within the limits,
        or once an idle one (silent since it connected) has been evicted to make room."""
        limits = self.options
        here = sum(1 for pending in self._handshakes.values() if pending.source == source)
        if here >= limits.max_handshakes_per_source:
            return self._evict_idle(source, _IDLE_SECONDS)
        if len(self._handshakes) >= limits.max_handshakes:
            return self._evict_idle(None, _IDLE_SECONDS)
        return True

    def _evict_idle(self, source: str | None, idle: float) -> bool:
        """Cancel the oldest handshake (of ``source``, if given) that has received nothing
        in ``idle`` seconds since it connected; True if there was one."""
        now = time.monotonic()
        for key, pending in self._handshakes.items():
            if (
                (source is None or pending.source == source)
                and pending.connection.bytes_received == 0
                and now - pending.started >= idle
            ):
                pending.cancel.cancel()
                del self._handshakes[key]
                return True
        return False

    async def _dial_loop(self, peer_id: str) -> None:
        peer = self.peers[peer_id]
        log = _log.bind(**{KEY_PEER: peer_id})
        delay = self.options.backoff_initial
        use_previous = False
        failures = 0
        assert self._peer_settings is not None
        while True:
            if peer_id in self.links:
                await trio.sleep(self.options.backoff_max * self.options.rng.uniform(0.5, 1))
                continue
            if self.persistence.degraded is not None:  # it would be refused: wait for room
                await self.persistence.writable.wait()
            self.status[peer_id].state = "connecting"
            try:
                connection = await PeerConnection.dial(
                    peer.host,
                    peer.port,
                    self._peer_settings,
                    use_previous_key=use_previous,
                    connect=self.options.network.connect,
                )
            except PeerDisconnected as error:
                self.status[peer_id].failed(error.message)
                if self.status[peer_id].state == "connecting":
                    self.status[peer_id].state = "disconnected"
                # During a key rotation the peer may hold only the previous key.
                if self._peer_settings.keyring.previous is not None:
                    use_previous = not use_previous
                failures += 1
                if self._throttle.allow(("dial", peer_id)) is not None:
                    log.warning("cannot reach peer", address=peer.address, reason=error.message,
                                attempts=failures, retry_in=round(delay, 2))  # fmt: skip
                await trio.sleep(delay * self.options.rng.uniform(0.5, 1.5))
                delay = min(delay * 2, self.options.backoff_max)
                continue
            if failures:
                log.info("peer reachable again", address=peer.address, attempts=failures)
            delay, failures = self.options.backoff_initial, 0
            hello = await self._greet(connection, dialled=peer_id)
            if hello is None:  # refused: wait as after a failed dial
                await trio.sleep(self.options.backoff_max * self.options.rng.uniform(0.5, 1))
                continue
            await self._serve(connection, hello, initiator=self.node_id)

    async def _greet(self, connection: PeerConnection, dialled: str | None) -> Hello | None:
        """Hello both ways; None (the connection closed, the reason logged) if the peer may
        not have a link now. ``dialled``: the peer id this node dialled."""
        unavailable = self._state_unavailable()
        if unavailable is not None:
            _log.info("connection closed", remote=connection.label, reason=unavailable)
            await connection.close(unavailable)
            return None
        try:
            hello = await self._exchange_hello(connection)
            if dialled is not None and hello.node_id != dialled:
                raise HelloRefused(
                    f"dialled {dialled} at {connection.label}, but the peer says it is "
                    f"{hello.node_id!r}",
                    op="hello",
                    peer=dialled,
                    hint="check the peer's address in replication.peers",
                )
        except PeerClosed as error:  # it closed first (a duplicate of a simultaneous dial)
            _log.info("connection closed by the peer during Hello", remote=connection.label,
                      reason=error.message)  # fmt: skip
            await connection.abort()
            return None
        except (PeerDisconnected, HelloRefused) as error:
            self.faults.count("hello")
            source = dialled or connection.label.rpartition(":")[0]
            if self._throttle.allow(("hello", source)) is not None:
                _log.warning("peer refused", remote=connection.label, reason=str(error),
                             **({KEY_PEER: dialled} if dialled else {}))  # fmt: skip
            await connection.abort()
            return None
        return hello

    async def _serve(self, connection: PeerConnection, hello: Hello, initiator: str | None) -> None:
        """Run the link until it ends. Whatever goes wrong with one peer ends that link (logged
        with the peer id and the reason), never the node; only a broken local database
        stops it."""
        peer_id = hello.node_id
        log = _log.bind(**{KEY_PEER: peer_id})
        link: Link | None = None
        try:
            link = await self._admit(connection, hello, initiator, log)
            if link is None:
                return
            try:
                await self._run_link(link)
                log.info("peer link closed")
            finally:
                await self._link_done(peer_id, link)
        except PeerDisconnected as error:
            if self._stopping:
                log.info("peer link closed", reason="node shutting down")
            elif link is not None and self.links.get(peer_id) not in (None, link):
                log.info("peer link closed", reason="replaced by a newer connection")
            else:
                self.status[peer_id].failed(error.message)
                log.warning("peer disconnected", reason=error.message)
        except Exception as error:
            fault = sqlite_errors.unusable(error)
            if fault is not None:
                raise fault from error
            leaf = first_leaf(error)
            reason = f"{type(leaf).__name__}: {leaf}"
            self.faults.count("link_error")
            self.status[peer_id].failed(reason)
            if self._throttle.allow(("link_error", peer_id)) is not None:
                # A database condition (out of descriptors, say) is no bug: no traceback.
                log.error("peer link failed: disconnected", reason=reason,
                          exc_info=None if isinstance(leaf, sqlite3.Error) else leaf)  # fmt: skip
        finally:
            await connection.abort()

    async def _admit(
        self, connection: PeerConnection, hello: Hello, initiator: str | None, log: Any
    ) -> Link | None:
        """The link for this connection, or None when it must not replace the peer's link."""
        peer_id = hello.node_id
        self.alarms.pop(f"needs_snapshot:{peer_id}", None)  # the link raises it again if so
        preferred = min(self.node_id, peer_id)
        dialled_by = initiator if initiator is not None else peer_id
        existing = self.links.get(peer_id)
        if existing is not None:
            settled = time.monotonic() - existing.started_at >= self._settle_seconds
            if settled and existing.heard_within(self._fresh_seconds):
                # A live link stays: a newcomer with the same id is a duplicate at best, an
                # impostor at worst.
                self.faults.count("identity")
                if self._throttle.allow(("duplicate", peer_id)) is not None:
                    log.warning("connection refused: this peer's link is alive",
                                remote=connection.label, dialled_by=dialled_by)  # fmt: skip
                await connection.close("duplicate connection")
                return None
            if not settled and dialled_by != preferred:
                # Both dialled at once: both sides keep the connection the smaller id dialled.
                log.debug("duplicate connection closed", dialled_by=dialled_by)
                await connection.close("duplicate connection")
                return None
            # The preferred connection of a simultaneous dial, or one replacing a dead link.
            await existing.close(
                "replaced by the preferred connection" if not settled else "replaced: link silent"
            )
        link = Link(
            connection,
            hello,
            self.status[peer_id],
            node_id=self.node_id,
            settings=self.options.link,
            outgoing=self._outgoing_filter(),
            read_log=LogReader(
                self.store_settings,
                Origin(hello.node_id, hello.incarnation),
                self._log_end,
            ),
            apply=self._apply,
            wait_for_log=self._wait_for_log,
            vector=self._last_vector,
            cluster=self.cluster,
            snapshots=self.resync,
            pause=self.pause_switch,
            alarms=self.alarms,
            faults=self.faults,
        )
        behind = self._changes_behind(hello.version_vector)
        recovery = self.config.replication.recovery
        last = self.resync.last_sent(peer_id)
        rested = last is None or time.time() - last >= recovery.resync_interval
        if recovery.auto_resync and behind > recovery.resync_threshold and rested:
            # At most one finished snapshot per resync_interval: a peer that keeps falling
            # behind is streamed the log instead.
            link.request_snapshot(
                f"{behind} changes behind (resync_threshold {recovery.resync_threshold})"
            )
        self.links[peer_id] = link
        log.info("peer connected", remote=connection.label, dialled_by=dialled_by)
        return link

    async def _link_done(self, peer_id: str, link: Link) -> None:
        if self.links.get(peer_id) is not link:  # replaced by a newer connection
            return
        del self.links[peer_id]
        ended, self._link_ended = self._link_ended, trio.Event()
        ended.set()
        self.status[peer_id].state = "disconnected"
        self._peer_roles.pop(peer_id, None)
        self._check_split_brain()
        with trio.CancelScope(shield=True):
            await self.resync.abandon(peer_id)

    @property
    def _settle_seconds(self) -> float:
        """How young a link may be and still lose to a connection dialled at the same time."""
        return max(1.0, 2 * self.options.link.heartbeat_interval)

    @property
    def _fresh_seconds(self) -> float:
        """How recently a link's peer must have spoken for the link to count as alive."""
        return max(2.0, 3 * self.options.link.heartbeat_interval)

    async def _run_link(self, link: Link) -> None:
        """The link, with a write the disk refused (in a snapshot merge, say) turned into the
        end of this link and a pause of replication, instead of the end of the node."""
        try:
            await link.run()
        except BaseExceptionGroup as group:
            refused, rest = group.split(sqlite3.DatabaseError)
            if refused is None or rest is not None:
                raise
            error = first_leaf(refused)
            if not self.persistence.write_failed(error, "a peer link"):
                raise
            raise PeerDisconnected(f"state database refuses writes: {error}") from None
        except sqlite3.DatabaseError as error:
            if not self.persistence.write_failed(error, "a peer link"):
                raise
            raise PeerDisconnected(f"state database refuses writes: {error}") from None

    async def _exchange_hello(self, connection: PeerConnection) -> Hello:
        vector = await trio.to_thread.run_sync(self._vector_now, limiter=self._apply_limiter)
        assert self.origin is not None
        hello = Hello(
            node_id=self.node_id,
            incarnation=self.origin.incarnation,
            capabilities=CAPABILITIES | {f"role:{self.role}"},
            schema_version=SCHEMA_VERSION,
            settings_fingerprint=fingerprint(self._settings),
            version_vector=vector,
            settings=self._settings,
        )
        try:
            with trio.fail_after(self.options.hello_timeout):
                await connection.send(hello)
                reply = await connection.receive()
        except trio.TooSlowError:
            raise PeerDisconnected(
                f"no Hello within {self.options.hello_timeout:g}s", op="hello",
                peer=connection.label,
            ) from None  # fmt: skip
        if isinstance(reply, Goodbye):
            raise PeerClosed(f"peer said goodbye: {reply.reason}", op="hello")
        if not isinstance(reply, Hello):
            raise HelloRefused(f"expected Hello, got {type(reply).__name__}", op="hello")
        check_hello(reply, local_id=self.node_id, expected=self.peers, settings=self._settings)
        role = _role_of(reply)
        configured = self.peers[reply.node_id].role
        if configured in ("primary", "replica") and configured != role:
            _log.warning("peer runs in another role than configured", configured=configured,
                         announced=role, **{KEY_PEER: reply.node_id})  # fmt: skip
        self._peer_roles[reply.node_id] = role
        self._check_split_brain()
        return reply

    # -- database work in threads ----------------------------------------------------------

    async def _apply(
        self, changes: Sequence[Change], skips: Sequence[Skip]
    ) -> tuple[ApplyResult, dict[Origin, int]]:
        """Apply a batch in transactions the pacer sizes (each short, each followed by a rest
        that lets the application's writers in); acknowledged once all committed."""
        total = ApplyResult()
        start = 0
        while True:
            size = self._pacer.piece_size()
            final = start + size >= len(changes)
            await self._pacer.wait_turn()
            result = await self._apply_piece(changes[start : start + size], skips, final=final)
            total.add(result)
            if final:
                self._note_refused(total)
                if self._wal and wal.size(self.store_settings.path) > _WAL_BOUND:
                    await self._reset_wal()
                return total, total.held
            start += size

    async def _reset_wal(self) -> None:
        """A catch-up's short transactions rewrite the same pages, so the WAL grows to several
        times the data they bring: on a disk with little room it would fill it, and then no
        checkpoint could grow the file to empty the WAL. Give its space back once it is large
        (without waiting for anyone: if readers hold it, the next batch tries again)."""
        assert self._applier is not None
        conn = self._applier.store.conn

        def reset() -> None:
            with contextlib.suppress(sqlite3.OperationalError):  # refused: the pause handles it
                wal.checkpoint(conn, truncate=True)

        await trio.to_thread.run_sync(reset, limiter=self._apply_limiter)

    def _note_refused(self, result: ApplyResult) -> None:
        """Count what a batch held that could not be applied, and keep the alarms true."""
        if result.not_replicated:
            self.faults.count("not_replicated_table", result.not_replicated)
        if result.malformed:
            self.faults.count("malformed_change", result.malformed)
        if result.quarantined:
            self._counts["quarantined"] += result.quarantined
            self._quarantine_alarm()

    def _quarantine_alarm(self) -> None:
        held = self._counts["quarantined"]
        dropped = self._applier.quarantine_dropped if self._applier is not None else 0
        if held:
            self.alarms["quarantine"] = (
                f"{held} changes from peers could not be applied here and are quarantined "
                "(table _repl_quarantine)"
            )
        else:
            self.alarms.pop("quarantine", None)
        if dropped:
            self.alarms["quarantine_full"] = (
                f"the quarantine is full: {dropped} more changes that could not be applied "
                "were dropped"
            )

    async def _apply_piece(
        self, changes: Sequence[Change], skips: Sequence[Skip], *, final: bool
    ) -> ApplyResult:
        assert self._applier is not None
        conn = self._applier.store.conn
        # A commit that waits for the disk (synchronous FULL) is never made on the loop.
        few = len(changes) + len(skips) <= dbcall.INLINE_ENTRIES and self._commit_is_quick
        while True:
            try:
                return await dbcall.call(
                    conn,
                    self._apply_limiter,
                    functools.partial(self._apply_sync, changes, skips, final),
                    inline=few,
                )
            except sqlite3.OperationalError as error:
                if self.persistence.write_failed(error, "applying a batch"):
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
        assert self._applier is not None
        result = self._applier.apply(changes, skips, final=final)
        self._pacer.applied(len(changes) + len(skips), self._applier.store.last_hold)
        self._vector_cache = result.held
        return result

    def _check_persistence(self, store: Store) -> None:
        """``state.persistence``: what the appliance keeps must be in the state database."""
        replication = self.config.replication
        present = {
            name for (name,) in store.conn.execute(
                "SELECT name FROM sqlite_schema WHERE type = 'table'"
            )
        }  # fmt: skip
        for category, wanted in sorted(self.config.state.persistence.items()):
            tables = replication.categories.get(category, (category,))
            missing = [t for t in tables if t not in present]
            if wanted and missing:
                raise ConfigError(
                    f"{self.config.file}: state.persistence.{category}: no table "
                    f"{', '.join(missing)} in {self.store_settings.path}",
                    op="start",
                    hint="create it (state.schema) or set it to false",
                )

    def _outgoing_filter(self) -> Callable[[Change], Change | None] | None:
        """Each link's own view of outgoing changes (None: every change travels as is)."""
        if self.row_filter is None or not self.row_filter.active:
            return None
        return self.row_filter.copy().outgoing

    def filter_copy(self) -> RowFilter | None:
        if self.row_filter is None or not self.row_filter.active:
            return None
        return self.row_filter.copy()

    def _the_applier(self) -> Applier:
        assert self._applier is not None, "the node is not prepared yet"
        return self._applier

    def _changes_behind(self, vector: Mapping[Origin, int]) -> int:
        """How many changes this node holds that a peer with ``vector`` lacks."""
        return sum(
            max(0, seq - vector.get(origin, 0)) for origin, seq in self._vector_cache.items()
        )

    def _merged_snapshot(self, vector: dict[Origin, int]) -> None:
        self._vector_cache = vector

    def _vector_now(self) -> dict[Origin, int]:
        assert self._applier is not None
        self._vector_cache = self._applier.store.version_vector()
        return self._vector_cache

    def _open_store(self) -> Store:
        """A connection of the node's own, its write transactions timed by the pacer."""
        store = Store.open(self.store_settings, prepare=False)
        store.hold_observer = self._pacer.held
        return store

    def _log_end(self) -> int:
        return 0 if self._detector is None else self._detector.position

    def _last_vector(self) -> dict[Origin, int]:
        return dict(self._vector_cache)


def _role_of(hello: Hello) -> str:
    for capability in hello.capabilities:
        if capability.startswith("role:"):
            return capability.removeprefix("role:")
    return "peer"


def _read_schema(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path) as schema:
            return schema.read()
    except OSError as error:
        raise ConfigError(f"state.schema: cannot read {path}: {error.strerror}") from None


def _raise_descriptor_limit() -> None:
    """Raise the soft limit on open files to the hard one: every peer, handshake and SQLite
    connection costs descriptors, and a flood of connections must not exhaust them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    for target in (wanted, 1 << 16):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(target, wanted), hard))
            return
