"""The state database as replication sees it: schema, triggers, keys and row encoding."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import Change, Op
from replicator.capture.migrations import SCHEMA_VERSION
from replicator.capture.rows import decode_row, encode_row, key_sql, parse_key, pk_key
from replicator.capture.store import Store, StoreSettings
from replicator.capture.tables import SIZE_LIMIT_TRIGGER
from replicator.errors import SchemaError

SCHEMA = """
CREATE TABLE leases (mac TEXT PRIMARY KEY, ip TEXT, expires INTEGER, client BLOB, score REAL);
CREATE TABLE records (zone TEXT, name TEXT, type TEXT, value TEXT,
                      PRIMARY KEY (zone, name, type)) WITHOUT ROWID;
CREATE TABLE flows (id INTEGER PRIMARY KEY, src TEXT);
CREATE TABLE nokey (a TEXT, b TEXT);
CREATE TABLE generated (k TEXT PRIMARY KEY, v INTEGER, twice INTEGER AS (v * 2));
"""


def open_store(
    path: Path, tables: tuple[str, ...] = ("leases", "records"), node: str = "n1"
) -> Store:
    return Store.open(StoreSettings(str(path), node, tables, schema_sql=SCHEMA))


def app(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def changes(store: Store) -> list[Change]:
    store.seal()  # as the node's detector does before anything is read
    return [r.entry for r in store.read_log(0, 10_000) if isinstance(r.entry, Change)]


def test_every_sqlite_value_type_is_captured_exactly(tmp_path: Path) -> None:
    store = open_store(tmp_path / "s.db")
    values = [
        ("a", "10.0.0.1", (1 << 63) - 1, b"\x00\xff\x00", 0.1 + 0.2),
        ("b", None, -(1 << 63), b"", float("inf")),
        ("c", "ünï'cödé\x00tail", 0, None, -1.5e-300),
    ]
    app(tmp_path / "s.db").executemany("INSERT INTO leases VALUES (?, ?, ?, ?, ?)", values)
    rows = [c.row for c in changes(store)]
    assert rows == [
        dict(zip(("mac", "ip", "expires", "client", "score"), v, strict=True)) for v in values
    ]
    for row, value in zip(rows, values, strict=True):
        assert row is not None
        assert [type(x) for x in row.values()] == [type(x) for x in value]


def test_composite_key_and_without_rowid_table_are_captured(tmp_path: Path) -> None:
    store = open_store(tmp_path / "s.db")
    conn = app(tmp_path / "s.db")
    conn.execute("INSERT INTO records VALUES ('lan', 'host', 'A', '10.0.0.9')")
    conn.execute("DELETE FROM records WHERE zone = 'lan'")
    insert, delete = changes(store)
    assert insert.pk == ("lan", "host", "A")
    assert (insert.op, delete.op) == (Op.INSERT, Op.DELETE)
    assert delete.old == {"zone": "lan", "name": "host", "type": "A", "value": "10.0.0.9"}
    assert delete.replaced == insert.version
    assert store.tables["records"].without_rowid


def test_upsert_and_replace_are_captured_with_growing_generations(tmp_path: Path) -> None:
    store = open_store(tmp_path / "s.db")
    conn = app(tmp_path / "s.db")
    upsert = (
        "INSERT INTO leases (mac, ip) VALUES ('m', ?)"
        " ON CONFLICT (mac) DO UPDATE SET ip = excluded.ip"
    )
    conn.execute(upsert, ("10.0.0.1",))
    conn.execute(upsert, ("10.0.0.2",))
    conn.execute("INSERT OR REPLACE INTO leases (mac, ip) VALUES ('m', '10.0.0.3')")
    conn.execute("INSERT INTO leases (mac, ip) VALUES ('m', 'x') ON CONFLICT DO NOTHING")
    captured = changes(store)
    assert [c.op for c in captured] == [Op.INSERT, Op.UPDATE, Op.INSERT]
    assert [c.row["ip"] for c in captured if c.row] == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert [c.version.generation for c in captured] == [1, 2, 3]
    assert [c.seq for c in captured] == [1, 2, 3]


def test_update_of_the_primary_key_is_a_delete_plus_an_insert(tmp_path: Path) -> None:
    store = open_store(tmp_path / "s.db")
    conn = app(tmp_path / "s.db")
    conn.execute("INSERT INTO leases (mac, ip) VALUES ('old', '10.0.0.1')")
    conn.execute("UPDATE leases SET mac = 'new' WHERE mac = 'old'")
    _, delete, insert = changes(store)
    assert (delete.op, delete.pk) == (Op.DELETE, ("old",))
    assert (insert.op, insert.pk, insert.row) == (
        Op.INSERT,
        ("new",),
        {"mac": "new", "ip": "10.0.0.1", "expires": None, "client": None, "score": None},
    )
    old_key = store.row_version("leases", ("old",))
    new_key = store.row_version("leases", ("new",))
    assert old_key is not None
    assert old_key[1]  # a tombstone for the old key
    assert new_key is not None
    assert not new_key[1]


def test_rolled_back_writes_leave_no_trace(tmp_path: Path) -> None:
    store = open_store(tmp_path / "s.db")
    conn = app(tmp_path / "s.db")
    conn.execute("BEGIN")
    conn.execute("INSERT INTO leases (mac) VALUES ('gone')")
    conn.execute("ROLLBACK")
    conn.execute("INSERT INTO leases (mac) VALUES ('kept')")
    assert [(c.seq, c.pk) for c in changes(store)] == [(1, ("kept",))]


def test_table_without_primary_key_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match="'nokey' has no primary key"):
        open_store(tmp_path / "s.db", ("leases", "nokey"))


def test_missing_table_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match="'ghost' does not exist"):
        open_store(tmp_path / "s.db", ("ghost",))


def test_auto_assigned_integer_key_is_flagged(tmp_path: Path) -> None:
    store = open_store(tmp_path / "s.db", ("flows", "leases"))
    assert store.tables["flows"].auto_integer_key
    assert not store.tables["leases"].auto_integer_key


def test_generated_columns_are_not_replicated(tmp_path: Path) -> None:
    store = open_store(tmp_path / "s.db", ("generated",))
    app(tmp_path / "s.db").execute("INSERT INTO generated (k, v) VALUES ('x', 21)")
    assert changes(store)[0].row == {"k": "x", "v": 21}


def test_migrations_are_recorded_and_idempotent(tmp_path: Path) -> None:
    open_store(tmp_path / "s.db").close()
    store = open_store(tmp_path / "s.db")
    versions = store.conn.execute("SELECT version FROM _repl_migrations").fetchall()
    assert versions == [(v,) for v in range(1, SCHEMA_VERSION + 1)]


def test_database_from_a_newer_replicator_is_refused(tmp_path: Path) -> None:
    open_store(tmp_path / "s.db").close()
    app(tmp_path / "s.db").execute(
        "INSERT INTO _repl_migrations VALUES (?, 'future', 0)", (SCHEMA_VERSION + 1,)
    )
    with pytest.raises(SchemaError, match="newer than this replicator"):
        open_store(tmp_path / "s.db")


def test_database_of_another_node_is_refused(tmp_path: Path) -> None:
    open_store(tmp_path / "s.db", node="node1").close()
    with pytest.raises(SchemaError, match="belongs to node 'node1'"):
        open_store(tmp_path / "s.db", node="node2")


def test_tables_added_and_removed_between_runs(tmp_path: Path) -> None:
    open_store(tmp_path / "s.db", ("leases",)).close()
    store = open_store(tmp_path / "s.db", ("records",))
    conn = app(tmp_path / "s.db")
    conn.execute("INSERT INTO leases (mac) VALUES ('not replicated any more')")
    conn.execute("INSERT INTO records VALUES ('z', 'n', 'A', 'v')")
    assert [c.table for c in changes(store)] == ["records"]
    triggers = {
        name for (name,) in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'trigger'")
    }
    assert all("records" in name for name in triggers - {SIZE_LIMIT_TRIGGER})


def test_fresh_databases_get_distinct_incarnations(tmp_path: Path) -> None:
    first = open_store(tmp_path / "a.db").origin
    second = open_store(tmp_path / "b.db").origin
    assert first.node_id == second.node_id
    assert first != second


def test_new_incarnation_restarts_sequences_under_a_new_origin(tmp_path: Path) -> None:
    store = open_store(tmp_path / "s.db")
    conn = app(tmp_path / "s.db")
    conn.execute("INSERT INTO leases (mac) VALUES ('a')")
    before = store.origin
    after = store.start_new_incarnation()
    conn.execute("INSERT INTO leases (mac) VALUES ('b')")
    first, second = changes(store)
    assert (first.origin, first.seq) == (before, 1)
    assert (second.origin, second.seq) == (after, 1)
    assert after.incarnation > before.incarnation


def test_replica_refuses_local_writes_until_promoted(tmp_path: Path) -> None:
    store = open_store(tmp_path / "s.db")
    store.set_read_only(True)
    conn = app(tmp_path / "s.db")
    with pytest.raises(sqlite3.IntegrityError, match="read-only on this replica"):
        conn.execute("INSERT INTO leases (mac) VALUES ('x')")
    store.set_read_only(False, promoted=True)
    conn.execute("INSERT INTO leases (mac) VALUES ('x')")
    assert store.clock().promoted


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(
        st.none()
        | st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)
        | st.text()
        | st.binary(max_size=40)
        | st.floats(allow_nan=False),
        min_size=1,
        max_size=3,
    )
)
def test_python_key_matches_the_key_triggers_compute(values: list[object]) -> None:
    conn = sqlite3.connect(":memory:")
    columns = [f"c{n}" for n in range(len(values))]
    conn.execute(f"CREATE TABLE k ({', '.join(columns)})")
    conn.execute(f"INSERT INTO k VALUES ({', '.join('?' for _ in values)})", values)
    (expected,) = conn.execute(f"SELECT {key_sql(None, columns)} FROM k").fetchone()

    def quote_real(value: float) -> str:
        return str(conn.execute("SELECT quote(?)", (value,)).fetchone()[0])

    assert pk_key(values, quote_real) == expected  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(
    row=st.dictionaries(
        st.text(min_size=1, max_size=8),
        st.none()
        | st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)
        | st.text()
        | st.binary()
        | st.floats(allow_nan=False),
        max_size=6,
    )
)
def test_row_encoding_round_trips_every_value(row: dict[str, object]) -> None:
    decoded = decode_row(encode_row(row))  # type: ignore[arg-type]
    assert decoded == row
    assert decoded is not None
    assert [type(v) for v in decoded.values()] == [type(v) for v in row.values()]


EVICTING_SCHEMA = """
CREATE TABLE hosts (name TEXT PRIMARY KEY, ip TEXT UNIQUE, mac TEXT, vlan INTEGER,
                    UNIQUE (mac, vlan));
"""


def test_rows_evicted_by_or_replace_through_unique_columns_are_captured(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = Store.open(StoreSettings(str(path), "n1", ("hosts",), schema_sql=EVICTING_SCHEMA))
    conn = app(path)
    conn.execute("INSERT INTO hosts VALUES ('a', '10.0.0.1', 'm1', 1)")
    conn.execute("INSERT INTO hosts VALUES ('b', '10.0.0.2', 'm2', 1)")
    conn.execute("INSERT INTO hosts VALUES ('c', '10.0.0.3', 'm3', 1)")
    # Takes a's ip and b's (mac, vlan): both are evicted without a DELETE trigger firing.
    conn.execute("INSERT OR REPLACE INTO hosts VALUES ('d', '10.0.0.1', 'm2', 1)")
    conn.execute("UPDATE OR REPLACE hosts SET ip = '10.0.0.1' WHERE name = 'c'")
    captured = changes(store)[3:]
    assert [(c.op, c.pk) for c in captured] == [
        (Op.DELETE, ("a",)),
        (Op.DELETE, ("b",)),
        (Op.INSERT, ("d",)),
        (Op.DELETE, ("d",)),
        (Op.UPDATE, ("c",)),
    ]
    assert [c.seq for c in captured] == [4, 5, 6, 7, 8]
    stamps = [c.version.hlc for c in changes(store)]
    assert stamps == sorted(stamps)
    assert len(set(stamps)) == len(stamps)
    assert {r for (r,) in conn.execute("SELECT name FROM hosts")} == {"c"}
    for gone in ("a", "b", "d"):
        version = store.row_version("hosts", (gone,))
        assert version is not None
        assert version[1]  # tombstone


def test_plain_inserts_into_a_table_with_unique_columns_log_nothing_extra(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = Store.open(StoreSettings(str(path), "n1", ("hosts",), schema_sql=EVICTING_SCHEMA))
    conn = app(path)
    conn.execute("INSERT INTO hosts VALUES ('a', '10.0.0.1', 'm1', 1)")
    conn.execute("INSERT OR IGNORE INTO hosts VALUES ('b', '10.0.0.1', 'm9', 1)")
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("INSERT INTO hosts VALUES ('c', '10.0.0.1', 'm8', 1)")
    conn.execute(
        "INSERT INTO hosts VALUES ('a', '10.0.0.5', 'm1', 1)"
        " ON CONFLICT (name) DO UPDATE SET ip = excluded.ip"
    )
    assert [(c.op, c.pk) for c in changes(store)] == [(Op.INSERT, ("a",)), (Op.UPDATE, ("a",))]
    assert conn.execute("SELECT count(*) FROM _repl_evict").fetchone() == (0,)


def test_applier_follows_a_column_added_by_the_application(tmp_path: Path) -> None:
    from replicator.apply.applier import Applier

    source = open_store(tmp_path / "a.db", ("leases",), node="a")
    target = open_store(tmp_path / "b.db", ("leases",), node="b")
    applier = Applier(target)
    for path in (tmp_path / "a.db", tmp_path / "b.db"):
        app(path).execute("ALTER TABLE leases ADD COLUMN vendor TEXT")
    source.refresh_triggers()
    app(tmp_path / "a.db").execute("INSERT INTO leases (mac, vendor) VALUES ('m', 'acme')")
    result = applier.apply(changes(source))
    assert result.quarantined == 0
    assert app(tmp_path / "b.db").execute("SELECT vendor FROM leases").fetchall() == [("acme",)]


@given(
    st.lists(
        st.one_of(
            st.none(),
            st.integers(-(1 << 63), (1 << 63) - 1),
            st.text(),
            st.binary(),
        ),
        min_size=1,
        max_size=4,
    )
)
@settings(max_examples=200, deadline=None)
def test_keys_read_back_to_their_values(values: list[object]) -> None:
    conn = sqlite3.connect(":memory:")
    key = pk_key(values, lambda x: str(conn.execute("SELECT quote(?)", (x,)).fetchone()[0]))  # type: ignore[arg-type]
    assert parse_key(key) == tuple(values)
    # SQLite's own spelling of the key (as the triggers compute it) reads back the same.
    columns = ", ".join(f"? AS c{n}" for n in range(len(values)))
    names = [f"c{n}" for n in range(len(values))]
    (in_sql,) = conn.execute(
        f"SELECT {key_sql(None, names)} FROM (SELECT {columns})", values
    ).fetchone()
    assert parse_key(in_sql) == tuple(values)


@pytest.mark.parametrize("released_after", [0.1, None])
def test_a_write_transaction_waits_for_the_lock_up_to_the_busy_timeout(
    tmp_path: Path, released_after: float | None
) -> None:
    """The node's transactions try for the lock often (not on SQLite's growing sleeps), get
    it soon after the application lets go, give up at the busy timeout, and leave the
    connection's busy timeout as it was either way."""
    path = tmp_path / "s.db"
    store = Store.open(
        StoreSettings(str(path), "n1", ("leases",), busy_timeout_ms=400, schema_sql=SCHEMA)
    )
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    if released_after is not None:
        threading.Timer(released_after, holder.execute, ("COMMIT",)).start()
        store.begin_immediate()
        store.commit()
    else:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            store.begin_immediate()
        holder.execute("COMMIT")
    assert store.conn.execute("PRAGMA busy_timeout").fetchone() == (400,)
    assert not store.conn.in_transaction
