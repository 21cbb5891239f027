"""The node's standing alarms: one message per condition, raised and cleared by whoever
watches it, shown in status and metrics until the condition is gone."""

from __future__ import annotations

__all__ = ["Alarms"]


class Alarms(dict[str, str]):
    """Alarm name (``max_lag:node2``, ``split_brain``, ...) -> the message an operator reads.

    A mapping, so the links and the snapshot exchange (which raise their own) need no more than
    ``MutableMapping``.
    """

    def sound(self, name: str, message: str) -> bool:
        """Raise or restate ``name``; True when it was not standing before (log it then)."""
        new = name not in self
        self[name] = message
        return new

    def silence(self, name: str) -> bool:
        """Clear ``name``; True when it was standing (log that it cleared)."""
        return self.pop(name, None) is not None

    def messages(self) -> list[str]:
        """What status shows: every standing alarm's message, sorted."""
        return sorted(self.values())
