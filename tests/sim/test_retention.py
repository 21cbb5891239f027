"""Forgetting safely: log truncation below the cluster floor or past retention, and tombstones
collected only when no change still in flight could be beaten by them."""

from __future__ import annotations

import time
from pathlib import Path

from protocol import Origin
from replicator.apply.resolvers import PriorityResolver, TimestampResolver
from replicator.capture import hlc
from replicator.sync.retention import collect_tombstones, stable_bound, truncate_log
from tests.support.cluster_sim import SimNode, deliver, sync_until_quiescent

TIMESTAMP = TimestampResolver()


def log_seqs(node: SimNode, origin: Origin) -> list[int]:
    return node.logged_seqs(origin)


def floor_row(node: SimNode, origin: Origin) -> tuple[int, int] | None:
    found = node.store.conn.execute(
        "SELECT seq, stable_hlc FROM _repl_log_floor WHERE origin_node = ? AND origin_inc = ?",
        (origin.node_id, origin.incarnation),
    ).fetchone()
    return None if found is None else (found[0], found[1])


def tombstones(node: SimNode) -> list[str]:
    return [
        pk
        for (pk,) in node.store.conn.execute(
            "SELECT pk FROM _repl_rowmeta WHERE deleted ORDER BY pk"
        )
    ]


def write(node: SimNode, *macs: str) -> None:
    for mac in macs:
        node.execute("INSERT OR REPLACE INTO leases (mac, ip) VALUES (?, '10.0.0.1')", (mac,))


def test_log_is_cut_up_to_the_first_entry_some_node_lacks(tmp_path: Path) -> None:
    a = SimNode(tmp_path, "a", TIMESTAMP)
    write(a, "m1", "m2", "m3", "m4")
    floor = {a.origin: 2}
    result = truncate_log(a.store.conn, floor)
    assert (result.removed, result.past_floor) == (2, 0)
    assert log_seqs(a, a.origin) == [3, 4]
    seq, stable = floor_row(a, a.origin) or (0, 0)
    assert seq == 2
    assert (
        stable
        == a.store.conn.execute("SELECT hlc FROM _repl_rowmeta WHERE pk = ?", ("'m2'",)).fetchone()[
            0
        ]
    )
    # Nothing below the floor is left to cut: a second pass removes nothing.
    assert truncate_log(a.store.conn, floor).removed == 0


def test_an_origin_missing_from_the_floor_stops_the_cut(tmp_path: Path) -> None:
    a, b = SimNode(tmp_path, "a", TIMESTAMP), SimNode(tmp_path, "b", TIMESTAMP)
    write(a, "m1")
    write(b, "b1")
    deliver(b, a)  # a's log: a1, then b1, which not every node holds
    write(a, "m2")
    result = truncate_log(a.store.conn, {a.origin: 2})
    assert result.removed == 1
    assert log_seqs(a, a.origin) == [2]
    assert log_seqs(a, b.origin) == [1]


def test_retention_cuts_past_the_floor_and_says_how_much_some_node_lacked(
    tmp_path: Path,
) -> None:
    a = SimNode(tmp_path, "a", TIMESTAMP)
    write(a, "m1", "m2", "m3")
    newest = max(r.entry.version.hlc for r in a.log())  # type: ignore[union-attr]
    result = truncate_log(a.store.conn, {a.origin: 1}, retention_hlc=newest)
    assert (result.removed, result.past_floor) == (2, 1)
    assert log_seqs(a, a.origin) == [3]
    seq, stable = floor_row(a, a.origin) or (0, 0)
    # The floor moves to what was cut; the stable stamp only to what every node held.
    assert seq == 2
    assert (
        stable
        == a.store.conn.execute("SELECT hlc FROM _repl_rowmeta WHERE pk = ?", ("'m1'",)).fetchone()[
            0
        ]
    )


def test_no_bound_until_every_node_has_reported(tmp_path: Path) -> None:
    a = SimNode(tmp_path, "a", TIMESTAMP)
    write(a, "m1")
    now = hlc.wall_clock_ms()
    reports = {"a": (now, a.vector()), "b": (0, {})}
    assert stable_bound(a.store.conn, reports, {}) == 0


def test_bound_trails_what_some_node_still_lacks(tmp_path: Path) -> None:
    a, b = SimNode(tmp_path, "a", TIMESTAMP), SimNode(tmp_path, "b", TIMESTAMP)
    write(a, "m1", "m2")
    deliver(a, b)
    now = hlc.wall_clock_ms()
    everyone = {"a": (now, a.vector()), "b": (now, b.vector())}
    # Every node holds everything: future writes are stamped after the reports.
    assert stable_bound(a.store.conn, everyone, {a.origin: 2}) == hlc.pack(now)
    # b lacks a's second write: the bound stays below its stamp.
    write(a, "m3")
    reports = {"a": (now, a.vector()), "b": (now, b.vector())}
    bound = stable_bound(a.store.conn, reports, {a.origin: 2})
    first = a.log()[0].entry.version.hlc  # type: ignore[union-attr]
    assert bound == first  # nothing truncated yet: the oldest logged stamp
    truncate_log(a.store.conn, {a.origin: 2})
    (m2,) = a.store.conn.execute("SELECT hlc FROM _repl_rowmeta WHERE pk = ?", ("'m2'",)).fetchone()
    assert stable_bound(a.store.conn, reports, {a.origin: 2}) == m2


def test_an_origin_this_node_never_saw_gives_no_bound(tmp_path: Path) -> None:
    a, c = SimNode(tmp_path, "a", TIMESTAMP), SimNode(tmp_path, "c", TIMESTAMP)
    write(c, "c1")
    now = hlc.wall_clock_ms()
    reports = {"a": (now, a.vector()), "c": (now, c.vector())}
    assert stable_bound(a.store.conn, reports, {}) == 0


def test_tombstones_go_below_the_bound_under_the_timestamp_order_only(tmp_path: Path) -> None:
    a = SimNode(tmp_path, "a", TIMESTAMP)
    write(a, "old", "kept")
    a.execute("DELETE FROM leases WHERE mac = 'old'")
    a.execute("INSERT INTO kv (a, b, v) VALUES (1, 'x', 1)")
    a.execute("DELETE FROM kv")
    (bound,) = a.store.conn.execute("SELECT MAX(hlc) + 1 FROM _repl_rowmeta").fetchone()
    # kv is under a priority order here: its tombstone stays until the retention bound.
    assert collect_tombstones(a.store.conn, bound, None, ["leases"]) == 1
    assert tombstones(a) == ["1,'x'"]
    assert collect_tombstones(a.store.conn, bound, bound, ["leases"]) == 1
    assert tombstones(a) == []
    # Live rows' versions are never collected.
    assert a.version_of("leases", "'kept'") is not None


def test_a_tombstone_newer_than_the_bound_survives(tmp_path: Path) -> None:
    a = SimNode(tmp_path, "a", TIMESTAMP)
    write(a, "m1")
    a.execute("DELETE FROM leases")
    (stamp,) = a.store.conn.execute("SELECT hlc FROM _repl_rowmeta").fetchone()
    assert collect_tombstones(a.store.conn, stamp, None, ["leases"]) == 0
    assert tombstones(a) == ["'m1'"]


def test_collecting_below_the_bound_changes_no_outcome(tmp_path: Path) -> None:
    """A write still in flight is stamped above the bound, so it beats the tombstone whether
    the tombstone is kept or collected: nodes that collected and nodes that did not agree."""
    a, b, c = (SimNode(tmp_path, name, TIMESTAMP) for name in "abc")
    write(a, "m1")
    sync_until_quiescent([a, b, c])
    a.execute("DELETE FROM leases")
    sync_until_quiescent([a, b, c])
    now = hlc.wall_clock_ms()
    floor = dict(a.vector())
    reports = {n.name: (now, n.vector()) for n in (a, b, c)}
    truncate_log(a.store.conn, floor)
    bound = stable_bound(a.store.conn, reports, floor)
    assert collect_tombstones(a.store.conn, bound, None, ["leases"]) == 1
    write(c, "m1")  # after the reports: stamped above the bound
    sync_until_quiescent([a, b, c])
    assert a.rows("leases") == b.rows("leases") == c.rows("leases")
    assert len(a.rows("leases")) == 1


def test_priority_tombstones_are_kept_by_the_collector_without_retention(tmp_path: Path) -> None:
    resolver = PriorityResolver(priorities={"a": 2, "b": 1})
    a = SimNode(tmp_path, "a", resolver)
    write(a, "m1")
    a.execute("DELETE FROM leases")
    assert collect_tombstones(a.store.conn, hlc.pack(hlc.wall_clock_ms() + 1000), None, []) == 0
    assert tombstones(a) == ["'m1'"]


def test_a_write_older_than_the_tombstone_still_in_flight_keeps_it(tmp_path: Path) -> None:
    a, b, c = (SimNode(tmp_path, name, TIMESTAMP) for name in "abc")
    write(a, "m1")
    sync_until_quiescent([a, b, c])
    c.execute("UPDATE leases SET ip = '10.9.9.9'")  # not yet delivered anywhere
    time.sleep(0.005)  # a later millisecond, so the stamps cannot tie
    a.execute("DELETE FROM leases")  # stamped later: it must win everywhere
    deliver(a, b)
    deliver(a, c)
    now = hlc.wall_clock_ms()
    reports = {n.name: (now, n.vector()) for n in (a, b, c)}
    floor = {o: min(n.vector().get(o, 0) for n in (a, b, c)) for o in c.vector()}
    floor = {o: s for o, s in floor.items() if s}
    truncate_log(a.store.conn, floor)
    bound = stable_bound(a.store.conn, reports, floor)
    assert collect_tombstones(a.store.conn, bound, None, ["leases"]) == 0
    sync_until_quiescent([a, b, c])
    assert a.rows("leases") == b.rows("leases") == c.rows("leases") == []
