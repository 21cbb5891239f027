"""Prometheus metrics for one node, built at scrape time from its status report.

The node keeps its numbers already (for ``status``); a collector that reads them when
Prometheus scrapes means no instrumentation calls spread through the replication code, and
metrics can never disagree with ``status``. Each node has its own registry, so nodes run
side by side in one process (tests) never mix their series, and nothing lands in
``prometheus_client``'s global default registry.

The report comes from code that changes, so every field is optional here: a missing or
``None`` field leaves its series out of the scrape rather than failing it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)

__all__ = ["NodeMetrics"]

Report = Callable[[], Mapping[str, Any]]


class NodeMetrics:
    """The node's metrics: its own registry holding one collector over ``report``."""

    CONTENT_TYPE: str = CONTENT_TYPE_LATEST

    def __init__(self, report: Report) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_ReportCollector(report))

    def render(self) -> bytes:
        """The exposition text for ``GET /metrics`` (calls ``report`` once)."""
        return generate_latest(self.registry)


class _ReportCollector:
    """Turns one status report into metric families; holds no state between scrapes."""

    def __init__(self, report: Report) -> None:
        self._report = report

    def describe(self) -> list[Metric]:
        """Nothing: otherwise registering would call ``report`` before the node is ready."""
        return []

    def collect(self) -> Iterator[Metric]:
        return iter(_families(self._report()))


# ---------------------------------------------------------------------------------------------
# Reading the report defensively


def _number(value: object) -> float | None:
    """A sample value, or None for anything that is not a number (missing, None, text)."""
    if isinstance(value, bool | int | float):
        return float(value)
    return None


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _mappings(value: object) -> list[Mapping[str, Any]]:
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        return []
    return [item for item in value if isinstance(item, Mapping)]


def _text(value: object) -> str:
    return "" if value is None else str(value)


def _add(family: GaugeMetricFamily | CounterMetricFamily, labels: list[str], value: object) -> None:
    number = _number(value)
    if number is not None:
        family.add_metric(labels, number)


def _gauge(name: str, doc: str, *labels: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=["node", *labels])


def _counter(name: str, doc: str, *labels: str) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=["node", *labels])


# ---------------------------------------------------------------------------------------------
# Families


def _families(report: Mapping[str, Any]) -> Iterable[Metric]:
    node = _text(report.get("node_id"))
    yield from _node_families(node, report)
    yield from _peer_families(node, _mappings(report.get("peers")))
    yield from _snapshot_families(node, _mappings(report.get("snapshots")))
    yield from _divergence_families(node, _mapping(report.get("divergence")))
    yield from _conflict_families(node, report)
    yield from _limit_families(node, report)
    yield from _store_families(node, report.get("state_store"))
    yield from _persistence_families(node, _mapping(report.get("persistence")))


def _node_families(node: str, report: Mapping[str, Any]) -> Iterable[Metric]:
    info = InfoMetricFamily(
        "replicator_node", "This node's replication mode and role.", labels=["node"]
    )
    info.add_metric([node], {"mode": _text(report.get("mode")), "role": _text(report.get("role"))})
    yield info

    paused = _gauge("replicator_paused", "1 while replication is paused by an operator.")
    _add(paused, [node], report.get("paused"))
    yield paused

    alarms = report.get("alarms")
    raised = _gauge("replicator_alarms", "Alarms currently raised (details in status).")
    if isinstance(alarms, Sequence) and not isinstance(alarms, str | bytes):
        raised.add_metric([node], len(alarms))
    yield raised

    uptime = _gauge("replicator_uptime_seconds", "Seconds since the node process started.")
    _add(uptime, [node], report.get("uptime_seconds"))
    yield uptime

    position = _gauge("replicator_log_position", "Newest position in this node's change log.")
    _add(position, [node], report.get("log_position"))
    yield position


def _peer_families(node: str, peers: list[Mapping[str, Any]]) -> Iterable[Metric]:
    connected = _gauge(
        "replicator_peer_connected", "1 while a replication link to the peer is up.", "peer"
    )
    lag_changes = _gauge(
        "replicator_peer_lag_changes",
        "Changes in this node's log the peer has not acknowledged.",
        "peer",
    )
    lag_seconds = _gauge(
        "replicator_peer_lag_seconds",
        "How long the oldest batch sent to the peer has waited for its ack.",
        "peer",
    )
    since_contact = _gauge(
        "replicator_peer_seconds_since_contact",
        "Seconds since anything was heard from the peer.",
        "peer",
    )
    skew = _gauge(
        "replicator_peer_clock_skew_seconds",
        "Peer's clock minus this node's, as last measured.",
        "peer",
    )
    acked = _gauge(
        "replicator_peer_acked_position", "Log position the peer has acknowledged.", "peer"
    )
    sent = _gauge("replicator_peer_sent_position", "Log position sent to the peer.", "peer")
    changes_sent = _counter(
        "replicator_peer_changes_sent_total", "Changes sent to the peer.", "peer"
    )
    changes_received = _counter(
        "replicator_peer_changes_received_total", "Changes from the peer applied here.", "peer"
    )
    bytes_in = _counter(
        "replicator_peer_received_bytes_total",
        "Bytes received on the link to the peer (restarts at 0 on reconnection).",
        "peer",
    )
    bytes_out = _counter(
        "replicator_peer_sent_bytes_total",
        "Bytes sent on the link to the peer (restarts at 0 on reconnection).",
        "peer",
    )
    for peer in peers:
        peer_id = _text(peer.get("id"))
        labels = [node, peer_id]
        state = peer.get("state")
        if state is not None:
            connected.add_metric(labels, 1.0 if state == "connected" else 0.0)
        _add(lag_changes, labels, peer.get("lag_changes"))
        _add(lag_seconds, labels, peer.get("lag_seconds"))
        _add(since_contact, labels, peer.get("seconds_since_contact"))
        skew_ms = _number(peer.get("skew_ms"))
        if skew_ms is not None:
            skew.add_metric(labels, skew_ms / 1000.0)
        _add(acked, labels, peer.get("acked_position"))
        _add(sent, labels, peer.get("sent_position"))
        _add(changes_sent, labels, peer.get("changes_sent"))
        _add(changes_received, labels, peer.get("changes_received"))
        _add(bytes_in, labels, peer.get("bytes_in"))
        _add(bytes_out, labels, peer.get("bytes_out"))
    yield from (connected, lag_changes, lag_seconds, since_contact, skew, acked, sent)
    yield from (changes_sent, changes_received, bytes_in, bytes_out)


def _snapshot_families(node: str, snapshots: list[Mapping[str, Any]]) -> Iterable[Metric]:
    """Only running snapshots: a finished one's numbers would read as a stuck transfer."""
    rows = _gauge(
        "replicator_snapshot_rows",
        "Rows transferred so far by a running snapshot.",
        "peer",
        "direction",
    )
    total = _gauge(
        "replicator_snapshot_total_rows",
        "Rows a running snapshot will transfer in all.",
        "peer",
        "direction",
    )
    percent = _gauge(
        "replicator_snapshot_percent",
        "Progress of a running snapshot, 0 to 100.",
        "peer",
        "direction",
    )
    for snapshot in snapshots:
        if snapshot.get("state") != "running":
            continue
        labels = [node, _text(snapshot.get("peer")), _text(snapshot.get("direction"))]
        _add(rows, labels, snapshot.get("rows"))
        _add(total, labels, snapshot.get("total_rows"))
        _add(percent, labels, snapshot.get("percent"))
    yield from (rows, total, percent)


def _divergence_families(node: str, divergence: Mapping[str, Any]) -> Iterable[Metric]:
    enabled = _gauge("replicator_divergence_check_enabled", "1 if table checksums are compared.")
    _add(enabled, [node], divergence.get("enabled"))
    yield enabled

    duration = _gauge(
        "replicator_divergence_check_seconds", "How long the last table checksum pass took."
    )
    _add(duration, [node], divergence.get("check_seconds"))
    yield duration

    checked = _gauge(
        "replicator_divergence_checked_timestamp_seconds",
        "Unix time of the last table checksum pass (alert when it stops moving).",
    )
    _add(checked, [node], divergence.get("checked_at"))
    yield checked

    rows = _gauge(
        "replicator_divergence_table_rows", "Rows in a table at the last checksum pass.", "table"
    )
    unversioned = _gauge(
        "replicator_divergence_unversioned_rows",
        "Rows with no replication version at the last checksum pass.",
        "table",
    )
    for table, check in sorted(_mapping(divergence.get("tables")).items()):
        fields = _mapping(check)
        _add(rows, [node, str(table)], fields.get("rows"))
        _add(unversioned, [node, str(table)], fields.get("unversioned_rows"))
    yield from (rows, unversioned)

    divergent = _gauge(
        "replicator_divergent_tables",
        "Tables whose checksum differs from the peer's at the same version vector.",
        "peer",
    )
    for peer, tables in sorted(_mapping(divergence.get("divergent_tables")).items()):
        if isinstance(tables, Sequence) and not isinstance(tables, str | bytes):
            divergent.add_metric([node, str(peer)], len(tables))
    yield divergent

    edited = _counter(
        "replicator_edited_rows_found_total", "Rows found edited behind replication's back."
    )
    _add(edited, [node], divergence.get("edited_behind_replication"))
    repairs = _counter("replicator_repairs_requested_total", "Repairs asked of peers.")
    _add(repairs, [node], divergence.get("repairs_requested"))
    repaired = _counter("replicator_rows_repaired_total", "Rows written or removed by repairs.")
    _add(repaired, [node], divergence.get("rows_repaired"))
    yield from (edited, repairs, repaired)


def _conflict_families(node: str, report: Mapping[str, Any]) -> Iterable[Metric]:
    conflicts = _mapping(report.get("conflicts"))
    open_ = _gauge("replicator_conflicts_open", "Conflicts recorded and not yet resolved.")
    _add(open_, [node], conflicts.get("open"))
    yield open_

    found = _counter(
        "replicator_conflicts_total",
        "Conflicts detected, by table, resolution strategy and kind.",
        "table",
        "strategy",
        "kind",
    )
    for table, strategies in sorted(_mapping(conflicts.get("by_table")).items()):
        for strategy, kinds in sorted(_mapping(strategies).items()):
            for kind, count in sorted(_mapping(kinds).items()):
                _add(found, [node, str(table), str(strategy), str(kind)], count)
    yield found

    quarantined = _gauge(
        "replicator_quarantined_changes", "Incoming changes held back as unappliable."
    )
    _add(quarantined, [node], report.get("quarantined"))
    yield quarantined
    dropped = _counter(
        "replicator_quarantine_dropped_total",
        "Quarantined changes dropped because the quarantine was full.",
    )
    _add(dropped, [node], _mapping(report.get("quarantine")).get("dropped"))
    yield dropped


def _limit_families(node: str, report: Mapping[str, Any]) -> Iterable[Metric]:
    """What peers had refused, and how long this node held SQLite's write lock."""
    faults = _counter(
        "replicator_peer_faults_total", "Inputs refused from peers, by reason.", "reason"
    )
    for reason, count in sorted(_mapping(report.get("peer_faults")).items()):
        _add(faults, [node, str(reason)], count)
    yield faults
    lock = _mapping(report.get("write_lock"))
    transactions = _counter(
        "replicator_write_transactions_total", "Write transactions of this node (applies, merges)."
    )
    _add(transactions, [node], lock.get("transactions"))
    yield transactions
    for key, name, doc in (
        ("p99_ms", "replicator_write_lock_hold_p99_seconds", "99th percentile of recent holds."),
        ("max_ms", "replicator_write_lock_hold_max_seconds", "Longest hold since the start."),
    ):
        family = _gauge(name, f"SQLite write lock held by this node: {doc}")
        value = _number(lock.get(key))
        _add(family, [node], None if value is None else value / 1000)
        yield family


def _store_families(node: str, store: object) -> Iterable[Metric]:
    """The applications' state store (replicator.state), when this file has one."""
    if not isinstance(store, Mapping):
        return
    counted = (
        ("reads", "Reads (get, keys, items) made by the applications' state stores."),
        ("writes", "Keys written by the applications' state stores."),
        ("deletes", "Deletes made by the applications' state stores."),
        ("hits", "State store gets that found a live key."),
        ("misses", "State store gets that found no live key."),
    )
    for name, doc in counted:
        family = _counter(f"replicator_store_{name}_total", doc)
        _add(family, [node], store.get(name))
        yield family
    ratio = _gauge("replicator_store_hit_ratio", "Share of state store gets that found a key.")
    _add(ratio, [node], store.get("hit_ratio"))
    keys = _gauge("replicator_store_keys", "Live (unexpired) keys in the state store.")
    _add(keys, [node], store.get("keys"))
    size = _gauge("replicator_store_bytes", "Bytes of the live values in the state store.")
    _add(size, [node], store.get("bytes"))
    yield from (ratio, keys, size)


def _persistence_families(node: str, persistence: Mapping[str, Any]) -> Iterable[Metric]:
    """Backups kept, and whether the state file takes writes."""
    if not persistence:
        return
    backups = _mapping(persistence.get("backups"))
    kept = _gauge("replicator_backups", "Backups of the state database kept in the directory.")
    _add(kept, [node], backups.get("count"))
    size = _gauge("replicator_backup_bytes", "Bytes of the backups kept.")
    _add(size, [node], backups.get("bytes"))
    newest = _gauge(
        "replicator_backup_newest_timestamp_seconds", "When the newest backup kept was taken."
    )
    _add(newest, [node], backups.get("newest_at"))
    failures = _counter("replicator_backup_failures", "Scheduled backups that failed.")
    _add(failures, [node], backups.get("failures"))
    refused = _gauge(
        "replicator_state_writes_refused",
        "1 while the state database refuses writes (disk full, I/O errors): replication paused.",
    )
    _add(refused, [node], persistence.get("degraded") is not None)
    restoring = _gauge("replicator_restoring", "1 while a backup is being restored.")
    _add(restoring, [node], persistence.get("restoring") is not None)
    yield from (kept, size, newest, failures, refused, restoring)
