"""Small database calls run on the event loop, but a locked database never stalls it."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import trio

from replicator.capture import dbcall


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA busy_timeout = 5000")
    return conn


def insert(conn: sqlite3.Connection, calls: list[bool], quick: bool) -> int:
    calls.append(quick)
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("INSERT INTO t VALUES (1)")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return int(conn.execute("SELECT count(*) FROM t").fetchone()[0])


async def test_a_free_database_is_used_on_the_loop(tmp_path: Path) -> None:
    conn = connect(tmp_path / "s.db")
    conn.execute("CREATE TABLE t (x)")
    calls: list[bool] = []
    count = await dbcall.call(
        conn, trio.CapacityLimiter(1), lambda quick: insert(conn, calls, quick), inline=True
    )
    assert (count, calls) == (1, [True])
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000


async def test_a_locked_database_moves_the_call_to_a_thread_and_the_loop_keeps_going(
    tmp_path: Path,
) -> None:
    conn = connect(tmp_path / "s.db")
    conn.execute("CREATE TABLE t (x)")
    holder = connect(tmp_path / "s.db")
    holder.execute("BEGIN IMMEDIATE")  # another process's writer holds the lock
    calls: list[bool] = []
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0.005)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(tick)
        # The lock is released 200 ms from now, from another thread.
        nursery.start_soon(trio.to_thread.run_sync, _release_later, holder)
        count = await dbcall.call(
            conn, trio.CapacityLimiter(1), lambda quick: insert(conn, calls, quick), inline=True
        )
        nursery.cancel_scope.cancel()
    assert count == 1
    assert calls == [True, False]  # refused at once on the loop, then waited in a thread
    assert ticks >= 20  # the loop ran all along


def _release_later(holder: sqlite3.Connection) -> None:
    time.sleep(0.2)
    holder.execute("COMMIT")


async def test_work_too_big_for_the_loop_goes_to_a_thread(tmp_path: Path) -> None:
    conn = connect(tmp_path / "s.db")
    calls: list[bool] = []

    def heavy(quick: bool) -> str:
        calls.append(quick)
        if quick:
            raise dbcall.WouldBlock
        return "done"

    assert await dbcall.call(conn, trio.CapacityLimiter(1), heavy, inline=True) == "done"
    assert calls == [True, False]
    assert await dbcall.call(conn, trio.CapacityLimiter(1), heavy, inline=False) == "done"
    assert calls == [True, False, False]
