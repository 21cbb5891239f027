"""structlog setup and the log keys every component uses.

Keys live here so that every line about a peer carries the same ``peer`` key, every line about
a table the same ``table`` key, and log queries work across components.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import structlog

__all__ = [
    "KEY_OP",
    "KEY_ORIGIN",
    "KEY_PEER",
    "KEY_SEQ",
    "KEY_TABLE",
    "Throttle",
    "configure",
    "get_logger",
]

KEY_COMPONENT = "component"
KEY_PEER = "peer"
KEY_TABLE = "table"
KEY_ORIGIN = "origin"
KEY_SEQ = "seq"
KEY_OP = "op"


def configure(*, json: bool | None = None, level: int = logging.INFO) -> None:
    """JSON lines in production, readable console output in a terminal (``json=None``: guess)."""
    if json is None:
        json = not sys.stderr.isatty()
    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def get_logger(component: str, **context: Any) -> Any:
    """A logger bound to its component (and, for peer code, ``peer=node_id``)."""
    # Initial values keep the proxy lazy: a module-level logger created at import time still
    # follows the configuration `configure` sets later.
    return structlog.get_logger(**{KEY_COMPONENT: component}, **context)


class Throttle:
    """At most one log line per key per ``interval``; remembers at most ``max_keys`` keys.

    Keeps the log readable through a flood (a hostile peer, a down peer's dial failures): the
    first line of each kind at once, then one line per interval saying how many were left out.
    """

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
