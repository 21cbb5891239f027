"""The node's clock, as a parameter: the system's in production, a simulated one in a test.

Everything the node times (lag, liveness, backoff, the age of a handshake) and every wall time
it reports or stamps reads one `Clock`, so a simulation can drive several nodes in one process
on `trio.testing.MockClock` and skew or jump one node's wall time. Calls may come from worker
threads: a clock must be safe to read from any thread.
"""

from __future__ import annotations

import time
from typing import Protocol

__all__ = ["Clock", "SystemClock"]


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds that only move forward: for durations and deadlines."""
        ...

    def time(self) -> float:
        """Wall time, seconds since the epoch: for what is shown and compared across nodes."""
        ...

    def wall_ms(self) -> int:
        """Wall time in milliseconds: hybrid-clock stamps, heartbeats, skew."""
        ...


class SystemClock:
    """The real one."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def wall_ms(self) -> int:
        return time.time_ns() // 1_000_000
