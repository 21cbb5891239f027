"""Capture and apply with real processes and real files (design sections 3 to 5).

Applications write the state database from their own processes through plain ``sqlite3``
connections (``tests/support/proc_helpers.py``); the detector and the applier run in this
process or in a child that is killed with -9. Every wait has a deadline: a subprocess timeout,
``fail_after``, or a loop bounded by ``time.monotonic()``.

A few tests reproduce races that a separate process cannot hit on demand (a commit landing
between two statements of the detector's poll): there a second connection in this process plays
the application, at the exact moment a wrapped `Store` method hands it the turn.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import pickle
import random
import select
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

from protocol import Change, Op, Origin, RowVersion, Skip
from replicator.apply.applier import Applier
from replicator.capture import hlc
from replicator.capture.detector import Detector
from replicator.capture.log_reader import LogReader
from replicator.capture.store import LogRecord, Store, StoreSettings
from tests.support.proc_helpers import BIG_ORIGIN, SCHEMA, TABLES, app_connect, big_batch

ROOT = Path(__file__).resolve().parents[2]
HOUR_MS = 3_600_000
KEYS = {"leases": "mac", "kv": "a, b", "hosts": "name"}


# -- helpers ----------------------------------------------------------------------------------


def node_settings(path: Path, node_id: str, schema: str = SCHEMA, tables=TABLES) -> StoreSettings:
    return StoreSettings(str(path), node_id, tuple(tables), schema_sql=schema)


def open_node(tmp_path: Path, node_id: str, schema: str = SCHEMA, tables=TABLES) -> Store:
    return Store.open(node_settings(tmp_path / f"{node_id}.db", node_id, schema, tables))


def helper(*args: object) -> list[str]:
    return [sys.executable, "-m", "tests.support.proc_helpers", *map(str, args)]


def rows(conn: sqlite3.Connection, table: str) -> list[tuple[Any, ...]]:
    return conn.execute(f"SELECT * FROM {table} ORDER BY {KEYS[table]}").fetchall()


def whole_log(store: Store) -> list[LogRecord]:
    store.seal()  # as the node's detector does before anything is read
    return store.read_log(0, 10**9)


def split(records: Sequence[LogRecord]) -> tuple[list[Change], list[Skip]]:
    changes = [r.entry for r in records if isinstance(r.entry, Change)]
    skips = [r.entry for r in records if isinstance(r.entry, Skip)]
    return changes, skips


def applied_cleanly(result: Any) -> bool:
    return not result.gaps and not result.clock_refused and result.quarantined == 0


class Lines:
    """Reads a child's stdout line by line, never past a deadline (raw fd, no hidden buffer)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.fd = proc.stdout.fileno()
        self.buffer = b""

    def next(self, deadline: float) -> str | None:
        """The next line, or None at end of output."""
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the child process said nothing before the deadline")
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(self.fd, 65536)
            if not chunk:
                rest, self.buffer = self.buffer, b""
                return rest.decode() or None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Any]:
    """Starts helper processes; any still running at the end of the test is killed (by pid)."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: object) -> subprocess.Popen[bytes]:
        err_path = tmp_path / f"child-{len(started)}.err"
        with err_path.open("wb") as err:
            proc = subprocess.Popen(
                helper(*args), cwd=ROOT, stdout=subprocess.PIPE, stderr=err, bufsize=0
            )
        proc.err_path = err_path  # type: ignore[attr-defined]
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


async def run_helper(*args: object) -> subprocess.CompletedProcess[bytes]:
    """Runs a helper to completion under trio (the caller's fail_after bounds it)."""
    done = await trio.run_process(
        helper(*args), cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False
    )
    assert done.returncode == 0, done.stderr.decode()
    return done


NO_PEER = Origin("no-peer", 0)  # the reader skips nobody's changes


class Tail:
    """The node's outgoing path, as a link runs it: the detector signals that the log moved,
    a `LogReader` reads from where it left off (nothing skipped: no peer origin here). Keeps
    every batch read, with arrival times."""

    def __init__(self, settings: StoreSettings, batch_size: int = 1000) -> None:
        self.detector = Detector(settings)
        self.reader = LogReader(settings, NO_PEER, lambda: self.detector.position)
        self.batch_size = batch_size
        self.after = 0
        self.batches: list[list[LogRecord]] = []
        self.arrived: list[tuple[float, LogRecord]] = []
        self.updated = trio.Event()

    async def run(self, nursery: trio.Nursery) -> None:
        while True:
            await trio.to_thread.run_sync(self.detector.poll_position)
            while True:
                batch, self.after = await self.reader(self.after, self.batch_size)
                if not batch:
                    break
                now = time.monotonic()
                self.batches.append(batch)
                self.arrived.extend((now, record) for record in batch)
                self.updated.set()
                self.updated = trio.Event()
            await trio.sleep(self.detector.poll_interval)

    def read_until_quiet(self, polls: int = 5) -> list[list[LogRecord]]:
        """Blocking: look and read ``polls`` times, as the node's loop would."""
        found = []
        for _ in range(polls):
            self.detector.poll_position()
            batch, self.after = self.reader.read(self.after, self.batch_size)
            if batch:
                found.append(batch)
        return found

    def close(self) -> None:
        self.detector.close()
        self.reader.close()

    @property
    def records(self) -> list[LogRecord]:
        return [record for batch in self.batches for record in batch]

    async def drain(self, path: Path, *, quiet: float = 0.15, give_up_after: float = 15) -> None:
        """Wait until the detector has sent everything in the log and nothing more comes (or
        ``give_up_after`` seconds passed: then the caller's assertions say what is missing)."""
        probe = sqlite3.connect(path)
        deadline = time.monotonic() + give_up_after
        try:
            while time.monotonic() < deadline:
                (top,) = probe.execute("SELECT COALESCE(MAX(seq), 0) FROM _repl_log").fetchone()
                seen = self.records[-1].position if self.records else 0
                if seen >= top:
                    with trio.move_on_after(quiet) as scope:
                        await self.updated.wait()
                    if scope.cancelled_caught:
                        (top,) = probe.execute("SELECT MAX(seq) FROM _repl_log").fetchone()
                        if seen >= (top or 0):
                            return
                else:
                    await trio.sleep(0.005)
        finally:
            probe.close()


def replay(records_in_batches: Sequence[Sequence[LogRecord]], target: Store) -> None:
    """Apply the detector's batches, in order, to another node, as a peer would."""
    applier = Applier(target)
    for batch in records_in_batches:
        changes, skips = split(batch)
        result = applier.apply(changes, skips)
        assert applied_cleanly(result), result


def entry_of(change: Change) -> tuple[str, list[Any], dict[str, Any] | None]:
    return change.table, list(change.pk), None if change.row is None else dict(change.row)


def belongs(change: Change, writer: str) -> bool:
    key = change.pk[0] if change.table == "leases" else change.pk[1]
    return isinstance(key, str) and key.startswith(f"{writer}-")


# -- 1. capture from another process ----------------------------------------------------------


async def test_writes_from_other_processes_are_captured_once_each_in_commit_order(tmp_path):
    """Two application processes write (autocommit, transactions, rolled-back transactions,
    UPSERT, INSERT OR REPLACE, primary-key updates, multi-row statements) while the detector
    loop runs here: every committed row change is logged once, in commit order, and a fresh
    node that applies the detector's batches ends identical to the writers' database."""
    node = open_node(tmp_path, "node1")
    origin = node.origin
    node.close()
    path = tmp_path / "node1.db"
    tail = Tail(node_settings(path, "node1"), batch_size=500)
    steps = 1500
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tail.run, nursery)
            async with trio.open_nursery() as writers:
                for writer, seed in (("w1", 11), ("w2", 22)):
                    journal = tmp_path / f"{writer}.journal"
                    writers.start_soon(run_helper, "workload", path, writer, steps, seed, journal)
            await tail.drain(path)
            nursery.cancel_scope.cancel()
    tail.close()

    records = tail.records
    changes, skips = split(records)
    assert not skips
    assert len(changes) == len(records) > 4000
    positions = [r.position for r in records]
    assert positions == sorted(set(positions)), "log positions must strictly increase"
    assert {c.origin for c in changes} == {origin}
    assert [c.seq for c in changes] == list(range(1, len(changes) + 1)), (
        "origin sequences must be 1..N in log order: no gap, no duplicate"
    )
    for change in changes:
        assert (change.op is Op.DELETE) == (change.row is None), change

    # Each writer's committed statements, in its commit order, match what was captured of it;
    # its rolled-back transactions and statements that matched no row left nothing behind.
    for writer in ("w1", "w2"):
        journal = pickle.loads((tmp_path / f"{writer}.journal").read_bytes())
        mine = [c for c in changes if belongs(c, writer)]
        at = 0
        for number, expected in enumerate(journal):
            got = [entry_of(c) for c in mine[at : at + len(expected)]]
            at += len(expected)
            assert sorted(got, key=repr) == sorted(expected, key=repr), (writer, number)
        assert at == len(mine), f"{writer}: {len(mine) - at} captured changes nobody committed"

    replica = open_node(tmp_path, "replica")
    replay(tail.batches, replica)
    source = sqlite3.connect(path)
    for table in TABLES:
        assert rows(replica.conn, table) == rows(source, table), table
    assert replica.version_vector()[origin] == len(changes)
    source.close()
    replica.close()


async def test_detector_notices_a_commit_from_another_process_within_a_second(
    tmp_path, record_property
):
    """Latency from an application's commit (in its own process) to the detector's batch.
    Printed, and bounded only generously (1 s) so a noisy machine cannot fail it."""
    node = open_node(tmp_path, "node1")
    node.close()
    path = tmp_path / "node1.db"
    tail = Tail(node_settings(path, "node1"))
    count = 15
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tail.run, nursery)
            done = await run_helper("probe", path, count, 0.03)
            await tail.drain(path)
            nursery.cancel_scope.cancel()
    tail.close()

    started = {}
    for line in done.stdout.decode().split("\n"):
        if line:
            i, start, _end = line.split()
            started[f"probe-{i}"] = float(start)
    seen = {
        record.entry.pk[1]: at
        for at, record in tail.arrived
        if isinstance(record.entry, Change) and record.entry.table == "kv"
    }
    assert set(seen) == set(started), "every probe commit must reach the detector"
    latencies = sorted(seen[key] - started[key] for key in started)
    median, worst = statistics.median(latencies), latencies[-1]
    print(f"\ncommit -> detector batch: median {median * 1000:.1f} ms, max {worst * 1000:.1f} ms")
    record_property("detector_latency_median_ms", round(median * 1000, 2))
    record_property("detector_latency_max_ms", round(worst * 1000, 2))
    assert worst < 1.0


# -- 2. application writes while the applier applies -----------------------------------------


def write_peer_history(conn: sqlite3.Connection) -> list[list[Any]]:
    """A peer's application history; returns the kv keys it wrote."""
    keys = []
    for i in range(600):
        conn.execute(
            "INSERT INTO leases (mac, ip, expires) VALUES (?, ?, ?)", (f"a-{i:05d}", "a", i)
        )
    for i in range(0, 600, 3):
        conn.execute("UPDATE leases SET ip = 'a2', score = ? WHERE mac = ?", (i / 7, f"a-{i:05d}"))
    for i in range(0, 600, 10):
        conn.execute("DELETE FROM leases WHERE mac = ?", (f"a-{i:05d}",))
    for i in range(400):
        conn.execute("INSERT INTO kv (a, b, v) VALUES (1, ?, ?)", (f"a-{i:05d}", f"peer-{i}"))
        keys.append([1, f"a-{i:05d}"])
    conn.execute("BEGIN IMMEDIATE")
    for i in range(0, 400, 2):
        conn.execute("UPDATE kv SET v = ? WHERE a = 1 AND b = ?", (f"peer2-{i}", f"a-{i:05d}"))
    conn.execute("COMMIT")
    return keys


def test_application_writes_during_remote_apply_are_captured_and_applied_rows_are_not(
    tmp_path, spawn
):
    """An application process inserts, updates, deletes, upserts and replaces on node B (also on
    rows the applier is writing) while B applies node A's history in many small batches:
    nothing fails, B's log holds A's entries once under A's origin, and exactly one local entry
    per row the application changed (the applier's own writes are never captured again)."""
    a = open_node(tmp_path, "a")
    b = open_node(tmp_path, "b")
    peer_app = app_connect(str(tmp_path / "a.db"))
    shared = write_peer_history(peer_app)
    peer_app.close()
    a_changes, _ = split(whole_log(a))
    n_remote = len(a_changes)

    stop = tmp_path / "stop"
    writer = spawn(
        "busy-writer", tmp_path / "b.db", 5, stop, json.dumps([json.dumps(k) for k in shared])
    )
    lines = Lines(writer)
    deadline = time.monotonic() + 30
    assert lines.next(deadline) == "ready"
    applier = Applier(b)
    for start in range(0, n_remote, 25):
        result = applier.apply(a_changes[start : start + 25])
        assert applied_cleanly(result), result
        assert result.accepted == len(a_changes[start : start + 25])
        time.sleep(0.003)  # batches arrive from the network, not back to back
    stop.touch()
    report = json.loads(lines.next(deadline) or "null")
    assert writer.wait(timeout=max(deadline - time.monotonic(), 1)) == 0
    assert b"Traceback" not in writer.err_path.read_bytes()

    log = whole_log(b)
    by_origin: dict[Origin, list[LogRecord]] = defaultdict(list)
    for record in log:
        by_origin[record.entry.origin].append(record)
    assert set(by_origin) == {a.origin, b.origin}
    remote = [r.entry for r in by_origin[a.origin]]
    assert remote == a_changes, "A's entries are logged on B once each, as A logged them"
    local = [r.entry for r in by_origin[b.origin]]
    assert len(local) == report["rows"], "one local entry per row the application changed"
    assert [c.seq for c in local] == list(range(1, report["rows"] + 1))
    assert b.version_vector() == {a.origin: n_remote, b.origin: report["rows"]}

    # The two really overlapped: application commits landed between applied batches.
    remote_positions = [r.position for r in by_origin[a.origin]]
    between = [
        r for r in by_origin[b.origin] if remote_positions[0] < r.position < remote_positions[-1]
    ]
    print(f"\n{len(between)} of {len(local)} application writes landed among {n_remote} applied")
    assert between, "the application never wrote while batches were being applied"

    # Rows only A wrote are A's; rows the application updated after they arrived are its own.
    a_conn = sqlite3.connect(tmp_path / "a.db")
    a_leases = {r[0]: r for r in rows(a_conn, "leases")}
    b_leases = {r[0]: r for r in rows(b.conn, "leases")}
    assert {k: v for k, v in b_leases.items() if k.startswith("a-")} == a_leases
    a_kv = {(r[0], r[1]): r for r in rows(a_conn, "kv")}
    b_kv = {(r[0], r[1]): r for r in rows(b.conn, "kv")}
    touched = {tuple(json.loads(k)) for k in report["touched"]}
    assert touched, "the application never updated a row the applier wrote"
    for key, row in a_kv.items():
        if key in touched:
            assert str(b_kv[key][2]).startswith("app-"), key
        else:
            assert b_kv[key] == row, key
    a_conn.close()
    a.close()
    b.close()


# -- 3. kill -9 in the middle of a large apply ------------------------------------------------


BIG = 60_000


def statements_of_an_apply(spawn: Any, path: Path, node_id: str) -> tuple[list[str], float]:
    """The statements the child's apply call starts, in order, and how long the call takes."""
    child = spawn("apply-batch", path, node_id, BIG)
    lines = Lines(child)
    deadline = time.monotonic() + 60
    assert lines.next(deadline) == "applying"
    started = time.monotonic()
    statements = []
    while (line := lines.next(deadline)) is not None and line.startswith("sql "):
        statements.append(line[4:])
    took = time.monotonic() - started
    assert (line or "").startswith("done")
    assert child.wait(timeout=10) == 0
    return statements, took


def test_kill_9_during_a_large_apply_leaves_all_or_nothing_and_a_matching_vector(tmp_path, spawn):
    """A child applies a 60k-change batch in one call and is killed with -9 partway: once at a
    random time, then just as it starts a random statement of the transaction, the one
    before last, and the last one (the commit), each a few random milliseconds late; the
    statements come from a run on a scratch node. Each attempt starts from a fresh copy of the
    same prepared file, so a child that commits before its kill (a loaded machine) does not
    stop the later attempts. After each kill the node reopens with the batch's rows all there
    or none, the `_repl_applying` marker gone (application writes are captured again), and a
    version vector that says exactly what the rows say. Applying the batch again then
    converges."""
    scratch = open_node(tmp_path, "scratch")
    scratch.close()
    statements, duration = statements_of_an_apply(spawn, tmp_path / "scratch.db", "scratch")
    count = len(statements)
    assert count >= 3, statements
    rng = random.Random()
    # (kill after this many statements started, or None: after a random time) and a delay.
    plan = [
        (None, rng.uniform(0.1, 0.9) * duration),
        (rng.randrange(count // 3, count - 1), rng.uniform(0, 0.01)),
        (count - 1, rng.uniform(0, 0.01)),
        (count, rng.uniform(0, 0.005)),
    ]
    node = open_node(tmp_path, "b")
    node.close()
    pristine = (tmp_path / "b.db").read_bytes()
    origin = Origin(*BIG_ORIGIN)
    outcomes = []
    for attempt, (target, delay) in enumerate(plan):
        path = tmp_path / f"b-{attempt}.db"
        path.write_bytes(pristine)
        settings = node_settings(path, "b")
        child = spawn("apply-batch", path, "b", BIG)
        lines = Lines(child)
        deadline = time.monotonic() + 60
        assert lines.next(deadline) == "applying"
        started = 0
        while target is not None and started < target:
            line = lines.next(deadline)
            if line is None or not line.startswith("sql "):
                break
            started += 1
        time.sleep(delay)
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
        returncode = child.wait(timeout=10)
        at = statements[started - 1] if started else f"{delay:.2f} s"

        store = Store.open(settings)  # a restart: prepares the file as the node does
        (present,) = store.conn.execute(
            "SELECT COUNT(*) FROM leases WHERE mac LIKE 'big-%'"
        ).fetchone()
        outcomes.append((at, returncode, present))
        assert present in (0, BIG), f"attempt {attempt}: a partial batch is visible ({present})"
        assert store.conn.execute("SELECT COUNT(*) FROM _repl_applying").fetchone() == (0,)
        assert store.version_vector().get(origin, 0) == present, outcomes
        (logged,) = store.conn.execute(
            "SELECT COUNT(*) FROM _repl_log WHERE origin_node = ? AND origin_inc = ?", BIG_ORIGIN
        ).fetchone()
        (versions,) = store.conn.execute(
            "SELECT COUNT(*) FROM _repl_rowmeta WHERE node = ? AND inc = ?", BIG_ORIGIN
        ).fetchone()
        assert logged == versions == present, outcomes
        # The application writes again, and capture sees it (no marker left behind).
        local_before = store.clock().local_seq
        app = app_connect(str(path))
        app.execute("INSERT INTO kv (a, b, v) VALUES (9, ?, 'after kill')", (f"k{attempt}",))
        app.close()
        assert store.seal() == 1  # the node stamps what the trigger logged
        assert store.clock().local_seq == local_before + 1 == 1
        store.close()
    print(f"\napply: {duration:.2f} s, {count} statements; kills (at, code, rows): {outcomes}")
    assert any(code == -signal.SIGKILL and not n for _, code, n in outcomes), (
        "no attempt killed the applier before it committed"
    )

    store = Store.open(settings)
    batch = big_batch(BIG)
    result = Applier(store).apply(batch)
    assert applied_cleanly(result)
    assert result.accepted + result.duplicates == BIG
    assert store.conn.execute("SELECT COUNT(*) FROM leases WHERE mac LIKE 'big-%'").fetchone() == (
        BIG,
    )
    assert store.version_vector()[origin] == BIG
    again = Applier(store).apply(batch[:1000])
    assert again.duplicates == 1000
    assert again.written == 0
    local = [r for r in whole_log(store) if r.entry.origin == store.origin]
    assert len(local) == 1, "the applier's writes must not appear as local captures"
    store.close()


# -- 4. restore and a new incarnation ---------------------------------------------------------


def restore_scenario(tmp_path: Path) -> tuple[Store, Store, Origin, Origin]:
    """A writes, is backed up, writes more; B applies all of it; A's file is restored from the
    backup (through the backup API, into the live file) and A starts a new incarnation, then
    writes new changes, one of them on a key whose lost insert B already holds."""
    a = open_node(tmp_path, "a")
    b = open_node(tmp_path, "b")
    app = app_connect(str(tmp_path / "a.db"))
    for key in ("k1", "k2", "k3"):
        app.execute("INSERT INTO leases (mac, ip) VALUES (?, 'first')", (key,))
    backup = sqlite3.connect(tmp_path / "backup.db")
    app.backup(backup)
    backup.close()
    app.execute("UPDATE leases SET ip = 'lost update' WHERE mac = 'k1'")
    app.execute("INSERT INTO leases (mac, ip) VALUES ('k4', 'lost insert')")
    app.execute("DELETE FROM leases WHERE mac = 'k2'")
    changes, _ = split(whole_log(a))
    assert applied_cleanly(Applier(b).apply(changes))
    old = a.origin
    assert b.version_vector()[old] == 6

    a.close()
    source = sqlite3.connect(tmp_path / "backup.db")
    source.backup(app)  # the application's connection stays open, as in a live restore
    source.close()
    a = Store.open(node_settings(tmp_path / "a.db", "a"))
    assert a.origin == old
    assert a.clock().local_seq == 3, "the restored file knows only the first three writes"
    new = a.start_new_incarnation()
    assert new.node_id == old.node_id
    assert new.incarnation > old.incarnation
    assert a.clock().local_seq == 0
    app.execute("INSERT INTO leases (mac, ip) VALUES ('k4', 'new insert')")
    app.execute("UPDATE leases SET ip = 'new update' WHERE mac = 'k3'")
    app.execute("INSERT INTO leases (mac, ip) VALUES ('k5', 'new')")
    app.close()
    return a, b, old, new


def test_restored_node_writes_under_a_new_incarnation_that_peers_never_skip(tmp_path):
    """After a restore and a new incarnation, A's new writes restart at sequence 1 under the new
    origin; B applies all of them (none taken for duplicates of the lost ones), and across both
    logs no (origin, sequence) pair ever names two different changes."""
    a, b, old, new = restore_scenario(tmp_path)
    a_changes, _ = split(whole_log(a))
    assert [(c.origin, c.seq) for c in a_changes] == [
        (old, 1),
        (old, 2),
        (old, 3),
        (new, 1),
        (new, 2),
        (new, 3),
    ]
    result = Applier(b).apply(a_changes)
    assert applied_cleanly(result)
    assert result.duplicates == 3
    assert result.accepted == 3
    b_rows = {r[0]: r[1] for r in rows(b.conn, "leases")}
    assert b_rows["k4"] == "new insert"
    assert b_rows["k3"] == "new update"
    assert b_rows["k5"] == "new"
    assert b.version_vector()[new] == 3

    named: dict[tuple[Origin, int], set[Any]] = defaultdict(set)
    for store in (a, b):
        for change in split(whole_log(store))[0]:
            content = (change.table, change.pk, change.op, repr(change.row), change.version)
            named[change.origin, change.seq].add(content)
    reused = {pair: contents for pair, contents in named.items() if len(contents) > 1}
    assert not reused
    a.close()
    b.close()


def test_restored_node_takes_back_its_lost_past_from_a_peer(tmp_path):
    """The restored node is sent what its version vector lacks, including its own writes from
    the incarnation the restore cut short (design: "it may be receiving its own lost past
    back"): applying that works, leaves A identical to B, logs each (origin, sequence) once,
    and reports as a conflict only the one real one (k4, inserted anew without knowledge of the
    lost insert), not the versions A already holds."""
    a, b, old, _new = restore_scenario(tmp_path)
    assert applied_cleanly(Applier(b).apply(split(whole_log(a))[0]))
    vector = a.version_vector()
    wanted = [c for c in split(whole_log(b))[0] if c.seq > vector.get(c.origin, 0)]
    result = Applier(a).apply(wanted)
    assert applied_cleanly(result)
    assert rows(a.conn, "leases") == rows(b.conn, "leases")
    logged = Counter((c.origin, c.seq) for c in split(whole_log(a))[0])
    assert [pair for pair, n in logged.items() if n > 1] == [], "an entry logged twice on A"
    assert a.version_vector().get(old) == 6
    assert result.conflicts == 1
    a.close()
    b.close()


# -- 5. clocks --------------------------------------------------------------------------------


def local_stamps(store: Store, after: int = 0) -> list[int]:
    store.seal()
    return [
        r.entry.version.hlc
        for r in store.read_log(after, 10**9)
        if isinstance(r.entry, Change) and r.entry.origin == store.origin
    ]


def test_clock_stepped_back_an_hour_keeps_stamps_monotonic_and_later_writes_winning(tmp_path):
    """Simulation: real time is the machine clock plus one hour. B's clock is right; A's wall
    clock has just stepped back an hour, so it reads the machine clock while A's clock row is
    an hour ahead of it. A's new stamps keep increasing, and A's write on top of B's row (which
    A saw before the step) wins on both nodes instead of losing to a stamp from A's "future"."""
    a = open_node(tmp_path, "a")
    b = open_node(tmp_path, "b")

    def real_time() -> int:
        return hlc.wall_clock_ms() + HOUR_MS

    b.conn.execute("UPDATE _repl_clock SET hlc = ? WHERE id = 1", (hlc.pack(real_time()),))
    b_app = app_connect(str(tmp_path / "b.db"))
    b_app.execute("INSERT INTO leases (mac, ip) VALUES ('r', 'from b')")
    (b_change,) = split(whole_log(b))[0]
    # Before the step A's clock was right too: it accepts B's write.
    assert applied_cleanly(Applier(a, wall_clock_ms=real_time).apply([b_change]))

    # The state after the step: A's clock row is an hour ahead of A's (machine) wall clock.
    ahead = hlc.physical_ms(a.clock().hlc) - hlc.wall_clock_ms()
    assert HOUR_MS - 60_000 < ahead <= HOUR_MS + 1_000
    first = app_connect(str(tmp_path / "a.db"))
    second = app_connect(str(tmp_path / "a.db"))
    for i in range(300):
        conn = first if i % 2 else second
        if i % 7 == 0:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("UPDATE leases SET ip = ? WHERE mac = 'r'", (f"a{i}",))
            conn.execute("INSERT INTO leases (mac, ip) VALUES (?, 'x')", (f"n{i}",))
            conn.execute("COMMIT")
        else:
            conn.execute("UPDATE leases SET ip = ? WHERE mac = 'r'", (f"a{i}",))
    stamps = local_stamps(a)
    assert len(stamps) == 300 + 300 // 7 + 1
    assert all(x < y for x, y in itertools.pairwise(stamps)), "stamps must increase"
    assert stamps[0] > b_change.version.hlc, "a write made after seeing B's must rank above it"
    assert hlc.physical_ms(stamps[-1]) >= hlc.physical_ms(b_change.version.hlc)

    # The 16-bit counter carries into the milliseconds instead of wrapping.
    position = a.log_position()
    top = a.clock().hlc
    a.conn.execute(
        "UPDATE _repl_clock SET hlc = ? WHERE id = 1",
        (hlc.pack(hlc.physical_ms(top), 0xFFFF - 3),),
    )
    for i in range(8):
        first.execute("UPDATE leases SET ip = ? WHERE mac = 'r'", (f"carry{i}",))
    carried = local_stamps(a, position)
    assert all(x < y for x, y in itertools.pairwise(carried))
    assert hlc.physical_ms(carried[-1]) == hlc.physical_ms(top) + 1

    result = Applier(b, wall_clock_ms=real_time).apply(split(whole_log(a))[0])
    assert applied_cleanly(result)
    a_row = first.execute("SELECT * FROM leases WHERE mac = 'r'").fetchone()
    assert a_row[1] == "carry7"
    assert b.conn.execute("SELECT * FROM leases WHERE mac = 'r'").fetchone() == a_row
    version = b.row_version("leases", ("r",))
    assert version is not None
    assert version[0].origin == a.origin
    for conn in (first, second, b_app):
        conn.close()
    a.close()
    b.close()


def nonzero(vector: dict[Origin, int]) -> dict[Origin, int]:
    return {origin: seq for origin, seq in vector.items() if seq}


def future_change(origin: Origin, seq: int, stamp: int, key: str) -> Change:
    return Change(
        origin,
        seq,
        "leases",
        Op.INSERT,
        (key,),
        {"mac": key, "ip": "f"},
        None,
        RowVersion(stamp, origin, 1),
    )


def test_change_stamped_beyond_max_clock_offset_is_refused_and_held_back_not_lost(tmp_path):
    """A stamp more than max_clock_offset (60 s by default) ahead of this node's wall clock is
    refused: not applied, not counted in the vector, the clock not dragged forward, and the
    origin's later changes wait behind it, while other origins in the same batch apply. Once the
    clocks agree the same batch applies. 60 s ahead exactly is still accepted."""
    node = open_node(tmp_path, "n")
    now = hlc.wall_clock_ms()
    runaway, slightly, beyond = Origin("runaway", 1), Origin("slightly", 1), Origin("beyond", 1)
    held = [
        future_change(runaway, 1, hlc.pack(now + 2 * HOUR_MS), "r1"),
        future_change(runaway, 2, hlc.pack(now + 2 * HOUR_MS, 1), "r2"),
    ]
    edge = future_change(slightly, 1, hlc.pack(now + 60_000), "s1")
    over = future_change(beyond, 1, hlc.pack(now + 60_001), "b1")

    result = Applier(node, wall_clock_ms=lambda: now).apply([*held, edge, over])
    assert result.clock_refused == {runaway: 1, beyond: 1}
    assert result.accepted == 1
    present = {r[0] for r in rows(node.conn, "leases")}
    assert present == {"s1"}
    assert nonzero(node.version_vector()) == {slightly: 1}
    assert hlc.physical_ms(node.clock().hlc) == now + 60_000, "advanced to the accepted stamp only"

    # With the real clock (no injection) a stamp two hours ahead is refused too.
    real = Applier(node).apply(held)
    assert real.clock_refused == {runaway: 1}
    assert real.written == 0

    later = Applier(node, wall_clock_ms=lambda: now + 2 * HOUR_MS).apply([*held, over])
    assert applied_cleanly(later)
    assert {r[0] for r in rows(node.conn, "leases")} == {"s1", "r1", "r2", "b1"}
    assert nonzero(node.version_vector()) == {slightly: 1, runaway: 2, beyond: 1}
    node.close()


# -- 6. ALTER TABLE while the detector runs ---------------------------------------------------


ALTERED_SCHEMA = SCHEMA.replace("score REAL)", "score REAL, vlan INTEGER DEFAULT 7)")


async def test_add_column_while_the_detector_runs_loses_no_value_of_the_new_column(tmp_path):
    """One application process writes, adds a column inside a transaction that also writes,
    and at once writes the new column (before the detector can notice); another keeps writing
    without knowing the column. A replica that applies the detector's batches ends with every
    row equal to the writers' database, the new column's values included."""
    node = open_node(tmp_path, "w")
    node.close()
    path = tmp_path / "w.db"
    tail = Tail(node_settings(path, "w"))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tail.run, nursery)
            async with trio.open_nursery() as writers:
                writers.start_soon(run_helper, "alter-workload", path, 3)
                writers.start_soon(run_helper, "workload", path, "w2", 400, 4, tmp_path / "j")
            await tail.drain(path)
            nursery.cancel_scope.cancel()
    tail.close()

    source = sqlite3.connect(path)
    (columns,) = source.execute(
        "SELECT COUNT(*) FROM pragma_table_info('leases') WHERE name = 'vlan'"
    ).fetchone()
    assert columns == 1
    vlans = Counter(v for (v,) in source.execute("SELECT vlan FROM leases"))
    assert sum(n for v, n in vlans.items() if v != 7) > 50, "the new column was barely written"
    triggers = [
        sql for (sql,) in source.execute("SELECT sql FROM sqlite_schema WHERE type = 'trigger'")
    ]
    assert triggers
    assert all("vlan" in sql for sql in triggers if "leases" in sql), "triggers not regenerated"

    # The writes inside the ALTER's transaction were logged by the old triggers, without the
    # column, and then logged again, whole (the path this test is about was taken).
    changes, _ = split(tail.records)
    lacking = {c.pk for c in changes if c.table == "leases" and c.row and "vlan" not in c.row}
    later = {c.pk for c in changes if c.table == "leases" and c.row and c.row.get("vlan", 7) != 7}
    assert lacking & later

    replica = open_node(tmp_path, "r", schema=ALTERED_SCHEMA)
    replay(tail.batches, replica)
    for table in TABLES:
        assert rows(replica.conn, table) == rows(source, table), table
    source.close()
    replica.close()


# The three tests below pin races of the detector's schema check. A separate process cannot
# commit at the exact instant on demand, so a second connection in this process plays the
# application, called from inside a wrapped `Store` method at the moment that matters.


def assert_replica_matches(tmp_path: Path, batches: list[list[LogRecord]], app, schema) -> None:
    replica = open_node(tmp_path, "replica", schema=schema)
    replay(batches, replica)
    assert rows(replica.conn, "leases") == rows(app, "leases")
    replica.close()


def test_add_column_committed_during_the_detector_poll_is_recaptured(tmp_path, monkeypatch):
    """The application adds a column and writes it right after the detector checked the schema
    and before it read the log: that write, logged without the column, must still reach peers
    with the column's value."""
    node = open_node(tmp_path, "w")
    node.close()
    settings = node_settings(tmp_path / "w.db", "w")
    app = app_connect(settings.path)
    tail = Tail(settings)
    records = tail.read_until_quiet()
    original = Store.schema_version
    armed = [False]

    def schema_version(self: Store) -> int:
        version = original(self)
        if armed[0]:
            armed[0] = False
            app.execute("ALTER TABLE leases ADD COLUMN vlan INTEGER DEFAULT 7")
            app.execute("INSERT INTO leases (mac, ip, vlan) VALUES ('k2', 'during', 42)")
        return version

    monkeypatch.setattr(Store, "schema_version", schema_version)
    app.execute("INSERT INTO leases (mac, ip) VALUES ('k1', 'before')")
    armed[0] = True
    records += tail.read_until_quiet()
    assert not armed[0], "the race was not staged"
    app.execute("INSERT INTO leases (mac, ip, vlan) VALUES ('k3', 'after', 43)")
    records += tail.read_until_quiet()
    tail.close()
    assert_replica_matches(tmp_path, records, app, ALTERED_SCHEMA)
    app.close()


def test_second_add_column_right_after_trigger_refresh_is_noticed(tmp_path, monkeypatch):
    """Two ALTERs in a row, the second committed just after the detector regenerated triggers
    for the first: the second column must be captured too."""
    node = open_node(tmp_path, "w")
    node.close()
    settings = node_settings(tmp_path / "w.db", "w")
    app = app_connect(settings.path)
    tail = Tail(settings)
    records = tail.read_until_quiet()
    original = Store.refresh_triggers
    armed = [True]

    def refresh_triggers(self: Store, recapture_after: int | None = None) -> list[str]:
        changed = original(self, recapture_after)
        if armed[0]:
            armed[0] = False
            app.execute("ALTER TABLE leases ADD COLUMN zone TEXT")
        return changed

    monkeypatch.setattr(Store, "refresh_triggers", refresh_triggers)
    app.execute("ALTER TABLE leases ADD COLUMN vlan INTEGER DEFAULT 7")
    records += tail.read_until_quiet()
    assert not armed[0], "the race was not staged"
    app.execute("INSERT INTO leases (mac, ip, vlan, zone) VALUES ('k1', 'x', 42, 'dmz')")
    records += tail.read_until_quiet()
    tail.close()
    both = ALTERED_SCHEMA.replace("DEFAULT 7)", "DEFAULT 7, zone TEXT)")
    assert_replica_matches(tmp_path, records, app, both)
    app.close()


def test_add_column_before_the_detector_first_polls_is_noticed(tmp_path):
    """The node prepared the file (triggers installed), then the application added a column
    before the detector's first poll: the new column must be captured."""
    node = open_node(tmp_path, "w")
    node.close()
    settings = node_settings(tmp_path / "w.db", "w")
    app = app_connect(settings.path)
    app.execute("ALTER TABLE leases ADD COLUMN vlan INTEGER DEFAULT 7")
    tail = Tail(settings)
    records = tail.read_until_quiet()
    app.execute("INSERT INTO leases (mac, ip, vlan) VALUES ('k1', 'x', 42)")
    records += tail.read_until_quiet()
    tail.close()
    assert_replica_matches(tmp_path, records, app, ALTERED_SCHEMA)
    app.close()


# -- 7. replica mode --------------------------------------------------------------------------


def test_replica_refuses_application_writes_applies_remote_ones_and_remembers_promotion(tmp_path):
    """With read_only set, the application's insert, update and delete fail with an error that
    says read-only replica, and leave nothing behind; the applier still applies the primary's
    changes; the mode survives a restart; after promotion the application writes and is
    captured, and the promotion is still recorded after reopening the store."""
    primary = open_node(tmp_path, "p")
    replica = open_node(tmp_path, "r")
    replica_path = tmp_path / "r.db"
    app = app_connect(str(replica_path))  # opened before the switch, as a running app would be
    app.execute("INSERT INTO leases (mac, ip) VALUES ('mine', 'before')")
    replica.seal()  # as the node's detector does
    replica.set_read_only(True)
    assert replica.clock().read_only
    before = (rows(app, "leases"), replica.log_position(), replica.clock().local_seq)

    refused = [
        "INSERT INTO leases (mac, ip) VALUES ('new', 'x')",
        "UPDATE leases SET ip = 'changed' WHERE mac = 'mine'",
        "DELETE FROM leases WHERE mac = 'mine'",
        "INSERT OR REPLACE INTO leases (mac, ip) VALUES ('mine', 'replaced')",
    ]
    for sql in refused:
        with pytest.raises(sqlite3.DatabaseError) as caught:
            app.execute(sql)
        message = str(caught.value).lower()
        assert "read-only" in message, message
        assert "replica" in message, message
    assert (rows(app, "leases"), replica.log_position(), replica.clock().local_seq) == before

    primary_app = app_connect(str(tmp_path / "p.db"))
    primary_app.execute("INSERT INTO leases (mac, ip) VALUES ('p1', 'from primary')")
    primary_app.execute("INSERT INTO kv (a, b, v) VALUES (1, 'p', x'00')")
    primary_app.close()
    result = Applier(replica).apply(split(whole_log(primary))[0])
    assert applied_cleanly(result)
    assert result.written == 2
    assert replica.conn.execute("SELECT ip FROM leases WHERE mac = 'p1'").fetchone() == (
        "from primary",
    )

    replica.close()
    replica = Store.open(node_settings(replica_path, "r"))
    assert replica.clock().read_only, "replica mode must survive a restart"
    with pytest.raises(sqlite3.DatabaseError, match="read-only"):
        app.execute("INSERT INTO leases (mac, ip) VALUES ('new', 'x')")

    replica.set_read_only(False, promoted=True)
    app.execute("INSERT INTO leases (mac, ip) VALUES ('new', 'after promotion')")
    app.execute("UPDATE leases SET ip = 'changed' WHERE mac = 'mine'")
    replica.seal()
    assert replica.clock().local_seq == before[2] + 2
    replica.close()
    replica = Store.open(node_settings(replica_path, "r"))
    clock = replica.clock()
    assert clock.promoted
    assert not clock.read_only
    app.execute("DELETE FROM leases WHERE mac = 'new'")
    replica.seal()
    assert replica.clock().local_seq == before[2] + 3
    app.close()
    primary.close()
    replica.close()


# -- capture completeness: rows a REPLACE evicts -----------------------------------------------


HOSTS = "CREATE TABLE hosts (name TEXT PRIMARY KEY, ip TEXT UNIQUE, note TEXT);"


def test_replace_that_evicts_a_row_through_a_unique_column_is_replicated(tmp_path):
    """INSERT OR REPLACE (and UPDATE OR REPLACE) that removes a *different* row because of a
    UNIQUE column deletes that row without firing DELETE triggers (recursive_triggers is off,
    SQLite's default): the peer must still end with the same rows, not keep the evicted one."""
    a = open_node(tmp_path, "a", schema=HOSTS, tables=("hosts",))
    b = open_node(tmp_path, "b", schema=HOSTS, tables=("hosts",))
    app = app_connect(str(tmp_path / "a.db"))
    app.execute("INSERT INTO hosts VALUES ('h1', '10.0.0.1', 'one')")
    app.execute("INSERT INTO hosts VALUES ('h3', '10.0.0.3', 'three')")
    app.execute("INSERT INTO hosts VALUES ('h4', '10.0.0.4', 'four')")
    app.execute("INSERT OR REPLACE INTO hosts VALUES ('h2', '10.0.0.1', 'two')")  # evicts h1
    app.execute("UPDATE OR REPLACE hosts SET ip = '10.0.0.4' WHERE name = 'h3'")  # evicts h4
    assert [r[0] for r in rows(app, "hosts")] == ["h2", "h3"]
    with contextlib.closing(app):
        result = Applier(b).apply(split(whole_log(a))[0])
        assert result.quarantined == 0
        assert rows(b.conn, "hosts") == rows(app, "hosts")
    a.close()
    b.close()
