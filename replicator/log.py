"""structlog setup and the log keys every component uses.

Keys live here so that every line about a peer carries the same ``peer`` key, every line about
a table the same ``table`` key, and log queries work across components.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

__all__ = ["KEY_OP", "KEY_ORIGIN", "KEY_PEER", "KEY_SEQ", "KEY_TABLE", "configure", "get_logger"]

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
