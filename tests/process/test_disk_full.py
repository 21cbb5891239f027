"""A disk that fills up under a running node heals by itself: replication pauses with an alarm,
the control socket keeps answering, and within seconds of space coming back replication resumes
and every row written meanwhile arrives, once. Nothing about a full disk ends the node.

Real `replicator run` processes on 127.0.0.x; the node's whole state directory (config,
state.db with its -wal and -shm, the control socket) is on a small tmpfs mounted for the test.
Its log is not: a log on the full disk is a matter for the log's own handling.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicator.harness import NodeProcess, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small filesystem needs root")

INSERT = "INSERT INTO dhcp_leases (mac, ip, hostname, expires) VALUES (?, ?, ?, ?)"
PAUSED = "state database refuses writes: replication paused"
RESUMED = "state database takes writes again: replication resumes"
RESUME_WITHIN = 5.0  # seconds from space coming back to the alarm gone
CATCH_UP_WITHIN = 15.0  # and to every row on the other node (a refused dial backs off)


@pytest.fixture
def small(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "small"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(where)],
                             capture_output=True, check=False, timeout=30)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, timeout=30)


@pytest.fixture
def nodes(small: Path) -> Iterator[list[NodeProcess]]:
    """Stopped before the tmpfs is unmounted (fixtures end in reverse order)."""
    started: list[NodeProcess] = []
    yield started
    for node in started:
        node.stop()


def pair(tmp_path: Path, small: Path, nodes: list[NodeProcess]) -> tuple[NodeProcess, NodeProcess]:
    """``a`` on the ordinary disk, ``b`` with its state directory on ``small``."""
    a = NodeProcess(tmp_path, "a", "127.0.0.1")
    b = NodeProcess(small, "b", "127.0.0.2")
    b.log_path = tmp_path / "b-node.log"
    nodes += [a, b]
    a.start([b])
    b.start([a])
    wait_until(lambda: connected(a) and connected(b), what="a and b to connect")
    return a, b


def connected(node: NodeProcess) -> bool:
    return all(peer["state"] == "connected" for peer in node.status()["peers"])


def rows(
    prefix: str, count: int, subnet: int, hostname: str | None = None
) -> list[tuple[object, ...]]:
    return [
        (f"{prefix}{i:05d}", f"10.{subnet}.{i >> 8 & 255}.{i & 255}", hostname, i)
        for i in range(count)
    ]


def write(node: NodeProcess, batch: list[tuple[object, ...]]) -> set[str]:
    with contextlib.closing(node.app()) as app:
        for start in range(0, len(batch), 100):
            app.execute("BEGIN")
            app.executemany(INSERT, batch[start : start + 100])
            app.execute("COMMIT")
    return {str(row[0]) for row in batch}


def macs(node: NodeProcess) -> set[str]:
    with contextlib.closing(sqlite3.connect(node.db_path, timeout=10)) as conn:
        return {mac for (mac,) in conn.execute("SELECT mac FROM dhcp_leases")}


def fill(directory: Path, leave: int = 0) -> Path:
    """A filler file taking every byte but ``leave``; with 0, until the filesystem refuses."""
    filler = directory / "filler"
    with open(filler, "wb") as file, contextlib.suppress(OSError):
        while shutil.disk_usage(directory).free > leave:
            file.write(b"\0" * 4096)
            file.flush()
    return filler


def write_until_refused(
    node: NodeProcess, batch: list[tuple[object, ...]], refusals: int = 5
) -> tuple[set[str], list[str]]:
    """The application writes on until the disk has refused it ``refusals`` times: what it
    committed, and what it was told."""
    committed: set[str] = set()
    refused: list[str] = []
    with contextlib.closing(node.app()) as app:
        for start in range(0, len(batch), 20):
            try:
                app.execute("BEGIN")
                app.executemany(INSERT, batch[start : start + 20])
                app.execute("COMMIT")
                committed |= {str(row[0]) for row in batch[start : start + 20]}
            except sqlite3.OperationalError as error:
                refused.append(str(error))
                if app.in_transaction:
                    app.execute("ROLLBACK")
                if len(refused) == refusals:
                    break
    return committed, refused


def degraded(node: NodeProcess) -> bool:
    status = node.status()
    alarmed = any("writes to the state database fail" in alarm for alarm in status["alarms"])
    return alarmed and status["persistence"]["degraded"] is not None


def healthy(node: NodeProcess) -> bool:
    status = node.status()
    return status["persistence"]["degraded"] is None and not any(
        "writes to the state database fail" in alarm for alarm in status["alarms"]
    )


def keeps_answering_while_degraded(node: NodeProcess, seconds: float) -> None:
    """Several probe intervals with the disk still full: the process lives and the socket
    answers with the alarm; then an operator's checkpoint and compaction are answered (refused
    or done), not fatal."""

    def answer(method: str, path: str) -> tuple[int, object]:
        assert node.process is not None
        assert node.process.poll() is None, f"{node.node_id} ended on a full disk"
        assert node.control_socket.exists(), f"{node.node_id}'s control socket is gone"
        try:
            return node.api(method, path)
        except (IndexError, OSError) as error:  # closed without an answer
            pytest.fail(f"{method} {path}: no answer ({error!r}); exit {node.process.poll()}")

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        code, status = answer("GET", "/api/replication/status")
        assert code == 200, status
        assert degraded(node)
        time.sleep(0.25)
    for path in ("/api/state/save", "/api/state/compact"):
        code, reply = answer("POST", path)
        assert code in (200, 503), (path, code, reply)
    answer("GET", "/api/replication/status")


def resumed_after_space_returns(node: NodeProcess, filler: Path) -> float:
    """Free the space; how long until the node says it takes writes again."""
    filler.unlink()
    freed = time.monotonic()
    wait_until(lambda: healthy(node), timeout=RESUME_WITHIN,
               what=f"{node.node_id} to resume once space is back")  # fmt: skip
    return time.monotonic() - freed


def applied_once(node: NodeProcess, origin: str) -> None:
    """No change from ``origin`` applied twice on ``node`` (its log keeps one entry each)."""
    with contextlib.closing(sqlite3.connect(node.db_path, timeout=10)) as conn:
        (twice,) = conn.execute(
            "SELECT count(*) FROM (SELECT 1 FROM _repl_log WHERE origin_node = ?"
            " GROUP BY origin_inc, origin_seq HAVING count(*) > 1)",
            (origin,),
        ).fetchone()
    assert twice == 0


def no_failure_logged(node: NodeProcess) -> None:
    assert node.process is not None
    assert node.process.poll() is None
    for event in ("control connection failed", "request failed"):
        assert not node.logged(event), node.logged(event)
    escaped = [line for line in node.logs()
               if "exception" in line or "Traceback" in str(line.get("event"))]  # fmt: skip
    assert not escaped, escaped


def test_a_receiver_whose_disk_fills_pauses_keeps_answering_and_resumes_without_loss(
    tmp_path: Path, small: Path, nodes: list[NodeProcess]
) -> None:
    a, b = pair(tmp_path, small, nodes)
    before = write(a, rows("before-", 200, 1))
    wait_until(lambda: macs(b) == before, what="b to hold the first rows")

    filler = fill(small)
    refused = write(a, rows("during-", 3000, 2, hostname="h" * 200))
    wait_until(lambda: degraded(b), timeout=20, what="b to report its disk refuses writes")
    paused = write(a, rows("paused-", 500, 3))  # while b is paused
    keeps_answering_while_degraded(b, seconds=3.5)
    assert b.logged(PAUSED)
    assert a.status()["node_id"] == "a"

    took = resumed_after_space_returns(b, filler)
    everything = before | refused | paused
    wait_until(lambda: macs(b) == everything, timeout=CATCH_UP_WITHIN, what="b to catch up")
    assert took < RESUME_WITHIN
    assert a.rows("dhcp_leases") == b.rows("dhcp_leases")
    applied_once(b, "a")
    assert len(b.logged(PAUSED)) == len(b.logged(RESUMED)) == 1  # once, no flapping
    no_failure_logged(b)


def test_a_node_whose_own_application_fills_the_disk_pauses_and_resumes_without_loss(
    tmp_path: Path, small: Path, nodes: list[NodeProcess]
) -> None:
    a, b = pair(tmp_path, small, nodes)
    committed = write(b, rows("before-", 200, 1))
    wait_until(lambda: macs(a) == committed, what="a to hold b's first rows")

    filler = fill(small, leave=3 << 20)
    written, refusals = write_until_refused(b, rows("app-", 20_000, 2, hostname="h" * 2000))
    committed |= written
    assert len(refusals) == 5, "the application never filled the disk"
    assert all("full" in refusal for refusal in refusals), refusals
    wait_until(lambda: degraded(b), timeout=20, what="b to report its disk refuses writes")
    keeps_answering_while_degraded(b, seconds=3.5)

    resumed_after_space_returns(b, filler)
    committed |= write(b, rows("after-", 100, 3))
    wait_until(lambda: macs(a) == committed, timeout=CATCH_UP_WITHIN,
               what="a to hold every row b committed")  # fmt: skip
    applied_once(a, "b")
    assert len(b.logged(PAUSED)) == len(b.logged(RESUMED)) == 1
    no_failure_logged(b)


def test_a_node_started_on_a_full_disk_recovers_nothing_over_its_file(
    tmp_path: Path, small: Path, nodes: list[NodeProcess]
) -> None:
    """A file the disk will not let SQLite open (no room for its WAL index) is not damaged:
    no copy aside, no backup or empty schema written over it, no new incarnation."""
    a, b = pair(tmp_path, small, nodes)
    mine = write(b, rows("b-", 200, 1))
    wait_until(lambda: macs(a) == mine, what="a to hold b's rows")
    origin = b.status()["origin"]
    b.stop()

    filler = fill(small)
    theirs = write(a, rows("a-", 300, 2))
    b.start([a])
    assert b.process is not None
    process = b.process
    wait_until(lambda: process.poll() is not None
               or "refuses writes" in b.log_path.read_text(errors="replace"),
               timeout=20, what="b to find its disk full at start")  # fmt: skip
    with contextlib.suppress(subprocess.TimeoutExpired):
        assert process.wait(5) == 2  # it said why and stopped, the file untouched
    assert not b.logged("state database failed validation at start: recovering")
    assert not list(b.directory.glob("state.db.damaged-*"))

    filler.unlink()
    if process.poll() is not None:
        b.start([a])
    wait_until(lambda: macs(b) == mine | theirs, timeout=CATCH_UP_WITHIN + 10,
               what="b to come up on its own file and catch up")  # fmt: skip
    assert b.status()["origin"] == origin


def shrink(filler: Path, give_back: int) -> None:
    """The operator frees ``give_back`` bytes (of the filler), not everything."""
    with open(filler, "r+b") as file:
        file.truncate(max(0, os.path.getsize(filler) - give_back))


def test_a_catch_up_after_the_disk_was_full_does_not_fill_it_again(
    tmp_path: Path, small: Path, nodes: list[NodeProcess]
) -> None:
    """Space comes back for the rows that waited, with room to spare but not for a WAL that
    grows unchecked: full again, no checkpoint can grow the file to empty the WAL, and the
    node would stay paused for good."""
    a, b = pair(tmp_path, small, nodes)
    before = write(a, rows("before-", 100, 1))
    wait_until(lambda: macs(b) == before, what="b to hold the first rows")
    filler = fill(small)
    waiting = write(a, rows("during-", 12_000, 2, hostname="h" * 200))
    wait_until(lambda: degraded(b), timeout=20, what="b to report its disk refuses writes")
    shrink(filler, give_back=14 << 20)  # the rows take about 8 MiB in the file
    # 12,000 rows to apply: on a loaded 2-core CI that alone took over 10 s once.
    wait_until(lambda: macs(b) == before | waiting and healthy(b), timeout=30,
               what="b to catch up and stay healthy")  # fmt: skip
    no_failure_logged(b)
