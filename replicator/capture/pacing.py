"""Short, spaced write transactions: the node shares SQLite's one write lock with the
application, and must never be the reason an application's write waits long.

SQLite lets one writer in at a time and a waiting writer's busy handler retries on its own
schedule (after 1, 2, 5, ... up to 100 ms between tries), so a node that commits back to back
during a catch-up can starve the application for seconds although each of its transactions is
short. While the application writes (another connection committed in the last ``quiet``
seconds), the pacer sizes each apply to take about ``target`` seconds, and makes the next one
wait until the lock has been free for ``rest`` times as long as it was held: the application
then finds the lock free at most of its tries. While it does not, the node holds the lock for
``quiet_target`` at a time with only a sliver of rest; if it holds it most of the time (a
catch-up: each second free earns back ``idle_credit`` seconds held), then after ``quiet_run``
seconds of holding it rests ``long_rest``, longer than the busy handler's longest sleep. An
application that starts writing then gets in within about ``quiet_run`` (sooner when the node
leaves gaps of its own, as in steady replication, where no long rest delays a batch), and
its commit brings the short pieces back. The pacer also keeps the hold times, so status and
the benchmark can show the longest.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import trio

__all__ = ["WritePacer"]

_KEPT = 4096  # recent hold times kept for the percentiles


class WritePacer:
    def __init__(
        self,
        target: float = 0.005,
        rest: float = 0.5,
        *,
        quiet: float = 2.0,
        quiet_target: float = 0.02,
        quiet_rest: float = 0.05,
        quiet_run: float = 0.5,
        long_rest: float = 0.12,
        idle_credit: float = 4.0,
        smallest: int = 16,
        largest: int = 4000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target = target
        self.rest = rest
        self.quiet = quiet
        self.quiet_target = quiet_target
        self.quiet_rest = quiet_rest
        self.quiet_run = quiet_run
        self.long_rest = long_rest
        self.idle_credit = idle_credit
        self._smallest = smallest
        self._largest = largest
        self._clock = clock
        self._per_entry = 50e-6  # seconds per applied entry, learnt as applies run
        self._free_at = 0.0
        self._others_at = -quiet  # when another connection last committed (as far as seen)
        self._run = 0.0  # seconds held since the last long rest, less the credit of gaps
        self._last_end: float | None = None  # when the last hold ended
        self._holds: deque[float] = deque(maxlen=_KEPT)
        self._lock = threading.Lock()
        self.transactions = 0
        self.longest = 0.0

    def others_wrote(self) -> None:
        """Another connection committed since one of ours last did: the application writes."""
        with self._lock:
            self._others_at = self._clock()

    def contended(self) -> bool:
        """The application wrote in the last ``quiet`` seconds."""
        return self._clock() - self._others_at < self.quiet

    def piece_size(self) -> int:
        """Entries for the next transaction, so it holds the lock about ``target`` (or
        ``quiet_target`` while the application does not write)."""
        target = self.target if self.contended() else self.quiet_target
        wanted = int(target / max(self._per_entry, 1e-7))
        return max(self._smallest, min(self._largest, wanted))

    def applied(self, entries: int, seconds: float) -> None:
        """An apply of ``entries`` held the lock ``seconds``: learn the rate from it."""
        if entries > 0 and seconds > 0:
            self._per_entry = 0.7 * self._per_entry + 0.3 * (seconds / entries)

    def held(self, seconds: float) -> None:
        """A write transaction of this node (any) held the lock ``seconds``."""
        with self._lock:
            self._holds.append(seconds)
            self.transactions += 1
            self.longest = max(self.longest, seconds)
            now = self._clock()
            gap = 0.0 if self._last_end is None else max(0.0, now - seconds - self._last_end)
            self._last_end = now
            if self.contended():
                self._run = 0.0
                rest = seconds * self.rest
            else:
                self._run = max(0.0, self._run - gap * self.idle_credit) + seconds
                rest = seconds * self.quiet_rest
                if self._run >= self.quiet_run:
                    self._run = 0.0
                    rest = self.long_rest
            self._free_at = max(self._free_at, now + rest)

    async def wait_turn(self) -> None:
        """Before a write transaction: until the lock has rested long enough."""
        delay = self._free_at - self._clock()
        if delay > 0:
            await trio.sleep(delay)

    def wait_turn_blocking(self) -> None:
        """`wait_turn` for code running in a worker thread."""
        delay = self._free_at - self._clock()
        if delay > 0:
            time.sleep(delay)

    def report(self) -> dict[str, Any]:
        with self._lock:
            holds = sorted(self._holds)

        def at(share: float) -> float | None:
            if not holds:
                return None
            return round(holds[min(len(holds) - 1, int(share * len(holds)))] * 1000, 3)

        return {
            "transactions": self.transactions,
            "recent": len(holds),
            "p50_ms": at(0.5),
            "p99_ms": at(0.99),
            "recent_max_ms": round(holds[-1] * 1000, 3) if holds else None,
            "max_ms": round(self.longest * 1000, 3),
        }
