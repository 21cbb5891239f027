"""Entry points for the multi-process capture tests: applications and appliers in their own process.

Run as ``python -m tests.support.proc_helpers COMMAND ...`` from the repository root. The
application commands (``workload``, ``probe``, ``busy-writer``, ``alter-workload``) use plain
``sqlite3`` connections with a busy timeout, exactly as an application would: no replicator
import, no extension, no temp table. ``apply-batch`` is a replicator applier that the test
kills with -9.

Everything a command reports goes to stdout, one line per fact, flushed as it happens.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import sqlite3
import sys
import time
from collections.abc import Callable
from typing import Any

# The application's schema: a rowid table with a text key and every SQLite value type, and a
# WITHOUT ROWID table with a composite key and untyped columns.
SCHEMA = (
    "CREATE TABLE leases (mac TEXT PRIMARY KEY, ip TEXT, expires INTEGER, data BLOB, score REAL);"
    "CREATE TABLE kv (a, b, v, PRIMARY KEY (a, b)) WITHOUT ROWID;"
)
TABLES = ("leases", "kv")
LEASE_COLUMNS = ("mac", "ip", "expires", "data", "score")
BIG_ORIGIN = ("far", 42)  # the origin of the batch `apply-batch` applies

Row = dict[str, Any]
Entry = tuple[str, list[Any], Row | None]  # (table, primary key, row after; None: deleted)


def app_connect(path: str) -> sqlite3.Connection:
    """An application's connection: autocommit, explicit transactions, a busy timeout."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    conn.execute("PRAGMA busy_timeout = 30000")
    return conn


def say(*parts: object) -> None:
    print(*parts, flush=True)


def _value(rng: random.Random) -> Any:
    kind = rng.randrange(6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([0, -1, 2**62, -(2**63), rng.randrange(10**9)])
    if kind == 2:
        return rng.choice([0.1, 1 / 3, -2.5e-300, 1e300, 12345.678])
    if kind == 3:
        return rng.choice(["", "text", "ünïcødé ✓", "quote ' and \" both", "x" * 200])
    return rng.randbytes(rng.randrange(0, 24))


class Workload:
    """Random application writes on this writer's own keys, with a journal of what committed.

    The journal holds, per committed statement, the rows it left (read back right after the
    statement, inside its transaction), so a test can compare them with what capture logged.
    """

    def __init__(self, conn: sqlite3.Connection, writer: str, rng: random.Random) -> None:
        self.conn = conn
        self.writer = writer
        self.rng = rng
        self.counter = 0
        self.leases: set[str] = set()
        self.kv: set[tuple[int, str]] = set()
        self.journal: list[list[Entry]] = []
        self.rows_changed = 0
        self.extra_columns: dict[str, Callable[[], Any]] = {}

    # -- helpers ----------------------------------------------------------------------------

    def new_mac(self) -> str:
        self.counter += 1
        return f"{self.writer}-{self.counter:06d}"

    def new_kv(self) -> tuple[int, str]:
        self.counter += 1
        return self.rng.randrange(4), f"{self.writer}-{self.counter:06d}"

    def lease_values(self, mac: str) -> dict[str, Any]:
        rng = self.rng
        values = {
            "mac": mac,
            "ip": f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}",
            "expires": rng.randrange(2**40),
            "data": rng.choice([None, b"", rng.randbytes(rng.randrange(1, 32))]),
            "score": rng.choice([None, rng.random() * 100, 1e300, -0.5]),
        }
        for column, make in self.extra_columns.items():
            values[column] = make()
        return values

    def lease_row(self, mac: str) -> Row | None:
        cursor = self.conn.execute("SELECT * FROM leases WHERE mac = ?", (mac,))
        names = [d[0] for d in cursor.description]
        row = cursor.fetchone()
        return None if row is None else dict(zip(names, row, strict=True))

    def kv_row(self, key: tuple[int, str]) -> Row | None:
        row = self.conn.execute("SELECT a, b, v FROM kv WHERE a = ? AND b = ?", key).fetchone()
        return None if row is None else {"a": row[0], "b": row[1], "v": row[2]}

    def run(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> int:
        count = self.conn.execute(sql, params).rowcount
        return max(count, 0)

    # -- one statement ----------------------------------------------------------------------

    def statement(self) -> tuple[list[Entry], int]:
        """Run one random statement; returns (journal entries, rows it changed)."""
        rng = self.rng
        choice = rng.random()
        if choice < 0.6:
            return self.lease_statement(rng.choice(_LEASE_OPS))
        return self.kv_statement(rng.choice(_KV_OPS))

    def insert_lease_sql(self, values: dict[str, Any], verb: str = "INSERT") -> tuple[str, list]:
        names = list(values)
        sql = f"{verb} INTO leases ({', '.join(names)}) VALUES ({', '.join('?' for _ in names)})"
        return sql, [values[n] for n in names]

    def lease_statement(self, op: str) -> tuple[list[Entry], int]:
        rng = self.rng
        existing = sorted(self.leases)
        if op in {"update", "delete", "rekey", "multi"} and not existing:
            op = "insert"
        if op == "insert":
            mac = self.new_mac()
            sql, params = self.insert_lease_sql(self.lease_values(mac))
            n = self.run(sql, params)
            self.leases.add(mac)
            return [("leases", [mac], self.lease_row(mac))], n
        if op == "update":
            mac = rng.choice(existing)
            values = self.lease_values(mac)
            sets = ", ".join(f"{c} = ?" for c in values if c != "mac")
            params = [v for c, v in values.items() if c != "mac"]
            n = self.run(f"UPDATE leases SET {sets} WHERE mac = ?", [*params, mac])
            return [("leases", [mac], self.lease_row(mac))], n
        if op == "delete":
            mac = rng.choice(existing)
            n = self.run("DELETE FROM leases WHERE mac = ?", (mac,))
            self.leases.discard(mac)
            return [("leases", [mac], None)], n
        if op in {"upsert", "replace"}:
            mac = rng.choice(existing) if existing and rng.random() < 0.6 else self.new_mac()
            values = self.lease_values(mac)
            if op == "upsert":
                sql, params = self.insert_lease_sql(values)
                sql += (
                    " ON CONFLICT (mac) DO UPDATE SET ip = excluded.ip,"
                    " expires = leases.expires + 1, data = excluded.data"
                )
            else:
                sql, params = self.insert_lease_sql(values, "INSERT OR REPLACE")
            n = self.run(sql, params)
            self.leases.add(mac)
            return [("leases", [mac], self.lease_row(mac))], n
        if op == "rekey":  # an UPDATE of the primary key: captured as a delete plus an insert
            old = rng.choice(existing)
            new = self.new_mac()
            n = self.run("UPDATE leases SET mac = ? WHERE mac = ?", (new, old))
            self.leases.discard(old)
            self.leases.add(new)
            return [("leases", [old], None), ("leases", [new], self.lease_row(new))], n
        if op == "multi":  # one statement, several rows
            macs = rng.sample(existing, min(len(existing), rng.randrange(2, 5)))
            marks = ", ".join("?" for _ in macs)
            n = self.run(f"UPDATE leases SET expires = expires + 1 WHERE mac IN ({marks})", macs)
            return [("leases", [m], self.lease_row(m)) for m in sorted(macs)], n
        if op == "noop":  # touches nothing: nothing may be captured
            n = self.run("UPDATE leases SET ip = 'x' WHERE mac = ?", (f"{self.writer}-none",))
            return [], n
        raise AssertionError(op)

    def kv_statement(self, op: str) -> tuple[list[Entry], int]:
        rng = self.rng
        existing = sorted(self.kv)
        if op in {"update", "delete"} and not existing:
            op = "insert"
        if op == "insert":
            key = self.new_kv()
            n = self.run("INSERT INTO kv (a, b, v) VALUES (?, ?, ?)", (*key, _value(rng)))
            self.kv.add(key)
        elif op == "update":
            key = rng.choice(existing)
            n = self.run("UPDATE kv SET v = ? WHERE a = ? AND b = ?", (_value(rng), *key))
        elif op == "delete":
            key = rng.choice(existing)
            n = self.run("DELETE FROM kv WHERE a = ? AND b = ?", key)
            self.kv.discard(key)
            return [("kv", list(key), None)], n
        else:
            key = rng.choice(existing) if existing and rng.random() < 0.6 else self.new_kv()
            if op == "upsert":
                sql = (
                    "INSERT INTO kv (a, b, v) VALUES (?, ?, ?)"
                    " ON CONFLICT (a, b) DO UPDATE SET v = excluded.v"
                )
            else:
                sql = "INSERT OR REPLACE INTO kv (a, b, v) VALUES (?, ?, ?)"
            n = self.run(sql, (*key, _value(rng)))
            self.kv.add(key)
        return [("kv", list(key), self.kv_row(key))], n

    # -- transactions -----------------------------------------------------------------------

    def step(self) -> None:
        """One unit of work: an autocommit statement, a transaction, or a rolled-back one."""
        rng = self.rng
        choice = rng.random()
        if choice < 0.55:
            entries, n = self.statement()
            self.journal.append(entries)
            self.rows_changed += n
            return
        saved = (set(self.leases), set(self.kv))
        self.conn.execute("BEGIN IMMEDIATE")
        pending: list[list[Entry]] = []
        changed = 0
        for _ in range(rng.randrange(2, 7)):
            entries, n = self.statement()
            pending.append(entries)
            changed += n
        if choice < 0.93:
            self.conn.execute("COMMIT")
            self.journal.extend(pending)
            self.rows_changed += changed
        else:  # an application that changes its mind: nothing of this may be captured
            self.conn.execute("ROLLBACK")
            self.leases, self.kv = saved


_LEASE_OPS = (
    "insert",
    "insert",
    "update",
    "update",
    "delete",
    "upsert",
    "replace",
    "rekey",
    "multi",
    "noop",
)
_KV_OPS = ("insert", "insert", "update", "delete", "upsert", "replace")


# -- commands ---------------------------------------------------------------------------------


def cmd_workload(path: str, writer: str, steps: str, seed: str, journal: str) -> None:
    """``steps`` units of random work; the journal (pickled) lists what committed, in order."""
    conn = app_connect(path)
    work = Workload(conn, writer, random.Random(int(seed)))
    say("ready")
    for _ in range(int(steps)):
        work.step()
    conn.close()
    with open(journal, "wb") as out:
        pickle.dump(work.journal, out)
    say("done", len(work.journal), work.rows_changed)


def cmd_probe(path: str, count: str, interval: str) -> None:
    """Single-row commits, spaced out; prints ``i start end`` (monotonic) around each commit."""
    conn = app_connect(path)
    for i in range(int(count)):
        time.sleep(float(interval))
        start = time.monotonic()
        conn.execute("INSERT INTO kv (a, b, v) VALUES (?, ?, ?)", (-1, f"probe-{i}", i))
        end = time.monotonic()
        say(i, start, end)
    conn.close()


def cmd_busy_writer(path: str, seed: str, stop_file: str, shared_keys: str) -> None:
    """Writes until ``stop_file`` exists: own keys and some keys a peer writes too.

    Prints ``ready`` after the first commit, then at the end one JSON line: the exact number of
    rows its committed statements changed and the peer keys it wrote."""
    rng = random.Random(int(seed))
    conn = app_connect(path)
    shared = json.loads(shared_keys)
    own: list[str] = []
    rows = statements = 0
    touched: set[str] = set()
    counter = 0

    def one() -> tuple[int, str | None]:
        nonlocal counter
        op = rng.randrange(6)
        if op == 0 or not own:
            counter += 1
            mac = f"app-{counter:06d}"
            own.append(mac)
            return conn.execute(
                "INSERT INTO leases (mac, ip, expires) VALUES (?, ?, ?)", (mac, "10.1.1.1", counter)
            ).rowcount, None
        if op == 1:
            return conn.execute(
                "UPDATE leases SET ip = ?, expires = expires + 1 WHERE mac = ?",
                (f"10.2.{counter % 256}.1", rng.choice(own)),
            ).rowcount, None
        if op == 2:
            mac = own.pop(rng.randrange(len(own)))
            return conn.execute("DELETE FROM leases WHERE mac = ?", (mac,)).rowcount, None
        if op == 3:
            mac = rng.choice(own)
            return conn.execute(
                "INSERT INTO leases (mac, ip, expires) VALUES (?, 'up', 1)"
                " ON CONFLICT (mac) DO UPDATE SET expires = leases.expires + 100",
                (mac,),
            ).rowcount, None
        if op == 4:
            mac = rng.choice(own)
            return conn.execute(
                "INSERT OR REPLACE INTO leases (mac, ip, expires, score) VALUES (?, 'rep', 2, 0.5)",
                (mac,),
            ).rowcount, None
        key = rng.choice(shared)  # a row the peer writes too: the app updates what it sees
        return conn.execute(
            "UPDATE kv SET v = ? WHERE a = ? AND b = ?", (f"app-{counter}", *json.loads(key))
        ).rowcount, key

    first = True
    while not os.path.exists(stop_file) or statements < 200:
        if rng.random() < 0.7:
            n, key = one()
            rows += max(n, 0)
            statements += 1
            if key is not None and n:
                touched.add(key)
        else:
            conn.execute("BEGIN IMMEDIATE")
            batch = [one() for _ in range(rng.randrange(2, 6))]
            if rng.random() < 0.9:
                conn.execute("COMMIT")
                rows += sum(max(n, 0) for n, _ in batch)
                statements += len(batch)
                touched.update(key for n, key in batch if key is not None and n)
            else:
                conn.execute("ROLLBACK")
                own[:] = [
                    m
                    for m in own
                    if conn.execute("SELECT 1 FROM leases WHERE mac = ?", (m,)).fetchone()
                ]
        if first:
            first = False
            say("ready")
        # An application thinks between writes: back-to-back commits with no pause would
        # starve every other writer (SQLite's busy handler is not fair), the applier included.
        time.sleep(rng.uniform(0.0002, 0.002))
    conn.close()
    say(json.dumps({"rows": rows, "statements": statements, "touched": sorted(touched)}))


def cmd_alter_workload(path: str, seed: str) -> None:
    """Writes, then ``ALTER TABLE leases ADD COLUMN vlan`` inside a transaction with writes,
    then a burst of writes that set the new column right away, then more a little later."""
    conn = app_connect(path)
    rng = random.Random(int(seed))
    work = Workload(conn, "alt", rng)
    for _ in range(150):
        work.step()
    say("altering")
    conn.execute("BEGIN IMMEDIATE")
    for _ in range(3):
        work.lease_statement("update")
    conn.execute("ALTER TABLE leases ADD COLUMN vlan INTEGER DEFAULT 7")
    work.extra_columns["vlan"] = lambda: rng.randrange(100, 4000)
    for op in ("insert", "update", "upsert", "replace", "rekey", "insert"):
        work.lease_statement(op)
    conn.execute("COMMIT")
    for _ in range(150):  # right after: before the detector can have noticed
        work.step()
    for mac in sorted(work.leases)[:40]:  # the new column on rows written before the ALTER
        conn.execute("UPDATE leases SET vlan = ? WHERE mac = ?", (rng.randrange(4000, 5000), mac))
    time.sleep(0.05)
    for _ in range(100):
        work.step()
    conn.close()
    say("done")


def big_batch(n: int) -> list[Any]:
    """``n`` inserts from one remote origin, sequences 1..n (deterministic content)."""
    from protocol import Change, Op, Origin, RowVersion
    from replicator.capture import hlc

    origin = Origin(*BIG_ORIGIN)
    base = hlc.pack(hlc.wall_clock_ms() - 60_000)
    return [
        Change(
            origin=origin,
            seq=i + 1,
            table="leases",
            op=Op.INSERT,
            pk=(f"big-{i:07d}",),
            row={
                "mac": f"big-{i:07d}",
                "ip": "192.0.2.1",
                "expires": i,
                "data": None,
                "score": float(i),
            },
            old=None,
            version=RowVersion(base + i, origin, 1),
        )
        for i in range(n)
    ]


def cmd_apply_batch(path: str, node_id: str, count: str) -> None:
    """Applies one large batch in one call; prints ``applying`` before and ``done`` after, and
    ``sql <statement start>`` each time the applier's connection starts a different statement
    (consecutive executions of one statement, as in executemany, print once)."""
    from replicator.apply.applier import Applier
    from replicator.capture.store import Store, StoreSettings

    store = Store.open(StoreSettings(path, node_id, TABLES), prepare=False)
    changes = big_batch(int(count))
    last = [""]

    def trace(sql: str) -> None:
        head = " ".join(sql.split())[:40]
        if head != last[0]:
            last[0] = head
            say("sql", head)

    store.conn.set_trace_callback(trace)
    say("applying")
    result = Applier(store).apply(changes)
    say("done", result.written)
    store.close()


COMMANDS: dict[str, Callable[..., None]] = {
    "workload": cmd_workload,
    "probe": cmd_probe,
    "busy-writer": cmd_busy_writer,
    "alter-workload": cmd_alter_workload,
    "apply-batch": cmd_apply_batch,
}


def main(argv: list[str]) -> None:
    COMMANDS[argv[0]](*argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
