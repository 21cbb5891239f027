"""What a node does at its limits: a huge transaction, a change too large to send, an
application holding the write lock, a port already taken, files others could read, and a
flood of connections.

Real node processes on 127.0.0.x, applications writing with plain sqlite3.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicator.harness import NodeProcess, wait_until


def pair(tmp_path: Path, nodes: list[NodeProcess], **options: str) -> tuple[NodeProcess, ...]:
    node1 = NodeProcess(tmp_path, "node1", "127.0.0.1", **options)
    node2 = NodeProcess(tmp_path, "node2", "127.0.0.2", **options)
    nodes += [node1, node2]
    node1.start([node2])
    node2.start([node1])
    return node1, node2


def run_node(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "replicator", "run", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_one_transaction_larger_than_a_message_replicates_whole(
    tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    node1, node2 = pair(tmp_path, nodes)
    rows = [(f"big{n:03d}", f"10.1.{n // 256}.{n % 256}", secrets.token_hex(128 << 10))
            for n in range(320)]  # fmt: skip  # 320 rows of 256 KiB: 80 MiB in one commit
    with node1.app() as app:
        app.execute("BEGIN")
        app.executemany(
            "INSERT INTO dhcp_leases (mac, ip, hostname, expires) VALUES (?, ?, ?, 1)", rows
        )
        app.execute("COMMIT")
    wait_until(lambda: node2.count("dhcp_leases") == 320, timeout=120, what="all 320 rows")
    assert not node1.logged("peer disconnected", peer="node2")
    with node2.app() as app:
        held = dict(app.execute("SELECT mac, hostname FROM dhcp_leases").fetchall())
    assert held == {mac: text for mac, _, text in rows}


def test_a_large_peer_transaction_is_applied_in_short_transactions_beside_the_application(
    tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    """SQLite has one write lock: a receiver applying a peer's 40,000-row transaction (sent in
    batches of 10,000) in one transaction per batch kept its application waiting for as long
    as each took. It is applied in pieces of at most 4,000 changes, sized by time, while an
    application writing on the receiver with Python's default 5 s busy timeout never fails."""
    node1 = NodeProcess(tmp_path, "node1", "127.0.0.1", batch_size=10_000)
    node2 = NodeProcess(tmp_path, "node2", "127.0.0.2", batch_size=10_000)
    nodes += [node1, node2]
    node1.start([node2])
    node2.start([node1])
    wait_until(lambda: bool(node2.logged("peer connected", peer="node1")), what="the link")
    before = node2.status()["write_lock"]["transactions"]
    rows = [(f"bulk{n:05d}", f"10.{n // 65536}.{n // 256 % 256}.{n % 256}") for n in range(40_000)]
    with node1.app() as app:
        app.execute("BEGIN")
        app.executemany("INSERT INTO dhcp_leases (mac, ip, expires) VALUES (?, ?, 1)", rows)
        app.execute("COMMIT")

    failures: list[str] = []
    written = 0
    app = sqlite3.connect(node2.db_path, isolation_level=None, timeout=5.0)  # the default
    try:
        while written % 50 or node2.count("dhcp_leases") < 40_000 + written:
            time.sleep(0.002)  # an application committing a few hundred times a second
            try:
                app.execute(
                    "INSERT INTO dhcp_leases (mac, ip, expires) VALUES (?, ?, 1)",
                    (f"local{written}", f"172.16.{written // 256}.{written % 256}"),
                )
                written += 1
            except sqlite3.OperationalError as error:
                failures.append(str(error))
            assert written < 200_000, "the peer's rows never all arrived"
    finally:
        app.close()
    assert failures == []
    assert written > 0
    lock = node2.status()["write_lock"]
    assert lock["transactions"] - before >= 40_000 // 4_000, lock


def test_a_change_too_large_to_send_is_refused_in_the_applications_statement(
    tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    node1, node2 = pair(tmp_path, nodes)
    with node1.app() as app:
        with pytest.raises(sqlite3.IntegrityError, match="larger than 15 MiB"):
            app.execute(
                "INSERT INTO dhcp_leases (mac, ip, hostname, expires) VALUES ('huge', 'x', ?, 1)",
                ("y" * (16 << 20),),
            )
        assert app.execute("SELECT count(*) FROM dhcp_leases").fetchone() == (0,)
        app.execute("INSERT INTO dhcp_leases (mac, ip, expires) VALUES ('after', '10.0.0.1', 1)")
    wait_until(lambda: node2.count("dhcp_leases") == 1, what="replication to go on")


@contextlib.contextmanager
def write_lock_held(node: NodeProcess, seconds: float) -> Iterator[sqlite3.Connection]:
    """The application holds the state file's write lock for ``seconds`` (longer than the
    node's 5 s busy timeout), as a long migration or bulk import would, then commits."""
    conn = sqlite3.connect(node.db_path, isolation_level=None, timeout=10)
    conn.execute("BEGIN IMMEDIATE")
    started = time.monotonic()
    try:
        yield conn
        time.sleep(max(0.0, seconds - (time.monotonic() - started)))
        conn.execute("COMMIT")
    finally:
        conn.close()


def test_an_application_holding_the_write_lock_past_the_busy_timeout_is_waited_out(
    tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    node1, node2 = pair(tmp_path, nodes)
    insert = "INSERT INTO dhcp_leases (mac, ip, expires) VALUES (?, ?, 1)"
    with node1.app() as app:
        app.execute(insert, ("before", "10.0.0.1"))
    wait_until(lambda: node2.count("dhcp_leases") == 1, what="the first lease to replicate")
    # At start: the file is locked, not damaged; nothing may be copied aside or emptied.
    node1.stop()
    with write_lock_held(node1, 7.0) as held:
        held.execute(insert, ("held at start", "10.0.0.2"))
        node1.start([node2])
        waiting = "state database locked by another connection at start: waiting"
        wait_until(lambda: bool(node1.logged(waiting)), what="node1 to wait for the lock")
    wait_until(lambda: len(node1.logged("node started")) == 2, what="node1 to start")
    # While running: the applications alter a table, then node1's holds the lock, so the
    # node's capture must wait to regenerate its triggers, as an apply waits for its batch.
    for node in (node2, node1):
        with node.app() as app:
            app.execute("ALTER TABLE dhcp_leases ADD COLUMN note TEXT")
    with write_lock_held(node1, 7.0) as held:
        held.execute(insert, ("held while running", "10.0.0.3"))
        with node2.app() as app:
            app.execute(insert, ("from node2", "10.0.0.4"))
    wait_until(lambda: node2.count("dhcp_leases") == 4, what="node1's held leases at node2")
    wait_until(lambda: node1.count("dhcp_leases") == 4, what="node2's lease at node1")
    assert node1.process is not None
    assert node1.process.poll() is None
    assert not node1.logged("state database failed validation at start: recovering")
    assert not list(node1.directory.glob("state.db.damaged-*"))
    assert not node1.logged("node stopped by an unexpected error")


def test_a_port_already_taken_is_one_line_naming_it_and_nothing_is_written(
    tmp_path: Path,
) -> None:
    node = NodeProcess(
        tmp_path,
        "node1",
        "127.0.0.1",
        state_extra=f'  backup {{ enabled = true  directory = "{tmp_path / "backups"}" }}',
    )
    config = node.write_config([])
    with socket.socket() as taken:
        taken.bind((node.host, node.port))
        taken.listen()
        result = run_node(config)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"{node.host}:{node.port}" in lines[0]
    assert "replication.listen_addr" in lines[0]
    assert not node.db_path.exists()
    assert not (tmp_path / "backups").exists() or not list((tmp_path / "backups").iterdir())


def test_state_files_are_created_private(tmp_path: Path, nodes: list[NodeProcess]) -> None:
    node1, _ = pair(tmp_path, nodes)
    with node1.app() as app:  # the node has created the file, and WAL made -wal and -shm
        app.execute("INSERT INTO dhcp_leases (mac, ip, expires) VALUES ('m', '10.0.0.1', 1)")
        for suffix in ("", "-wal", "-shm"):
            mode = stat.S_IMODE(os.stat(f"{node1.db_path}{suffix}").st_mode)
            assert mode == 0o640, f"state.db{suffix} is {mode:04o}"


def test_a_key_file_others_can_read_stops_the_node_with_one_line(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path, "node1", "127.0.0.1")
    key = tmp_path / "cluster.psk"
    key.write_text("a passphrase of sixteen characters or more\n")
    key.chmod(0o644)
    config = node.write_config([])
    config.write_text(
        config.read_text().replace(f'secret_key = "{node.secret}"', f'secret_key_file = "{key}"')
    )
    result = run_node(config)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "replication.auth.secret_key_file" in lines[0]
    assert str(key) in lines[0]
    assert "chmod 600" in lines[0]


def test_a_flood_of_connections_neither_stops_the_node_nor_floods_its_log(
    tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    node1 = NodeProcess(tmp_path, "node1", "127.0.0.1")
    node2 = NodeProcess(tmp_path, "node2", "127.0.0.2")
    nodes += [node1, node2]
    node1.open_files_limit = 64  # too few for the flood: accept meets EMFILE
    node1.peer_addresses["node2"] = "127.0.0.2:1"  # node1 cannot dial: node2 must get in
    node1.start([node2])
    node1.app().close()
    flood: list[socket.socket] = []
    try:
        for n in range(1100):
            client = socket.socket()
            client.setblocking(False)
            # From many source addresses, as a distributed flood would come.
            client.bind((f"127.0.{1 + n // 250}.{1 + n % 250}", 0))
            with contextlib.suppress(BlockingIOError):
                client.connect((node1.host, node1.port))
            flood.append(client)
        node2.start([node1])  # a real peer arrives in the middle of it
        with node2.app() as app:
            app.execute("INSERT INTO dhcp_leases (mac, ip, expires) VALUES ('m', '10.0.0.1', 1)")
        wait_until(lambda: node1.count("dhcp_leases") == 1, timeout=60, what="the real peer")
    finally:
        for client in flood:
            client.close()
    assert node1.process is not None
    assert node1.process.poll() is None
    text = node1.log_path.read_text()
    assert "Traceback" not in text
    refusals = [line for line in node1.logs() if "refused" in str(line.get("event"))]
    assert len(refusals) <= 10, [line.get("event") for line in refusals]
    faults = node1.status()["peer_faults"]
    assert faults.get("accept_errors", 0) > 0, faults  # it ran out of descriptors...
    assert faults.get("handshake_evicted", 0) > 0, faults  # ...and silent ones made room
