"""Prometheus metrics: what an operator's dashboards and alerts read from ``GET /metrics``,
built from the status report, robust to missing fields, and kept off the global registry."""

from __future__ import annotations

import copy
from typing import Any

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from replicator.ops.metrics import NodeMetrics
from replicator.sync.snapshot import SnapshotProgress

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def sample_report() -> dict[str, Any]:
    running = SnapshotProgress("node2", "receiving", "behind the log floor")
    running.rows, running.total_rows, running.bytes = 25, 100, 4096
    finished = SnapshotProgress("node3", "sending", "asked")
    finished.rows = finished.total_rows = 10
    finished.finish()
    return {
        "node_id": "node1",
        "mode": "active-active",
        "role": "peer",
        "paused": False,
        "alarms": ["peer node3 unreachable for 300s"],
        "uptime_seconds": 12.5,
        "log_position": 1234,
        "version_vector": {"node1#17000": 1200},
        "peers": [
            {
                "id": "node2",
                "address": "127.0.0.2:9001",
                "state": "connected",
                "seconds_since_contact": 0.2,
                "sent_position": 1200,
                "acked_position": 1190,
                "lag_changes": 44,
                "lag_seconds": 0.75,
                "skew_ms": -3,
                "bytes_in": 10,
                "bytes_out": 20,
                "changes_sent": 1190,
                "changes_received": 5,
                "last_error": None,
            },
            {
                "id": "node3",
                "address": "127.0.0.3:9001",
                "state": "disconnected",
                "seconds_since_contact": None,
                "sent_position": 0,
                "acked_position": 0,
                "lag_changes": 1234,
                "lag_seconds": 0.0,
                "skew_ms": None,
                "bytes_in": 0,
                "bytes_out": 0,
                "changes_sent": 0,
                "changes_received": 0,
                "last_error": "connection refused",
            },
        ],
        "snapshots": [running.as_dict(), finished.as_dict()],
        "divergence": {
            "enabled": True,
            "checked_at": 1.7e9,
            "check_seconds": 0.125,
            "vector": {},
            "tables": {"dhcp_leases": {"rows": 500, "checksum": "ab" * 16, "unversioned_rows": 2}},
            "edited_behind_replication": 3,
            "divergent_tables": {"node2": ["dhcp_leases"]},
            "repairs_requested": 1,
            "rows_repaired": 7,
        },
        "conflicts": {
            "open": 2,
            "by_table": {"dhcp_leases": {"timestamp": {"concurrent": 5, "near_tie": 1}}},
        },
        "quarantined": 4,
        "quarantine": {"held": 4, "limit": 10_000, "dropped": 6},
        "peer_faults": {"frame_too_large": 2, "skip_beyond_holdings": 1},
        "write_lock": {"transactions": 90, "p50_ms": 4.0, "p99_ms": 12.5, "max_ms": 40.0},
        "persistence": {
            "backups": {"count": 3, "bytes": 4096, "newest_at": 1.7e9, "failures": 1},
            "degraded": {"since": 1.7e9, "error": "database or disk is full"},
            "restoring": None,
        },
    }


def scrape(metrics: NodeMetrics) -> tuple[dict[str, str], Samples]:
    """Family name -> type, and (sample name, labels) -> value, as Prometheus would read them."""
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        types[family.name] = family.type
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = sample.value
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def test_node_and_peer_series() -> None:
    _, samples = scrape(NodeMetrics(sample_report))
    node = {"node": "node1"}
    info = {"mode": "active-active", "role": "peer", **node}
    assert value(samples, "replicator_node_info", **info) == 1
    assert value(samples, "replicator_paused", **node) == 0
    assert value(samples, "replicator_alarms", **node) == 1
    assert value(samples, "replicator_uptime_seconds", **node) == 12.5
    assert value(samples, "replicator_log_position", **node) == 1234

    up = {"peer": "node2", **node}
    down = {"peer": "node3", **node}
    assert value(samples, "replicator_peer_connected", **up) == 1
    assert value(samples, "replicator_peer_connected", **down) == 0
    assert value(samples, "replicator_peer_lag_changes", **up) == 44
    assert value(samples, "replicator_peer_lag_changes", **down) == 1234
    assert value(samples, "replicator_peer_lag_seconds", **up) == 0.75
    assert value(samples, "replicator_peer_seconds_since_contact", **up) == 0.2
    assert value(samples, "replicator_peer_clock_skew_seconds", **up) == pytest.approx(-0.003)
    assert value(samples, "replicator_peer_acked_position", **up) == 1190
    assert value(samples, "replicator_peer_sent_position", **up) == 1200
    assert value(samples, "replicator_peer_changes_sent_total", **up) == 1190
    assert value(samples, "replicator_peer_changes_received_total", **up) == 5
    assert value(samples, "replicator_peer_received_bytes_total", **up) == 10
    assert value(samples, "replicator_peer_sent_bytes_total", **up) == 20
    # unknown is left out, not reported as 0 (a 0 skew or contact age would read as healthy)
    assert ("replicator_peer_seconds_since_contact", frozenset(down.items())) not in samples
    assert ("replicator_peer_clock_skew_seconds", frozenset(down.items())) not in samples


def test_snapshot_divergence_and_conflict_series() -> None:
    _, samples = scrape(NodeMetrics(sample_report))
    running = {"node": "node1", "peer": "node2", "direction": "receiving"}
    assert value(samples, "replicator_snapshot_rows", **running) == 25
    assert value(samples, "replicator_snapshot_total_rows", **running) == 100
    assert value(samples, "replicator_snapshot_percent", **running) == 25.0
    snapshot_peers = {
        dict(labels)["peer"] for name, labels in samples if name.startswith("replicator_snapshot_")
    }
    assert snapshot_peers == {"node2"}, "a finished snapshot is not shown as in progress"

    node = {"node": "node1"}
    table = {"table": "dhcp_leases", **node}
    assert value(samples, "replicator_divergence_table_rows", **table) == 500
    assert value(samples, "replicator_divergence_unversioned_rows", **table) == 2
    assert value(samples, "replicator_divergence_check_seconds", **node) == 0.125
    assert value(samples, "replicator_divergence_checked_timestamp_seconds", **node) == 1.7e9
    assert value(samples, "replicator_divergence_check_enabled", **node) == 1
    assert value(samples, "replicator_divergent_tables", peer="node2", **node) == 1
    assert value(samples, "replicator_edited_rows_found_total", **node) == 3
    assert value(samples, "replicator_repairs_requested_total", **node) == 1
    assert value(samples, "replicator_rows_repaired_total", **node) == 7

    assert value(samples, "replicator_conflicts_open", **node) == 2
    kind = {"strategy": "timestamp", **table}
    assert value(samples, "replicator_conflicts_total", kind="concurrent", **kind) == 5
    assert value(samples, "replicator_conflicts_total", kind="near_tie", **kind) == 1
    assert value(samples, "replicator_quarantined_changes", **node) == 4
    assert value(samples, "replicator_quarantine_dropped_total", **node) == 6


def test_peer_faults_and_write_lock_series() -> None:
    _, samples = scrape(NodeMetrics(sample_report))
    node = {"node": "node1"}
    faults = "replicator_peer_faults_total"
    assert value(samples, faults, reason="frame_too_large", **node) == 2
    assert value(samples, faults, reason="skip_beyond_holdings", **node) == 1
    assert value(samples, "replicator_write_transactions_total", **node) == 90
    assert value(samples, "replicator_write_lock_hold_p99_seconds", **node) == 0.0125
    assert value(samples, "replicator_write_lock_hold_max_seconds", **node) == 0.04


def test_backup_and_write_refusal_series() -> None:
    _, samples = scrape(NodeMetrics(sample_report))
    node = {"node": "node1"}
    assert value(samples, "replicator_backups", **node) == 3
    assert value(samples, "replicator_backup_bytes", **node) == 4096
    assert value(samples, "replicator_backup_newest_timestamp_seconds", **node) == 1.7e9
    assert value(samples, "replicator_backup_failures_total", **node) == 1
    assert value(samples, "replicator_state_writes_refused", **node) == 1
    assert value(samples, "replicator_restoring", **node) == 0

    def writable() -> dict[str, Any]:
        report = sample_report()
        report["persistence"]["degraded"] = None
        return report

    _, samples = scrape(NodeMetrics(writable))
    assert value(samples, "replicator_state_writes_refused", **node) == 0


def test_types_and_names_follow_prometheus_conventions() -> None:
    types, samples = scrape(NodeMetrics(sample_report))
    counters = {name for name, kind in types.items() if kind == "counter"}
    assert counters == {
        "replicator_peer_changes_sent",
        "replicator_peer_changes_received",
        "replicator_peer_received_bytes",
        "replicator_peer_sent_bytes",
        "replicator_edited_rows_found",
        "replicator_repairs_requested",
        "replicator_rows_repaired",
        "replicator_conflicts",
        "replicator_quarantine_dropped",
        "replicator_peer_faults",
        "replicator_write_transactions",
        "replicator_backup_failures",
    }
    assert all(kind in {"counter", "gauge"} for kind in types.values())
    assert all(name.startswith("replicator_") for name in types)
    for name in names(samples):
        family = name.removesuffix("_total")
        assert (types.get(family) == "counter") == name.endswith("_total"), name
    for name, labels in samples:
        assert dict(labels).get("node") == "node1", name


def test_near_empty_reports_do_not_fail_the_scrape() -> None:
    _, samples = scrape(NodeMetrics(lambda: {"node_id": "node1"}))
    assert value(samples, "replicator_node_info", node="node1", mode="", role="") == 1
    assert names(samples) == {"replicator_node_info"}

    _, samples = scrape(NodeMetrics(dict))
    assert names(samples) == {"replicator_node_info"}

    odd: dict[str, Any] = {
        "node_id": "node1",
        "paused": None,
        "alarms": None,
        "peers": [{"id": "node2"}, "not a peer", {"id": "node3", "lag_seconds": "soon"}],
        "snapshots": "none",
        "divergence": {"tables": {"t": None}, "divergent_tables": {"node2": None}},
        "conflicts": {"open": None, "by_table": {"t": {"timestamp": None}}},
        "quarantined": None,
    }
    _, samples = scrape(NodeMetrics(lambda: odd))
    assert names(samples) == {"replicator_node_info"}


def test_scrapes_follow_the_report() -> None:
    report = sample_report()
    metrics = NodeMetrics(lambda: copy.deepcopy(report))
    _, before = scrape(metrics)
    up = {"node": "node1", "peer": "node2"}
    report["peers"][0]["changes_sent"] += 10
    report["peers"][0]["lag_changes"] = 0
    report["peers"][1]["state"] = "connected"
    report["divergence"]["rows_repaired"] = 9
    _, after = scrape(metrics)
    sent = "replicator_peer_changes_sent_total"
    assert value(after, sent, **up) == value(before, sent, **up) + 10
    assert value(after, "replicator_peer_lag_changes", **up) == 0
    assert value(after, "replicator_peer_connected", node="node1", peer="node3") == 1
    assert value(after, "replicator_rows_repaired_total", node="node1") == 9


def test_own_registry_and_global_one_untouched() -> None:
    calls = 0

    def report() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        return sample_report()

    first, second = NodeMetrics(report), NodeMetrics(report)
    assert calls == 0, "registering must not read the report (the node may not be ready)"
    assert first.registry is not second.registry
    assert first.registry is not prometheus_client.REGISTRY
    first.render()
    assert calls == 1
    leaked = [
        family.name
        for family in prometheus_client.REGISTRY.collect()
        if family.name.startswith("replicator")
    ]
    assert leaked == []
    assert calls == 1
    assert first.CONTENT_TYPE == prometheus_client.CONTENT_TYPE_LATEST
    assert NodeMetrics.CONTENT_TYPE.startswith("text/plain")
