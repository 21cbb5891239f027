"""The state store an application embeds: values, scopes, patterns, expiry, transactions,
write-behind, metrics and migrations, on real SQLite files (and real processes where a
restart or a failing disk is the point). Replication between nodes is played in-process here
(log entries applied by the real applier); tests/process/test_state_store_nodes.py runs real
nodes."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from protocol import Change, Skip
from replicator.app_migrations import Migration, MigrationError, Migrations
from replicator.apply.applier import Applier
from replicator.capture.store import Store, StoreSettings
from replicator.errors import ReplicationError
from replicator.ops.metrics import NodeMetrics
from replicator.state import (
    DDL,
    TABLE,
    AsyncStateStore,
    BatchedWriter,
    ReadOnlyReplicaError,
    StateSchemaError,
    StateStore,
    StateStoreClosed,
    StateStoreError,
    StateValueError,
    WriteBehindFull,
)
from replicator.state.counters import node_figures
from replicator.sync import divergence

ROOT = Path(__file__).resolve().parents[2]


class Clock:
    """Unix seconds that move only when a test says so."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[StateStore]:
    opened = StateStore(tmp_path / "state.db", clock=clock, purge_margin=1.0)
    yield opened
    opened.close()


class Peer:
    """A node's state file as the node prepares it (state_kv replicated), an applier, and
    the application's store on it. ``pull`` applies another peer's whole log, as a link would."""

    def __init__(self, directory: Path, name: str, clock: Clock) -> None:
        self.path = directory / f"{name}.db"
        self.node = Store.open(StoreSettings(str(self.path), name, (TABLE,), schema_sql=DDL))
        self.applier = Applier(self.node)
        self.app = StateStore(self.path, clock=clock, purge_margin=1.0)

    def pull(self, source: Peer) -> None:
        source.node.seal()  # as the node's detector does before anything is read
        entries = [record.entry for record in source.node.read_log(0, 1 << 62)]
        changes = [e for e in entries if isinstance(e, Change)]
        result = self.applier.apply(changes, [e for e in entries if isinstance(e, Skip)])
        assert not result.gaps

    def checksums(self) -> divergence.Checksums:
        conn = self.node.conn
        conn.execute("BEGIN")
        try:
            vector = self.node.version_vector()
            return divergence.compute(conn, self.node.tables, vector, self.node.origin)
        finally:
            conn.execute("COMMIT")

    def stored_keys(self) -> list[tuple[str, str]]:
        """Every row of the table, expired or not, as (scope, key)."""
        return self.node.conn.execute(
            f"SELECT scope, key FROM {TABLE} WHERE scope != '_repl_expiry' ORDER BY 1, 2"
        ).fetchall()

    def logged_keys(self) -> list[str]:
        return [pk for (pk,) in self.node.conn.execute("SELECT pk FROM _repl_log ORDER BY seq")]

    def close(self) -> None:
        self.app.close()
        self.node.close()


@pytest.fixture
def peers(tmp_path: Path, clock: Clock) -> Iterator[Callable[[str], Peer]]:
    made: list[Peer] = []

    def make(name: str) -> Peer:
        made.append(Peer(tmp_path, name, clock))
        return made[-1]

    yield make
    for peer in made:
        peer.close()


def run_python(script: str, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# -- values, keys and scopes -------------------------------------------------------------------


def test_values_come_back_as_stored_across_store_instances(tmp_path: Path) -> None:
    values = {
        "lease": {"ip": "10.0.0.10", "expires": 1_900_000_000, "tags": ["a", "b"]},
        "raw": b"\x00\xffbytes",
        "ratio": 0.1,
        "flag": False,
        "nothing": None,
        "int keys": {1: "one", 2: "two"},
        "big": 2**63 - 1,
    }
    with StateStore(tmp_path / "state.db") as first:
        for key, value in values.items():
            first.set(key, value)
        first.set("pair", (1, 2))
    with StateStore(tmp_path / "state.db") as second:
        assert {key: second.get(key) for key in values} == values
        assert second.get("pair") == [1, 2]  # msgpack has no tuples
        assert second.get("absent") is None
        assert second.get("absent", "fallback") == "fallback"


@pytest.mark.parametrize("value", [{1, 2}, object(), 2**64, {"nested": [Path("/")]}])
def test_a_value_msgpack_cannot_encode_is_refused_naming_the_key(
    store: StateStore, value: Any
) -> None:
    with pytest.raises(StateValueError, match="'config'") as raised:
        store.set("config", value)
    assert isinstance(raised.value, TypeError)
    assert store.keys() == []


@pytest.mark.parametrize("key", ["", None, 7, "nul\x00inside"])
def test_keys_are_non_empty_strings(store: StateStore, key: Any) -> None:
    with pytest.raises(ValueError, match="non-empty string"):
        store.set(key, 1)


def test_keys_match_glob_patterns_and_items_take_a_literal_prefix(store: StateStore) -> None:
    for key in ["leases/1", "leases/2", "leases/10", "dns/a", "le*ases/x", "Leases/3"]:
        store.set(key, key.upper())
    assert store.keys() == sorted(["leases/1", "leases/2", "leases/10", "dns/a", "le*ases/x",
                                   "Leases/3"])  # fmt: skip
    assert store.keys("leases/*") == ["leases/1", "leases/10", "leases/2"]
    assert store.keys("leases/?") == ["leases/1", "leases/2"]
    assert store.keys("leases/[12]") == ["leases/1", "leases/2"]
    assert store.keys("[^l]*") == ["Leases/3", "dns/a"]
    assert store.keys("nothing*") == []
    assert store.items("le*") == [("le*ases/x", "LE*ASES/X")]  # '*' is literal in a prefix
    assert [key for key, _ in store.items("leases/1")] == ["leases/1", "leases/10"]
    assert len(store.items()) == 6


def test_a_scope_reads_and_lists_only_its_own_keys(store: StateStore) -> None:
    tenant_a, tenant_b = store.scope("tenant-a"), store.scope("tenant-b")
    tenant_a.set("config", {"theme": "dark"})
    tenant_b.set("config", {"theme": "light"})
    tenant_b.set("secret", "b only")
    store.set("config", "the default scope's")
    assert tenant_a.get("config") == {"theme": "dark"}
    assert tenant_b.get("config") == {"theme": "light"}
    assert tenant_a.get("secret") is None
    assert tenant_a.keys() == ["config"]
    assert tenant_a.items() == [("config", {"theme": "dark"})]
    assert tenant_a.delete("secret") is False
    assert tenant_b.get("secret") == "b only"
    assert store.get("config") == "the default scope's"
    # A tenant's scopes nest inside it: it cannot name another tenant's.
    inner = tenant_a.scope("tenant-b")
    assert inner.scope_name == "tenant-a/tenant-b"
    assert inner.get("config") is None
    assert store.scope("tenant-a").get("config") == {"theme": "dark"}  # the same scope again


@pytest.mark.parametrize("name", ["", "a/b", "_repl_expiry", "_replx", "nul\x00"])
def test_reserved_or_ambiguous_scope_names_are_refused(store: StateStore, name: str) -> None:
    with pytest.raises(ValueError, match="scope name"):
        store.scope(name)


def test_delete_reports_whether_a_live_key_went(store: StateStore, clock: Clock) -> None:
    store.set("here", 1)
    store.set("fading", 2, ttl=5)
    clock.now += 6
    assert store.delete("here") is True
    assert store.delete("here") is False
    assert store.delete("fading") is False  # it had expired already
    assert store.keys() == []


# -- expiry --------------------------------------------------------------------------------


def test_keys_expire_by_the_store_clock(store: StateStore, clock: Clock) -> None:
    store.set("lease", {"ip": "10.0.0.1"}, ttl=30)
    store.set("forever", 1)
    clock.now += 29.9
    assert store.get("lease") == {"ip": "10.0.0.1"}
    clock.now += 0.2
    assert store.get("lease") is None
    assert store.keys() == ["forever"]
    assert store.items() == [("forever", 1)]
    store.set("lease", {"ip": "10.0.0.2"})  # set again: no expiry any more
    clock.now += 1e6
    assert store.get("lease") == {"ip": "10.0.0.2"}
    with pytest.raises(ValueError, match="ttl"):
        store.set("lease", 1, ttl=0)


def test_purge_removes_only_keys_expired_past_the_margin(store: StateStore, clock: Clock) -> None:
    store.set("old", 1, ttl=10)
    store.set("recent", 2, ttl=10.5)
    store.set("kept", 3)
    clock.now += 10.6  # both expired; "old" more than the 1 s margin ago... not yet
    assert store.purge_expired() == 0
    clock.now += 0.5
    assert store.purge_expired() == 1
    with store.connection() as conn:
        assert conn.execute(f"SELECT key FROM {TABLE} ORDER BY key").fetchall() == [
            ("kept",),
            ("recent",),
        ]
    assert not store.replicated  # no node captures this file: a plain delete


def test_a_purge_is_not_replicated_and_leaves_checksums_equal(
    peers: Callable[[str], Peer], clock: Clock
) -> None:
    a, b, c = peers("a"), peers("b"), peers("c")
    c.app.set("lease/2", "c wrote first, concurrently")  # never reaches a before the purge
    a.app.set("lease/1", "short", ttl=10)
    a.app.set("lease/2", "short too", ttl=10)
    a.app.set("kept", "no expiry")
    b.pull(a)
    assert a.checksums().table_checksums() == b.checksums().table_checksums()

    clock.now += 20
    assert a.app.purge_expired() == 2
    assert a.logged_keys()[-1] == "'_repl_expiry','a'"  # the cutoff travels; the purge does not
    b.pull(a)
    assert a.stored_keys() == [("default", "kept")]
    assert b.stored_keys() == [("default", "kept"), ("default", "lease/1"), ("default", "lease/2")]
    mine, theirs = a.checksums(), b.checksums()
    assert mine.vector == theirs.vector
    assert mine.table_checksums() == theirs.table_checksums()
    assert theirs.tables[TABLE].rows == 2  # kept and a's cutoff: the expired rows left out
    assert not mine.tables[TABLE].missing  # a purged row is no edit behind replication's back

    # A late write that lost to the purged version still loses to its tombstone...
    a.pull(c)
    b.pull(c)
    assert a.app.get("lease/2") is None
    assert ("default", "lease/2") not in a.stored_keys()
    # ...and a newer write made elsewhere after the expiry comes back in.
    b.app.set("lease/1", "set again on b")
    a.pull(b)
    assert a.app.get("lease/1") == "set again on b"
    assert a.checksums().table_checksums() == b.checksums().table_checksums()


def test_a_replica_purges_only_below_the_cutoff_its_primary_recorded(
    peers: Callable[[str], Peer], clock: Clock
) -> None:
    primary, replica = peers("primary"), peers("replica")
    replica.node.set_read_only(True)
    primary.app.set("lease", 1, ttl=10)
    replica.pull(primary)
    clock.now += 20
    assert replica.app.purge_expired() == 0  # no cutoff recorded yet: nothing it may remove
    assert replica.app.keys() == []  # though reads hide it already
    assert primary.app.purge_expired() == 1
    replica.pull(primary)
    assert replica.app.purge_expired() == 1
    assert replica.stored_keys() == []
    assert primary.checksums().table_checksums() == replica.checksums().table_checksums()


def test_writes_on_a_replica_are_refused_by_name(peers: Callable[[str], Peer]) -> None:
    primary, replica = peers("primary"), peers("replica")
    primary.app.set("config", "from the primary")
    replica.pull(primary)
    replica.node.set_read_only(True)
    with pytest.raises(ReadOnlyReplicaError, match="replica"):
        replica.app.set("config", "local")
    with pytest.raises(ReadOnlyReplicaError):
        replica.app.delete("config")
    assert replica.app.get("config") == "from the primary"
    assert replica.app.replicated


# -- transactions ----------------------------------------------------------------------------


def test_a_transaction_is_all_or_nothing(store: StateStore) -> None:
    store.set("balance/a", 100)
    store.set("balance/b", 0)
    tenant = store.scope("audit")

    def transfer_then_crash() -> None:
        with store.transaction() as tx:
            tx.set("balance/a", tx.get("balance/a") - 30)
            store.set("balance/b", 30)  # the store itself, on this thread: in the transaction
            tenant.set("entry", "moved 30")
            assert tx.get("balance/b") == 30  # reads see the transaction's writes
            raise RuntimeError("crash before commit")

    with pytest.raises(RuntimeError, match="crash"):
        transfer_then_crash()
    assert (store.get("balance/a"), store.get("balance/b")) == (100, 0)
    assert tenant.keys() == []

    with store.transaction() as tx:
        tx.set("balance/a", 70)
        try:
            with tx.transaction():  # nested: a savepoint, rolled back alone
                tx.set("balance/b", -1)
                raise ValueError
        except ValueError:
            pass
        tx.set("balance/b", 30)
    assert (store.get("balance/a"), store.get("balance/b")) == (70, 30)


def test_another_thread_sees_a_transaction_only_once_it_commits(store: StateStore) -> None:
    seen: list[Any] = []
    with store.transaction():
        store.set("flag", "set inside")
        reader = threading.Thread(target=lambda: seen.append(store.get("flag")))
        reader.start()
        reader.join()
    assert seen == [None]
    assert store.get("flag") == "set inside"


def test_a_table_of_another_shape_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as conn:
        conn.execute(f"CREATE TABLE {TABLE} (key TEXT PRIMARY KEY, value BLOB)")
    with pytest.raises(StateSchemaError, match="scope, key"):
        StateStore(path)


def test_the_example_schema_creates_the_table_the_store_uses(tmp_path: Path) -> None:
    def shape(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
        columns = conn.execute(
            f"SELECT name, type, \"notnull\", pk FROM pragma_table_info('{TABLE}')"
        ).fetchall()
        return [*columns, *conn.execute(f"SELECT wr FROM pragma_table_list('{TABLE}')")]

    def created_by(sql: str) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(":memory:")
        conn.executescript(sql)
        return shape(conn)

    assert created_by((ROOT / "conf" / "schema.sql").read_text()) == created_by(DDL)
    with StateStore(tmp_path / "fresh.db") as fresh, fresh.connection() as conn:
        assert shape(conn) == created_by(DDL)
    assert created_by(DDL)[-1] == (1,)  # WITHOUT ROWID


# -- surviving a restart -----------------------------------------------------------------------


def test_state_survives_the_application_process(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    writer = run_python(
        """
        import sys
        from replicator.state import BatchedWriter, StateStore
        store = StateStore(sys.argv[1])
        store.set("leases/02:00:00:00:00:01", {"ip": "10.0.0.10"}, ttl=3600)
        with store.transaction():
            store.scope("dns").set("host", "10.0.0.53")
        behind = BatchedWriter(store, interval=None)
        for n in range(500):
            behind.set("counter", n)
        # No close: the interpreter's exit flushes what waits.
        """,
        str(path),
    )
    assert writer.returncode == 0, writer.stderr
    with StateStore(path) as store:
        assert store.get("leases/02:00:00:00:00:01") == {"ip": "10.0.0.10"}
        assert store.scope("dns").get("host") == "10.0.0.53"
        assert store.get("counter") == 499


# -- write-behind ------------------------------------------------------------------------------


def test_write_behind_coalesces_rapid_updates_of_a_key(peers: Callable[[str], Peer]) -> None:
    peer = peers("a")
    with BatchedWriter(peer.app, interval=None) as writer:
        for n in range(1000):
            writer.set(f"counter/{n % 3}", n)
            assert writer.get(f"counter/{n % 3}") == n  # read-your-writes before any flush
        writer.delete("counter/2")
        assert writer.pending == 3
        assert peer.app.keys() == []
        assert writer.flush() == 3
    assert peer.app.items() == [("counter/0", 999), ("counter/1", 997)]
    assert peer.logged_keys() == ["'default','counter/0'", "'default','counter/1'"]


def test_write_behind_flushes_every_interval_by_itself(store: StateStore) -> None:
    writer = BatchedWriter(store, interval=0.05)
    try:
        writer.set("seen", "soon")
        deadline = time.monotonic() + 5
        while (writer.pending or store.get("seen") is None) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store.get("seen") == "soon"
    finally:
        writer.close()


def test_write_behind_at_its_bound_writes_through_in_the_caller(store: StateStore) -> None:
    with BatchedWriter(store, interval=None, max_pending=3) as writer:
        for key in "abc":
            writer.set(key, key)
        writer.set("a", "again")  # a key already waiting takes no room
        assert store.keys() == []
        writer.set("d", "d")  # beyond the bound: the caller writes the three first
        assert store.items() == [("a", "again"), ("b", "b"), ("c", "c")]
        assert writer.pending == 1
    assert store.get("d") == "d"


def test_write_behind_full_of_refused_writes_refuses_more_and_loses_nothing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.db"
    store = StateStore(path, busy_timeout=0.02)
    blocker = sqlite3.connect(path, isolation_level=None)
    writer = BatchedWriter(store, interval=None, max_pending=1, full_timeout=0.3,
                           retry_interval=0.05)  # fmt: skip
    try:
        writer.set("first", 1)
        blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock: writes fail
        with pytest.raises(StateStoreError, match="locked"):
            writer.flush()
        started = time.monotonic()
        with pytest.raises(WriteBehindFull):
            writer.set("second", 2)
        assert time.monotonic() - started >= 0.3
        assert writer.pending == 1
        assert writer.get("first") == 1
        blocker.execute("ROLLBACK")
        writer.set("second", 2)  # room again: "first" was written on the way
        writer.close()
        assert store.items() == [("first", 1), ("second", 2)]
    finally:
        blocker.close()
        store.close()


def test_a_writer_outliving_its_store_fails_at_once_keeping_its_writes(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    writer = BatchedWriter(store, interval=None, full_timeout=30.0)
    writer.set("late", 1)
    store.close()
    started = time.monotonic()
    with pytest.raises(StateStoreClosed, match="closed"):
        writer.close()
    assert time.monotonic() - started < 5  # no retrying what cannot succeed
    assert writer.pending == 1


def test_write_behind_keeps_and_retries_writes_while_the_disk_refuses(tmp_path: Path) -> None:
    """A real write failure: the process may not grow any file past its size limit, as on a
    full disk. The application keeps writing; nothing is lost once the disk takes writes."""
    result = run_python(
        """
        import json, logging, os, resource, signal, sys, time
        from replicator.state import BatchedWriter, StateStore
        logging.basicConfig(stream=sys.stderr, format="%(levelname)s %(message)s")
        path = sys.argv[1]
        store = StateStore(path)
        writer = BatchedWriter(store, interval=0.02, retry_interval=0.05)
        store.set("before", "written")
        with store.connection() as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails: EFBIG
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path), hard))
        writer.set("blob", b"x" * 200_000)
        for n in range(100):
            writer.set("counter", n)  # the application carries on: no exception
            time.sleep(0.005)
        time.sleep(0.3)
        during = {"pending": writer.pending, "failures": writer.failures,
                  "stored": StateStore(path).keys()}
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        deadline = time.monotonic() + 10
        while writer.pending and time.monotonic() < deadline:
            time.sleep(0.02)
        during["pending_after"] = writer.pending
        writer.close()
        print(json.dumps(during))
        """,
        str(tmp_path / "state.db"),
    )
    assert result.returncode == 0, result.stderr
    during = json.loads(result.stdout)
    assert during["pending"] == 2  # blob and counter, coalesced, kept
    assert during["failures"] >= 2  # and retried
    assert during["stored"] == ["before"]
    assert during["pending_after"] == 0
    warnings = result.stderr.splitlines()
    # Once per outage, not per retry:
    assert warnings[0].startswith("WARNING write-behind flush failed (1 in a row); 2 keys kept")
    assert warnings[1].startswith("WARNING write-behind flush succeeded after")
    assert len(warnings) == 2
    assert "xxxx" not in result.stderr  # counts, never values
    with StateStore(tmp_path / "state.db") as store:
        assert store.get("counter") == 99
        assert store.get("blob") == b"x" * 200_000


# -- async -------------------------------------------------------------------------------------


def off_loop_clock(threads: set[int]) -> Callable[[], float]:
    """A clock that notes which thread read it: every store call reads the clock."""

    def now() -> float:
        threads.add(threading.get_ident())
        return time.time()

    return now


async def test_the_async_store_works_off_the_trio_event_loop(tmp_path: Path) -> None:
    threads: set[int] = set()
    store = AsyncStateStore.for_trio(StateStore(tmp_path / "s.db", clock=off_loop_clock(threads)))
    with trio.fail_after(10):
        await store.set("a", 1, ttl=60)
        await store.scope("t").set("b", 2, ttl=60)
        assert await store.get("a") == 1
        assert await store.keys() == ["a"]
        assert await store.scope("t").items() == [("b", 2)]

        def move(tx: StateStore) -> int:
            tx.set("a", tx.get("a") + 1)
            raise ValueError("and roll back")

        with pytest.raises(ValueError, match="roll back"):
            await store.transact(move)
        assert await store.get("a") == 1
        assert await store.delete("a") is True
        await store.close()
    assert threading.get_ident() not in threads
    assert threads


def test_the_async_store_works_off_the_asyncio_event_loop(tmp_path: Path) -> None:
    threads: set[int] = set()

    async def main() -> Any:
        store = AsyncStateStore.for_asyncio(StateStore(tmp_path / "s.db",
                                                       clock=off_loop_clock(threads)))  # fmt: skip
        await store.set("k", {"v": 1}, ttl=60)
        total = await store.transact(lambda tx: tx.get("k")["v"] + 1)
        found = (await store.get("k"), total, await store.metrics())
        await store.close()
        return found

    value, total, metrics = asyncio.run(main())
    assert (value, total) == ({"v": 1}, 2)
    assert metrics["keys"] == 1
    assert threading.get_ident() not in threads
    assert threads


# -- metrics -----------------------------------------------------------------------------------


def test_metrics_count_reads_writes_hits_keys_and_bytes(store: StateStore, clock: Clock) -> None:
    store.set("a", "x" * 10)
    store.scope("t").set("b", b"y" * 20)
    store.set("gone", 1, ttl=1)
    store.get("a")
    store.get("missing")
    store.delete("a")
    store.keys()
    clock.now += 2
    figures = store.metrics()
    assert figures == {
        "reads": 3,
        "writes": 3,
        "deletes": 1,
        "hits": 1,
        "misses": 1,
        "hit_ratio": 0.5,
        "keys": 1,  # b; a deleted, gone expired
        "bytes": 22,  # msgpack: a 2-byte header and 20 bytes
    }


def test_every_process_store_reaches_the_node_metrics(peers: Callable[[str], Peer]) -> None:
    peer = peers("a")
    other = StateStore(peer.path, metrics_interval=0.0)  # publishes after every call
    other.set("k", "v")
    other.get("k")
    peer.app.get("nothing")
    conn = peer.node.conn
    assert node_figures(conn, int(time.time() * 1000))["reads"] == 1  # other's only: so far
    peer.app.publish_metrics()
    other.close()  # folds into the closed stores' row: totals do not move
    figures = node_figures(conn, int(time.time() * 1000))
    assert figures is not None
    assert (figures["reads"], figures["writes"], figures["hits"], figures["misses"]) == (2, 1, 1, 1)
    assert (figures["hit_ratio"], figures["keys"], figures["open_stores"]) == (0.5, 1, 1)
    assert conn.execute("SELECT count(*) FROM _repl_store_metrics").fetchone()[0] == 2

    report = {"node_id": "a", "state_store": figures}
    text = NodeMetrics(lambda: report).render().decode()
    samples = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("replicator_store_")
    }
    assert samples == {
        "replicator_store_reads_total": 2,
        "replicator_store_writes_total": 1,
        "replicator_store_deletes_total": 0,
        "replicator_store_hits_total": 1,
        "replicator_store_misses_total": 1,
        "replicator_store_hit_ratio": 0.5,
        "replicator_store_keys": 1,
        "replicator_store_bytes": 2,
    }
    without = NodeMetrics(lambda: {"node_id": "a", "state_store": None}).render().decode()
    assert "replicator_store_" not in without


# -- migrations --------------------------------------------------------------------------------


def leases_migrations(fail_at: int | None = None) -> Migrations:
    def backfill(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE leases SET hostname = 'host-' || mac WHERE hostname IS NULL")
        if fail_at == 3:
            raise RuntimeError("disk on fire")

    return Migrations([
        Migration(2, "hostnames", up="ALTER TABLE leases ADD COLUMN hostname TEXT",
                  down="ALTER TABLE leases DROP COLUMN hostname"),
        Migration(1, "leases", up="""
            CREATE TABLE leases (mac TEXT PRIMARY KEY, ip TEXT NOT NULL);
            INSERT INTO leases VALUES ('02:00', '10.0.0.1');
            """, down="DROP TABLE leases"),
        Migration(3, "backfill hostnames", up=backfill),
    ])  # fmt: skip


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    opened = sqlite3.connect(tmp_path / "app.db", isolation_level=None)
    yield opened
    opened.close()


def test_migrations_apply_in_order_each_recorded_once(conn: sqlite3.Connection) -> None:
    migrations = leases_migrations()
    assert migrations.upgrade(conn, to=2) == [1, 2]
    assert migrations.current(conn) == 2
    assert migrations.upgrade(conn) == [3]
    assert migrations.upgrade(conn) == []
    assert conn.execute("SELECT mac, ip, hostname FROM leases").fetchall() == [
        ("02:00", "10.0.0.1", "host-02:00")
    ]
    recorded = conn.execute("SELECT version, name FROM app_migrations ORDER BY 1").fetchall()
    assert recorded == [(1, "leases"), (2, "hostnames"), (3, "backfill hostnames")]


def test_a_failing_migration_rolls_back_alone(conn: sqlite3.Connection) -> None:
    with pytest.raises(MigrationError, match=r"3 \(backfill hostnames\) failed going up"):
        leases_migrations(fail_at=3).upgrade(conn)
    assert leases_migrations().current(conn) == 2
    assert conn.execute("SELECT hostname FROM leases").fetchall() == [(None,)]


def test_downgrade_undoes_newest_first_and_needs_every_down_step(
    conn: sqlite3.Connection,
) -> None:
    migrations = leases_migrations()
    migrations.upgrade(conn)
    with pytest.raises(MigrationError, match=r"\[3\] have no down step"):
        migrations.downgrade(conn, to=1)
    assert migrations.current(conn) == 3
    migrations.upgrade(conn)
    without_backfill = Migrations(migrations.steps[:2])
    conn.execute("DELETE FROM app_migrations WHERE version = 3")
    assert without_backfill.downgrade(conn, to=1) == [2]
    columns = [row[1] for row in conn.execute("PRAGMA table_info(leases)")]
    assert columns == ["mac", "ip"]
    assert without_backfill.downgrade(conn, to=0) == [1]
    assert conn.execute("SELECT name FROM sqlite_schema WHERE name = 'leases'").fetchone() is None


def test_an_application_catching_replication_error_catches_the_store_and_migrations(
    tmp_path: Path, conn: sqlite3.Connection
) -> None:
    store = StateStore(tmp_path / "state.db")
    store.close()
    with pytest.raises(ReplicationError, match="closed"):
        store.get("k")
    leases_migrations().upgrade(conn)
    with pytest.raises(ReplicationError, match="newer than the newest known here"):
        Migrations(leases_migrations().steps[:1]).upgrade(conn)


def test_a_database_migrated_further_than_known_is_refused(conn: sqlite3.Connection) -> None:
    leases_migrations().upgrade(conn)
    older = Migrations(leases_migrations().steps[:2])
    with pytest.raises(MigrationError, match="newer than the newest known here"):
        older.upgrade(conn)
    with pytest.raises(MigrationError, match="newer"):
        older.downgrade(conn, to=0)
    with pytest.raises(MigrationError, match="no migration 7"):
        leases_migrations().upgrade(conn, to=7)
