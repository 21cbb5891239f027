"""The node's status report, built from the shared state the other parts keep up to date (no
query: the API refreshes the few figures read from the file before it asks)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from replicator.clock import Clock
from replicator.config import Config
from replicator.durability.persistence import Persistence
from replicator.node.alarms import Alarms
from replicator.node.applying import ApplyHandle
from replicator.node.housekeeping import Housekeeping
from replicator.node.lag import LagWatch
from replicator.node.vectors import VectorCache
from replicator.ops.report import PeerReport, StatusReport
from replicator.sync.faults import Faults
from replicator.sync.link import Link, PauseSwitch, PeerStatus
from replicator.sync.resync import Resync

__all__ = ["StatusBoard"]


class StatusBoard:
    def __init__(
        self,
        *,
        config: Config,
        status: Mapping[str, PeerStatus],
        links: Mapping[str, Link],
        lag: LagWatch,
        vectors: VectorCache,
        applying: ApplyHandle,
        housekeeping: Housekeeping,
        resync: Resync,
        persistence: Persistence,
        pause: PauseSwitch,
        alarms: Alarms,
        faults: Faults,
        clock: Clock,
    ) -> None:
        self._config = config
        self._status = status
        self._links = links
        self._lag = lag
        self._vectors = vectors
        self._applying = applying
        self._housekeeping = housekeeping
        self._resync = resync
        self._persistence = persistence
        self._pause = pause
        self._alarms = alarms
        self._faults = faults
        self._clock = clock
        self.started_at = clock.time()
        self.state_store: dict[str, Any] | None = None  # the applications' key-value store

    def report(self, *, role: str, origin: str, log_position: int) -> StatusReport:
        replication = self._config.replication
        counts = self._applying.counts
        now = self._clock.time()
        return {
            "node_id": replication.node_id,
            "mode": replication.mode,
            "role": role,
            "paused": self._pause.paused,
            "alarms": self._alarms.messages(),
            "cluster_id": replication.cluster_id,
            "origin": origin,
            "listen": f"{replication.listen_host}:{replication.listen_port}",
            "uptime_seconds": round(now - self.started_at, 3),
            "log_position": log_position,
            "version_vector": {str(o): seq for o, seq in self._vectors.held.items()},
            "peers": [self._peer(status, log_position, now) for status in self._status.values()],
            "snapshots": self._resync.report(),
            "divergence": self._resync.divergence_report(),
            "checkpoints": self._housekeeping.checkpoints,
            "conflicts": {"open": counts["open"], "by_table": counts["by_table"]},
            "quarantined": counts["quarantined"],
            "quarantine": self._applying.quarantine_report(),
            "peer_faults": self._faults.as_dict(),
            "write_lock": self._applying.pacer.report(),
            "state_store": self.state_store,
            "persistence": self._persistence.status(),
        }

    def _peer(self, status: PeerStatus, log_position: int, now: float) -> PeerReport:
        link = self._links.get(status.node_id)
        contact = status.last_contact
        return {
            "id": status.node_id,
            "address": status.address,
            "state": status.state,
            "last_contact": contact,
            "seconds_since_contact": None if contact is None else round(now - contact, 3),
            "sent_position": status.sent_position,
            "acked_position": status.acked_position,
            "lag_changes": max(0, log_position - status.acked_position),
            "lag_seconds": round(self._lag.seconds(status.node_id), 3),
            "skew_ms": status.skew_ms,
            "bytes_in": status.bytes_in,
            "bytes_out": status.bytes_out,
            "changes_sent": status.changes_sent,
            "changes_received": status.changes_received,
            "in_flight_batches": link.in_flight if link is not None else 0,
            "last_error": status.last_error,
            "last_error_at": status.last_error_at,
        }
