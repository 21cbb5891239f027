"""How rows and keys are written down in `_repl_*` tables, in SQL and in Python alike.

Rows: the capture triggers build a JSON object per row with SQLite's json_object. JSON keeps
integers (all 64 bits), text and null exactly, but cannot hold a blob and prints reals with 15
digits, so those two are tagged: a blob as ``["b", "<HEX>"]``, a real as
``["r", printf('%!.20e', x)]``: twenty digits, which read back as the same double. (quote() is
not enough: SQLite 3.40 stops at 15 digits whenever its own, inexact, parser reads them back.)
A SQLite value is never a JSON array, so the tags cannot be confused with data. Rows the node
writes itself (entries applied from peers, conflict records) are stored as msgpack blobs
instead, which keep every type as is and cost a fraction of JSON to produce; a stored row is
JSON if it is TEXT, msgpack if it is a BLOB.

Keys: a row's primary key is identified by the SQL literals of its values, as SQLite's quote()
prints them, joined by commas: exact for every type, computable inside a trigger, and mirrored
here in Python (reals, which are rare in keys, are quoted by asking SQLite). quote() stops at a
NUL inside text, so such text is written ``T<hex of its bytes>`` instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgpack

from protocol.checks import SqlValue

__all__ = [
    "decode_row",
    "encode_row",
    "json_value_sql",
    "key_sql",
    "parse_key",
    "pk_key",
    "quote_identifier",
    "quote_literal",
]


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def json_value_sql(expression: str) -> str:
    """SQL turning one value into its JSON form (tagged for blobs and reals)."""
    return (
        f"CASE typeof({expression}) WHEN 'blob' THEN json_array('b', hex({expression})) "
        f"WHEN 'real' THEN json_array('r', printf('%!.20e', {expression})) "
        f"ELSE {expression} END"
    )


def row_json_sql(prefix: str, columns: Sequence[str]) -> str:
    """SQL building the JSON object of a row (``prefix`` is NEW or OLD inside a trigger)."""
    pairs = ", ".join(
        f"{quote_literal(column)}, {json_value_sql(f'{prefix}.{quote_identifier(column)}')}"
        for column in columns
    )
    return f"json_object({pairs})"


def key_sql(prefix: str | None, pk_columns: Sequence[str]) -> str:
    """SQL computing a row's key from its primary-key columns (of ``prefix``, if given)."""
    qualifier = f"{prefix}." if prefix else ""
    return " || ',' || ".join(
        _key_part_sql(f"{qualifier}{quote_identifier(column)}") for column in pk_columns
    )


def _key_part_sql(value: str) -> str:
    return (
        f"CASE WHEN typeof({value}) = 'text' AND instr(CAST({value} AS BLOB), x'00')"
        f" THEN 'T' || hex({value}) ELSE quote({value}) END"
    )


def _decode_value(value: Any) -> SqlValue:
    if type(value) is list:
        tag, text = value
        return bytes.fromhex(text) if tag == "b" else float(text)
    return value  # type: ignore[no-any-return]


def decode_row(stored: str | bytes | None) -> dict[str, SqlValue] | None:
    if stored is None:
        return None
    if isinstance(stored, bytes):
        row: dict[str, SqlValue] = msgpack.unpackb(stored, raw=False)
        return row
    decoded: dict[str, Any] = json.loads(stored)
    for column, value in decoded.items():
        if type(value) is list:  # only tagged values need more than the JSON decoder
            decoded[column] = _decode_value(value)
    return decoded


def encode_row(row: Mapping[str, SqlValue] | None) -> bytes | None:
    if row is None:
        return None
    packed: bytes = msgpack.packb(row, use_bin_type=True)
    return packed


def pk_key(values: Sequence[SqlValue], quote_real: Callable[[float], str]) -> str:
    """The key string SQLite's ``quote(a) || ',' || quote(b)`` gives for these values."""
    if len(values) == 1:
        (value,) = values
        if type(value) is str and "'" not in value and "\x00" not in value:
            return f"'{value}'"
        if type(value) is int:
            return str(value)
    return ",".join(_quote(value, quote_real) for value in values)


def _quote(value: SqlValue, quote_real: Callable[[float], str]) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):  # pragma: no cover - never produced by the codecs
        raise TypeError("booleans are not SQLite values")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        if "\x00" in value:  # quote() would stop at the NUL
            return "T" + value.encode().hex().upper()
        return quote_literal(value)
    if isinstance(value, bytes):
        return "X'" + value.hex().upper() + "'"
    return quote_real(value)


def parse_key(key: str) -> tuple[SqlValue, ...]:
    """The values of a key written by `pk_key` or `key_sql` (the inverse of both).

    Reals come back as quote() printed them (15 significant digits), so a real key part may
    not be the exact double stored; every other type is exact.
    """
    values: list[SqlValue] = []
    index, end = 0, len(key)
    while True:
        if key.startswith("'", index):
            close = index + 1
            while True:
                close = key.index("'", close)
                if key.startswith("''", close):
                    close += 2
                    continue
                break
            values.append(key[index + 1 : close].replace("''", "'"))
            index = close + 1
        else:
            stop = key.find(",", index)
            stop = end if stop < 0 else stop
            token = key[index:stop]
            index = stop
            if token == "NULL":  # noqa: S105 - SQL's NULL literal, not a secret
                values.append(None)
            elif token.startswith("X'") and token.endswith("'"):
                values.append(bytes.fromhex(token[2:-1]))
            elif token.startswith("T"):
                values.append(bytes.fromhex(token[1:]).decode())
            elif token.lstrip("-").isdigit():
                values.append(int(token))
            else:
                values.append(float(token))
        if index >= end:
            return tuple(values)
        if key[index] != ",":
            raise ValueError(f"not a row key: {key!r}")
        index += 1
