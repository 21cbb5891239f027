"""Divergence: checksums nodes can compare, rows edited behind replication's back found, and
repairs that carry only the buckets that differ, or only the rows the asker names."""

from __future__ import annotations

from pathlib import Path

from replicator.sync import divergence
from replicator.sync.snapshot_merge import SnapshotMerge
from replicator.sync.snapshot_source import SnapshotSource
from tests.sim.test_snapshot import fill, nodes
from tests.support.cluster_sim import SimNode, sync_until_quiescent


def checksums(node: SimNode) -> divergence.Checksums:
    conn = node.store.conn
    conn.execute("BEGIN")
    try:
        return divergence.compute(conn, node.store.tables, node.vector(), node.origin)
    finally:
        conn.execute("COMMIT")


def record_hashes(node: SimNode) -> None:
    node.store.seal()  # as the node's detector does: only stamped versions get hashes
    position = 0
    while True:
        end, _ = divergence.fill_hashes(node.store.conn, position)
        if end == position:
            return
        position = end


def behind_replications_back(node: SimNode, sql: str) -> None:
    """Write with capture bypassed, as if the triggers had been dropped by hand."""
    with node.app:
        node.app.execute("BEGIN")
        node.app.execute("INSERT INTO _repl_applying (marker) VALUES (1)")
        node.app.execute(sql)
        node.app.execute("DELETE FROM _repl_applying")


def hashed_pair(tmp_path: Path, rows: int) -> tuple[SimNode, SimNode]:
    """Two nodes holding the same ``rows`` leases, their content hashes recorded."""
    a, b = nodes(tmp_path, "a", "b")
    fill(a, rows)
    sync_until_quiescent([a, b])
    for node in (a, b):
        record_hashes(node)
    return a, b


def mark_wrong(node: SimNode) -> list[str]:
    """Find and mark the rows edited or deleted behind replication's back, as the divergence
    watch does; returns their keys."""
    check = checksums(node).tables["leases"]
    wrong = check.tampered + check.missing
    with node.store.conn:
        divergence.mark_tampered(node.store.conn, "leases", wrong)
    return wrong


def repair(source: SimNode, target: SimNode, keys: list[str] | None = None) -> SnapshotSource:
    """``target`` asks ``source`` for the buckets of ``leases`` that differ (or for the rows
    under ``keys``)."""
    asked = {"leases": checksums(target).tables["leases"].bucket_bytes()}
    named = None if keys is None else {"leases": tuple(keys)}
    snapshot = SnapshotSource(
        source.store.settings, source.store.tables, 7, repair=asked, keys=named
    )
    try:
        merge = SnapshotMerge(target.applier, snapshot.open(), source.name)
        for chunk in snapshot.chunks():
            merge.chunk(chunk)
        merge.finish(snapshot.end())
    finally:
        snapshot.close()
    return snapshot


def test_nodes_holding_the_same_rows_agree_and_row_order_does_not_matter(tmp_path: Path) -> None:
    a, b = nodes(tmp_path, "a", "b")
    fill(a, 300)
    fill(b, 300, prefix="b")
    sync_until_quiescent([a, b])  # b applied a's rows after writing its own, a the reverse
    ca, cb = checksums(a), checksums(b)
    assert ca.vector == cb.vector
    assert ca.table_checksums() == cb.table_checksums()
    assert ca.tables["leases"].rows == 600
    behind_replications_back(b, "UPDATE leases SET ip = '10.6.6.6' WHERE mac = 'm00042'")
    changed = checksums(b)
    assert changed.table_checksums()["leases"] != ca.table_checksums()["leases"]
    assert changed.table_checksums()["kv"] == ca.table_checksums()["kv"]
    assert len(changed.tables["leases"].differing(ca.tables["leases"].bucket_bytes())) == 1


def test_rows_edited_or_deleted_behind_replications_back_are_found(tmp_path: Path) -> None:
    (a,) = nodes(tmp_path, "a")
    fill(a, 50)
    record_hashes(a)
    assert checksums(a).tables["leases"].tampered == []
    behind_replications_back(a, "UPDATE leases SET ip = '10.6.6.6' WHERE mac = 'm00007'")
    behind_replications_back(a, "DELETE FROM leases WHERE mac = 'm00008'")
    behind_replications_back(a, "INSERT INTO leases (mac, ip) VALUES ('ghost', '10.0.0.9')")
    check = checksums(a).tables["leases"]
    assert check.tampered == ["'m00007'"]
    assert check.missing == ["'m00008'"]
    assert check.unversioned == 1


def test_a_repair_mends_edited_and_deleted_rows_from_a_peer(tmp_path: Path) -> None:
    a, b = hashed_pair(tmp_path, 2000)
    behind_replications_back(b, "UPDATE leases SET ip = '10.6.6.6' WHERE mac = 'm00007'")
    behind_replications_back(b, "DELETE FROM leases WHERE mac = 'm01234'")
    mark_wrong(b)
    vector = b.vector()
    snapshot = repair(a, b)
    assert b.rows("leases") == a.rows("leases")
    assert checksums(b).table_checksums() == checksums(a).table_checksums()
    assert b.vector() == vector  # a repair mends rows; it does not move the vector
    # Only the two buckets that differed travelled, not the table.
    assert len(snapshot.ranges["leases"]) == 2
    assert snapshot.end().row_count < 100
    assert checksums(b).tables["leases"].tampered == []


def test_equal_versions_with_different_contents_settle_on_one_copy(tmp_path: Path) -> None:
    """Neither side knows which copy is right (no content hash recorded yet): both repair from
    each other and end with the same copy, whichever way round they run."""
    a, b = nodes(tmp_path, "a", "b")
    fill(a, 100)
    sync_until_quiescent([a, b])
    behind_replications_back(b, "UPDATE leases SET ip = '10.6.6.6' WHERE mac = 'm00010'")
    repair(a, b)
    repair(b, a)
    assert a.rows("leases") == b.rows("leases")
    assert checksums(a).table_checksums() == checksums(b).table_checksums()


def test_a_node_with_edited_rows_never_makes_its_peer_lose_them(tmp_path: Path) -> None:
    """Both sides see their checksums differ and ask each other for a repair at once: the
    side with the edited rows withholds them, and its peer must keep its good copies."""
    a, b = hashed_pair(tmp_path, 500)
    behind_replications_back(b, "UPDATE leases SET ip = '10.6.6.6' WHERE mac = 'm00007'")
    behind_replications_back(b, "DELETE FROM leases WHERE mac = 'm00300'")
    mark_wrong(b)
    good = a.rows("leases")
    repair(b, a)  # a asks b, which answers with its edited rows withheld
    assert a.rows("leases") == good
    repair(a, b)
    assert b.rows("leases") == good


def test_a_repair_of_named_rows_carries_exactly_those_rows(tmp_path: Path) -> None:
    """The asker knows which of its rows are wrong (edited, deleted behind replication's
    back): the peer sends those rows and nothing else, and they come back right."""
    a, b = hashed_pair(tmp_path, 2000)
    behind_replications_back(b, "UPDATE leases SET ip = '10.6.6.6' WHERE mac = 'm00007'")
    behind_replications_back(b, "UPDATE leases SET ip = '10.6.6.7' WHERE mac = 'm00008'")
    behind_replications_back(b, "DELETE FROM leases WHERE mac = 'm01234'")
    wrong = mark_wrong(b)
    assert len(wrong) == 3
    vector = b.vector()
    snapshot = repair(a, b, wrong)
    assert snapshot.end().row_count == 3  # not the 3 buckets around them
    assert snapshot.ranges == {}
    assert b.rows("leases") == a.rows("leases")
    assert checksums(b).table_checksums() == checksums(a).table_checksums()
    assert b.vector() == vector
    assert checksums(b).tables["leases"].tampered == []


def test_a_named_row_the_peer_no_longer_holds_goes_and_others_stay(tmp_path: Path) -> None:
    """A named row the peer has neither as a row nor as a tombstone, though it saw its
    version, was deleted there: it goes here too. A row the peer withholds (edited there
    too) stays, and a name that is no key at all is ignored."""
    a, b = hashed_pair(tmp_path, 200)
    # On a, m00050 is gone with its tombstone collected; m00060 was edited there too.
    behind_replications_back(a, "DELETE FROM leases WHERE mac = 'm00050'")
    with a.store.conn:
        a.store.conn.execute("DELETE FROM _repl_rowmeta WHERE pk = quote('m00050')")
    behind_replications_back(a, "UPDATE leases SET ip = '10.9.9.9' WHERE mac = 'm00060'")
    assert mark_wrong(a) == ["'m00060'"]  # (m00050 has no version left to miss)
    for mac in ("m00050", "m00060"):
        behind_replications_back(b, f"UPDATE leases SET ip = '10.6.6.6' WHERE mac = '{mac}'")
    wrong = mark_wrong(b)
    before = b.rows("leases")
    repair(a, b, [*wrong, "'unterminated", "X'zz'"])
    after = b.rows("leases")
    assert len(after) == len(before) - 1
    assert "m00050" not in {row[0] for row in after}
    assert [row for row in after if row[0] == "m00060"] == [
        row for row in before if row[0] == "m00060"
    ]  # withheld by a: b keeps its copy (still marked, for another peer to mend)
