"""Backups of the state database: real files, real writer processes, kill -9, bad bytes, keys.

The state databases are prepared by `Store` (``conf/schema.sql`` plus an ``accounts`` table), so
every backup holds the `_repl_*` tables and capture triggers a node's file has.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from replicator.capture.store import Store, StoreSettings
from replicator.config import BackupConfig, Retention
from replicator.durability.backup import (
    BackupCorrupt,
    BackupError,
    BackupInfo,
    BackupKeyError,
    BackupStore,
    expired,
    load_key,
)
from replicator.durability.backup_format import HEADER, RECORD_LENGTH

ROOT = Path(__file__).resolve().parents[2]
NODE = "node1"
ACCOUNTS = 10
TOTAL = ACCOUNTS * 100
SCHEMA = (ROOT / "conf" / "schema.sql").read_text() + (
    "CREATE TABLE IF NOT EXISTS accounts (id TEXT PRIMARY KEY, balance INTEGER NOT NULL);"
    "CREATE TABLE IF NOT EXISTS filler (id INTEGER PRIMARY KEY, payload TEXT);"
)
TABLES = ("dhcp_leases", "dns_records", "config_history", "accounts")
MARKER = "secret-hostname-marker"
T0 = datetime(2026, 9, 1, 0, 30, tzinfo=UTC).timestamp()

# Moves value between two accounts (the total stays TOTAL) and inserts a pair of leases, in one
# transaction, as fast as it can, until killed. Plain sqlite3, as an application writes.
WRITER = """
import random, sqlite3, sys
ACCOUNTS = int(sys.argv[2])
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
conn.execute("PRAGMA busy_timeout = 30000")
rng = random.Random(7)
n = 0
while True:
    conn.execute("BEGIN IMMEDIATE")
    a, b = (f"acct{i}" for i in rng.sample(range(ACCOUNTS), 2))
    amount = rng.randrange(1, 50)
    conn.execute("UPDATE accounts SET balance = balance - ? WHERE id = ?", (amount, a))
    conn.execute("UPDATE accounts SET balance = balance + ? WHERE id = ?", (amount, b))
    conn.executemany(
        "INSERT INTO dhcp_leases (mac, ip, expires) VALUES (?, ?, ?)",
        [(f"w{n}a", f"w{n}a", n), (f"w{n}b", f"w{n}b", n)],
    )
    conn.execute("COMMIT")
    n += 1
    if n == 1:
        print("ready", flush=True)
"""

# Makes one backup of argv[1] into argv[2]; the test kills it with -9 part way.
BACKER = """
import sys
from replicator.durability.backup import BackupStore
from replicator.config import BackupConfig
config = BackupConfig(enabled=True, directory=sys.argv[2], compression_level=int(sys.argv[3]))
BackupStore(config, "node1").create(sys.argv[1])
print("done", flush=True)
"""


# ---------------------------------------------------------------------------------------------
# helpers


def open_state(path: Path) -> Store:
    store = Store.open(StoreSettings(str(path), NODE, TABLES, schema_sql=SCHEMA))
    conn = app(path)
    with conn:
        conn.executemany(
            "INSERT OR IGNORE INTO accounts VALUES (?, 100)",
            [(f"acct{i}",) for i in range(ACCOUNTS)],
        )
    conn.close()
    return store


def app(path: Path | str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30)
    conn.execute("PRAGMA busy_timeout = 30000")
    return conn


def add_leases(path: Path, count: int, start: int = 0) -> None:
    conn = app(path)
    with conn:
        conn.executemany(
            "INSERT INTO dhcp_leases (mac, ip, hostname, expires) VALUES (?, ?, ?, ?)",
            [(f"m{i}", f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", f"{MARKER}-{i}", i)
             for i in range(start, start + count)],
        )  # fmt: skip
    conn.close()


def state(tmp_path: Path, leases: int = 200) -> Path:
    path = tmp_path / "state.db"
    open_state(path).close()
    add_leases(path, leases)
    return path


def key_file(tmp_path: Path, text: str | None = None, mode: int = 0o600, name: str = "k") -> Path:
    """A key file as `replicator keygen` writes it: a random passphrase line, mode 0600."""
    path = tmp_path / name
    path.write_text(secrets.token_urlsafe(32) + "\n" if text is None else text)
    path.chmod(mode)
    return path


def backups(tmp_path: Path, **settings: Any) -> BackupStore:
    config = BackupConfig(enabled=True, directory=str(tmp_path / "backups"), **settings)
    return BackupStore(config, NODE)


def encrypted(tmp_path: Path, **settings: Any) -> BackupStore:
    key = tmp_path / "k"
    if not key.exists():
        key_file(tmp_path)
    return backups(tmp_path, encryption=True, encryption_key=str(key), **settings)


def content(conn: sqlite3.Connection) -> list[Any]:
    return [
        conn.execute("SELECT * FROM dhcp_leases ORDER BY mac").fetchall(),
        conn.execute("SELECT * FROM accounts ORDER BY id").fetchall(),
    ]


def file_content(path: Path | str) -> list[Any]:
    conn = sqlite3.connect(path)
    try:
        return content(conn)
    finally:
        conn.close()


def live_fingerprint(path: Path) -> tuple[list[str], str]:
    """The live database's logical content and the bytes of its files (main and WAL)."""
    conn = sqlite3.connect(path)
    try:
        dump = list(conn.iterdump())
    finally:
        conn.close()
    digest = hashlib.sha256()
    for name in (path, path.with_name(path.name + "-wal")):
        if name.exists():
            digest.update(name.read_bytes())
    return dump, digest.hexdigest()


def listing(store: BackupStore) -> list[str]:
    return sorted(os.listdir(store.directory))


def rewrite_data(store: BackupStore, name: str, data: bytes) -> None:
    """Replace a backup's bytes AND fix its metadata, so only the deeper checks can object."""
    (store.directory / f"{name}.backup").write_bytes(data)
    meta_path = store.directory / f"{name}.json"
    meta = json.loads(meta_path.read_text())
    meta["size"] = len(data)
    meta["checksum"] = "blake2b:" + hashlib.blake2b(data, digest_size=32).hexdigest()
    meta_path.write_text(json.dumps(meta))


def assert_refused_everywhere(store: BackupStore, name: str, db: Path, *, verify: bool) -> None:
    """verify (if the checksum is what breaks), opened and restore_into refuse the backup, and
    the live database is exactly as it was."""
    before = live_fingerprint(db)
    if verify:
        with pytest.raises(BackupCorrupt):
            store.verify(name)
    with pytest.raises(BackupCorrupt), store.opened(name):
        pass
    live = app(db)
    try:
        with pytest.raises(BackupCorrupt):
            store.restore_into(name, live)
    finally:
        live.close()
    assert live_fingerprint(db) == before
    assert not [f for f in listing(store) if f.startswith(".tmp-")]


def fake(at: datetime) -> BackupInfo:
    return BackupInfo(
        name=at.strftime("n-%Y%m%dT%H%M"),
        node_id="n",
        created_at=at.timestamp(),
        size=1,
        database_bytes=1,
        checksum="blake2b:00",
        description=None,
        schema_version=0,
        replicator_schema=0,
        vector={},
        compressed=True,
        encrypted=False,
    )


def at(month: int, day: int, hour: int) -> str:
    return datetime(2026, month, day, hour, 30, tzinfo=UTC).strftime("n-%Y%m%dT%H%M")


# ---------------------------------------------------------------------------------------------
# 1. consistent copies while another process writes


@pytest.mark.slow
def test_backup_while_another_process_writes_is_one_consistent_snapshot(tmp_path: Path) -> None:
    db = state(tmp_path, leases=30_000)
    store = backups(tmp_path)
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(db), str(ACCOUNTS)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "ready"
        made = []
        for _ in range(4):
            made.append(store.create(str(db)))
            time.sleep(0.1)
        assert writer.poll() is None, "the writer must keep writing through every backup"
    finally:
        writer.kill()
        writer.wait()
        assert writer.stdout is not None
        writer.stdout.close()
    sequences = []
    for info in made:
        with store.opened(info.name) as copy:  # integrity_check passed
            conn = sqlite3.connect(copy)
            try:
                (total,) = conn.execute("SELECT SUM(balance) FROM accounts").fetchone()
                macs = {mac for (mac,) in conn.execute("SELECT mac FROM dhcp_leases")}
                node, inc, local_seq = conn.execute(
                    "SELECT node_id, incarnation, local_seq FROM _repl_clock"
                ).fetchone()
                logged, top = conn.execute(
                    "SELECT COUNT(*), MAX(origin_seq) FROM _repl_log"
                    " WHERE origin_node = ? AND origin_inc = ?",
                    (node, inc),
                ).fetchone()
            finally:
                conn.close()
        assert total == TOTAL
        pairs = {mac[:-1] for mac in macs if mac.startswith("w")}
        assert all(f"{p}a" in macs and f"{p}b" in macs for p in pairs)
        assert len([m for m in macs if m.startswith("w")]) == 2 * len(pairs)
        # The recorded vector is the copy's own: what its log and clock say, nothing later.
        assert info.vector == {f"{node}#{inc}": local_seq}
        assert logged == top == local_seq
        assert info.replicator_schema > 0
        sequences.append(local_seq)
    assert sequences == sorted(set(sequences)), "every backup saw more of the writer's work"
    # One of them written into a fresh database file: the same checks hold there.
    target = tmp_path / "restored.db"
    conn = sqlite3.connect(target)
    try:
        store.restore_into(made[-1].name, conn)
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("SELECT SUM(balance) FROM accounts").fetchone() == (TOTAL,)
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------
# 2. round trips


@pytest.mark.parametrize("compression", [False, True], ids=["plain", "lz4"])
@pytest.mark.parametrize("encryption", [False, True], ids=["clear", "secretbox"])
def test_round_trip_and_restore_into_a_live_database(
    tmp_path: Path, compression: bool, encryption: bool
) -> None:
    db = state(tmp_path, leases=3000)
    store = (
        encrypted(tmp_path, compression=compression)
        if encryption
        else backups(tmp_path, compression=compression)
    )
    expected = file_content(db)
    info = store.create(str(db), description="before the upgrade", now=T0)
    assert info.name == "node1-20260901T003000000Z"
    assert (info.compressed, info.encrypted) == (compression, encryption)
    assert info.description == "before the upgrade"
    assert info.created_at == T0
    assert store.list() == [info] == [store.get(info.name)] == [store.verify(info.name)]
    assert json.loads(json.dumps(info.as_dict())) == info.as_dict()
    data = (store.directory / f"{info.name}.backup").read_bytes()
    assert info.size == len(data)
    if encryption:
        assert MARKER.encode() not in data
    elif not compression:
        assert MARKER.encode() in data
    if compression:
        assert info.size < info.database_bytes / 2
    with store.opened(info.name) as copy:
        assert file_content(copy) == expected
        assert os.path.getsize(copy) == info.database_bytes
    assert not [f for f in listing(store) if f.startswith(".tmp-")]

    # The live file changes after the backup; an application keeps its connection open.
    add_leases(db, 50, start=100_000)
    other = app(db)
    assert content(other) != expected
    live = app(db)
    try:
        assert store.restore_into(info.name, live) == info
        assert content(live) == expected
        assert content(other) == expected  # the same file, seen through another connection
        assert live.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert live.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        live.close()
        other.close()


def test_files_modes_names_and_lookups(tmp_path: Path) -> None:
    db = state(tmp_path)
    store = backups(tmp_path)
    assert stat.S_IMODE(store.directory.stat().st_mode) == 0o750
    first = store.create(str(db), now=T0)
    second = store.create(str(db), now=T0)  # the same millisecond: still two backups
    third = store.create(str(db), now=T0 + 60)
    assert second.name.startswith(first.name + "-")
    assert [b.name for b in store.list()] == [third.name, second.name, first.name]
    for name in os.listdir(store.directory):
        assert stat.S_IMODE((store.directory / name).stat().st_mode) == 0o640
    assert first.checksum.startswith("blake2b:")
    for bad in ("nope", "../state", f"{first.name}/../x", "node2-20260901T003000000Z"):
        with pytest.raises(BackupError, match="no backup"):
            store.get(bad)
    # Another node's backups in a shared directory are neither listed nor touched.
    other = BackupStore(store.config, "node2")
    theirs = other.create(str(db), now=T0)
    assert other.list() == [theirs]
    assert theirs.name not in [b.name for b in store.list()]
    assert store.prune(now=T0 + 365 * 86400) == [first.name, second.name]
    assert other.list() == [theirs]
    store.remove(third.name)
    assert store.list() == []
    with pytest.raises(BackupError, match="no backup"):
        store.remove(third.name)
    with pytest.raises(BackupError, match="no backup"):
        store.remove(theirs.name)  # not this node's
    assert other.list() == [theirs]


def test_create_refuses_a_missing_database_and_leaves_nothing(tmp_path: Path) -> None:
    store = backups(tmp_path)
    with pytest.raises(BackupError, match=str(tmp_path / "missing.db")):
        store.create(str(tmp_path / "missing.db"))
    assert listing(store) == []
    assert not (tmp_path / "missing.db").exists()


# ---------------------------------------------------------------------------------------------
# 3. kill -9 during a backup


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["db", "data"], ids=["while-copying", "while-writing"])
def test_kill_9_during_a_backup_leaves_no_partial_backup(tmp_path: Path, phase: str) -> None:
    db = state(tmp_path)
    conn = app(db)
    with conn:  # ~40 MB, compressible: lz4 at level 16 takes a while over it
        conn.execute(
            "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < 40000)"
            " INSERT INTO filler SELECT i, printf('%.1000c', 'x') || hex(randomblob(8)) FROM c"
        )
    conn.close()
    assert db.stat().st_size > 30_000_000
    directory = tmp_path / "backups"
    backer = subprocess.Popen(
        [sys.executable, "-c", BACKER, str(db), str(directory), "16"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and backer.poll() is None:
            names = os.listdir(directory) if directory.exists() else []
            if any(n.startswith(".tmp-") and n.endswith(f".{phase}") for n in names):
                break
            time.sleep(0.001)
        assert backer.poll() is None, "the backup ended before it could be killed"
        backer.send_signal(signal.SIGKILL)
        assert backer.wait() == -signal.SIGKILL
    finally:
        backer.kill()
        backer.wait()
        assert backer.stdout is not None
        backer.stdout.close()
    left = os.listdir(directory)
    assert any(n.startswith(".tmp-") and n.endswith(f".{phase}") for n in left), left
    assert not [n for n in left if n.endswith(".json")]

    store = backups(tmp_path)  # removes the leftovers
    assert store.list() == []
    assert listing(store) == []
    info = store.create(str(db))
    assert store.verify(info.name) == info
    assert store.list() == [info]


def test_leftovers_of_a_running_backup_are_left_alone(tmp_path: Path) -> None:
    import fcntl

    db = state(tmp_path)
    store = backups(tmp_path)
    info = store.create(str(db))
    # A data file whose metadata never got renamed into place: an interrupted backup.
    orphan = store.create(str(db), now=T0)
    (store.directory / f"{orphan.name}.json").unlink()
    # Files of a backup another process is making right now (it holds the lock).
    busy = "node1-20260901T010000000Z"
    lock = store.directory / f".tmp-{busy}.lock"
    lock.touch()
    (store.directory / f".tmp-{busy}.data").write_bytes(b"x")
    with lock.open("rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        assert backups(tmp_path).list() == [info]
        assert f".tmp-{busy}.data" in listing(store)
        assert f"{orphan.name}.backup" not in listing(store)
    backups(tmp_path)  # the lock is free now: the files are leftovers
    assert listing(store) == [f"{info.name}.backup", f"{info.name}.json"]


# ---------------------------------------------------------------------------------------------
# 4. retention


def timeline() -> list[BackupInfo]:
    """One backup every hour for 60 days: 2026-09-01 00:30 to 2026-10-30 23:30 (a Friday)."""
    start = datetime(2026, 9, 1, 0, 30, tzinfo=UTC)
    return [fake(start + timedelta(hours=h)) for h in range(60 * 24)]


def test_retention_buckets_keep_the_newest_of_each_recent_period() -> None:
    found = timeline()
    last = found[-1].created_at
    rule = Retention(hourly=24, daily=7, weekly=4, monthly=3)
    deleted = expired(found, rule, now=last + 600)
    kept = {b.name for b in found} - set(deleted)
    assert kept == (
        {at(10, 30, hour) for hour in range(24)}  # hourly: the last 24 hours
        | {at(10, day, 23) for day in range(24, 30)}  # daily: the last of Oct 24..30
        | {at(10, 18, 23), at(10, 11, 23)}  # weekly: Sundays ending ISO weeks 42, 41 (43: 25th)
        | {at(9, 30, 23)}  # monthly: only September and October hold backups
    )
    assert len(deleted) == len(found) - 33
    assert deleted == [b.name for b in found if b.name not in kept]  # oldest first
    # Order of the input does not matter; periods without backups are skipped, not counted.
    assert expired(found[::-1], rule, now=last) == deleted
    sparse = [fake(datetime(2026, 10, d, 12, 30, tzinfo=UTC)) for d in (1, 2, 9, 20)]
    assert expired(sparse, Retention(daily=3), now=0) == [at(10, 1, 12)]


def test_retention_by_age_always_keeps_the_newest() -> None:
    found = timeline()
    last = found[-1].created_at
    deleted = expired(found, Retention(max_age=3 * 86400), now=last + 3600)
    assert len(found) - len(deleted) == 71  # younger than 72 h at last + 1 h
    assert deleted == [b.name for b in found[: len(found) - 71]]
    # Everything is older than max_age: the newest stays anyway.
    assert expired(found, Retention(max_age=86400), now=last + 30 * 86400) == [
        b.name for b in found[:-1]
    ]
    assert expired(found[-1:], Retention(hourly=1), now=last + 1e9) == []
    assert expired([], Retention(max_age=1), now=last) == []
    assert expired(found, Retention(), now=last) == []  # no rule: nothing expires


def test_prune_applies_retention_to_the_directory(tmp_path: Path) -> None:
    db = state(tmp_path)
    store = backups(tmp_path, retention=Retention(max_age=2.5 * 3600))
    with capture_logs() as logs:
        made = [store.create(str(db), now=T0 + hour * 3600) for hour in range(6)]
        assert store.prune(now=T0 + 5 * 3600) == [b.name for b in made[:3]]
    created = [e for e in logs if e["event"] == "backup created"]
    assert [e["name"] for e in created] == [b.name for b in made]
    assert all(e["size"] > 0 and e["seconds"] >= 0 for e in created)
    removed = [e["name"] for e in logs if e["event"] == "backup removed by retention"]
    assert removed == [b.name for b in made[:3]]
    assert store.list() == made[:2:-1]
    assert listing(store) == sorted(
        f"{b.name}{ext}" for b in made[3:] for ext in (".backup", ".json")
    )
    assert store.prune(now=T0 + 5 * 3600) == []
    assert store.prune(now=T0 + 100 * 3600) == [made[3].name, made[4].name]
    assert store.list() == [made[5]]
    daily = backups(tmp_path, retention=Retention(daily=2))
    extra = [daily.create(str(db), now=T0 + 86400 * d + h * 60) for d in (1, 2) for h in (0, 1)]
    assert daily.prune() == [made[5].name, extra[0].name, extra[2].name]


# ---------------------------------------------------------------------------------------------
# 5. damaged backups


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "lz4+secretbox"])
def test_damaged_backups_are_refused_and_the_live_database_is_untouched(
    tmp_path: Path, secure: bool
) -> None:
    db = state(tmp_path, leases=2000)
    store = encrypted(tmp_path) if secure else backups(tmp_path, compression=False)

    def data_of(info: BackupInfo) -> Path:
        return store.directory / f"{info.name}.backup"

    flipped = store.create(str(db), now=T0)
    raw = bytearray(data_of(flipped).read_bytes())
    raw[len(raw) // 2] ^= 0x04
    data_of(flipped).write_bytes(raw)
    assert_refused_everywhere(store, flipped.name, db, verify=True)

    truncated = store.create(str(db), now=T0 + 1)
    with data_of(truncated).open("r+b") as file:
        file.truncate(truncated.size - 100)
    assert_refused_everywhere(store, truncated.name, db, verify=True)

    edited = store.create(str(db), now=T0 + 2)
    meta_path = store.directory / f"{edited.name}.json"
    meta = json.loads(meta_path.read_text())
    meta["checksum"] = "blake2b:" + "0" * 64
    meta_path.write_text(json.dumps(meta))
    assert_refused_everywhere(store, edited.name, db, verify=True)

    # Damage that matches its (rewritten) checksum: the decoding and SQLite checks catch it.
    cut = store.create(str(db), now=T0 + 3)
    rewrite_data(store, cut.name, data_of(cut).read_bytes()[:-7])
    assert_refused_everywhere(store, cut.name, db, verify=False)


def test_newest_good_passes_over_backups_that_fail_their_checksum(tmp_path: Path) -> None:
    db = state(tmp_path)
    store = backups(tmp_path)
    assert store.newest_good() is None
    good = store.create(str(db), now=T0)
    bad = store.create(str(db), now=T0 + 60)
    assert store.newest_good() == bad
    with (store.directory / f"{bad.name}.backup").open("r+b") as file:
        file.seek(100)
        file.write(b"!")
    assert store.newest_good() == good


def test_a_copy_that_is_no_valid_database_is_refused(tmp_path: Path) -> None:
    db = state(tmp_path, leases=5000)
    store = backups(tmp_path, compression=False)
    header = store.create(str(db), now=T0)
    raw = bytearray((store.directory / f"{header.name}.backup").read_bytes())
    raw[HEADER.size] ^= 0xFF  # the "SQLite format 3" magic
    rewrite_data(store, header.name, bytes(raw))
    with pytest.raises(BackupCorrupt, match="not a valid SQLite database"):  # noqa: SIM117
        with store.opened(header.name):
            pass

    page = store.create(str(db), now=T0 + 1)
    raw = bytearray((store.directory / f"{page.name}.backup").read_bytes())
    page_size = 4096
    middle = HEADER.size + (page.database_bytes // page_size // 2) * page_size
    raw[middle : middle + page_size] = bytes(page_size)  # a b-tree page zeroed
    rewrite_data(store, page.name, bytes(raw))
    assert_refused_everywhere(store, page.name, db, verify=False)


def test_encrypted_records_cut_or_reordered_are_refused(tmp_path: Path) -> None:
    db = state(tmp_path, leases=20_000)  # several 1 MiB chunks, uncompressed
    store = encrypted(tmp_path, compression=False)
    info = store.create(str(db), now=T0)
    raw = (store.directory / f"{info.name}.backup").read_bytes()
    records, offset = [], HEADER.size
    while offset < len(raw):
        (length,) = RECORD_LENGTH.unpack_from(raw, offset)
        records.append(raw[offset : offset + RECORD_LENGTH.size + length])
        offset += RECORD_LENGTH.size + length
    assert len(records) >= 3
    head = raw[: HEADER.size]
    for label, body in (
        ("truncated", records[:-1]),
        ("out of place", [records[1], records[0], *records[2:]]),
        ("out of place", [records[0], records[0], *records[1:]]),
        ("after the final", [*records, records[-1]]),
    ):
        damaged = store.create(str(db), now=T0 + len(store.list()))
        rewrite_data(store, damaged.name, head + b"".join(body))
        with pytest.raises(BackupCorrupt, match=label), store.opened(damaged.name):
            pass
    # Records of another backup under this one's header (its own file id) are refused too.
    spliced = store.create(str(db), now=T0 + 100)
    own_head = (store.directory / f"{spliced.name}.backup").read_bytes()[: HEADER.size]
    rewrite_data(store, spliced.name, own_head + b"".join(records))
    with pytest.raises(BackupCorrupt, match="out of place"), store.opened(spliced.name):
        pass


# ---------------------------------------------------------------------------------------------
# 6. keys


def test_key_files_are_checked(tmp_path: Path) -> None:
    good = key_file(tmp_path, "  correct horse battery staple\n", name="good")
    assert len(load_key(str(good))) == 32
    assert load_key(str(good)) == load_key(
        str(key_file(tmp_path, "correct horse battery staple", name="same"))
    )
    assert load_key(str(good)) != load_key(str(key_file(tmp_path, name="other")))

    open_to_all = key_file(tmp_path, mode=0o644, name="open")
    with pytest.raises(BackupKeyError, match=f"{open_to_all}.*0644") as refused:
        load_key(str(open_to_all))
    assert refused.value.hint == f"chmod 600 {open_to_all}"
    with pytest.raises(BackupKeyError, match="0660"):
        load_key(str(key_file(tmp_path, mode=0o660, name="group")))
    with pytest.raises(BackupKeyError, match="16 to 4096 characters"):
        load_key(str(key_file(tmp_path, "fifteen-chars!!\n", name="short")))
    assert len(load_key(str(key_file(tmp_path, "sixteen-chars!!!", name="sixteen")))) == 32
    with pytest.raises(BackupKeyError, match="does not exist"):
        load_key(str(tmp_path / "missing"))

    # The store loads the key at start: a bad key file refuses it there.
    with pytest.raises(BackupKeyError, match=str(open_to_all)):
        backups(tmp_path, encryption=True, encryption_key=str(open_to_all))
    with pytest.raises(BackupKeyError, match="encryption_key"):
        backups(tmp_path, encryption=True)


def test_a_backup_needs_the_key_it_was_made_with(tmp_path: Path) -> None:
    db = state(tmp_path)
    with capture_logs() as logs:
        info = encrypted(tmp_path).create(str(db))
    passphrase = (tmp_path / "k").read_text().strip()
    assert logs
    assert passphrase not in repr(logs)
    assert load_key(str(tmp_path / "k")).hex() not in repr(logs)
    wrong = backups(tmp_path, encryption=True, encryption_key=str(key_file(tmp_path, name="b")))
    assert wrong.verify(info.name) == info  # the checksum is over the stored bytes
    assert_refused_everywhere(wrong, info.name, db, verify=False)
    with pytest.raises(BackupKeyError, match="encryption_key"), backups(tmp_path).opened(info.name):
        pass
    # Encryption turned off later: the key file, still configured, reads old backups.
    reader = backups(tmp_path, encryption_key=str(tmp_path / "k"))
    with reader.opened(info.name) as copy:
        assert file_content(copy) == file_content(db)
