"""The node's error root: every failure says what was being done, to which peer, and what to try.

Modelled on errors that carry their context (operation, peer, sequence) and a hint for the
operator, so a log line or an API error is actionable without reading code.
"""

from __future__ import annotations

__all__ = ["ClockOffsetError", "ConfigError", "ReplicationError", "SchemaError", "first_leaf"]


def first_leaf(error: BaseException) -> BaseException:
    """The first error inside (nested) exception groups: the one a nursery's failure was."""
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


class ReplicationError(Exception):
    def __init__(
        self,
        message: str,
        *,
        op: str | None = None,
        peer: str | None = None,
        seq: int | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.op = op
        self.peer = peer
        self.seq = seq
        self.hint = hint

    def __str__(self) -> str:
        context = ", ".join(
            f"{name}={value}"
            for name, value in (("op", self.op), ("peer", self.peer), ("seq", self.seq))
            if value is not None
        )
        text = f"{self.message} ({context})" if context else self.message
        return f"{text}; hint: {self.hint}" if self.hint else text


class SchemaError(ReplicationError):
    """The application's database cannot be replicated as configured (no primary key...)."""


class ConfigError(ReplicationError):
    """A configuration file or value is invalid; the message names the file and the key."""


class ClockOffsetError(ReplicationError):
    """A remote stamp is further ahead of our wall clock than `max_clock_offset` allows."""
