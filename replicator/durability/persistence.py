"""A running node's care of its state file: scheduled backups, restores while the node runs,
and pausing replication while the disk refuses writes.

A restore stops every link (a peer must not stream into a file being replaced), writes the
backup in through SQLite's backup API under a new incarnation, and lets the links come back:
each peer sees the restored version vector in Hello and sends what this node now lacks, its
own earlier writes included.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

from protocol import Origin
from replicator.capture.sqlite_errors import is_locked, refusal
from replicator.capture.store import Store, StoreSettings
from replicator.capture.transactions import write_transaction
from replicator.config import Config
from replicator.durability.backup import BackupInfo, BackupStore
from replicator.durability.recovery import RecoveryReport, restore_backup
from replicator.errors import ReplicationError
from replicator.log import Throttle, get_logger

__all__ = ["NodeForPersistence", "Persistence"]

_log = get_logger("persistence")
_PROBE_INTERVAL = 1.0
_LOCKED_RETRY = 0.5  # seconds between tries while the application holds the write lock
_PROBE_BYTES = 64 * 1024  # several pages: a full disk cannot hide it in free pages
_DEGRADED = "degraded"
RESYNC_BACKUP = "before full resync"


class NodeForPersistence(Protocol):
    """What persistence needs of the node: its settings and alarms, the applier's connection
    and limiter, and the links to stop and restart around a restore or a full disk."""

    @property
    def config(self) -> Config: ...
    @property
    def alarms(self) -> dict[str, str]: ...
    @property
    def store_settings(self) -> StoreSettings: ...
    @property
    def apply_limiter(self) -> trio.CapacityLimiter: ...
    @property
    def divergence_lock(self) -> threading.Lock: ...
    def applier_store(self) -> Store: ...
    def forget_row_hashes(self) -> None: ...
    async def close_links(self, reason: str) -> None: ...
    async def after_restore(self, origin: Origin) -> None: ...


class Persistence:
    def __init__(self, node: NodeForPersistence, backups: BackupStore | None) -> None:
        self.node = node
        self.backups = backups
        self.recovery: RecoveryReport | None = None
        self._busy_lines = Throttle()
        self.degraded: dict[str, Any] | None = None
        self.restoring: str | None = None
        self.last_restore: dict[str, Any] | None = None
        self.last_backup_error: str | None = None
        self.backup_failures = 0
        self.kept: dict[str, Any] = {"count": 0, "bytes": 0, "newest_at": None}
        self.newest: BackupInfo | None = None
        self.writable = trio.Event()
        self.writable.set()
        self._lock = trio.Lock()  # one backup or restore at a time
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.backups is not None:
                await self._count_backups()
            if self.backups is not None and self.node.config.state.backup.enabled:
                nursery.start_soon(self._back_up_on_schedule)
            task_status.started()
            await trio.sleep_forever()

    # -- backups ---------------------------------------------------------------------------

    async def create(self, description: str | None = None) -> BackupInfo:
        backups = self._backups()
        async with self._lock:
            info = await trio.to_thread.run_sync(
                lambda: backups.create(self.node.store_settings.path, description=description)
            )
            removed = await trio.to_thread.run_sync(backups.prune)
            await self._count_backups()
        _log.info("backup created", backup=info.name, size=info.size,
                  removed_by_retention=len(removed))  # fmt: skip
        return info

    async def _count_backups(self) -> None:
        """What the backups directory holds, for status and metrics without a disk read."""
        assert self.backups is not None
        found = await trio.to_thread.run_sync(self.backups.list)
        self.newest = found[0] if found else None
        self.kept = {
            "count": len(found),
            "bytes": sum(info.size for info in found),
            "newest_at": found[0].created_at if found else None,
        }

    async def _back_up_on_schedule(self) -> None:
        """Every ``interval`` since the newest backup (one soon after start if it is older)."""
        interval = self.node.config.state.backup.interval
        while True:
            newest = self.kept["newest_at"] or 0.0  # counted at start and after each backup
            await trio.sleep(max(0.0, newest + interval - time.time()))
            await self.writable.wait()
            try:
                await self.create("scheduled")
                self.last_backup_error = None
                self.node.alarms.pop("backup", None)
            except Exception as error:  # a failed backup must not stop the node
                self.last_backup_error = str(error)
                self.backup_failures += 1
                self.node.alarms["backup"] = f"scheduled backup failed: {error}"
                _log.error("scheduled backup failed", error=str(error))
                await trio.sleep(min(interval, 60.0))

    async def restore(self, name: str) -> dict[str, Any]:
        """Replace the state with backup ``name`` while the node runs (see the module doc)."""
        backups = self._backups()
        node = self.node
        async with self._lock:
            info = await trio.to_thread.run_sync(backups.verify, name)  # before touching anything
            self.restoring = name
            started = time.time()
            _log.warning("restoring the state database from a backup: replication paused",
                         backup=name)  # fmt: skip
            try:
                await node.close_links(f"restoring backup {name}")
                origin = await trio.to_thread.run_sync(
                    self._restore_sync, backups, name, limiter=node.apply_limiter
                )
                # A link whose Hello was under way when the restore began knows the old file.
                await node.close_links(f"restored backup {name}")
                await node.after_restore(origin)
            finally:
                self.restoring = None
        self.last_restore = {
            "backup": name,
            "created_at": info.created_at,
            "restored_at": started,
            "seconds": round(time.time() - started, 3),
            "origin": str(origin),
            "vector": info.vector,
        }
        _log.warning("backup restored: catching up from peers", backup=name, origin=str(origin),
                     seconds=self.last_restore["seconds"])  # fmt: skip
        return self.last_restore

    def _restore_sync(self, backups: BackupStore, name: str) -> Any:
        node = self.node
        with node.divergence_lock:
            store = node.applier_store()
            origin = restore_backup(backups, name, node.store_settings, store.conn)
            store.origin = origin
            node.forget_row_hashes()
            return origin

    async def expire_resync_backups(self) -> list[str]:
        """``replication.backup_retention``: backups taken before a full resync are kept this
        long (the newest backup always stays)."""
        keep_for = self.node.config.replication.backup_retention
        if keep_for is None:
            return []
        backups = self._backups()

        def expire() -> list[str]:
            found = backups.list()
            old = [
                info.name
                for info in found[1:]
                if (info.description or "").startswith(RESYNC_BACKUP)
                and info.created_at < time.time() - keep_for
            ]
            for name in old:
                backups.remove(name)
            return old

        async with self._lock:
            removed = await trio.to_thread.run_sync(expire)
            await self._count_backups()
        if removed:
            _log.info("backups taken before a resync removed (backup_retention)",
                      backups=removed)  # fmt: skip
        return removed

    def _backups(self) -> BackupStore:
        if self.backups is None:
            raise ReplicationError(
                "backups are not enabled", op="backup",
                hint="set state.backup.enabled and its directory",
            )  # fmt: skip
        return self.backups

    # -- a disk that refuses writes --------------------------------------------------------

    def write_failed(self, error: BaseException, where: str) -> bool:
        """Called with an error from a write: True when it means the disk refuses writes, in
        which case replication pauses until a probe write succeeds."""
        refused = refusal(error)
        if refused is None:
            return False
        error = refused
        if self.degraded is None:
            self.degraded = {"since": time.time(), "error": str(error), "where": where}
            self.writable = trio.Event()
            self.node.alarms[_DEGRADED] = (
                f"writes to the state database fail ({error}): replication paused until they "
                "succeed again"
            )
            _log.error("state database refuses writes: replication paused", error=str(error),
                       where=where)  # fmt: skip
            if self._nursery is not None:
                self._nursery.start_soon(self._probe_until_writable)
        return True

    async def _probe_until_writable(self) -> None:
        await self.node.close_links("this node's state database refuses writes")
        while True:
            await trio.sleep(_PROBE_INTERVAL)
            try:
                await trio.to_thread.run_sync(self._probe, limiter=self.node.apply_limiter)
            except sqlite3.Error as error:  # not yet (locked, say): probing must not end the node
                assert self.degraded is not None
                self.degraded["error"] = str(error)
                continue
            break
        since = self.degraded["since"] if self.degraded else time.time()
        self.degraded = None
        self.node.alarms.pop(_DEGRADED, None)
        self.writable.set()
        _log.warning("state database takes writes again: replication resumes",
                     paused_seconds=round(time.time() - since, 1))  # fmt: skip

    def _probe(self) -> None:
        """Commit a few pages, then free them: each commit must reach the disk (the WAL)."""
        conn = self.node.applier_store().conn
        for statement, args in (
            ("INSERT INTO _repl_probe (data) VALUES (zeroblob(?))", (_PROBE_BYTES,)),
            ("DELETE FROM _repl_probe", ()),
        ):
            # A refused COMMIT has rolled back already: the probe must fail with the refusal
            # itself, not with the ROLLBACK's "no transaction is active".
            with write_transaction(conn, rollback_only_if_open=True):
                conn.execute(statement, args)

    async def keep_running(self, task: Callable[[], Awaitable[None]]) -> None:
        """Run a periodic task that touches the database; a refused write pauses it (and
        replication) until the disk takes writes again, and a lock the application held past
        the busy timeout (a long migration, a bulk import) is waited out, instead of stopping
        the node."""
        name = getattr(getattr(task, "func", task), "__name__", "task").strip("_")
        while True:
            try:
                await task()
                return
            except sqlite3.DatabaseError as error:
                if is_locked(error):
                    if self._busy_lines.allow(name) is not None:
                        _log.warning("state database locked by another connection: retrying",
                                     task=name, error=str(error))  # fmt: skip
                    await trio.sleep(_LOCKED_RETRY)
                    continue
                if not self.write_failed(error, name):
                    raise
                await self.writable.wait()

    # -- reports -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        config = self.node.config.state.backup
        return {
            "backups": {
                "enabled": config.enabled,
                "directory": config.directory or None,
                "interval_seconds": config.interval,
                "encryption": config.encryption,
                "compression": config.compression,
                "last_error": self.last_backup_error,
                "failures": self.backup_failures,
                **self.kept,
            },
            "recovery": None if self.recovery is None else self.recovery.as_dict(),
            "last_restore": self.last_restore,
            "restoring": self.restoring,
            "degraded": self.degraded,
        }
