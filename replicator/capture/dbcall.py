"""Database calls from trio: short ones on the event loop, the rest in a worker thread.

A worker-thread hop costs a few hundred microseconds of wake-ups and GIL hand-offs on a busy
machine, more than reading one log entry or applying a one-row batch. Those small calls run
directly on the event loop with SQLite's busy timeout at zero, so they can never stall it: if the
database is locked the call fails at once and is run again in a worker thread, where waiting is
harmless. Callers make sure a call that fails that way has changed nothing.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterator
from typing import TypeVar

import trio

from replicator.capture.sqlite_errors import is_locked

__all__ = ["INLINE_ENTRIES", "WouldBlock", "call", "no_waiting"]

# Log entries or changes few enough to read or apply on the event loop.
INLINE_ENTRIES = 32

_T = TypeVar("_T")


class WouldBlock(Exception):
    """Raised by a function run on the loop when it finds more work than is quick."""


@contextlib.contextmanager
def no_waiting(conn: sqlite3.Connection) -> Iterator[None]:
    """Busy timeout zero for the block: a locked database fails at once."""
    (previous,) = conn.execute("PRAGMA busy_timeout").fetchone()
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        yield
    finally:
        conn.execute(f"PRAGMA busy_timeout = {int(previous)}")


async def call(
    conn: sqlite3.Connection | None,
    limiter: trio.CapacityLimiter,
    function: Callable[[bool], _T],
    *,
    inline: bool,
) -> _T:
    """``function(quick)`` (which uses ``conn``): on the loop with ``quick=True`` when
    ``inline`` and the database is free, else in a worker thread with ``quick=False``.
    ``limiter`` keeps the connection to one user at a time."""
    if inline and conn is not None:
        async with limiter:
            try:
                with no_waiting(conn):
                    return function(True)
            except WouldBlock:
                pass
            except sqlite3.OperationalError as error:
                if not is_locked(error):
                    raise
    return await trio.to_thread.run_sync(function, False, limiter=limiter)
