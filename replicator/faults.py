"""What peers did wrong, counted by reason, and a throttle for the log lines about it.

A hostile or broken peer costs the node a log line and a counter, never the process. Counting
by a fixed reason (the label in status and metrics) lets an operator see a flood at a glance;
the throttle keeps the log readable while it lasts: the first line of each kind at once, then
one line per interval saying how many were left out.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable

__all__ = ["Faults", "Throttle"]


class Faults:
    """Counts per reason (``protocol``, ``hello``, ``skip_beyond_holdings``...)."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()

    def count(self, reason: str, times: int = 1) -> None:
        self._counts[reason] += times

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self._counts.items()))


class Throttle:
    """At most one log line per key per ``interval``; remembers at most ``max_keys`` keys."""

    def __init__(
        self,
        interval: float = 10.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 1024,
    ) -> None:
        self.interval = interval
        self._clock = clock
        self._max_keys = max_keys
        self._seen: OrderedDict[Hashable, tuple[float, int]] = OrderedDict()

    def allow(self, key: Hashable = None) -> int | None:
        """None: leave this line out. A number: log it, saying that many were left out
        since the last line of this key."""
        now = self._clock()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self.interval:
            self._seen[key] = (last[0], last[1] + 1)
            return None
        self._seen[key] = (now, 0)
        self._seen.move_to_end(key)
        while len(self._seen) > self._max_keys:
            self._seen.popitem(last=False)
        return 0 if last is None else last[1]
