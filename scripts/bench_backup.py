#!/usr/bin/env python3
"""Cost of backups of a large state database: create, create encrypted, verify, restore.

Why: a node backs up its state on a schedule while the application keeps writing, and restores
from a backup when the file is lost or damaged; how long these take for a realistic table (and
that memory does not grow with the database) decides the interval and recovery times an
operator can promise. Nothing is asserted: figures are printed.

The state database is built through the project's `Store` with the shipped ``conf/schema.sql``:
``--rows`` DHCP leases inserted with plain SQL in big transactions, so the capture triggers fill
``_repl_log`` and ``_repl_rowmeta`` as they would on a node. Then, on that file:

1. ``create`` with lz4 compression (level 0), no encryption;
2. ``create`` with lz4 compression and SecretBox encryption;
3. ``verify`` of the first (re-checksum of the stored file);
4. ``restore_into`` a live connection (the state file, its `Store` connection kept open), from
   each backup: checksum, decrypt, decompress, integrity_check, then SQLite's backup API;
5. the node's restore (`replicator backup restore`): the same, plus replicator's invariants
   checked on the copy and a new incarnation written into it before it goes in.

Peak RSS of the process is printed after the build and at the end: the backup steps stream in
1 MiB chunks, so it should barely move whatever the size of the database.

    .venv/bin/python scripts/bench_backup.py [--rows N] [--dir DIR]
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import secrets
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from replicator.capture.store import Store, StoreSettings
from replicator.config import BackupConfig, Retention
from replicator.durability.backup import BackupInfo, BackupStore
from replicator.durability.recovery import restore_backup
from replicator.log import configure

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "conf" / "schema.sql"
NODE = "bench-node"
TABLES = ("dhcp_leases", "dns_records", "config_history")
BATCH = 50_000
EPOCH = 1_750_000_000
R = TypeVar("R")


def leases(first: int, count: int) -> Iterator[tuple[str, str, str | None, str, int, bytes]]:
    """DHCP leases as a server writes them: fresh MACs, addresses in a /8, mixed columns."""
    for index in range(first, first + count):
        mac = bytes((0x02, 0x00)) + index.to_bytes(4, "big")
        yield (
            ":".join(f"{byte:02x}" for byte in mac),
            f"10.{(index >> 16) & 0xFF}.{(index >> 8) & 0xFF}.{index & 0xFF}",
            f"host-{index:07d}" if index % 5 else None,
            ("lan", "guest", "iot")[index % 3],
            EPOCH + (index * 7919) % 86_400,
            b"\x01" + mac,
        )


def build(path: Path, rows: int) -> Store:
    store = Store.open(StoreSettings(str(path), NODE, TABLES, schema_sql=SCHEMA.read_text()))
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous = NORMAL")
    for first in range(0, rows, BATCH):
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO dhcp_leases (mac, ip, hostname, scope, expires, client_id)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            leases(first, min(BATCH, rows - first)),
        )
        conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return store


def timed(body: Callable[[], R]) -> tuple[R, float]:
    start = time.perf_counter()
    result = body()
    return result, time.perf_counter() - start


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def mib(size: int) -> str:
    return f"{size / (1 << 20):8.1f} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--rows", type=int, default=1_000_000, help="DHCP leases (1,000,000)")
    parser.add_argument("--dir", help="work directory (default: a temporary one, removed)")
    args = parser.parse_args()
    configure(json=False, level=logging.WARNING)  # keep the figures readable
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-backup-"))
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=root))
    try:
        run(work, args.rows)
    finally:
        shutil.rmtree(work)
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


def run(work: Path, rows: int) -> None:
    db = work / "state.db"
    key = work / "backup.key"
    key.write_text(secrets.token_urlsafe(32) + "\n")  # as `replicator keygen` writes it
    key.chmod(0o600)

    print(
        f"python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}, {os.cpu_count()} CPUs"
    )
    store, seconds = timed(lambda: build(db, rows))
    db_size = db.stat().st_size
    log_rows = store.conn.execute("SELECT COUNT(*) FROM _repl_log").fetchone()[0]
    print(f"rows            {rows:>12,}  (+ {log_rows:,} _repl_log entries)")
    print(f"database        {mib(db_size)}")
    print(f"build           {seconds:8.2f} s  {rows / seconds:>12,.0f} rows/s")
    print(f"peak RSS after build {peak_rss_mib():.0f} MiB")
    print()

    def config(encryption: bool) -> BackupConfig:
        return BackupConfig(
            enabled=True,
            directory=str(work / "backups"),
            retention=Retention(max_age=86400.0),
            compression=True,
            compression_level=0,
            encryption=encryption,
            encryption_key=str(key),
        )

    plain, encrypted = BackupStore(config(False), NODE), BackupStore(config(True), NODE)
    print(f"{'step':<26} {'seconds':>8} {'rows/s':>12} {'db MiB/s':>9} {'backup':>12} {'ratio':>6}")

    def report(step: str, seconds: float, info: BackupInfo | None = None) -> None:
        size = f"{mib(info.size)} {info.size / db_size:6.3f}" if info is not None else ""
        print(
            f"{step:<26} {seconds:8.2f} {rows / seconds:>12,.0f}"
            f" {db_size / (1 << 20) / seconds:>9.1f} {size}"
        )

    first, seconds = timed(lambda: plain.create(str(db), description="bench"))
    report("create (lz4)", seconds, first)
    second, seconds = timed(lambda: encrypted.create(str(db), description="bench"))
    report("create (lz4 + secretbox)", seconds, second)
    _, seconds = timed(lambda: plain.verify(first.name))
    report("verify (lz4)", seconds)
    for label, backups, info in (
        ("restore_into (lz4)", plain, first),
        ("restore_into (lz4+secret)", encrypted, second),
    ):
        live = sqlite3.connect(db, isolation_level=None)  # the Store's connection stays open too
        try:
            _, seconds = timed(lambda b=backups, i=info, c=live: b.restore_into(i.name, c))
            restored = live.execute("SELECT COUNT(*) FROM dhcp_leases").fetchone()[0]
        finally:
            live.close()
        assert restored == rows, (restored, rows)
        report(label, seconds)
    # What `replicator backup restore` does in a node: verify, decode, integrity check and
    # invariants on the copy, a new incarnation, then the backup API into the live file.
    live = sqlite3.connect(db, isolation_level=None)
    try:
        _, seconds = timed(lambda: restore_backup(plain, first.name, store.settings, live))
    finally:
        live.close()
    report("node restore (lz4)", seconds)
    store.close()
    print()
    print(f"peak RSS at the end  {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    sys.exit(main())
