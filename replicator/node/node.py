"""The node: one trio process, a tree of tasks you can read top-down in `Node.run`.

    run
    ├── persistence   backups on schedule, restores, the probe of a disk that refused writes
    ├── control       the operator API on the control socket
    ├── detector      notices commits (any process) and wakes the senders
    ├── housekeeping  WAL checkpoints, conflict expiry, log truncation, position checkpoints
    ├── divergence    table checksums, compared with peers'
    ├── lag           the max_lag alarm
    ├── listener      accepts peers: handshake, Hello, then a Link      (see connections.py)
    └── dialer (each) one per configured peer: connect, Hello, Link; reconnect with backoff

`Node` wires the parts and owns the state file's life (prepare, restore, promote); the parts
share small typed objects (`Alarms`, `VectorCache`, `ApplyHandle`) instead of reaching into it.
SQLite calls block, so they run in worker threads, one connection per concern (the applier,
each link's log reader, the detector, the checksums), the applier's behind a limiter of one.
Nothing a peer does ends the process; only the configuration and the local database may stop
the node, each with one line saying why.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
import threading
from collections.abc import Callable, Mapping
from typing import Any

import trio

from protocol import Change, Keyring, Origin, SessionSettings, stretch_passphrase
from replicator.apply import conflicts
from replicator.apply.applier import Applier
from replicator.apply.resolvers import Resolver, make_resolver
from replicator.capture import dbcall
from replicator.capture.detector import Detector
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
from replicator.errors import ConfigError
from replicator.log import KEY_PEER, Throttle, get_logger
from replicator.node.alarms import Alarms
from replicator.node.applying import ApplyHandle
from replicator.node.connections import Connections
from replicator.node.divergence_watch import DivergenceWatch
from replicator.node.housekeeping import Housekeeping
from replicator.node.lag import LagWatch
from replicator.node.options import NodeOptions
from replicator.node.startup import (
    check_persistence,
    raise_descriptor_limit,
    read_schema,
    unbuilt_settings,
)
from replicator.node.status import StatusBoard
from replicator.node.vectors import VectorCache
from replicator.ops.api import ControlApi
from replicator.ops.control import serve_control
from replicator.ops.metrics import NodeMetrics
from replicator.ops.report import StatusReport
from replicator.state.counters import node_figures
from replicator.sync.faults import Faults
from replicator.sync.filters import RowFilter
from replicator.sync.link import Link, LinkSettings, PauseSwitch, PeerStatus
from replicator.sync.membership import ClusterView, shared_settings
from replicator.sync.network import Listener
from replicator.sync.peer import PeerDisconnected, PeerSettings
from replicator.sync.resync import Resync
from replicator.sync.snapshot import SnapshotError

__all__ = ["Node"]

_log = get_logger("node")
# Nodes beyond the configured peers kept in the cluster view: in a chain, the far ends.
_RELAYED_MEMBERS = 64


class Node:
    def __init__(self, config: Config, options: NodeOptions | None = None) -> None:
        self.config = config
        replication = config.replication
        sync, database = replication.sync, config.state.database
        self.options = options or NodeOptions(
            link=LinkSettings(
                batch_size=sync.batch_size,
                heartbeat_interval=sync.heartbeat_interval,
                liveness_timeout=sync.liveness_timeout,
            )
        )
        clock = self.options.clock
        self.node_id = replication.node_id
        self.peers = {peer.id: peer for peer in replication.peers}
        self.status = {peer.id: PeerStatus(peer.id, peer.address) for peer in replication.peers}
        self.store_settings = StoreSettings(
            path=config.state.path,
            node_id=self.node_id,
            tables=replication.replicated_tables(),
            pragmas=database.pragmas(),
            busy_timeout_ms=int(database.busy_timeout * 1000),
            schema_sql=read_schema(config.state.schema),
        )
        self.links: dict[str, Link] = {}
        self.cluster = ClusterView(
            self.node_id,
            self.peers,
            max_clock_offset_ms=int(replication.conflict_resolution.max_clock_offset * 1000),
            relayed_limit=_RELAYED_MEMBERS,
        )
        self.faults = Faults()
        self.alarms = Alarms()
        self.vectors = VectorCache()
        self.pause_switch = PauseSwitch()
        self.promoted = False
        self.origin: Origin | None = None
        self.row_filter: RowFilter | None = None
        self.last_validation: dict[str, Any] | None = None
        self._throttle = Throttle(self.options.log_interval)
        self._listeners: list[Listener] = []
        self._log_changed = trio.Event()
        self._detector: Detector | None = None
        self._pull_full_from_a_peer: str | None = None
        self.persistence = Persistence(self, None)
        self.applying = ApplyHandle(
            path=self.store_settings.path,
            wal_mode=database.journal_mode.upper() == "WAL",
            commit_is_quick=database.synchronous in ("OFF", "NORMAL"),
            vectors=self.vectors,
            alarms=self.alarms,
            faults=self.faults,
            throttle=self._throttle,
            write_failed=self.persistence.write_failed,
            clock=clock,
        )
        self.resync = Resync(
            self.store_settings,
            replication.recovery,
            self.applying.the_applier,
            self.applying.limiter,
            self.alarms,
            self.vectors.set,
            self.links,
            self.vectors.copy,
            self.filter_copy,
            before_full_merge=self._back_up_before_resync,
            pacer=self.applying.pacer,
            clock=clock,
            rng=self.options.rng,
        )
        self.connections = Connections(
            node_id=self.node_id,
            peers=self.peers,
            status=self.status,
            links=self.links,
            options=self.options,
            recovery=replication.recovery,
            store_settings=self.store_settings,
            cluster=self.cluster,
            resync=self.resync,
            applying=self.applying,
            vectors=self.vectors,
            persistence=self.persistence,
            pause=self.pause_switch,
            alarms=self.alarms,
            faults=self.faults,
            throttle=self._throttle,
            role=lambda: self.role,
            origin=lambda: self.origin,
            log_end=self._log_end,
            outgoing_filter=self._outgoing_filter,
            wait_for_log=self._wait_for_log,
        )
        self.housekeeping = Housekeeping(
            config=config,
            applying=self.applying,
            vectors=self.vectors,
            cluster=self.cluster,
            resync=self.resync,
            links=self.links,
            status=self.status,
            open_store=self._open_store,
            heartbeat_interval=self.options.link.heartbeat_interval,
            clock=clock,
        )
        self.divergence = DivergenceWatch(
            resync=self.resync,
            open_store=self._open_store,
            origin=lambda: self.origin,
            interval=replication.recovery.checksum_interval,
        )
        self.lag = LagWatch(
            peers=self.peers,
            links=self.links,
            status=self.status,
            cluster=self.cluster,
            vectors=self.vectors,
            log_end=self._log_end,
            alarms=self.alarms,
            max_lag=sync.max_lag,
            clock=clock,
        )
        self.board = StatusBoard(
            config=config,
            status=self.status,
            links=self.links,
            lag=self.lag,
            vectors=self.vectors,
            applying=self.applying,
            housekeeping=self.housekeeping,
            resync=self.resync,
            persistence=self.persistence,
            pause=self.pause_switch,
            alarms=self.alarms,
            faults=self.faults,
            clock=clock,
        )
        self.metrics = NodeMetrics(self.status_report)

    # -- the tree --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        unbuilt = unbuilt_settings(self.config)
        if unbuilt:
            raise ConfigError(
                f"{self.config.file}: not supported by this version: {', '.join(unbuilt)}",
                op="start",
                hint="remove these settings; replicator never ignores a setting silently",
            )
        raise_descriptor_limit()
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
        self.divergence.view = self.filter_copy()
        self.connections.peer_settings = await trio.to_thread.run_sync(
            self._peer_settings_from_config
        )
        self.origin = store.origin
        detector = Detector(self.store_settings)
        detector.position = await trio.to_thread.run_sync(store.log_position)
        replication = self.config.replication
        recovery = replication.recovery
        self._detector = detector
        self.board.started_at = self.options.clock.time()
        async with trio.open_nursery() as nursery:
            await nursery.start(self.persistence.run)
            await nursery.start(
                serve_control, replication.control_socket, ControlApi(self).routes()
            )
            keep_running = self.persistence.keep_running
            nursery.start_soon(keep_running, functools.partial(self._watch_log, detector))
            for job in self.housekeeping.jobs():
                nursery.start_soon(keep_running, job)
            if recovery.divergence_check:
                nursery.start_soon(keep_running, self.divergence.run)
            if self._pull_full_from_a_peer is not None:
                nursery.start_soon(self._pull_full_snapshot, self._pull_full_from_a_peer)
            if recovery.full_resync_schedule is not None:
                nursery.start_soon(
                    self.housekeeping.full_resync_on_schedule, recovery.full_resync_schedule
                )
            nursery.start_soon(self.lag.run)
            for listener in self._listeners:
                nursery.start_soon(self.connections.accept_loop, listener, nursery)
            for peer_id in self.peers:
                nursery.start_soon(self.connections.dial_loop, peer_id)
            _log.info(
                "node started",
                node=self.node_id,
                mode=replication.mode,
                listen=f"{replication.listen_host}:{replication.listen_port}",
                tables=list(self.store_settings.tables),
                peers=list(self.peers),
            )
            task_status.started()

    async def shutdown(self) -> None:
        """Say goodbye to every peer (briefly: a dead peer must not hold up the stop)."""
        await self.connections.shutdown()

    # -- the state file --------------------------------------------------------------------

    async def _prepare_when_writable(self) -> Store:
        """A disk that refuses writes at start, or an application holding the write lock past
        the busy timeout, is waited out (the file is not damaged): the node comes up by itself
        once it can write, and SIGTERM still stops it meanwhile."""
        clock = self.options.clock
        since: float | None = None
        while True:
            try:
                store = await trio.to_thread.run_sync(self._prepare)
            except (StateRefusesWrites, StateInUse) as error:
                if since is None:
                    since = clock.monotonic()
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
                             waited_seconds=round(clock.monotonic() - since, 1))  # fmt: skip
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
            functools.partial(check_persistence, self.config),
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
            if self.applying.applier is not None:
                self.applying.applier.store.close()
                self.applying.applier = None
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
        choices = self.config.replication.conflict_resolution

        def resolver(strategy: str) -> Resolver:
            return make_resolver(
                strategy,
                clock_skew_tolerance_ms=int(choices.clock_skew_tolerance * 1000),
                near_tie=choices.near_tie,
                priorities=choices.priorities,
            )

        applier_store = self._open_store()
        # Other connections' commits between two applies: the application is writing.
        applier_store.others_observer = self.applying.pacer.others_wrote
        if self.applying.wal_mode:
            # Checkpoints (and their fsyncs) run in a background task, not in an apply.
            applier_store.conn.execute("PRAGMA wal_autocheckpoint = 0")
        self.applying.applier = Applier(
            applier_store,
            {table: resolver(strategy) for table, strategy in choices.tables.items()},
            resolver(choices.strategy),
            max_clock_offset_ms=int(choices.max_clock_offset * 1000),
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
        self.connections.offered = self._offered_settings(store.tables)
        self.resync.refresh_floor()
        self.resync.clear_staging()
        self.housekeeping.read_checkpoints(store)

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

    def _open_store(self) -> Store:
        """A connection of the node's own, its write transactions timed by the pacer."""
        store = Store.open(self.store_settings, prepare=False)
        store.hold_observer = self.applying.pacer.held
        return store

    # -- the log ---------------------------------------------------------------------------

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
                self.connections.offered = self._offered_settings(detector.tables)
            if moved is not None:
                self.announce_log_change()
                self.lag.log_moved()
                continue
            with trio.move_on_after(detector.poll_interval):
                await self._log_changed.wait()

    def announce_log_change(self) -> None:
        """Wake every sender: the log grew."""
        changed, self._log_changed = self._log_changed, trio.Event()
        changed.set()

    async def _wait_for_log(self, position: int) -> None:
        with trio.move_on_after(self.config.replication.sync.interval):
            await self._log_changed.wait()

    def _log_end(self) -> int:
        return 0 if self._detector is None else self._detector.position

    def _outgoing_filter(self) -> Callable[[Change], Change | None] | None:
        """Each link's own view of outgoing changes (None: every change travels as is)."""
        if self.row_filter is None or not self.row_filter.active:
            return None
        return self.row_filter.copy().outgoing

    def filter_copy(self) -> RowFilter | None:
        if self.row_filter is None or not self.row_filter.active:
            return None
        return self.row_filter.copy()

    # -- role ------------------------------------------------------------------------------

    @property
    def role(self) -> str:
        """primary, replica, or peer (the multi-writer modes)."""
        mode = self.config.replication.mode
        if mode == "primary" or (mode == "replica" and self.promoted):
            return "primary"
        return "replica" if mode == "replica" else "peer"

    async def promote(self) -> dict[str, Any]:
        if self.role == "primary":
            return {"role": self.role, "changed": False}

        def promote() -> None:
            self.applier_store().set_read_only(False, promoted=True)

        await self.applying.run(promote)
        self.promoted = True
        _log.warning("promoted: this node now accepts local writes", node=self.node_id)
        self.connections.check_split_brain()
        return {"role": self.role, "changed": True}

    # -- the operator's view (ports of replicator.ops.api) ---------------------------------

    def status_report(self) -> StatusReport:
        return self.board.report(
            role=self.role, origin=str(self.origin), log_position=self._log_end()
        )

    async def fresh_status(self) -> StatusReport:
        """The status report, with the version vector and the counts read just now."""

        def read() -> None:
            store = self.applier_store()
            self.vectors.read(store)
            self.applying.counts = conflicts.summary(store.conn)
            self.board.state_store = node_figures(store.conn, self.options.clock.wall_ms())

        await self.applying.run(read)
        self.applying.quarantine_alarm()
        return self.status_report()

    @property
    def apply_limiter(self) -> trio.CapacityLimiter:
        return self.applying.limiter

    def applier_store(self) -> Store:
        return self.applying.store

    async def check_divergence_now(self) -> None:
        await self.divergence.check_now()

    async def forget(self) -> int:
        return await self.housekeeping.forget()

    async def take_checkpoint(self, reason: str) -> dict[str, Any]:
        return await self.housekeeping.take_checkpoint(reason)

    # -- backups and restores (ports of replicator.durability.persistence) -----------------

    @property
    def divergence_lock(self) -> threading.Lock:
        return self.divergence.lock

    def forget_row_hashes(self) -> None:
        self.divergence.forget_row_hashes()

    async def close_links(self, reason: str) -> None:
        await self.connections.close_links(reason)

    async def after_restore(self, origin: Origin) -> None:
        """The file now holds a backup under a new incarnation: forget what described the
        old contents, so senders scan the restored log and peers are asked for the rest."""
        assert self._detector is not None
        self.origin = origin

        def reread() -> int:
            store = self.applier_store()
            store.set_read_only(self.role == "replica", promoted=self.promoted)
            self.vectors.read(store)
            self.resync.refresh_floor()
            self.applying.counts = conflicts.summary(store.conn)
            self.housekeeping.read_checkpoints(store)
            return store.log_position()

        self._detector.position = await self.applying.run(reread)
        for status in self.status.values():
            status.sent_position = status.acked_position = 0
            status.peer_vector = {}
        self.resync.recompute.set()
        self.announce_log_change()

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
