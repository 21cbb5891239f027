"""What this node holds, per origin, as last read: the version vector heartbeats, Hello and
lag read many times a second without a query each time."""

from __future__ import annotations

from collections.abc import Mapping

from protocol import Origin
from replicator.capture.store import Store

__all__ = ["VectorCache"]


class VectorCache:
    """Refreshed by every apply, every merged snapshot and once per heartbeat (local commits
    do not refresh it: they would cost a query per commit)."""

    def __init__(self) -> None:
        self._held: dict[Origin, int] = {}

    @property
    def held(self) -> Mapping[Origin, int]:
        return self._held

    def copy(self) -> dict[Origin, int]:
        """A copy the caller may change (links merge what they just sent into it)."""
        return dict(self._held)

    def set(self, vector: dict[Origin, int]) -> None:
        self._held = vector

    def read(self, store: Store) -> dict[Origin, int]:
        """Blocking: read the vector from ``store`` now and keep it."""
        self._held = store.version_vector()
        return self._held

    def behind(self, vector: Mapping[Origin, int]) -> int:
        """How many changes this node holds that a peer holding ``vector`` lacks."""
        return sum(max(0, seq - vector.get(origin, 0)) for origin, seq in self._held.items())
