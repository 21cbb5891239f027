"""Network partitions between real node processes, made by fault-injecting TCP proxies.

Every node dials every peer through its own proxy (one per direction), so cutting both
proxies of a pair partitions it: the open connection is reset, and redials are accepted and
reset at once. Both sides keep taking writes while partitioned, including to the same rows;
after the heal every node must hold the same rows and the same row versions, the newest write
of each row winning.
"""

from __future__ import annotations

import json
import signal
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from replicator.capture import hlc, sealing
from replicator.harness import NodeProcess, wait_until
from tests.support.fault_proxy import FaultProxy

INSERT = "INSERT INTO dhcp_leases (mac, ip, expires) VALUES (?, ?, ?)"
VERSIONS = "SELECT tbl, pk, hlc, node, inc, generation, deleted FROM _repl_rowmeta ORDER BY tbl, pk"
CONVERGE_TIMEOUT = 30.0  # a redial backs off to at most 5 s (x1.5 jitter) after the heal


class Cluster:
    """Nodes that reach each other only through proxies, one per (dialer, peer) pair."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.nodes: list[NodeProcess] = []
        self.proxies: dict[tuple[str, str], FaultProxy] = {}
        self.connections: list[sqlite3.Connection] = []

    def add(self, node_id: str, **options: Any) -> NodeProcess:
        host = f"127.0.0.{len(self.nodes) + 1}"
        # 2 s liveness: a dead link is noticed quickly. No truncation during the test: it
        # would collect tombstones on one node before another and blur the version comparison.
        options = {"liveness_timeout": "2s", "truncate_interval": "10m", **options}
        node = NodeProcess(self.tmp_path, node_id, host, **options)
        self.nodes.append(node)
        return node

    def start(self) -> None:
        """A proxy for every node dialling every other, then every node started."""
        for number, dialer in enumerate(self.nodes, start=11):
            for peer in self.nodes:
                if peer is not dialer:
                    # The proxies on their own addresses: their ports cannot collide with the
                    # nodes' (probed free, bound later).
                    proxy = FaultProxy(f"127.0.0.{number}", peer.host, peer.port)
                    self.proxies[dialer.node_id, peer.node_id] = proxy
                    dialer.peer_addresses[peer.node_id] = proxy.address
        for node in self.nodes:
            node.start([peer for peer in self.nodes if peer is not node])

    def app(self, node: NodeProcess) -> sqlite3.Connection:
        connection = node.app()
        self.connections.append(connection)
        return connection

    def links(self, first: NodeProcess, second: NodeProcess) -> list[FaultProxy]:
        return [
            self.proxies[first.node_id, second.node_id],
            self.proxies[second.node_id, first.node_id],
        ]

    def cut(self, first: NodeProcess, second: NodeProcess) -> None:
        for proxy in self.links(first, second):
            proxy.cut()

    def heal(self, first: NodeProcess, second: NodeProcess) -> None:
        for proxy in self.links(first, second):
            proxy.heal()

    def close(self) -> None:
        for node in self.nodes:
            node.stop(signal.SIGKILL)
        for connection in self.connections:
            connection.close()
        for proxy in self.proxies.values():
            proxy.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    nodes = Cluster(tmp_path)
    yield nodes
    nodes.close()


def lease(i: int, prefix: str, net: int) -> tuple[str, str, int]:
    """A lease whose IP (UNIQUE) is in 10.<net>/16: each writer gets its own net."""
    return f"{prefix}{i:04d}", f"10.{net}.{i >> 8 & 255}.{i & 255}", 1_800_000_000 + i


def peer_state(node: NodeProcess, peer: NodeProcess) -> str:
    states = {p["id"]: p["state"] for p in node.status()["peers"]}
    return str(states[peer.node_id])


def wait_connected(first: NodeProcess, second: NodeProcess) -> None:
    wait_until(
        lambda: (
            peer_state(first, second) == "connected" and peer_state(second, first) == "connected"
        ),
        timeout=CONVERGE_TIMEOUT,
        what=f"{first.node_id} and {second.node_id} to connect",
    )


def wait_partitioned(first: NodeProcess, second: NodeProcess) -> None:
    """Both ends report the peer as not connected (a user watches this in status)."""
    wait_until(
        lambda: (
            peer_state(first, second) != "connected" and peer_state(second, first) != "connected"
        ),
        timeout=10,
        what=f"{first.node_id} and {second.node_id} to see the partition",
    )


def versions(node: NodeProcess) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(node.db_path, timeout=10)
    try:
        return conn.execute(VERSIONS).fetchall()
    finally:
        conn.close()


def stamped(node: NodeProcess) -> None:
    """Wait until the node stamped everything its application logged: versions and the clock
    row hold an application write only once the node's detector has stamped it."""

    def caught_up() -> bool:
        conn = sqlite3.connect(node.db_path, timeout=10)
        try:
            sealed, logged = sealing.unsealed(conn)
        finally:
            conn.close()
        return sealed == logged

    wait_until(caught_up, timeout=10, what=f"{node.node_id} to stamp its writes")


def version_of(node: NodeProcess, mac: str) -> tuple[int, str, int]:
    """(hlc, node, inc) of the row's current version on this node: the timestamp order."""
    stamped(node)
    conn = sqlite3.connect(node.db_path, timeout=10)
    try:
        row = conn.execute(
            "SELECT hlc, node, inc FROM _repl_rowmeta WHERE tbl = 'dhcp_leases' AND pk = quote(?)",
            (mac,),
        ).fetchone()
    finally:
        conn.close()
    assert row is not None, f"no version of {mac} on {node.node_id}"
    return int(row[0]), str(row[1]), int(row[2])


def converged(nodes: list[NodeProcess], expected_rows: int) -> bool:
    rows = [node.rows("dhcp_leases") for node in nodes]
    if len(rows[0]) != expected_rows or any(r != rows[0] for r in rows[1:]):
        return False
    metas = [versions(node) for node in nodes]
    return all(m == metas[0] for m in metas[1:])


def wait_converged(nodes: list[NodeProcess], expected_rows: int) -> None:
    wait_until(
        lambda: converged(nodes, expected_rows),
        timeout=CONVERGE_TIMEOUT,
        what=f"{', '.join(n.node_id for n in nodes)} to converge on {expected_rows} rows",
    )


def clock_moves_on(*nodes: NodeProcess) -> None:
    """Wait until the wall clock passed every stamp these nodes issued, with a margin, so the
    next write anywhere is the newest by the timestamp order (one host, one clock)."""
    newest = 0
    for node in nodes:
        stamped(node)
        conn = sqlite3.connect(node.db_path, timeout=10)
        try:
            (stamp,) = conn.execute("SELECT hlc FROM _repl_clock").fetchone()
        finally:
            conn.close()
        newest = max(newest, hlc.physical_ms(int(stamp)))
    wait_until(lambda: hlc.wall_clock_ms() > newest + 5, timeout=5, what="the clock to move on")


def hostnames(node: NodeProcess) -> dict[str, str | None]:
    return {row[0]: row[2] for row in node.rows("dhcp_leases")}


def conflict_count(node: NodeProcess, kind: str = "concurrent") -> int:
    conn = sqlite3.connect(node.db_path, timeout=10)
    try:
        row = conn.execute(
            "SELECT COALESCE(SUM(count), 0) FROM _repl_conflict_counts"
            " WHERE tbl = 'dhcp_leases' AND kind = ?",
            (kind,),
        ).fetchone()
    finally:
        conn.close()
    return int(row[0])


SHARED = 20  # rows both sides update while partitioned
NEW = 30  # rows each side inserts while partitioned
BEFORE = 50  # rows each side inserts while connected


def partition_two_nodes_and_heal(cluster: Cluster, strategy: str) -> tuple[NodeProcess, ...]:
    """The two-node scenario; returns the converged nodes.

    While partitioned, in three rounds with the clock moving on in between (so which write is
    newest is known): a updates shared rows 0-9, deletes a0040 and updates a0041; b inserts,
    updates all 20 shared rows, updates a0040 (deleted on a) and deletes a0041 (updated on a);
    a updates shared rows 10-19. Newest wins: b's values on rows 0-9, a's on 10-19, a0040
    back with b's value, a0041 gone.
    """
    a = cluster.add("a", strategy=strategy)
    b = cluster.add("b", strategy=strategy)
    cluster.start()
    one, two = cluster.app(a), cluster.app(b)
    with one:
        one.executemany(INSERT, [lease(i, "a", 1) for i in range(BEFORE)])
    with two:
        two.executemany(INSERT, [lease(i, "b", 2) for i in range(BEFORE)])
    wait_converged([a, b], 2 * BEFORE)
    wait_connected(a, b)
    shared = [f"a{i:04d}" for i in range(SHARED)]

    cluster.cut(a, b)
    wait_partitioned(a, b)
    with one:
        one.executemany(INSERT, [lease(i, "pa", 3) for i in range(NEW)])
        one.executemany("UPDATE dhcp_leases SET hostname = ? WHERE mac = ?",
                        [(f"from-a-{mac}", mac) for mac in shared[:10]])  # fmt: skip
        one.execute("DELETE FROM dhcp_leases WHERE mac = 'a0040'")
        one.execute("UPDATE dhcp_leases SET hostname = 'kept by a' WHERE mac = 'a0041'")
    clock_moves_on(a, b)
    with two:
        two.executemany(INSERT, [lease(i, "pb", 4) for i in range(NEW)])
        two.executemany("UPDATE dhcp_leases SET hostname = ? WHERE mac = ?",
                        [(f"from-b-{mac}", mac) for mac in shared])  # fmt: skip
        two.execute("UPDATE dhcp_leases SET hostname = 'revived by b' WHERE mac = 'a0040'")
        two.execute("DELETE FROM dhcp_leases WHERE mac = 'a0041'")
    clock_moves_on(a, b)
    with one:
        one.executemany("UPDATE dhcp_leases SET hostname = ? WHERE mac = ?",
                        [(f"from-a-{mac}", mac) for mac in shared[10:]])  # fmt: skip
    # The partition held: neither side has the other's new rows.
    assert "pb0000" not in hostnames(a)
    assert "pa0000" not in hostnames(b)
    newest = {mac: max(version_of(a, mac), version_of(b, mac)) for mac in shared}

    cluster.heal(a, b)
    wait_converged([a, b], 2 * BEFORE + 2 * NEW - 1)  # a0041 deleted
    wait_connected(a, b)

    names = hostnames(a)
    written = {f"{p}{i:04d}" for p in ("a", "b") for i in range(BEFORE)}
    written |= {f"{p}{i:04d}" for p in ("pa", "pb") for i in range(NEW)}
    assert set(names) == written - {"a0041"}
    assert [names[mac] for mac in shared] == [
        f"from-b-{mac}" if i < 10 else f"from-a-{mac}" for i, mac in enumerate(shared)
    ]
    assert names["a0040"] == "revived by b"  # b's update is newer than a's delete
    # The row version each node kept is the newest either side wrote.
    assert {mac: version_of(a, mac) for mac in shared} == newest
    return a, b


def test_both_sides_write_through_a_partition_and_converge_after_the_heal(
    cluster: Cluster,
) -> None:
    """Both nodes of an active-active pair keep taking writes while cut off from each other,
    to new rows and the same rows; after the heal both hold identical rows and row versions,
    nothing written is lost, the newest write of each row wins, and the concurrent updates
    are counted as conflicts."""
    a, b = partition_two_nodes_and_heal(cluster, "timestamp")
    # 20 shared rows plus a0040 and a0041: each node sees each of the other's writes to them
    # arrive concurrent with its own.
    assert conflict_count(a) == SHARED + 2
    assert conflict_count(b) == SHARED + 2


def conflicts(node: NodeProcess) -> list[tuple[str, str, list[Any], str]]:
    """(id, key, winning version, status) of each queued conflict. The winner column says
    local or remote, from the point of view of the node that queued it, so it is resolved to
    the version here, which can be compared across nodes."""
    conn = sqlite3.connect(node.db_path, timeout=10)
    try:
        rows = conn.execute(
            "SELECT id, pk, winner, local_version, remote_version, status"
            " FROM _repl_conflicts ORDER BY id"
        ).fetchall()
    finally:
        conn.close()
    return [
        (ident, key, json.loads(local if winner == "local" else remote), status)
        for ident, key, winner, local, remote, status in rows
    ]


def test_manual_strategy_queues_the_same_conflicts_on_both_sides_of_a_partition(
    cluster: Cluster,
) -> None:
    """With the manual strategy, the writes both sides made to the same rows while partitioned
    are queued for review on both nodes, under the same conflict ids and with the same
    provisional winner, which is what both nodes hold."""
    a, b = partition_two_nodes_and_heal(cluster, "manual")
    wait_until(
        lambda: conflicts(a) == conflicts(b) and len(conflicts(a)) == SHARED + 2,
        timeout=10,
        what="both nodes to queue the same conflicts",
    )
    queued = conflicts(a)
    assert {status for *_, status in queued} == {"open"}
    # The provisional winner of each is the version both nodes kept: [hlc, node, inc, gen].
    kept = {pk: [stamp, node, inc, gen] for _, pk, stamp, node, inc, gen, _ in versions(a)}
    assert {key: winning for _, key, winning, _ in queued} == {
        key: kept[key] for _, key, _, _ in queued
    }


def test_a_node_cut_off_from_a_three_node_mesh_catches_up_after_the_heal(
    cluster: Cluster,
) -> None:
    """In a three-node mesh, a node cut off from both others keeps taking writes; the other two
    keep replicating to each other meanwhile; after the heal all three hold identical rows and
    row versions, newest write winning."""
    a, b, c = (cluster.add(node_id) for node_id in ("a", "b", "c"))
    cluster.start()
    apps = {node.node_id: cluster.app(node) for node in (a, b, c)}
    for net, (node_id, app) in enumerate(apps.items(), start=1):
        with app:
            app.executemany(INSERT, [lease(i, node_id, net) for i in range(BEFORE)])
    wait_converged([a, b, c], 3 * BEFORE)
    shared = [f"a{i:04d}" for i in range(SHARED)]

    cluster.cut(c, a)
    cluster.cut(c, b)
    wait_partitioned(c, a)
    wait_partitioned(c, b)
    for net, (node_id, app) in enumerate(apps.items(), start=4):
        with app:
            app.executemany(INSERT, [lease(i, f"p{node_id}", net) for i in range(NEW)])
    with apps["c"]:
        apps["c"].executemany("UPDATE dhcp_leases SET hostname = ? WHERE mac = ?",
                              [(f"from-c-{mac}", mac) for mac in shared])  # fmt: skip
    clock_moves_on(a, b, c)
    with apps["a"]:
        apps["a"].executemany("UPDATE dhcp_leases SET hostname = ? WHERE mac = ?",
                              [(f"from-a-{mac}", mac) for mac in shared[:10]])  # fmt: skip
        apps["a"].execute("DELETE FROM dhcp_leases WHERE mac = 'c0001'")
    # a and b still replicate to each other; c sees none of it.
    wait_until(
        lambda: (
            "pa0000" in hostnames(b)
            and "pb0000" in hostnames(a)
            and "c0001" not in hostnames(b)
            and hostnames(b)["a0000"] == "from-a-a0000"
        ),
        timeout=CONVERGE_TIMEOUT,
        what="b to see a's writes during the partition",
    )
    assert peer_state(a, b) == "connected"
    assert "pa0000" not in hostnames(c)
    assert "pc0000" not in hostnames(a)
    assert "pc0000" not in hostnames(b)

    cluster.heal(c, a)
    cluster.heal(c, b)
    wait_converged([a, b, c], 3 * BEFORE + 3 * NEW - 1)  # c0001 deleted
    names = hostnames(c)
    assert [names[mac] for mac in shared] == [
        f"from-a-{mac}" if i < 10 else f"from-c-{mac}" for i, mac in enumerate(shared)
    ]
    assert "c0001" not in names
    assert "pa0029" in names
    assert "pb0029" in names
    assert "pc0029" in names
