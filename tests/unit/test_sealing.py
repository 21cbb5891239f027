"""The node stamps what the capture triggers logged, in log order, exactly as the tick rule
and the version chain would have at commit."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator.capture import hlc
from replicator.capture import store as store_module
from replicator.capture.store import Store, StoreSettings
from replicator.capture.tables import OP_DELETE, OP_INSERT, OP_UPDATE

SCHEMA = "CREATE TABLE leases (mac TEXT PRIMARY KEY, ip TEXT);"
HOUR_MS = 3_600_000


def open_store(path: Path) -> Store:
    return Store.open(StoreSettings(str(path), "n1", ("leases",), schema_sql=SCHEMA))


def log(conn: sqlite3.Connection) -> list[tuple[int, ...]]:
    return conn.execute(
        "SELECT seq, origin_seq, hlc, generation, prev_hlc, prev_gen FROM _repl_log ORDER BY seq"
    ).fetchall()


def test_nothing_is_sent_before_it_is_stamped(tmp_path: Path) -> None:
    store = open_store(tmp_path / "s.db")
    app = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    app.execute("INSERT INTO leases VALUES ('aa', '10.0.0.1')")
    assert store.log_position() == 0
    assert store.read_log(0, 10) == []
    assert store.unsealed() == (0, 1)
    assert store.seal() == 1
    assert store.log_position() == 1
    assert [record.entry.seq for record in store.read_log(0, 10)] == [1]
    assert store.seal() == 0


def test_stamps_follow_the_tick_rule_when_the_wall_clock_stepped_back(tmp_path: Path) -> None:
    store = open_store(tmp_path / "s.db")
    ahead = hlc.pack(hlc.wall_clock_ms() + HOUR_MS)  # as if the wall clock stepped back
    store.conn.execute("UPDATE _repl_clock SET hlc = ?", (ahead,))
    app = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    app.execute("INSERT INTO leases VALUES ('aa', '10.0.0.1')")
    app.execute("UPDATE leases SET ip = '10.0.0.2' WHERE mac = 'aa'")
    app.execute("INSERT INTO leases VALUES ('bb', '10.0.0.3')")
    app.execute("DELETE FROM leases WHERE mac = 'aa'")
    store.seal()
    entries = log(store.conn)
    assert [e[1] for e in entries] == [1, 2, 3, 4]
    assert [e[2] for e in entries] == [ahead + 1, ahead + 2, ahead + 3, ahead + 4]
    # aa: generations 1, 2, 3, each replacing the one before; bb: 1, replacing nothing.
    assert [(e[3], e[4], e[5]) for e in entries] == [
        (1, None, None),
        (2, ahead + 1, 1),
        (1, None, None),
        (3, ahead + 2, 2),
    ]
    assert (store.clock().hlc, store.clock().local_seq) == (ahead + 4, 4)
    version, deleted = store.row_version("leases", ("aa",)) or (None, None)
    assert version is not None
    assert (version.hlc, version.generation) == (ahead + 4, 3)
    assert deleted


def reference(clock: int, walls: list[int], keys: list[str], generations: dict[str, int]):
    """The stamps the triggers used to assign at commit: tick, then chain the key's version."""
    out = []
    current = dict(generations)
    last: dict[str, int] = {}
    for wall, key in zip(walls, keys, strict=True):
        clock = hlc.tick(clock, wall)
        generation = current.get(key, 0) + 1
        out.append((clock, generation, last.get(key)))
        current[key], last[key] = generation, clock
    return out


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 5),  # wall: a few ms either way, so both rules of tick matter
            st.sampled_from(["a", "b", "c"]),
            st.sampled_from([OP_INSERT, OP_UPDATE, OP_DELETE]),
            st.sampled_from([False, False, False, True]),  # an entry no trigger wrote first
        ),
        min_size=1,
        max_size=40,
    ),
    st.integers(0, 1),
)
def test_sealing_in_batches_gives_the_stamps_of_the_tick_rule(
    tmp_path_factory: object, writes: list[tuple[int, str, int, bool]], split: int
) -> None:
    """Whether the log holds only the triggers' entries (the usual case) or also entries no
    trigger wrote (a damaged file: they keep what they hold and take no stamp)."""
    path = tmp_path_factory.mktemp("seal") / "s.db"  # type: ignore[attr-defined]
    store = open_store(path)
    base = hlc.wall_clock_ms()
    start = store.clock().hlc
    cut = len(writes) // 2 if split else len(writes)
    append = (
        "INSERT INTO _repl_log (seq, origin_node, origin_inc, origin_seq, op, tbl, pk, hlc)"
        " SELECT (SELECT COALESCE(MAX(seq), 0) + 1 FROM _repl_log), ?, ?, ?, ?, ?, ?, ?"
        " FROM _repl_clock"
    )
    origin = (store.clock().origin.node_id, store.clock().origin.incarnation)
    for batch in (writes[:cut], writes[cut:]):
        for wall, key, op, foreign in batch:
            if foreign:
                store.conn.execute(append, ("peer", 1, 9, 0, None, None, 0))
            store.conn.execute(
                append, (*origin, 0, op, "leases", f"'{key}'", hlc.pack(base + wall))
            )
        store.seal()
    expected = reference(
        start, [base + wall for wall, _, _, _ in writes], [key for _, key, _, _ in writes], {}
    )
    ours = store.conn.execute(
        "SELECT origin_seq, hlc, generation, prev_hlc FROM _repl_log WHERE tbl IS NOT NULL"
        " ORDER BY seq"
    ).fetchall()
    assert [e[1:] for e in ours] == expected
    assert [e[0] for e in ours] == list(range(1, len(writes) + 1))
    foreign = store.conn.execute("SELECT origin_seq, hlc FROM _repl_log WHERE tbl IS NULL")
    assert set(foreign) <= {(9, 0)}  # left as they were
    last = {key: (stamp, generation) for (stamp, generation, _), (_, key, _, _)
            in zip(expected, writes, strict=True)}  # fmt: skip
    versions = {
        key.strip("'"): (stamp, generation)
        for key, stamp, generation in store.conn.execute(
            "SELECT pk, hlc, generation FROM _repl_rowmeta"
        )
    }
    assert versions == last
    assert store.clock().local_seq == len(writes)


def test_a_huge_transaction_is_stamped_in_short_transactions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "SEAL_CHUNK", 7)
    store = open_store(tmp_path / "s.db")
    app = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    with app:
        app.execute("BEGIN")
        app.executemany(
            "INSERT INTO leases VALUES (?, '10.0.0.1')", [(f"m{i}",) for i in range(50)]
        )
    holds: list[float] = []
    store.hold_observer = holds.append
    assert store.seal() == 50
    assert len(holds) == 8  # ceil(50 / 7) write transactions
    assert [e[1] for e in log(store.conn)] == list(range(1, 51))
    stamps = [e[2] for e in log(store.conn)]
    assert stamps == sorted(set(stamps))
