"""The status report's shape: what ``GET /api/replication/status`` returns, what the CLI
prints and what the metrics are built from, typed once so the three cannot drift apart."""

from __future__ import annotations

from typing import Any, TypedDict

__all__ = ["ConflictCounts", "PeerReport", "StatusReport"]


class PeerReport(TypedDict):
    """One configured peer, as this node sees it."""

    id: str
    address: str
    state: str  # connecting, connected, disconnected, ...
    last_contact: float | None  # wall time of the last message from it
    seconds_since_contact: float | None
    sent_position: int  # this node's log position sent to it
    acked_position: int  # ... and known to be held by it
    lag_changes: int
    lag_seconds: float
    skew_ms: int | None  # its wall clock minus ours, from heartbeats
    bytes_in: int
    bytes_out: int
    changes_sent: int
    changes_received: int
    in_flight_batches: int
    last_error: str | None
    last_error_at: float | None


class ConflictCounts(TypedDict):
    open: int
    by_table: dict[str, int]


class StatusReport(TypedDict):
    """The whole node."""

    node_id: str
    mode: str  # as configured
    role: str  # primary, replica or peer, as it runs now
    paused: bool
    alarms: list[str]
    cluster_id: str
    origin: str  # node id and incarnation of this node's own changes
    listen: str
    uptime_seconds: float
    log_position: int
    version_vector: dict[str, int]  # origin -> highest sequence held
    peers: list[PeerReport]
    snapshots: list[dict[str, object]]
    divergence: dict[str, Any]
    checkpoints: list[dict[str, Any]]
    conflicts: ConflictCounts
    quarantined: int
    quarantine: dict[str, Any]
    peer_faults: dict[str, int]
    write_lock: dict[str, Any]
    state_store: dict[str, Any] | None
    persistence: dict[str, Any]
