"""A running node's state file: backups and restores while peers and applications write,
recovery of a corrupted file at start, a disk that fills up, and the config history."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from replicator.cli import main
from replicator.harness import NodeProcess, wait_until

INSERT = "INSERT INTO dhcp_leases (mac, ip, hostname, expires) VALUES (?, ?, ?, ?)"
BACKUPS = 'backup = { enabled = true, directory = "backups", interval = "1h" }'


def write(node: NodeProcess, prefix: str, count: int, subnet: int, hostname: str = "") -> set[str]:
    rows = [
        (f"{prefix}{i:05d}", f"10.{subnet}.{i >> 8 & 255}.{i & 255}", hostname or None, i)
        for i in range(count)
    ]
    with contextlib.closing(node.app()) as app:
        for start in range(0, count, 100):
            app.execute("BEGIN")
            app.executemany(INSERT, rows[start : start + 100])
            app.execute("COMMIT")
    return {mac for mac, _, _, _ in rows}


def macs(node: NodeProcess) -> set[str]:
    with contextlib.closing(sqlite3.connect(node.db_path, timeout=10)) as conn:
        return {mac for (mac,) in conn.execute("SELECT mac FROM dhcp_leases")}


def connected(node: NodeProcess) -> bool:
    return all(peer["state"] == "connected" for peer in node.status()["peers"])


def pair(tmp_path: Path, nodes: list[NodeProcess], **b_options: str) -> tuple[NodeProcess, ...]:
    a = NodeProcess(tmp_path, "a", "127.0.0.1")
    b = NodeProcess(tmp_path, "b", "127.0.0.2", **b_options)  # type: ignore[arg-type]
    nodes += [a, b]
    a.start([b])
    b.start([a])
    wait_until(lambda: connected(a) and connected(b), what="a and b to connect")
    return a, b


def corrupt(db_path: Path, table: str) -> None:
    """Scribble over the table's root page, as a bad disk or a stray write would."""
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        (root,) = conn.execute(
            "SELECT rootpage FROM sqlite_schema WHERE name = ?", (table,)
        ).fetchone()
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
    with open(db_path, "r+b") as file:
        file.seek((root - 1) * page_size + 8)
        file.write(os.urandom(page_size - 8))
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        try:
            damaged = conn.execute("PRAGMA integrity_check").fetchone()[0] != "ok"
        except sqlite3.DatabaseError:  # "database disk image is malformed"
            damaged = True
    assert damaged


def test_restore_while_running_comes_back_under_a_new_origin_and_catches_up(
    tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    a, b = pair(tmp_path, nodes, state_extra=BACKUPS)
    first = write(a, "first-", 300, 1)
    wait_until(lambda: macs(b) == first, what="b to hold a's first rows")
    created = b.post("/api/state/backups", {"description": "before the next batch"})
    assert created["description"] == "before the next batch"
    origin_before = b.status()["origin"]

    later_a = write(a, "later-a-", 200, 2)
    later_b = write(b, "later-b-", 100, 3)  # b's own writes after the backup reach a...
    everything = first | later_a | later_b
    wait_until(lambda: macs(a) == macs(b) == everything, what="both to hold every row")
    app = b.app()  # an application keeps the file open across the restore
    try:
        restored = b.post(f"/api/state/backups/{created['name']}/restore")
        assert restored["restored"] is True
        assert restored["backup"] == created["name"]
        status = b.status()
        assert status["origin"] != origin_before  # a new incarnation: no sequence reused
        # ...so after the restore they come back from a, with a's later rows.
        wait_until(lambda: macs(b) == everything, timeout=30, what="b to catch up after restore")
        assert app.execute("SELECT count(*) FROM dhcp_leases").fetchone()[0] == len(everything)
        app.execute(INSERT, ("after-restore", "10.9.9.9", None, 1))  # capture still works
    finally:
        app.close()
    wait_until(lambda: "after-restore" in macs(a), what="a write made after the restore")
    wait_until(lambda: a.rows("dhcp_leases") == b.rows("dhcp_leases"), what="identical rows")
    wait_until(lambda: b.post("/api/replication/validate")["consistent"],
               what="table checksums to agree")  # fmt: skip
    assert b.logged("backup restored: catching up from peers", backup=created["name"])


def test_a_corrupted_backup_is_refused_and_the_live_state_untouched(
    tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    a, b = pair(tmp_path, nodes, state_extra=BACKUPS)
    rows = write(b, "row-", 100, 1)
    created = b.post("/api/state/backups")
    backup_file = next((b.directory / "backups").glob(f"{created['name']}*.backup"))
    data = bytearray(backup_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    backup_file.write_bytes(bytes(data))
    write(b, "more-", 10, 2)
    before = b.rows("dhcp_leases")
    code, answer = b.api("POST", f"/api/state/backups/{created['name']}/restore")
    assert code == 422, answer
    assert "checksum" in answer["details"]
    assert b.rows("dhcp_leases") == before
    code, shown = b.api("GET", f"/api/state/backups/{created['name']}")
    assert code == 200
    assert shown["verified"] is False
    code, _ = b.api("POST", "/api/state/backups/no-such-backup/restore")
    assert code == 404
    assert connected(b)
    assert rows <= macs(a)


def test_a_node_started_on_a_corrupted_file_restores_its_newest_backup_and_catches_up(
    tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    a, b = pair(tmp_path, nodes, state_extra=BACKUPS)
    early = write(a, "early-", 300, 1) | write(b, "b-early-", 100, 2)
    wait_until(lambda: macs(a) == macs(b) == early, what="both to hold the early rows")
    b.post("/api/state/backups", {"description": "good"})
    late = write(a, "late-", 300, 3) | write(b, "b-late-", 100, 4)
    wait_until(lambda: macs(a) == macs(b) == early | late, what="both to hold the late rows")
    b.stop()
    corrupt(b.db_path, "dhcp_leases")
    b.start([a])
    wait_until(lambda: bool(b.logged("node started")) and len(b.logged("node started")) == 2,
               what="b to start again")  # fmt: skip
    state = b.api("GET", "/api/state/status")[1]
    assert state["recovery"]["restored_from"] is not None
    assert "restored from backup" in state["recovery"]["outcome"]
    steps = [step["step"] for step in state["recovery"]["steps"]]
    assert steps[:2] == ["damaged file copied aside", "restoring backup"]
    assert Path(state["recovery"]["kept_copy"]).exists()
    wait_until(lambda: macs(b) == early | late, timeout=30, what="b to catch up from a")
    wait_until(lambda: a.rows("dhcp_leases") == b.rows("dhcp_leases"), what="identical rows")
    assert b.api("POST", "/api/state/validate")[1]["ok"]


def test_without_a_good_backup_a_corrupted_file_is_refilled_from_a_peer(
    tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    a, b = pair(tmp_path, nodes)
    rows = write(a, "a-", 400, 1) | write(b, "b-", 200, 2)
    wait_until(lambda: macs(a) == macs(b) == rows, what="both to hold every row")
    b.stop()
    corrupt(b.db_path, "dhcp_leases")
    b.start([a])
    wait_until(lambda: len(b.logged("node started")) == 2, what="b to start again")
    recovery = b.api("GET", "/api/state/status")[1]["recovery"]
    assert recovery["needs_full_resync"] is True
    wait_until(lambda: macs(b) == rows, timeout=30, what="b to be refilled from a")
    wait_until(lambda: bool(b.logged("full resync requested after recovery", peer="a")),
               what="b to ask a for a full resync")  # fmt: skip
    more = write(b, "b-after-", 50, 3)
    wait_until(lambda: more <= macs(a), what="b's new writes to reach a")


def test_auto_recover_off_refuses_a_corrupted_file_naming_the_problem(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path, "solo", "127.0.0.1",
                       state_extra="recovery = { auto_recover = false }")  # fmt: skip
    node.start([])
    try:
        write(node, "x-", 50, 1)
    finally:
        node.stop()
    corrupt(node.db_path, "dhcp_leases")
    node.start([])
    assert node.process is not None
    assert node.process.wait(30) != 0
    text = node.log_path.read_text()
    assert "failed validation at start" in text
    assert "auto_recover" in text


def test_backups_follow_the_schedule_and_the_retention(
    tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    schedule = (
        'backup = { enabled = true, directory = "backups", interval = "1s", retention = "3s" }'
    )
    node = NodeProcess(tmp_path, "solo", "127.0.0.1", state_extra=schedule)
    nodes.append(node)
    node.start([])
    write(node, "x-", 50, 1)

    def listed() -> list[dict[str, object]]:
        return list(node.api("GET", "/api/state/backups")[1]["backups"])

    wait_until(lambda: len(listed()) >= 3, timeout=20, what="three scheduled backups")
    time.sleep(4)
    found = listed()
    newest = max(float(str(b["created_at"])) for b in found)
    assert all(newest - float(str(b["created_at"])) <= 4.5 for b in found), found
    stats = node.api("GET", "/api/state/stats")[1]
    assert stats["backups"]["count"] >= 1
    assert stats["backups"]["last"]["description"] == "scheduled"


def test_backup_before_resync_keeps_the_state_as_it_was(
    tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    a, b = pair(
        tmp_path, nodes, state_extra=BACKUPS,
        extra='backup_before_resync = true\n  backup_retention = "7d"',
    )  # fmt: skip
    rows = write(a, "a-", 200, 1)
    wait_until(lambda: macs(b) == rows, what="b to hold a's rows")
    b.post("/api/replication/resync", {"peer": "a", "full": True})
    wait_until(lambda: bool(b.logged("backup taken before a full resync", peer="a")),
               what="the backup before the resync")  # fmt: skip
    backups = b.api("GET", "/api/state/backups")[1]["backups"]
    assert "before full resync from a" in [x["description"] for x in backups]


def test_each_distinct_configuration_is_recorded_and_replicates_without_collisions(
    tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    tables = "dhcp_leases = true, configuration = true"
    a = NodeProcess(tmp_path, "a", "127.0.0.1", tables=tables)
    b = NodeProcess(tmp_path, "b", "127.0.0.2", tables=tables)
    nodes += [a, b]
    a.start([b])
    b.start([a])

    def history(node: NodeProcess) -> list[tuple[str, str, str]]:
        with contextlib.closing(sqlite3.connect(node.db_path, timeout=10)) as conn:
            return conn.execute(
                "SELECT node_id, config_hash, config_data FROM config_history ORDER BY 1, 2"
            ).fetchall()

    wait_until(lambda: connected(a) and connected(b), what="a and b to connect")

    wait_until(lambda: len(history(a)) == len(history(b)) == 2, what="both histories")
    assert history(a) == history(b)
    assert {row[0] for row in history(a)} == {"a", "b"}
    for _, _, data in history(a):
        assert a.secret not in data
        assert json.loads(data)["replication"]["auth"]["secret_key"] == "[redacted]"
    a.stop()
    a.start([b])  # the same configuration again: nothing new
    wait_until(lambda: len(a.logged("node started")) == 2, what="a to restart")
    a.max_lag = "20s"
    a.stop()
    a.start([b])  # another one: a second row for a, on both nodes
    wait_until(lambda: len(history(b)) == 3, what="a's new configuration to reach b")
    assert [row[0] for row in history(b)].count("a") == 2


@contextlib.contextmanager
def small_filesystem(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, check=False)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(directory: Path, leave: int) -> Path:
    filler = directory / "filler"
    with open(filler, "wb") as file:
        while shutil.disk_usage(directory).free > leave:
            file.write(b"\0" * 16384)
            file.flush()
    return filler


def degraded(node: NodeProcess) -> bool:
    return any("state database fail" in alarm for alarm in node.status()["alarms"])


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small filesystem needs root")
def test_a_full_disk_pauses_replication_and_it_resumes_without_loss(
    tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    with small_filesystem(tmp_path / "small", "6m") as small:
        a, b = pair(tmp_path, nodes, db_path=small / "state.db")  # type: ignore[arg-type]
        before = write(a, "before-", 100, 1)
        wait_until(lambda: macs(b) == before, what="b to hold the first rows")
        filler = fill(small, leave=96 * 1024)
        during = write(a, "during-", 3000, 2, hostname="h" * 200)
        wait_until(lambda: degraded(b), timeout=30,
                   what="b to report that its disk refuses writes")  # fmt: skip
        assert b.logged("state database refuses writes: replication paused")
        assert a.status()["node_id"] == "a"  # a keeps serving
        filler.unlink()
        wait_until(lambda: bool(b.logged("state database takes writes again: replication resumes")),
                   timeout=30, what="b to resume")  # fmt: skip
        wait_until(lambda: macs(b) == before | during, timeout=60, what="b to catch up")
        assert not degraded(b)
        assert a.rows("dhcp_leases") == b.rows("dhcp_leases")
        for node in (a, b):
            node.stop()


def test_backup_commands_create_list_and_restore_from_the_command_line(
    tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    a, b = pair(tmp_path, nodes, state_extra=BACKUPS)
    rows = write(b, "b-", 100, 1)
    socket = ["--socket", str(b.control_socket)]

    def run(*args: str) -> Result:
        return CliRunner().invoke(main, [*args, *socket])

    created = run("backup", "create", "--description", "before upgrade", "--json")
    assert created.exit_code == 0, created.output
    name = json.loads(created.stdout)["name"]
    listed = run("backup", "list")
    assert listed.exit_code == 0, listed.output
    line = next(line for line in listed.stdout.splitlines() if line.startswith(name))
    assert line.rstrip().endswith("before upgrade")
    write(b, "later-", 20, 2)
    restored = run("backup", "restore", name, "--yes")
    assert restored.exit_code == 0, restored.output
    assert f"Backup {name} restored in" in restored.stdout
    assert "catches up from its peers" in restored.stdout
    state = run("state", "status")
    assert f"Last restore: backup {name}" in state.stdout
    assert "backups          every 1h" in state.stdout
    stats = run("state", "stats")
    assert f"newest {name}" in stats.stdout
    wait_until(lambda: rows <= macs(a) and macs(a) == macs(b), what="the pair to converge")
    missing = run("backup", "restore", "nope", "--yes")
    assert missing.exit_code == 4
    assert missing.stderr.startswith("replicator: no backup 'nope'")
