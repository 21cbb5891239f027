"""Full resync by snapshot: merged under the version order, verified, resumable, and exact
about which rows the receiver keeps."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from protocol import SnapshotColumns
from replicator.sync import retention
from replicator.sync.snapshot import CHUNK_ROWS, SnapshotError
from replicator.sync.snapshot_merge import SnapshotMerge
from replicator.sync.snapshot_source import SnapshotSource
from tests.sim.test_retention import TIMESTAMP, tombstones
from tests.support.cluster_sim import SimNode, deliver, deliver_records, sync_until_quiescent

LEASE = "INSERT OR REPLACE INTO leases (mac, ip, expires) VALUES (?, ?, ?)"


def nodes(tmp_path: Path, *names: str) -> list[SimNode]:
    return [SimNode(tmp_path, name, TIMESTAMP) for name in names]


def fill(node: SimNode, count: int, prefix: str = "m", ip: str = "10.0.0.1") -> None:
    with node.app:
        node.app.execute("BEGIN")
        node.app.executemany(LEASE, [(f"{prefix}{i:05d}", ip, i) for i in range(count)])


def open_source(node: SimNode, ident: int = 1) -> SnapshotSource:
    return SnapshotSource(node.store.settings, node.store.tables, ident)


def transfer(source: SimNode, target: SimNode, *, tamper: bool = False) -> SnapshotSource:
    """Send a whole snapshot from ``source`` and merge it into ``target``."""
    snapshot = open_source(source)
    try:
        begin = snapshot.open()
        merge = SnapshotMerge(target.applier, begin, source.name)
        for chunk in snapshot.chunks():
            declared = next(table for table in begin.tables if table.name == chunk.table)
            if tamper and "ip" in declared.columns and len(chunk.live):
                # One value altered on the way.
                columns = list(chunk.columns)
                at = declared.columns.index("ip")
                columns[at] = ("6.6.6.6", *columns[at][1:])
                merge.chunk(dataclasses.replace(chunk, columns=tuple(columns)))
                tamper = False
            else:
                merge.chunk(chunk)
        merge.finish(snapshot.end())
    finally:
        snapshot.close()
    return snapshot


def test_an_empty_node_gets_every_row_and_the_stream_resumes_with_no_gap(tmp_path: Path) -> None:
    a, b = nodes(tmp_path, "a", "b")
    fill(a, 2 * CHUNK_ROWS + 500)  # several chunks
    a.execute("DELETE FROM leases WHERE mac = 'm00007'")
    a.execute("INSERT INTO kv (a, b, v) VALUES (1, 'x', x'00ff')")
    snapshot = transfer(a, b)
    assert b.rows("leases") == a.rows("leases")
    assert b.rows("kv") == a.rows("kv")
    # Versions and tombstones alike (the replaced versions are history, not sent).
    assert [m[:7] for m in b.rowmeta()] == [m[:7] for m in a.rowmeta()]
    assert b.vector() == a.vector() == snapshot.vector
    assert not Path(snapshot.path).exists()
    # The incremental stream resumes after the snapshot's log position: nothing twice.
    fill(a, 10, prefix="late")
    after = [r for r in a.log() if r.position > snapshot.log_position]
    result = deliver_records(b, after)
    assert (result.accepted, result.duplicates, dict(result.gaps)) == (10, 0, {})
    assert b.rows("leases") == a.rows("leases")


def test_the_receivers_newer_unshipped_writes_survive_and_keep_shipping(tmp_path: Path) -> None:
    a, b = nodes(tmp_path, "a", "b")
    fill(a, 100)
    sync_until_quiescent([a, b])
    fill(a, 100, ip="10.0.0.2")  # b misses these...
    b.execute("UPDATE leases SET ip = '10.9.9.9' WHERE mac = 'm00005'")  # ...and writes later
    b.execute("INSERT INTO leases (mac, ip, expires) VALUES ('only-b', '10.7.7.7', 1)")
    transfer(a, b)
    assert b.row("leases", "'m00005'")["ip"] == "10.9.9.9"  # type: ignore[index]
    assert b.row("leases", "'only-b'") is not None
    assert b.row("leases", "'m00006'")["ip"] == "10.0.0.2"  # type: ignore[index]
    deliver(b, a)  # b's own writes are still in its log and still ship
    assert a.rows("leases") == b.rows("leases")


def test_rows_deleted_at_the_sender_go_only_if_it_had_seen_them(tmp_path: Path) -> None:
    a, b = nodes(tmp_path, "a", "b")
    fill(a, 20)
    sync_until_quiescent([a, b])
    a.execute("DELETE FROM leases WHERE mac IN ('m00003', 'm00015')")
    # a forgets those tombstones (every node "held" everything, as far as a knows).
    assert retention.collect_tombstones(a.store.conn, 1 << 62, None, ["leases"]) == 2
    b.execute("INSERT INTO leases (mac, ip, expires) VALUES ('m00003x', '10.1.1.1', 1)")
    transfer(a, b)
    macs = [row[0] for row in b.rows("leases")]
    assert "m00003" not in macs
    assert "m00015" not in macs
    assert "m00003x" in macs  # a never saw this version: kept
    assert len(macs) == 19


def test_tombstones_delete_older_rows(tmp_path: Path) -> None:
    a, b = nodes(tmp_path, "a", "b")
    fill(a, 5)
    sync_until_quiescent([a, b])
    a.execute("DELETE FROM leases WHERE mac = 'm00002'")
    transfer(a, b)
    assert [row[0] for row in b.rows("leases")] == ["m00000", "m00001", "m00003", "m00004"]
    assert tombstones(b) == ["'m00002'"]


def test_a_corrupted_chunk_fails_the_checksum_and_the_vector_stays(tmp_path: Path) -> None:
    a, b = nodes(tmp_path, "a", "b")
    fill(a, 50)
    before = b.vector()
    with pytest.raises(SnapshotError, match="checksum"):
        transfer(a, b, tamper=True)
    assert b.vector() == before
    assert b.rows("leases") == []  # not one row of it merged
    assert b.store.conn.execute("SELECT count(*) FROM _repl_snapshot_stage").fetchone() == (0,)
    transfer(a, b)  # a clean one afterwards repairs everything
    assert b.rows("leases") == a.rows("leases")


def test_an_interrupted_snapshot_is_finished_by_the_next(tmp_path: Path) -> None:
    a, b = nodes(tmp_path, "a", "b")
    fill(a, CHUNK_ROWS + 500)
    snapshot = open_source(a)
    merge = SnapshotMerge(b.applier, snapshot.open(), "a")
    chunks = snapshot.chunks()
    merge.chunk(next(chunks))  # the receiver dies here
    snapshot.close()
    assert b.rows("leases") == []  # nothing merged before the whole snapshot verified
    assert b.vector() == {}
    fill(a, 10, prefix="more")
    transfer(a, b)
    assert b.rows("leases") == a.rows("leases")
    assert b.vector() == a.vector()


def test_a_table_of_another_shape_is_refused(tmp_path: Path) -> None:
    a, b = nodes(tmp_path, "a", "b")
    snapshot = open_source(a)
    begin = snapshot.open()
    snapshot.close()
    table = begin.tables[0]
    odd = dataclasses.replace(begin, tables=(dataclasses.replace(table, columns=("x",)),))
    with pytest.raises(SnapshotError, match="differs"):
        SnapshotMerge(b.applier, odd, "a")


def test_chunks_out_of_order_are_refused(tmp_path: Path) -> None:
    a, b = nodes(tmp_path, "a", "b")
    fill(a, CHUNK_ROWS + 500)
    snapshot = open_source(a)
    merge = SnapshotMerge(b.applier, snapshot.open(), "a")
    chunks = list(snapshot.chunks())
    snapshot.close()
    second = next(c for c in chunks if c.index == 1)
    with pytest.raises(SnapshotError, match="out of order"):
        merge.chunk(second)
    assert isinstance(second, SnapshotColumns)
