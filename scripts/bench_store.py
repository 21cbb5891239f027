#!/usr/bin/env python3
"""Cost of capture and apply on a DHCP-lease table, next to plain SQLite, in one run.

Why: the capture triggers run inside the application's own transactions, so every write the
application makes pays for them; the applier is what bounds how fast a node catches up. Each
figure is printed beside its uncaptured / plain-SQLite baseline measured in the same run on the
same machine, with the target the issue set (ratios are what carry over between machines; raw
rates do not). Nothing is asserted about speed: targets are reported as MET or MISSED.

1. Application writes with capture (a prepared `Store`: `_repl_*` tables and triggers) and
   without (a separate database with the same table and pragmas, no `Store`): batched (1,000
   rows per transaction, INSERTs of fresh keys, then UPDATEs of those keys) and one row per
   transaction (autocommit INSERTs of fresh keys, into the table the batched pass filled).
2. Node A captures --apply-rows inserts; they are read back with `Store.read_log` (timed
   separately: the sender pays it) and applied with `Applier.apply` in 1,000-change batches on
   a fresh node B, next to a plain executemany INSERT of the same rows.

Every connection uses journal_mode=WAL and synchronous=NORMAL (synchronous is per connection,
so the application connections set it too). Databases live in a temporary directory under
/tmp (or --dir), fresh for each repeat. Rates are the median (and best) over --repeats.

    .venv/bin/python scripts/bench_store.py [--rows N] [--single-rows N] [--apply-rows N]
                                            [--repeats R] [--dir DIR]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, TypeAlias, TypeVar

from protocol import Change, Op
from replicator.apply.applier import Applier
from replicator.capture.store import LogRecord, Store, StoreSettings

TABLE = "dhcp_leases"
SCHEMA = (
    "CREATE TABLE dhcp_leases (mac TEXT PRIMARY KEY, ip TEXT NOT NULL, hostname TEXT,"
    " expires INTEGER NOT NULL, scope TEXT, client_id BLOB)"
)
COLUMNS = ("mac", "ip", "hostname", "expires", "scope", "client_id")
INSERT_SQL = f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?)"
UPDATE_SQL = f"UPDATE {TABLE} SET expires = ? WHERE mac = ?"
PRAGMAS = (("journal_mode", "WAL"), ("synchronous", "NORMAL"))
BATCH_SIZE = 1000
EPOCH = 1_750_000_000
LEASE_SECONDS = 3600
# Targets from the issue: captured/uncaptured rate, apply changes/s, apply/plain-insert rate.
CAPTURE_TARGET = 0.50
APPLY_RATE_TARGET = 100_000.0
APPLY_RATIO_TARGET = 0.30

P = ParamSpec("P")
R = TypeVar("R")
Lease: TypeAlias = tuple[str, str, str | None, int, str, bytes | None]


@dataclass(frozen=True, slots=True)
class Timing:
    """Rates (units per second) of every repeat of one measurement."""

    rates: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def best(self) -> float:
        return max(self.rates)


class Recorder:
    """Collects one rate per repeat under each measurement's name."""

    def __init__(self) -> None:
        self.rates: dict[str, list[float]] = {}

    def time(
        self, name: str, units: int, body: Callable[P, R], *args: P.args, **kwargs: P.kwargs
    ) -> R:
        """Run ``body(*args)``, which does ``units`` of work, and record its rate."""
        gc.collect()  # each measurement starts without the previous one's garbage
        start = time.perf_counter()
        result = body(*args, **kwargs)
        elapsed = time.perf_counter() - start
        self.rates.setdefault(name, []).append(units / elapsed)
        return result

    def __getitem__(self, name: str) -> Timing:
        return Timing(self.rates[name])


def leases(first: int, count: int, seed: int) -> list[Lease]:
    """DHCP leases as a server writes them: fresh MACs, addresses in a /8, mixed columns."""
    rng = random.Random(seed * 1_000_003 + first)
    rows: list[Lease] = []
    for index in range(first, first + count):
        mac_bytes = bytes((0x02, 0x00)) + index.to_bytes(4, "big")
        mac = ":".join(f"{byte:02x}" for byte in mac_bytes)
        ip = f"10.{(index >> 16) & 0xFF}.{(index >> 8) & 0xFF}.{index & 0xFF}"
        kind = rng.choice(("pc", "phone", "printer", "cam"))
        hostname = f"{kind}-{index:06d}" if rng.random() < 0.8 else None
        client_id = b"\x01" + mac_bytes if rng.random() < 0.7 else None  # type 1 + hw address
        expires = EPOCH + rng.randrange(86_400)
        rows.append((mac, ip, hostname, expires, rng.choice(("lan", "guest", "iot")), client_id))
    return rows


def renewals(rows: Sequence[Lease]) -> list[tuple[int, str]]:
    """UPDATE parameters: every lease renewed for another lease period."""
    return [(row[3] + LEASE_SECONDS, row[0]) for row in rows]


def app_connect(path: Path) -> sqlite3.Connection:
    """An application's own connection: plain sqlite3, autocommit, the benchmark's pragmas."""
    conn = sqlite3.connect(path, isolation_level=None)
    for name, value in PRAGMAS:
        conn.execute(f"PRAGMA {name} = {value}")
    return conn


def open_store(path: Path, node_id: str) -> Store:
    return Store.open(
        StoreSettings(str(path), node_id, (TABLE,), pragmas=dict(PRAGMAS), schema_sql=SCHEMA)
    )


def plain_database(path: Path) -> sqlite3.Connection:
    """The uncaptured baseline: same table and pragmas, no `_repl_*` tables, no triggers."""
    conn = app_connect(path)
    conn.execute(SCHEMA)
    return conn


@contextmanager
def scratch(root: Path, name: str) -> Iterator[Path]:
    """A fresh directory for one repeat's databases, removed afterwards."""
    path = root / name
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path)


def write_batched(conn: sqlite3.Connection, sql: str, params: Sequence[tuple[object, ...]]) -> None:
    for start in range(0, len(params), BATCH_SIZE):
        conn.execute("BEGIN")
        conn.executemany(sql, params[start : start + BATCH_SIZE])
        conn.execute("COMMIT")


def write_single(conn: sqlite3.Connection, rows: Sequence[Lease]) -> None:
    for row in rows:
        conn.execute(INSERT_SQL, row)  # autocommit: one transaction per statement


def bench_capture(
    root: Path, rows: list[Lease], single: list[Lease], repeats: int, record: Recorder
) -> None:
    """Application writes with and without capture; fresh databases for every repeat."""
    updates = renewals(rows)
    for repeat in range(repeats):
        for captured in (False, True):
            label = "captured" if captured else "plain"
            with scratch(root, f"capture-{repeat}-{label}") as directory:
                path = directory / "state.db"
                store = open_store(path, "node-a") if captured else None
                conn = app_connect(path) if captured else plain_database(path)
                try:
                    record.time(f"insert/{label}", len(rows), write_batched, conn, INSERT_SQL, rows)
                    record.time(
                        f"update/{label}", len(updates), write_batched, conn, UPDATE_SQL, updates
                    )
                    record.time(f"single/{label}", len(single), write_single, conn, single)
                    check_written(conn, store, len(rows), len(single))
                finally:
                    conn.close()
                    if store is not None:
                        store.close()
        record.rates.setdefault("insert+update/plain", []).append(
            _combined(record, "plain", repeat)
        )
        record.rates.setdefault("insert+update/captured", []).append(
            _combined(record, "captured", repeat)
        )


def check_written(conn: sqlite3.Connection, store: Store | None, rows: int, single: int) -> None:
    """The writes all landed, and with capture every one of them was logged."""
    (count,) = conn.execute(f"SELECT COUNT(*) FROM {TABLE}").fetchone()
    if count != rows + single:
        raise SystemExit(f"{count} rows in {TABLE}, expected {rows + single}")
    logged = 2 * rows + single  # inserts, their updates, single inserts
    if store is not None and store.unsealed()[1] != logged:
        raise SystemExit(f"capture logged {store.unsealed()[1]} changes, expected {logged}")


def _combined(record: Recorder, label: str, repeat: int) -> float:
    """Rows/s over the whole insert + update pass of one repeat."""
    inserts = record.rates[f"insert/{label}"][repeat]
    updates = record.rates[f"update/{label}"][repeat]
    return 2 / (1 / inserts + 1 / updates)  # equal row counts: the harmonic mean


def read_all(store: Store) -> list[LogRecord]:
    """The whole log, 1,000 entries per call."""
    records: list[LogRecord] = []
    position = 0
    while batch := store.read_log(position, BATCH_SIZE):
        records.extend(batch)
        position = batch[-1].position
    return records


def read_and_send(store: Store) -> int:
    """Read the whole log as a sender does: 1,000 entries per call, each batch dropped once
    "sent" (holding them all would time the garbage collector walking them instead)."""
    count = position = 0
    while batch := store.read_log(position, BATCH_SIZE):
        count += len(batch)
        position = batch[-1].position
    return count


def apply_all(applier: Applier, batches: Sequence[Sequence[Change]]) -> int:
    """Apply every batch, each in its own transaction; returns the rows written."""
    return sum(applier.apply(batch).written for batch in batches)


def bench_apply(root: Path, rows: list[Lease], repeats: int, record: Recorder) -> None:
    """Non-conflicting remote inserts: read_log on A, Applier.apply on B, plain insert."""
    with scratch(root, "apply-source") as directory:
        source = open_store(directory / "a.db", "node-a")
        conn = app_connect(directory / "a.db")
        try:
            write_batched(conn, INSERT_SQL, rows)
            expected = conn.execute(f"SELECT * FROM {TABLE} ORDER BY mac").fetchall()
        finally:
            conn.close()
        try:
            # The node stamps what the triggers logged before anything is read (once: the
            # stamps cannot be taken off again).
            record.time("seal", len(rows), source.seal)
            for _ in range(repeats):
                record.time("read_log", len(rows), read_and_send, source)
            records = read_all(source)
        finally:
            source.close()
    changes = [r.entry for r in records if isinstance(r.entry, Change) and r.entry.op is Op.INSERT]
    if len(changes) != len(rows):
        raise SystemExit(f"read {len(changes)} insert changes back, expected {len(rows)}")
    batches = [changes[start : start + BATCH_SIZE] for start in range(0, len(changes), BATCH_SIZE)]
    plain_rows = [
        tuple(change.row[column] for column in COLUMNS) for change in changes if change.row
    ]
    del records
    # The pre-read changes stay live for the whole measurement: keep the collector from
    # walking them again and again, which would time it rather than the applier.
    gc.collect()
    gc.freeze()
    try:
        for repeat in range(repeats):
            with scratch(root, f"apply-{repeat}") as directory:
                target = open_store(directory / "b.db", "node-b")
                try:
                    applier = Applier(target)
                    written = record.time("apply", len(changes), apply_all, applier, batches)
                    if written != len(changes):
                        raise SystemExit(f"applier wrote {written} rows of {len(changes)}")
                    got = target.conn.execute(f"SELECT * FROM {TABLE} ORDER BY mac").fetchall()
                    if got != expected:
                        raise SystemExit("node B does not hold the rows node A captured")
                finally:
                    target.close()
                plain = plain_database(directory / "plain.db")
                try:
                    record.time(
                        "apply/plain",
                        len(plain_rows),
                        write_batched,
                        plain,
                        INSERT_SQL,
                        plain_rows,
                    )
                finally:
                    plain.close()
    finally:
        gc.unfreeze()


def verdict(met: bool) -> str:
    return "MET" if met else "MISSED"


def line(label: str, *cells: str, target: str = "") -> None:
    print(f"  {label:<40}" + "".join(f"{cell:>12}" for cell in cells) + f"   {target}".rstrip())


def rates(timing: Timing) -> tuple[str, str]:
    return f"{timing.median:,.0f}", f"({timing.best:,.0f})"


def report_capture(record: Recorder, args: argparse.Namespace) -> list[bool]:
    print(f"1. application writes to {TABLE}, rows/s: with capture vs without (no triggers)")
    line("", "captured", "(best)", "uncaptured", "(best)", "ratio", target="target")
    verdicts: list[bool] = []
    cases = (
        ("insert", f"batched INSERT ({args.rows:,} rows)", False),
        ("update", f"batched UPDATE ({args.rows:,} rows)", False),
        ("insert+update", "(a) batched INSERT + UPDATE", True),
        ("single", f"(b) 1 INSERT per txn ({args.single_rows:,} rows)", True),
    )
    for key, label, targeted in cases:
        captured, plain = record[f"{key}/captured"], record[f"{key}/plain"]
        ratio = captured.median / plain.median
        target = ""
        if targeted:
            verdicts.append(ratio >= CAPTURE_TARGET)
            target = f">= {CAPTURE_TARGET:.2f}  {verdict(verdicts[-1])}"
        line(label, *rates(captured), *rates(plain), f"{ratio:.3f}", target=target)
    print(f"  batched: {BATCH_SIZE:,} rows per transaction; ratio: median / median")
    return verdicts


def report_apply(record: Recorder, args: argparse.Namespace) -> list[bool]:
    print(
        f"\n2. remote upserts: {args.apply_rows:,} non-conflicting inserts captured on node A,"
        f" applied on a fresh node B\n   ({BATCH_SIZE:,} changes per batch and transaction)"
    )
    line("", "per second", "(best)", "", "", "ratio", target="target")
    apply, plain, read = record["apply"], record["apply/plain"], record["read_log"]
    ratio = apply.median / plain.median
    rate_met = apply.median >= APPLY_RATE_TARGET
    ratio_met = ratio >= APPLY_RATIO_TARGET
    blank = ("", "")
    line("stamping on A (Store.seal, once), entries/s", *rates(record["seal"]))
    line("read_log on A, entries/s", *rates(read))
    line(
        "Applier.apply on B, changes/s",
        *rates(apply),
        *blank,
        "",
        target=f">= {APPLY_RATE_TARGET:,.0f}/s  {verdict(rate_met)}",
    )
    line("plain executemany INSERT, rows/s", *rates(plain))
    line(
        "apply / plain INSERT",
        *blank,
        *blank,
        f"{ratio:.3f}",
        target=f">= {APPLY_RATIO_TARGET:.2f}  {verdict(ratio_met)}",
    )
    both = 1 / (1 / read.median + 1 / apply.median)
    line(
        "read_log + apply in series, changes/s",
        f"{both:,.0f}",
        "",
        *blank,
        f"{both / plain.median:.3f}",
    )
    print("  apply timing excludes read_log (all entries are read before it starts)")
    return [rate_met, ratio_met]


def versions(root: Path) -> list[tuple[str, str]]:
    return [
        ("python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("sqlite", sqlite3.sqlite_version),
        ("machine", f"{platform.machine()}, {os.cpu_count()} CPUs"),
        ("tmpdir", str(root)),
        ("pragmas", ", ".join(f"{name}={value}" for name, value in PRAGMAS)),
    ]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--rows", type=int, default=40_000, help="rows per batched pass (default 40,000)"
    )
    parser.add_argument(
        "--single-rows",
        type=int,
        default=8_000,
        help="rows written one per transaction (default 8,000)",
    )
    parser.add_argument(
        "--apply-rows", type=int, default=50_000, help="changes applied per repeat (default 50,000)"
    )
    parser.add_argument("--repeats", type=int, default=7, help="repeats of each (default 7)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the generated leases")
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to create the temporary directory (/tmp)"
    )
    args = parser.parse_args(argv)
    if min(args.rows, args.single_rows, args.apply_rows, args.repeats) < 1:
        parser.error("--rows, --single-rows, --apply-rows and --repeats must be at least 1")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="bench_store-", dir=args.dir or "/tmp"))
    try:
        for name, value in versions(root):
            print(f"{name:<8} {value}")
        print(f"repeats  median (best) of {args.repeats}, fresh databases each repeat\n")
        rows = leases(0, args.rows, args.seed)
        single = leases(args.rows, args.single_rows, args.seed)
        applied = leases(0, args.apply_rows, args.seed + 1)
        record = Recorder()
        print("measuring application writes ...", file=sys.stderr, flush=True)
        bench_capture(root, rows, single, args.repeats, record)
        print("measuring read_log and apply ...", file=sys.stderr, flush=True)
        bench_apply(root, applied, args.repeats, record)
        verdicts = report_capture(record, args) + report_apply(record, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(
        f"\ntargets met: {sum(verdicts)} of {len(verdicts)}"
        f"   (run took {time.perf_counter() - started:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
