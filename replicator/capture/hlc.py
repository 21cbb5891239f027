"""Hybrid logical clock: 48 bits of wall-clock milliseconds, 16 bits of counter, one integer.

The clock's state is the ``hlc`` column of the ``_repl_clock`` row. The capture triggers log
the wall time of each change (`WALL_STAMP_SQL`); the node ticks the clock for them in log order
(`capture.sealing`, in SQL) and when it writes itself. Two rules:

- a local event ticks: ``max(previous + 1, now << 16)``; monotonic even when the wall clock
  steps backwards, because it never goes below ``previous + 1``;
- receiving a remote stamp advances the state to at least that stamp, so the next local event
  ranks above everything already seen, unless the stamp is more than ``max_offset`` ahead of
  our wall clock: a node with a runaway clock must not drag every other clock forward.
"""

from __future__ import annotations

import time

from replicator.errors import ClockOffsetError

__all__ = [
    "COUNTER_BITS",
    "NOW_MS_SQL",
    "WALL_STAMP_SQL",
    "pack",
    "physical_ms",
    "receive",
    "tick",
    "wall_clock_ms",
]

COUNTER_BITS = 16
_COUNTER_MASK = (1 << COUNTER_BITS) - 1

# SQLite 3.40 has no unixepoch('subsec'): julianday() has millisecond resolution.
NOW_MS_SQL = "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)"


WALL_STAMP_SQL = f"({NOW_MS_SQL} << {COUNTER_BITS})"
"""The wall time as a stamp with a zero counter: what a capture trigger logs, and the floor of
the tick rule, which the node applies in log order (`capture.sealing`)."""


def pack(physical: int, counter: int = 0) -> int:
    return (physical << COUNTER_BITS) | (counter & _COUNTER_MASK)


def physical_ms(stamp: int) -> int:
    return stamp >> COUNTER_BITS


def counter(stamp: int) -> int:
    return stamp & _COUNTER_MASK


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def tick(previous: int, now_ms: int) -> int:
    return max(previous + 1, now_ms << COUNTER_BITS)


def receive(previous: int, remote: int, now_ms: int, max_offset_ms: int) -> int:
    """The clock state after seeing ``remote``; refuses stamps too far in the future."""
    ahead = physical_ms(remote) - now_ms
    if ahead > max_offset_ms:
        raise ClockOffsetError(
            f"remote clock stamp is {ahead} ms ahead of this node's clock, "
            f"more than max_clock_offset ({max_offset_ms} ms)",
            op="receive",
            hint="check NTP on both nodes; the change is held back until the clocks agree",
        )
    return max(previous, remote)
