"""The operator API on the control socket: every path of the design, one handler each.

Handlers read the node's state or ask the node to act; database work runs in a worker thread
on the applier's connection (behind its limiter), so a request never races an apply. Errors
are `ControlError`s, which the server turns into ``{"error", "details"}`` with their status.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

import trio

from replicator.apply import conflicts, quarantine
from replicator.capture.bookkeeping import log_entries as count_log_entries
from replicator.capture.bookkeeping import tombstones
from replicator.capture.migrations import recorded_version
from replicator.capture.rows import quote_identifier
from replicator.capture.store import Store, StoreSettings
from replicator.config import Config, PeerConfig
from replicator.durability.backup import BackupCorrupt, BackupError, BackupInfo, BackupStore
from replicator.durability.persistence import Persistence
from replicator.durability.recovery import validate_state
from replicator.log import KEY_PEER, get_logger
from replicator.ops.control import ControlError, Request, Response, Routes
from replicator.ops.metrics import NodeMetrics
from replicator.ops.report import StatusReport
from replicator.sync.link import Link, PauseSwitch
from replicator.sync.peer import PeerDisconnected
from replicator.sync.resync import Resync

__all__ = ["ControlApi", "NodeForApi"]

_log = get_logger("api")
_T = TypeVar("_T")
_WAIT_FOR_PEERS = 3.0  # validate: how long to wait for peers' checksums at our vector


class NodeForApi(Protocol):
    """What the operator API reads of the node and asks it to do."""

    @property
    def config(self) -> Config: ...
    @property
    def peers(self) -> Mapping[str, PeerConfig]: ...
    @property
    def links(self) -> Mapping[str, Link]: ...
    @property
    def persistence(self) -> Persistence: ...
    @property
    def metrics(self) -> NodeMetrics: ...
    @property
    def pause_switch(self) -> PauseSwitch: ...
    @property
    def resync(self) -> Resync: ...
    @property
    def store_settings(self) -> StoreSettings: ...

    last_validation: dict[str, Any] | None  # the API's own validate sets it too

    @property
    def apply_limiter(self) -> trio.CapacityLimiter: ...
    def applier_store(self) -> Store: ...
    def announce_log_change(self) -> None: ...
    async def fresh_status(self) -> StatusReport: ...
    async def promote(self) -> dict[str, Any]: ...
    async def check_divergence_now(self) -> None: ...
    async def forget(self) -> int: ...
    async def take_checkpoint(self, reason: str) -> dict[str, Any]: ...


class ControlApi:
    def __init__(self, node: NodeForApi) -> None:
        self.node = node

    def routes(self) -> Routes:
        r, s = "/api/replication", "/api/state"
        return {
            ("GET", f"{r}/status"): self.status,
            ("GET", f"{r}/peers"): self.peers,
            ("GET", f"{r}/lag"): self.lag,
            ("GET", f"{r}/queue"): self.queue,
            ("POST", f"{r}/resync"): self.resync,
            ("POST", f"{r}/pause"): self.pause,
            ("POST", f"{r}/resume"): self.resume,
            ("POST", f"{r}/checkpoint"): self.checkpoint,
            ("GET", f"{r}/checkpoint"): self.checkpoints,
            ("POST", f"{r}/validate"): self.validate,
            ("POST", f"{r}/promote"): self.promote,
            ("GET", f"{r}/conflicts"): self.conflicts,
            ("GET", f"{r}/conflicts/{{id}}"): self.conflict,
            ("POST", f"{r}/conflicts/{{id}}/resolve"): self.resolve,
            ("GET", f"{s}/status"): self.state_status,
            ("GET", f"{s}/stats"): self.state_stats,
            ("POST", f"{s}/save"): self.state_save,
            ("POST", f"{s}/validate"): self.state_validate,
            ("POST", f"{s}/compact"): self.state_compact,
            ("GET", f"{s}/backups"): self.backups,
            ("POST", f"{s}/backups"): self.backup_create,
            ("GET", f"{s}/backups/{{name}}"): self.backup,
            ("POST", f"{s}/backups/{{name}}/restore"): self.backup_restore,
            ("GET", "/metrics"): self.metrics,
        }

    async def _db(self, function: Callable[[Store], _T]) -> _T:
        """``function(store)`` on the applier's connection, in a worker thread."""
        store = self.node.applier_store()
        return await trio.to_thread.run_sync(function, store, limiter=self.node.apply_limiter)

    # -- replication -----------------------------------------------------------------------

    async def status(self, request: Request) -> Response:
        return Response(200, await self.node.fresh_status())

    async def peers(self, request: Request) -> Response:
        report = await self.node.fresh_status()
        return Response(200, {"node_id": report["node_id"], "peers": report["peers"]})

    async def lag(self, request: Request) -> Response:
        report = await self.node.fresh_status()
        peers = [
            {key: peer[key] for key in ("id", "state", "lag_changes", "lag_seconds",
                                        "acked_position", "seconds_since_contact")}
            for peer in report["peers"]
        ]  # fmt: skip
        worst = max((peer["lag_seconds"] for peer in report["peers"]), default=0.0)
        return Response(200, {
            "node_id": report["node_id"],
            "log_position": report["log_position"],
            "max_lag_seconds": self.node.config.replication.sync.max_lag,
            "worst_lag_seconds": worst,
            "lagging": [alarm for alarm in report["alarms"] if "max_lag" in alarm],
            "peers": peers,
        })  # fmt: skip

    async def queue(self, request: Request) -> Response:
        report = await self.node.fresh_status()
        peers = [
            {
                "id": peer["id"],
                "state": peer["state"],
                "pending_changes": peer["lag_changes"],
                "sent_position": peer["sent_position"],
                "acked_position": peer["acked_position"],
                "in_flight_batches": peer["in_flight_batches"],
            }
            for peer in report["peers"]
        ]
        return Response(200, {
            "log_position": report["log_position"],
            "peers": peers,
            "conflicts_open": report["conflicts"]["open"],
            "quarantined": report["quarantined"],
            "paused": report["paused"],
        })  # fmt: skip

    async def resync(self, request: Request) -> Response:
        """This node pulls from a peer: its whole state (``full``) or its log again."""
        body = _object(request)
        full = body.get("full", False)
        peer = body.get("peer")
        if not isinstance(full, bool) or not (peer is None or isinstance(peer, str)):
            raise ControlError(400, "invalid resync request",
                               '"full" must be true or false, "peer" a node id')  # fmt: skip
        link = self._link(peer)
        await link.pull(full=full, reason="requested by the operator")
        _log.info("resync requested", full=full, **{KEY_PEER: link.peer})
        return Response(202, {"peer": link.peer, "full": full, "requested": True})

    def _link(self, peer: str | None) -> Any:
        node = self.node
        if peer is None:
            connected = sorted(node.links)
            if not connected:
                raise ControlError(409, "no peer is connected", "nothing to resync from")
            peer = connected[0]
        elif peer not in node.peers:
            raise ControlError(404, f"no configured peer {peer!r}",
                               f"configured: {', '.join(sorted(node.peers))}")  # fmt: skip
        link = node.links.get(peer)
        if link is None:
            raise ControlError(409, f"peer {peer!r} is not connected",
                               "it needs a live link; see /api/replication/peers")  # fmt: skip
        return link

    async def pause(self, request: Request) -> Response:
        self.node.pause_switch.pause()
        _log.info("replication paused")
        return Response(200, {"paused": True})

    async def resume(self, request: Request) -> Response:
        self.node.pause_switch.resume()
        _log.info("replication resumed")
        for link in list(self.node.links.values()):
            with contextlib.suppress(PeerDisconnected):
                await link.resumed()
        return Response(200, {"paused": False})

    async def checkpoint(self, request: Request) -> Response:
        return Response(200, await self.node.take_checkpoint("requested by the operator"))

    async def checkpoints(self, request: Request) -> Response:
        report = await self.node.fresh_status()
        return Response(200, {"checkpoints": report["checkpoints"]})

    async def validate(self, request: Request) -> Response:
        """Compare table checksums with every connected peer at the same version vector."""
        node = self.node
        await node.check_divergence_now()
        resync = node.resync
        deadline = trio.current_time() + _WAIT_FOR_PEERS
        while trio.current_time() < deadline:
            if all(resync.comparable(peer) for peer in node.links):
                break
            await trio.sleep(0.1)
        mine = resync.checksums
        assert mine is not None
        peers: dict[str, dict[str, Any]] = {}
        for peer in sorted(node.peers):
            seen = resync.peer_sums.get(peer)
            if peer not in node.links:
                peers[peer] = {"compared": False, "reason": "not connected"}
            elif seen is None or not resync.comparable(peer):
                reason = "not at the same version vector (writes in flight)"
                peers[peer] = {"compared": False, "reason": reason}
            else:
                differing = sorted(t for t, digest in mine.table_checksums().items()
                                   if seen[1].get(t) not in (None, digest))  # fmt: skip
                peers[peer] = {"compared": True, "divergent_tables": differing}
        divergent = sorted({t for p in peers.values() for t in p.get("divergent_tables", [])})
        return Response(200, {
            "consistent": not divergent and all(p["compared"] for p in peers.values()),
            "divergent_tables": divergent,
            "version_vector": {str(o): s for o, s in mine.vector.items()},
            "tables": {name: {"rows": check.rows, "checksum": check.checksum.to_bytes(16, "big")
                              .hex()} for name, check in mine.tables.items()},
            "peers": peers,
        })  # fmt: skip

    async def promote(self, request: Request) -> Response:
        return Response(200, await self.node.promote())

    async def conflicts(self, request: Request) -> Response:
        status = request.query.get("status", "open")
        if status not in ("open", "resolved", "timed_out", "all"):
            raise ControlError(400, "invalid status", "open, resolved, timed_out or all")
        try:
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            raise ControlError(400, "invalid limit", "a number of conflicts") from None
        wanted = None if status == "all" else status
        found = await self._db(lambda store: conflicts.list_conflicts(store.conn, wanted, limit))
        return Response(200, {"conflicts": [c.as_dict() for c in found], "status": status})

    async def conflict(self, request: Request) -> Response:
        ident = request.params["id"]
        found = await self._db(lambda store: conflicts.get(store.conn, ident))
        if found is None:
            raise ControlError(404, f"no conflict {ident!r}", "see /api/replication/conflicts")
        return Response(200, found.as_dict())

    async def resolve(self, request: Request) -> Response:
        ident = request.params["id"]
        body = _object(request)
        use, row = body.get("use"), body.get("row")
        if use not in (None, "local", "remote") or (row is not None and not isinstance(row, dict)):
            expected = '{"use": "local"} or {"use": "remote"} or {"row": {...}}'
            raise ControlError(400, "invalid resolution", expected)
        if (use is None) == (row is None):
            raise ControlError(400, "invalid resolution", 'give exactly one of "use" and "row"')

        def resolve(store: Store) -> conflicts.Conflict:
            found = conflicts.get(store.conn, ident)
            if found is None:
                raise ControlError(404, f"no conflict {ident!r}", "see /api/replication/conflicts")
            if found.status != "open":
                raise ControlError(409, f"conflict {ident} is already {found.status}")
            info = store.tables.get(found.table)
            if info is None:
                raise ControlError(409, f"table {found.table} is no longer replicated")
            return conflicts.resolve(store.conn, ident, info.primary_key, use=use, row=row)

        try:
            resolved = await self._db(resolve)
        except sqlite3.Error as error:
            raise ControlError(409, "the resolution could not be written", str(error)) from None
        _log.info("conflict resolved", conflict=ident, use=use or "given row")
        self.node.announce_log_change()
        return Response(200, resolved.as_dict())

    # -- state -----------------------------------------------------------------------------

    async def state_status(self, request: Request) -> Response:
        node = self.node
        state = node.config.state
        path = node.store_settings.path

        def read(store: Store) -> dict[str, Any]:
            conn = store.conn
            (journal,) = conn.execute("PRAGMA journal_mode").fetchone()
            version = recorded_version(conn)
            return {"journal_mode": journal, "replicator_schema_version": version}

        facts = await self._db(read)
        return Response(200, {
            "path": path,
            "size_bytes": _size(path),
            "wal_bytes": _size(f"{path}-wal"),
            **facts,
            "synchronous": state.database.synchronous,
            "last_validation": node.last_validation,
            **node.persistence.status(),
        })  # fmt: skip

    async def state_stats(self, request: Request) -> Response:
        node = self.node
        path = node.store_settings.path

        def read(store: Store) -> dict[str, Any]:
            conn = store.conn
            tables = {}
            for name in sorted(store.tables):
                (rows,) = conn.execute(f"SELECT count(*) FROM {quote_identifier(name)}").fetchone()
                tables[name] = {"rows": rows, "tombstones": tombstones(conn, name)}
            log_entries = count_log_entries(conn)
            (page_size,) = conn.execute("PRAGMA page_size").fetchone()
            (pages,) = conn.execute("PRAGMA page_count").fetchone()
            (free,) = conn.execute("PRAGMA freelist_count").fetchone()
            open_conflicts = conflicts.open_count(conn)
            quarantined = quarantine.held(conn)
            return {
                "tables": tables,
                "log_entries": log_entries,
                "page_size": page_size,
                "pages": pages,
                "free_pages": free,
                "conflicts_open": open_conflicts,
                "quarantined": quarantined,
            }

        stats = await self._db(read)
        return Response(200, {
            "path": path,
            "size_bytes": _size(path),
            "wal_bytes": _size(f"{path}-wal"),
            **stats,
            "backups": self._backup_summary(),
        })  # fmt: skip

    async def state_save(self, request: Request) -> Response:
        """Everything committed is in the database file itself (a WAL checkpoint)."""

        def save(store: Store) -> tuple[int, int, int]:
            busy, frames, copied = store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            return int(busy), int(frames), int(copied)

        busy, frames, copied = await self._db(save)
        return Response(200, {"saved": not busy, "wal_frames": frames, "frames_copied": copied,
                              "busy": bool(busy)})  # fmt: skip

    async def state_validate(self, request: Request) -> Response:
        result = await self._db(validate_state)
        self.node.last_validation = result
        return Response(200, result)

    async def state_compact(self, request: Request) -> Response:
        """Truncate the log to what every node holds, then VACUUM."""
        path = self.node.store_settings.path
        before = _size(path)
        removed = await self.node.forget()
        await self._db(lambda store: store.conn.execute("VACUUM"))
        return Response(200, {"bytes_before": before, "bytes_after": _size(path),
                              "log_entries_removed": removed})  # fmt: skip

    def _backup_summary(self) -> dict[str, Any]:
        persistence = self.node.persistence
        if persistence.backups is None:
            return {"enabled": False, "count": 0, "last": None}
        newest = persistence.newest
        return {
            "enabled": True,
            "count": persistence.kept["count"],
            "last": None if newest is None else _backup_json(newest),
            "bytes": persistence.kept["bytes"],
        }

    async def backups(self, request: Request) -> Response:
        persistence = self.node.persistence
        if persistence.backups is None:
            return Response(200, {"enabled": False, "backups": []})
        found = await trio.to_thread.run_sync(persistence.backups.list)
        return Response(200, {
            "enabled": True,
            "directory": persistence.backups.directory.as_posix(),
            "backups": [_backup_json(info) for info in found],
        })  # fmt: skip

    async def backup_create(self, request: Request) -> Response:
        body = _object(request)
        description = body.get("description")
        if description is not None and not isinstance(description, str):
            raise ControlError(400, "description must be a string", repr(description))
        if self.node.persistence.backups is None:
            raise ControlError(409, "backups are not enabled",
                               "set state.backup.enabled and its directory")  # fmt: skip
        try:
            info = await self.node.persistence.create(description)
        except BackupError as error:
            raise ControlError(500, "backup failed", error.message) from None
        return Response(201, _backup_json(info))

    async def backup(self, request: Request) -> Response:
        backups = self._backups()
        name = request.params["name"]
        try:
            info = await trio.to_thread.run_sync(backups.verify, name)
        except BackupCorrupt as error:
            return Response(200, {**_backup_json(backups.get(name)), "verified": False,
                                  "problem": error.message})  # fmt: skip
        except BackupError:
            raise ControlError(404, f"no backup {name!r}", "see /api/state/backups") from None
        return Response(200, {**_backup_json(info), "verified": True})

    async def backup_restore(self, request: Request) -> Response:
        backups = self._backups()
        name = request.params["name"]
        try:
            await trio.to_thread.run_sync(backups.get, name)
        except BackupError:
            raise ControlError(404, f"no backup {name!r}", "see /api/state/backups") from None
        try:
            result = await self.node.persistence.restore(name)
        except BackupError as error:
            raise ControlError(422, f"backup {name} refused: the state is untouched",
                               error.message) from None  # fmt: skip
        return Response(200, {"restored": True, **result})

    def _backups(self) -> BackupStore:
        backups = self.node.persistence.backups
        if backups is None:
            raise ControlError(404, "backups are not enabled",
                               "set state.backup.enabled and its directory")  # fmt: skip
        return backups

    async def metrics(self, request: Request) -> Response:
        await self.node.fresh_status()
        return Response(200, self.node.metrics.render())


def _backup_json(info: BackupInfo) -> dict[str, Any]:
    return {**info.as_dict(), "size_bytes": info.size}


def _object(request: Request) -> dict[str, Any]:
    body = request.json()
    if not isinstance(body, dict):
        raise ControlError(400, "request body must be a JSON object")
    return body


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0
