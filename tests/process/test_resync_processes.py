"""Full resyncs and repairs between real node processes: snapshots while applications write,
a receiver killed mid-snapshot, rows edited behind replication's back, and the resync API."""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
from pathlib import Path

from replicator.harness import NodeProcess, wait_until

INSERT = "INSERT INTO dhcp_leases (mac, ip, expires) VALUES (?, ?, ?)"
FAST_CHECKS = 'recovery = { checksum_interval = "1s" }'


def leases(prefix: str, count: int, subnet: int) -> list[tuple[str, str, int]]:
    return [(f"{prefix}{i:06d}", f"10.{subnet}.{i >> 8 & 255}.{i & 255}", i) for i in range(count)]


def started_again(node: NodeProcess, times: int) -> bool:
    return len(node.logged("node started")) == times


class Writer(threading.Thread):
    """An application writing single-row transactions until stopped."""

    def __init__(self, node: NodeProcess, prefix: str, subnet: int) -> None:
        super().__init__(daemon=True)
        self.node, self.prefix, self.subnet = node, prefix, subnet
        self.written: list[str] = []
        self._halt = threading.Event()

    def run(self) -> None:
        conn = sqlite3.connect(self.node.db_path, isolation_level=None, timeout=30)
        conn.execute("PRAGMA busy_timeout = 30000")
        try:
            i = 0
            while not self._halt.is_set():
                mac = f"{self.prefix}{i:06d}"
                conn.execute(INSERT, (mac, f"10.{self.subnet}.{i >> 8 & 255}.{i & 255}", i))
                self.written.append(mac)
                i += 1
                time.sleep(0.002)
        finally:
            conn.close()

    def stop(self) -> list[str]:
        self._halt.set()
        self.join(10)
        return self.written


def macs(node: NodeProcess) -> set[str]:
    conn = sqlite3.connect(node.db_path, timeout=10)
    try:
        return {mac for (mac,) in conn.execute("SELECT mac FROM dhcp_leases")}
    finally:
        conn.close()


def test_snapshot_while_both_sides_write_and_a_receiver_killed_halfway(
    tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    """b joins empty and far behind: a sends a snapshot. Both applications keep writing the
    whole time; b is killed with SIGKILL in the middle of the snapshot, restarts, gets a new
    one, and in the end both hold every row either side wrote."""
    resync = "recovery = { resync_threshold = 1000 }"
    a = NodeProcess(tmp_path, "a", "127.0.0.1", extra=resync)
    b = NodeProcess(tmp_path, "b", "127.0.0.2", extra=resync)
    nodes += [a, b]
    a.start([b])
    with a.app() as app:
        app.executemany(INSERT, leases("bulk", 60_000, 1))
    writer_a = Writer(a, "a-", 2)
    writer_a.start()
    b.start([a])
    wait_until(lambda: started_again(b, 1), what="b to start")
    writer_b = Writer(b, "b-", 3)
    writer_b.start()

    def receiving() -> bool:
        return any(s["direction"] == "receiving" and s["state"] == "running" and s["rows"] > 0
                   for s in b.status()["snapshots"])  # fmt: skip

    wait_until(receiving, what="b to be halfway through a snapshot")
    writer_b.stop()
    b.stop(signal.SIGKILL)
    conn = sqlite3.connect(b.db_path)
    try:
        # Nothing of the unfinished snapshot was merged: chunks wait until all arrived.
        (bulk,) = conn.execute("SELECT count(*) FROM dhcp_leases WHERE mac LIKE 'bulk%'").fetchone()
    finally:
        conn.close()
    assert bulk == 0
    b.start([a])
    wait_until(lambda: started_again(b, 2), what="b to restart")
    writer_b = Writer(b, "b2-", 4)
    writer_b.start()
    wait_until(lambda: len(b.logged("snapshot merged", peer="a")) >= 1, timeout=60,
               what="the second snapshot to be merged")  # fmt: skip
    time.sleep(0.5)
    written = set(writer_a.stop()) | set(writer_b.stop())
    expected = written | {mac for mac, _, _ in leases("bulk", 60_000, 1)}
    b_before_kill = {mac for mac in macs(b) if mac.startswith("b-")}
    expected |= b_before_kill
    wait_until(lambda: macs(a) == macs(b) == expected, timeout=60, what="both to converge")
    assert a.rows("dhcp_leases") == b.rows("dhcp_leases")


def test_rows_edited_behind_replications_back_are_repaired_from_a_peer(
    tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    a = NodeProcess(tmp_path, "a", "127.0.0.1", extra=FAST_CHECKS)
    b = NodeProcess(tmp_path, "b", "127.0.0.2", extra=FAST_CHECKS)
    nodes += [a, b]
    a.start([b])
    b.start([a])
    with a.app() as app:
        app.executemany(INSERT, leases("m", 500, 1))
    wait_until(lambda: b.count("dhcp_leases") == 500, what="b to receive the leases")
    wait_until(lambda: b.status()["divergence"]["tables"].get("dhcp_leases", {}).get("rows")
               == 500, what="b's first checksums")  # fmt: skip
    edit = b.app()
    with edit:  # the capture triggers bypassed, as when dropped by hand
        edit.execute("BEGIN")
        edit.execute("INSERT INTO _repl_applying (marker) VALUES (1)")
        edit.execute("UPDATE dhcp_leases SET ip = '10.66.6.6' WHERE mac = 'm000007'")
        edit.execute("DELETE FROM dhcp_leases WHERE mac = 'm000300'")
        edit.execute("DELETE FROM _repl_applying")
    edit.close()
    wait_until(lambda: a.rows("dhcp_leases") == b.rows("dhcp_leases"), timeout=30,
               what="b's edited rows to be repaired")  # fmt: skip
    assert b.logged("rows edited behind replication's back: repairing from a peer")
    report = b.status()["divergence"]
    assert report["edited_behind_replication"] == 2
    assert report["rows_repaired"] >= 2
    assert a.logged("sending a snapshot", peer="b")


def test_resync_on_request_through_the_control_api(
    tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    a = NodeProcess(tmp_path, "a", "127.0.0.1")
    b = NodeProcess(tmp_path, "b", "127.0.0.2")
    nodes += [a, b]
    a.start([b])
    b.start([a])
    with a.app() as app:
        app.executemany(INSERT, leases("m", 100, 1))
    wait_until(lambda: b.count("dhcp_leases") == 100, what="b to receive the leases")
    reply = b.post("/api/replication/resync", {"peer": "a", "full": True})
    assert reply == {"peer": "a", "full": True, "requested": True}
    wait_until(lambda: bool(b.logged("snapshot merged", peer="a")), what="the full resync")
    assert a.logged("peer asked for a snapshot", peer="b")
    assert b.post("/api/replication/resync", {"full": False})["peer"] == "a"
    code, error = b.api("POST", "/api/replication/resync", {"peer": "nobody", "full": True})
    assert code == 404
    assert "nobody" in error["error"]
    code, error = b.api("POST", "/api/replication/resync", {"full": "yes"})
    assert (code, error["error"]) == (400, "invalid resync request")
    assert a.rows("dhcp_leases") == b.rows("dhcp_leases")


def test_scheduled_full_resyncs_and_checkpoints(tmp_path: Path, nodes: list[NodeProcess]) -> None:
    """A cron schedule pulls full snapshots (seconds-level here, to see it happen);
    checkpoints record each peer's acknowledged position and survive a restart."""
    schedule = 'recovery = { full_resync = { schedule = "* * * * * */2" } }'
    a = NodeProcess(tmp_path, "a", "127.0.0.1")
    b = NodeProcess(tmp_path, "b", "127.0.0.2", extra=schedule)
    nodes += [a, b]
    a.start([b])
    b.start([a])
    with a.app() as app:
        app.executemany(INSERT, leases("m", 50, 1))
    wait_until(lambda: b.count("dhcp_leases") == 50, what="b to receive the leases")
    wait_until(lambda: len(b.logged("snapshot merged", peer="a")) >= 2, timeout=15,
               what="two scheduled full resyncs")  # fmt: skip
    assert b.logged("scheduled full resync requested", peer="a")
    checkpoint = a.post("/api/replication/checkpoint")
    assert checkpoint["reason"] == "requested by the operator"
    assert checkpoint["peers"]["b"]["acked_position"] == 50
    assert checkpoint["version_vector"] == a.status()["version_vector"]
    a.stop()
    a.start([b])
    wait_until(lambda: started_again(a, 2), what="a to restart")
    assert [c["id"] for c in a.status()["checkpoints"]] == [checkpoint["id"]]


def test_filtered_and_transformed_replication_keeps_checksums_in_agreement(
    tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    """Rows in the 'test' scope stay home, client ids stay home, IPs travel anonymized; a row
    moved into 'test' is deleted at the peer; both nodes still agree on their checksums (they
    compare only what links carry); and a full resync keeps the receiver's unshared rows."""
    shared = """
  filters = { custom_filters = [ { type = "dhcp", condition = "scope != 'test'" } ],
              exclude_sensitive = true, sensitive_columns = ["dhcp_leases.client_id"] }
  transformations = { anonymize_ips = true }
  recovery = { checksum_interval = "1s" }"""
    a = NodeProcess(tmp_path, "a", "127.0.0.1", extra=shared)
    b = NodeProcess(tmp_path, "b", "127.0.0.2", extra=shared)
    nodes += [a, b]
    a.start([b])
    b.start([a])
    row = "INSERT INTO dhcp_leases (mac, ip, scope, expires, client_id) VALUES (?, ?, ?, 1, ?)"
    with a.app() as app:
        app.execute(row, ("m1", "10.0.0.1", "lan", b"\x01"))
        app.execute(row, ("m2", "10.0.0.2", "test", b"\x02"))
        app.execute(row, ("m3", "10.0.0.3", "lan", b"\x03"))
    with b.app() as app:
        app.execute(row, ("b-test", "10.9.0.1", "test", b"\x09"))
    wait_until(lambda: b.count("dhcp_leases") == 3, what="b to receive the shared leases")
    received = {r[0]: r for r in b.rows("dhcp_leases")}
    assert set(received) == {"m1", "m3", "b-test"}
    _mac, ip, _hostname, scope, _expires, client_id = received["m1"]
    assert (scope, client_id) == ("lan", None)
    assert str(ip).startswith("ip-")
    assert "b-test" not in {r[0] for r in a.rows("dhcp_leases")}
    with a.app() as app:
        app.execute("UPDATE dhcp_leases SET scope = 'test' WHERE mac = 'm3'")
    wait_until(lambda: "m3" not in {r[0] for r in b.rows("dhcp_leases")},
               what="the row that stopped matching to leave b")  # fmt: skip

    def agreed() -> bool:
        ours, theirs = a.status()["divergence"], b.status()["divergence"]
        shared_rows = ours["tables"].get("dhcp_leases", {}).get("rows")
        same = ours["vector"] == theirs["vector"] and ours["tables"] == theirs["tables"]
        return shared_rows == 1 and same  # m1, the only row both share

    wait_until(agreed, what="both nodes' checksums to agree at the same vector")
    assert b.status()["divergence"]["rows_repaired"] == 0
    b.post("/api/replication/resync", {"peer": "a", "full": True})
    wait_until(lambda: bool(b.logged("snapshot merged", peer="a")), what="b's full resync")
    assert {r[0] for r in b.rows("dhcp_leases")} == {"m1", "b-test"}


def test_a_peer_away_past_log_retention_gets_a_snapshot_while_both_write(
    tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    """b is down so long that a forgets log entries b never had (log_retention); when b
    comes back, a snapshot brings it up to date while both applications keep writing, and
    nothing either side wrote is lost."""
    a = NodeProcess(tmp_path, "a", "127.0.0.1", truncate_interval="300ms", log_retention="1s")
    b = NodeProcess(tmp_path, "b", "127.0.0.2")
    nodes += [a, b]
    a.start([b])
    b.start([a])
    with a.app() as app:
        app.executemany(INSERT, leases("m", 200, 1))
    wait_until(lambda: b.count("dhcp_leases") == 200, what="b to receive the leases")
    b.stop()
    with a.app() as app:
        app.executemany(INSERT, leases("away", 500, 2))
    forgotten = "log entries past log_retention forgotten before every peer had them"
    wait_until(lambda: bool(a.logged(forgotten)), what="a to forget what b lacks")
    writer_a = Writer(a, "a-", 3)
    writer_a.start()
    b.start([a])
    wait_until(lambda: started_again(b, 2), what="b to restart")
    writer_b = Writer(b, "b-", 4)
    writer_b.start()
    wait_until(lambda: bool(b.logged("snapshot merged", peer="a")), what="b's snapshot")
    time.sleep(0.5)
    written = set(writer_a.stop()) | set(writer_b.stop())
    expected = written | {m for m, _, _ in leases("m", 200, 1) + leases("away", 500, 2)}
    wait_until(lambda: macs(a) == macs(b) == expected, what="both to hold every row")
    assert a.logged("sending a snapshot", peer="b")
