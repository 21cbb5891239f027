"""What a node shares: the outgoing view of its rows under `filters` and `transformations`.

A row is shared when it passes every custom filter condition for its table (SQL expressions,
prepared against the table at start so a bad one is refused by name) and, for tables with the
zone column, lies in one of the configured zones. A shared row travels without its sensitive
columns (``exclude_sensitive``) and with IP addresses in its text replaced by a stable keyed
hash (``anonymize_ips``). The hash is spelled ``ip-<hex>``, which is not an address, so the
view of a row already seen through it is the row itself: every node can compute the same view
of the same rows, which is what table checksums compare.

Changes follow rows: a change to a row that is not shared travels as a skip marker (no gap in
the sequence), and an update that makes a shared row stop matching travels as a delete, so
peers that had the row drop it. Filters are part of the settings every node must share.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import ipaddress
import re
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass

from protocol import Change, Op, SnapshotRow
from protocol.checks import SqlValue
from replicator.capture.rows import pk_key, quote_identifier
from replicator.capture.tables import TableInfo
from replicator.config import FILTER_TYPES, ReplicationConfig
from replicator.errors import ConfigError

__all__ = ["RowFilter"]

# IPv4 dotted quads and IPv6 (full or compressed), checked with ipaddress before replacing.
_ADDRESS = re.compile(
    r"(?<![\w.:])(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f:]*:[0-9A-Fa-f:.]+)(?![\w.:])"
)


@dataclass(frozen=True, slots=True)
class _TableRules:
    condition: str | None  # SQL over the row's columns; None: every row
    dropped: frozenset[str]  # sensitive columns left out
    key: tuple[str, ...]


class RowFilter:
    """The outgoing view (use from one thread at a time: conditions run on an in-memory
    SQLite connection of its own)."""

    def __init__(
        self,
        replication: ReplicationConfig,
        tables: Mapping[str, TableInfo],
        conn: sqlite3.Connection,
        anonymize_key: bytes,
        file: str = "",
    ) -> None:
        filters = replication.filters
        self.anonymize = replication.transformations.get("anonymize_ips", False)
        self._key = hashlib.blake2b(anonymize_key, key=b"anonymize_ips", digest_size=32).digest()
        conditions: dict[str, list[str]] = {name: [] for name in tables}
        for index, custom in enumerate(filters.custom_filters):
            where = f"{file}: replication.filters.custom_filters[{index}]"
            covered = _covered(custom.type, replication.categories, tables)
            if not covered:
                raise ConfigError(
                    f"{where}.type: {custom.type!r} names no replicated table",
                    op="start",
                    hint=f"a table, a category, or one of {', '.join(sorted(FILTER_TYPES))}",
                )
            for name in covered:
                _prepare(conn, name, custom.condition, f"{where}.condition")
                conditions[name].append(f"({custom.condition})")
        if filters.zones:
            zones = ", ".join("'" + zone.replace("'", "''") + "'" for zone in filters.zones)
            for name, info in tables.items():
                if filters.zone_column in info.columns:
                    conditions[name].append(f"{quote_identifier(filters.zone_column)} IN ({zones})")
        self._rules: dict[str, _TableRules] = {}
        for name, info in tables.items():
            dropped: set[str] = set()
            if filters.exclude_sensitive:
                dropped = {
                    column
                    for column in info.columns
                    if column not in info.primary_key
                    and any(
                        fnmatch.fnmatchcase(f"{name}.{column}", pattern)
                        for pattern in filters.sensitive_columns
                    )
                }
            self._rules[name] = _TableRules(
                " AND ".join(conditions[name]) or None, frozenset(dropped), info.primary_key
            )
        self.active = self.anonymize or any(
            rules.condition is not None or rules.dropped for rules in self._rules.values()
        )
        self._eval = sqlite3.connect(":memory:", check_same_thread=False)
        self._queries: dict[tuple[str, tuple[str, ...]], str] = {}

    def copy(self) -> RowFilter:
        """The same view for another thread (conditions run on a connection of its own)."""
        twin = object.__new__(RowFilter)
        twin.anonymize, twin._key, twin._rules, twin.active = (
            self.anonymize, self._key, self._rules, self.active
        )  # fmt: skip
        twin._eval = sqlite3.connect(":memory:", check_same_thread=False)
        twin._queries = {}
        return twin

    # -- rows ------------------------------------------------------------------------------

    def shares(self, table: str, row: Mapping[str, SqlValue]) -> bool:
        rules = self._rules.get(table)
        if rules is None or rules.condition is None:
            return True
        columns = tuple(row)
        query = self._queries.get((table, columns))
        if query is None:
            select = ", ".join(f"? AS {quote_identifier(c)}" for c in columns)
            query = f"SELECT COALESCE(({rules.condition}), 0) FROM (SELECT {select})"
            self._queries[table, columns] = query
        return bool(self._eval.execute(query, list(row.values())).fetchone()[0])

    def view(self, table: str, row: Mapping[str, SqlValue]) -> dict[str, SqlValue] | None:
        """The row as peers see it, or None when it is not shared."""
        if not self.shares(table, row):
            return None
        return self.transform(table, row)

    def shared_row(
        self, table: str, row: SnapshotRow, key: str, conn: sqlite3.Connection
    ) -> tuple[SnapshotRow | None, str]:
        """A stored row (with its key) as peers see it; None when not shared."""
        if row.values is None:
            return row, key
        shared = self.view(table, row.values)
        if shared is None:
            return None, key
        pk = self._key_of_row(table, shared, row.pk)
        if pk != row.pk:
            key = pk_key(pk, lambda x: str(conn.execute("SELECT quote(?)", (x,)).fetchone()[0]))
        return SnapshotRow(pk, shared, row.version, row.seq), key

    def transform(self, table: str, row: Mapping[str, SqlValue]) -> dict[str, SqlValue]:
        rules = self._rules.get(table)
        dropped = rules.dropped if rules is not None else frozenset()
        return {
            column: self._anonymized(value) if self.anonymize else value
            for column, value in row.items()
            if column not in dropped
        }

    def _anonymized(self, value: SqlValue) -> SqlValue:
        if not isinstance(value, str) or ("." not in value and ":" not in value):
            return value
        return _ADDRESS.sub(self._replace, value)

    def _replace(self, match: re.Match[str]) -> str:
        text = match.group(0)
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            return text
        digest = hashlib.blake2b(address.packed, key=self._key, digest_size=6).hexdigest()
        return f"ip-{digest}"

    # -- changes ---------------------------------------------------------------------------

    def outgoing(self, change: Change) -> Change | None:
        """The change as peers get it; None when it concerns no shared row (a skip)."""
        table = change.table
        old = None if change.old is None else self.view(table, change.old)
        new = None if change.row is None else self.view(table, change.row)
        if change.op is Op.DELETE:
            if old is None:
                return None
            return dataclasses.replace(change, old=old, pk=self._key_of(table, old, change))
        if new is None:
            if change.op is Op.UPDATE and old is not None:
                # The row stopped matching: peers that had it drop it.
                return dataclasses.replace(
                    change, op=Op.DELETE, row=None, old=old, pk=self._key_of(table, old, change)
                )
            return None
        return dataclasses.replace(change, row=new, old=old, pk=self._key_of(table, new, change))

    def _key_of(
        self, table: str, row: Mapping[str, SqlValue], change: Change
    ) -> tuple[SqlValue, ...]:
        return self._key_of_row(table, row, change.pk)

    def _key_of_row(
        self, table: str, row: Mapping[str, SqlValue], pk: tuple[SqlValue, ...]
    ) -> tuple[SqlValue, ...]:
        rules = self._rules.get(table)
        if rules is None or not self.anonymize:
            return pk
        return tuple(row[column] for column in rules.key)

    def describe(self) -> dict[str, str]:
        """Per table, what is withheld or changed (the settings peers must share)."""
        return {
            name: f"where={rules.condition or ''};drop={','.join(sorted(rules.dropped))}"
            f";anonymize_ips={self.anonymize}"
            for name, rules in sorted(self._rules.items())
            if rules.condition is not None or rules.dropped or self.anonymize
        }

    def close(self) -> None:
        self._eval.close()


def _covered(
    kind: str, categories: Mapping[str, tuple[str, ...]], tables: Mapping[str, TableInfo]
) -> list[str]:
    names = set(FILTER_TYPES.get(kind, ())) | set(categories.get(kind, ()))
    if kind in tables:
        names.add(kind)
    return sorted(name for name in names if name in tables)


def _prepare(conn: sqlite3.Connection, table: str, condition: str, where: str) -> None:
    try:
        conn.execute(
            f"SELECT 1 FROM {quote_identifier(table)} WHERE ({condition}) LIMIT 0"
        ).fetchall()
    except sqlite3.Error as error:
        raise ConfigError(
            f"{where}: {condition!r} is not a valid condition on table {table}: {error}",
            op="start",
            hint="an SQL expression over the table's columns, such as scope != 'test'",
        ) from None
    if ";" in condition:
        raise ConfigError(f"{where}: {condition!r}: one expression, no ';'", op="start")
