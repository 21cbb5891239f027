"""What peers did wrong, counted by reason (the log lines about it go through `log.Throttle`).

A hostile or broken peer costs the node a log line and a counter, never the process. Counting
by a fixed reason (the label in status and metrics) lets an operator see a flood at a glance.
"""

from __future__ import annotations

from collections import Counter

__all__ = ["Faults"]


class Faults:
    """Counts per reason (``protocol``, ``hello``, ``skip_beyond_holdings``...)."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()

    def count(self, reason: str, times: int = 1) -> None:
        self._counts[reason] += times

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self._counts.items()))
