"""An in-process cluster for replication tests: nodes are SQLite files, links are function calls.

Each `SimNode` is what a real node holds: its own state database prepared by `Store.open`, an
application connection writing the replicated tables with plain SQL (as an application would),
and an `Applier` with the cluster's conflict strategy. `deliver` moves log entries from one
node to another the way a peer stream would (a whole log, a slice, or any chosen records), and
`sync_until_quiescent` exchanges full logs until no version vector moves. The read helpers
return plain tuples (values with their SQLite types) so tests can compare nodes with ``==``.
"""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from protocol import Change, Origin, RowVersion, Skip
from replicator.apply import conflicts
from replicator.apply.applier import Applier, ApplyResult
from replicator.apply.resolvers import Resolver
from replicator.capture.store import LogRecord, Store, StoreSettings

__all__ = [
    "COLUMNS",
    "PRIMARY_KEYS",
    "SCHEMA",
    "TABLES",
    "Recorded",
    "SimNode",
    "deliver",
    "deliver_checked",
    "deliver_records",
    "sync_until_quiescent",
    "typed",
]

SCHEMA = """
CREATE TABLE leases (
    mac     TEXT PRIMARY KEY,
    ip      TEXT,
    expires INTEGER,
    score   REAL,
    data    BLOB,
    extra
);
CREATE TABLE kv (
    a INTEGER NOT NULL,
    b TEXT NOT NULL,
    v,
    PRIMARY KEY (a, b)
) WITHOUT ROWID;
"""
"""A TEXT-keyed table with typed columns (and one without affinity), and a composite key."""

TABLES = ("leases", "kv")
PRIMARY_KEYS: dict[str, tuple[str, ...]] = {"leases": ("mac",), "kv": ("a", "b")}
COLUMNS: dict[str, tuple[str, ...]] = {
    "leases": ("mac", "ip", "expires", "score", "data", "extra"),
    "kv": ("a", "b", "v"),
}
_ALL = 1 << 62

Row = tuple[Any, ...]


class Recorded(NamedTuple):
    """One `_repl_conflicts` row, decoded."""

    table: str
    key: str
    local: RowVersion
    remote: RowVersion
    local_row: dict[str, Any] | None
    remote_row: dict[str, Any] | None
    winner: str
    status: str


class SimNode:
    """One node: its state database, an application connection and an applier."""

    def __init__(
        self,
        directory: Path | str,
        name: str,
        resolver: Resolver,
        resolvers: Mapping[str, Resolver] | None = None,
    ) -> None:
        self.name = name
        self.path = str(Path(directory) / f"{name}.db")
        self.store = Store.open(StoreSettings(self.path, name, TABLES, schema_sql=SCHEMA))
        self.app = sqlite3.connect(self.path, isolation_level=None)
        self.app.execute("PRAGMA busy_timeout = 5000")
        self.applier = Applier(self.store, resolvers=resolvers, default_resolver=resolver)

    def __repr__(self) -> str:
        return f"SimNode({self.name})"

    def close(self) -> None:
        self.app.close()
        self.store.close()

    def clone(self, directory: Path | str, resolver: Resolver) -> SimNode:
        """The same node (same file contents, same origin) in another directory."""
        target = sqlite3.connect(Path(directory) / f"{self.name}.db")
        try:
            self.store.conn.backup(target)
        finally:
            target.close()
        return SimNode(directory, self.name, resolver, self.applier.resolvers)

    @property
    def origin(self) -> Origin:
        return self.store.origin

    # -- what the node holds -------------------------------------------------------------

    def log(self) -> list[LogRecord]:
        self.store.seal()  # as the node's detector does before anything is read
        return self.store.read_log(0, _ALL)

    def changes(self) -> list[Change]:
        return [r.entry for r in self.log() if isinstance(r.entry, Change)]

    def vector(self) -> dict[Origin, int]:
        self.store.seal()  # the application's writes count once the detector stamped them
        return self.store.version_vector()

    def rows(self, table: str) -> list[Row]:
        """Every row, each value beside its SQLite type, in key order."""
        columns = COLUMNS[table]
        select = ", ".join(f"{c}, typeof({c}), quote({c})" for c in columns)
        order = ", ".join(PRIMARY_KEYS[table])
        return self.store.conn.execute(f"SELECT {select} FROM {table} ORDER BY {order}").fetchall()

    def row(self, table: str, key: str) -> dict[str, Any] | None:
        """The stored row whose key (as `Store.key` spells it) is ``key``."""
        columns = COLUMNS[table]
        key_expr = " || ',' || ".join(f"quote({c})" for c in PRIMARY_KEYS[table])
        found = self.store.conn.execute(
            f"SELECT {', '.join(columns)} FROM {table} WHERE {key_expr} = ?", (key,)
        ).fetchone()
        return None if found is None else dict(zip(columns, found, strict=True))

    def rowmeta(self) -> list[Row]:
        self.store.seal()
        return self.store.conn.execute(
            "SELECT tbl, pk, hlc, node, inc, generation, deleted,"
            " prev_hlc, prev_node, prev_inc, prev_gen FROM _repl_rowmeta ORDER BY tbl, pk"
        ).fetchall()

    def conflicts(self) -> dict[str, Recorded]:
        """Every queued conflict by id, whatever its status."""
        found = conflicts.list_conflicts(self.store.conn, status=None, limit=_ALL)
        return {c.id: _recorded(c) for c in found}

    def open_conflicts(self) -> list[str]:
        return sorted(i for i, c in self.conflicts().items() if c.status == "open")

    def state(self) -> tuple[Any, ...]:
        """Everything replication decides here: rows, versions, conflicts, log, progress."""
        return (
            [self.rows(table) for table in TABLES],
            self.rowmeta(),
            self.conflicts(),
            self.conflict_counts(),
            self.store.log_position(),
            self.vector(),
        )

    def conflict_counts(self) -> dict[tuple[str, str, str], int]:
        return {
            (tbl, strategy, kind): count
            for tbl, strategy, kind, count in self.store.conn.execute(
                "SELECT tbl, strategy, kind, count FROM _repl_conflict_counts"
            )
        }

    def version_of(self, table: str, key: str) -> RowVersion | None:
        self.store.seal()
        found = self.store.conn.execute(
            "SELECT hlc, node, inc, generation FROM _repl_rowmeta WHERE tbl = ? AND pk = ?",
            (table, key),
        ).fetchone()
        if found is None:
            return None
        stamp, node, inc, generation = found
        return RowVersion(stamp, Origin(node, inc), generation)

    def logged_seqs(self, origin: Origin) -> list[int]:
        return [
            seq
            for (seq,) in self.store.conn.execute(
                "SELECT origin_seq FROM _repl_log WHERE origin_node = ? AND origin_inc = ?"
                " ORDER BY origin_seq",
                (origin.node_id, origin.incarnation),
            )
        ]

    # -- the application's side ----------------------------------------------------------

    def execute(self, sql: str, params: Sequence[Any] = ()) -> bool:
        """Run one application statement; False when SQLite refused it (a constraint). What
        it logged is stamped at once, as the node's detector would soon after."""
        try:
            self.app.execute(sql, params)
        except sqlite3.IntegrityError:
            return False
        if not self.app.in_transaction:
            self.store.seal()
        return True

    # -- receiving -------------------------------------------------------------------------

    def pull(self, source: SimNode) -> ApplyResult:
        """Apply the source's whole log."""
        return deliver(source, self)


def deliver(
    source: SimNode, target: SimNode, start: int = 0, stop: int | None = None
) -> ApplyResult:
    """``target`` applies ``source``'s log records ``[start:stop]`` (list indices) as one batch."""
    return deliver_records(target, source.log()[start:stop])


def deliver_records(target: SimNode, records: Iterable[LogRecord]) -> ApplyResult:
    """``target`` applies these records, in this order, as one batch."""
    entries = [record.entry for record in records]
    changes = [e for e in entries if isinstance(e, Change)]
    skips = [e for e in entries if isinstance(e, Skip)]
    return target.applier.apply(changes, skips)


def sync_until_quiescent(
    nodes: Sequence[SimNode],
    links: Iterable[tuple[SimNode, SimNode]] | None = None,
    max_rounds: int = 20,
) -> int:
    """Exchange whole logs along ``links`` (source, target; default: every ordered pair)
    until a round moves no version vector; returns the rounds taken. A whole log never
    leaves a gap, so any gap here fails the caller's test."""
    pairs = [(s, t) for s in nodes for t in nodes if s is not t] if links is None else list(links)
    for rounds in range(1, max_rounds + 1):
        before = [node.vector() for node in nodes]
        for source, target in pairs:
            result = deliver(source, target)
            assert not result.gaps, f"{source} -> {target}: gap in a whole log {result.gaps}"
            assert not result.clock_refused, result.clock_refused
        if [node.vector() for node in nodes] == before:
            return rounds
    raise AssertionError(f"no quiescence after {max_rounds} rounds")


def deliver_checked(target: SimNode, records: Sequence[LogRecord]) -> ApplyResult:
    """`deliver_records`, checking the applier's admission against the version vector.

    Per origin, entries at or below the vector are duplicates and the next ones apply in
    sequence; the first missing sequence is a gap: reported, and nothing after it is applied
    or logged. Whatever the batch order, everything that arrives in sequence order is applied
    (the applier may also reorder an origin's entries by sequence, but need not). A batch
    that admits nothing changes nothing."""
    own = target.origin
    vector = target.vector()
    before = target.state()
    by_origin: dict[Origin, list[Change | Skip]] = defaultdict(list)
    for record in records:
        by_origin[record.entry.origin].append(record.entry)
    echoed = len(by_origin.pop(own, []))
    bounds = {
        origin: (
            _admitted(vector.get(origin, 0), entries),
            _admitted(vector.get(origin, 0), sorted(entries, key=_first_seq)),
        )
        for origin, entries in by_origin.items()
    }
    result = deliver_records(target, records)
    assert not result.clock_refused, result.clock_refused
    assert result.own == echoed
    after = target.vector()
    accepted = 0
    for origin, (least, most) in bounds.items():
        have = after.get(origin, 0)
        assert least <= have <= most, (origin, least, have, most)
        assert target.logged_seqs(origin) == list(range(1, have + 1)), origin
        seqs = {e.seq for e in by_origin[origin] if isinstance(e, Change)}
        accepted += len([seq for seq in seqs if vector.get(origin, 0) < seq <= have])
        if any(_seqs(entry)[1] > have for entry in by_origin[origin]):
            assert result.gaps.get(origin) == have + 1, (origin, result.gaps, have)
        else:
            assert origin not in result.gaps, (origin, result.gaps)
    assert set(result.gaps) <= set(bounds)
    assert result.accepted == accepted, (result.accepted, accepted)
    assert result.duplicates <= len(records) - echoed - accepted
    if after == vector:
        assert target.state() == before, "a batch of duplicates changed the node"
    return result


def _admitted(have: int, entries: Iterable[Change | Skip]) -> int:
    """How far an origin's entries, taken in this order, carry its contiguous prefix."""
    for entry in entries:
        first, last = _seqs(entry)
        if first > have + 1:
            break
        have = max(have, last)
    return have


def _first_seq(entry: Change | Skip) -> int:
    return _seqs(entry)[0]


def _seqs(entry: Change | Skip) -> tuple[int, int]:
    if isinstance(entry, Skip):
        return entry.first_seq, entry.last_seq
    return entry.seq, entry.seq


def _recorded(c: conflicts.Conflict) -> Recorded:
    local, remote = _plain(c.local_row), _plain(c.remote_row)
    return Recorded(c.table, c.key, c.local_version, c.remote_version, local, remote, c.winner,
                    c.status)  # fmt: skip


def _plain(row: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return None if row is None else dict(row)


def typed(row: Mapping[str, Any] | None) -> dict[str, tuple[str, Any]] | None:
    """A row whose values compare with their types (``1 == 1.0`` but a REAL is not an INTEGER)."""
    if row is None:
        return None
    return {column: (type(value).__name__, value) for column, value in row.items()}
