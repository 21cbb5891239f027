"""Schema checks for decoded msgpack: each returns the value typed, or raises.

Everything a peer sends passes through these before it becomes a dataclass, so the node never
sees a bool where it expects a sequence number, a list where it expects a column value, or a
64-bit overflow. ``what`` names the field in the error for our logs.
"""

from __future__ import annotations

import math
from typing import Any

from protocol.errors import RemoteProtocolError

__all__ = [
    "INT64_MAX",
    "INT64_MIN",
    "MAX_NAME_LENGTH",
    "SqlValue",
    "want_bytes",
    "want_int",
    "want_list",
    "want_name",
    "want_row",
    "want_sql_value",
    "want_str",
]

SqlValue = int | float | str | bytes | None
"""The five SQLite storage classes, kept exactly end to end."""

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
MAX_NAME_LENGTH = 255
MAX_TEXT_LENGTH = 4096


def _fail(what: str, expected: str, value: object) -> RemoteProtocolError:
    return RemoteProtocolError(f"{what}: expected {expected}, got {type(value).__name__}")


def want_list(value: Any, what: str, *, min_len: int = 0, max_len: int = 1 << 20) -> list[Any]:
    if type(value) is not list:
        raise _fail(what, "an array", value)
    if not min_len <= len(value) <= max_len:
        raise RemoteProtocolError(
            f"{what}: expected {min_len}..{max_len} elements, got {len(value)}"
        )
    return value


def want_int(value: Any, what: str, *, low: int = 0, high: int = INT64_MAX) -> int:
    # `type(...) is int` rather than isinstance: msgpack booleans decode to bool, a subclass.
    if type(value) is not int:
        raise _fail(what, "an integer", value)
    if not low <= value <= high:
        raise RemoteProtocolError(f"{what}: {value} is outside {low}..{high}")
    return value


def want_str(value: Any, what: str, *, max_len: int = MAX_TEXT_LENGTH) -> str:
    if type(value) is not str:
        raise _fail(what, "a string", value)
    if len(value) > max_len:
        raise RemoteProtocolError(f"{what}: {len(value)} characters exceeds {max_len}")
    return value


def want_name(value: Any, what: str) -> str:
    """An identifier (node, table or column name): non-empty, bounded, no NUL."""
    name = want_str(value, what, max_len=MAX_NAME_LENGTH)
    if not name or "\x00" in name:
        raise RemoteProtocolError(f"{what}: names must be non-empty and contain no NUL")
    return name


def want_bytes(value: Any, what: str, *, max_len: int) -> bytes:
    if type(value) is not bytes:
        raise _fail(what, "binary data", value)
    if len(value) > max_len:
        raise RemoteProtocolError(f"{what}: {len(value)} bytes exceeds {max_len}")
    return value


_SCALAR_TYPES = frozenset({str, bytes, type(None)})


def want_sql_value(value: Any, what: str) -> SqlValue:
    kind = type(value)
    if kind in _SCALAR_TYPES:
        return value  # type: ignore[no-any-return]
    if kind is float:
        # SQLite stores NaN as NULL, and NaN equals nothing: refused, so no node ever holds
        # a value another node cannot compare.
        if math.isnan(value):
            raise RemoteProtocolError(f"{what}: NaN is not an SQLite value")
        return value  # type: ignore[no-any-return]
    if kind is int:
        if not INT64_MIN <= value <= INT64_MAX:
            raise RemoteProtocolError(f"{what}: integer {value} does not fit SQLite's 64 bits")
        return value  # type: ignore[no-any-return]
    raise _fail(what, "an SQLite value (integer, real, text, blob or null)", value)


def want_row(value: Any, what: str) -> dict[str, SqlValue]:
    """A row as a map of column name to value (the hot path: checks are inlined)."""
    if type(value) is not dict:
        raise _fail(what, "a map of columns", value)
    for column, cell in value.items():
        if type(column) is not str or not 0 < len(column) <= MAX_NAME_LENGTH or "\x00" in column:
            want_name(column, f"{what} column name")
        kind = type(cell)
        if kind is int:
            if not INT64_MIN <= cell <= INT64_MAX:
                want_sql_value(cell, f"{what}.{column}")
        elif kind is float:
            if math.isnan(cell):
                want_sql_value(cell, f"{what}.{column}")
        elif kind not in _SCALAR_TYPES:
            want_sql_value(cell, f"{what}.{column}")
    return value
