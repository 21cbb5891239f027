"""Applies what peers send: one batch, one transaction, the version order deciding every row.

Inside a single ``BEGIN IMMEDIATE`` transaction the applier

1. inserts the `_repl_applying` marker, so the capture triggers stay silent for our writes;
2. drops duplicates (at or below the version vector) and our own current incarnation's echoes,
   stops an origin at a gap (never skips it: the caller asks for a resend) or at a stamp too far
   in the future (`max_clock_offset`), and lets skip markers advance the vector;
3. decides each change against the row's current version with the table's strategy, keeping
   the greater, detecting and counting conflicts, queueing those the strategy wants reviewed;
4. writes each key's final winner once, the new row versions, every accepted entry to
   `_repl_log` (with its original origin and sequence, so chains and meshes can forward it), the
   advanced clock and the new vector, then removes the marker and commits.

Nothing a peer sends can stop the applier. A change for a table this node does not replicate
becomes a skip marker in the log: never stored, never forwarded. A malformed change (a key of
the wrong width, a row without its key columns or contradicting its key, an empty row) goes to
the quarantine and is logged as a skip marker, so no other node receives it either. A change
that is well formed but cannot be applied here (an unknown column, a constraint, any SQLite
error on that one row) goes to the quarantine with an alarm and is still forwarded: it may
apply elsewhere. Either way its sequence counts as received, so the stream goes on. The
quarantine holds at most `QUARANTINE_LIMIT` changes; past that they are counted and dropped.
"""

from __future__ import annotations

import json
import sqlite3
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from protocol import Change, Op, Origin, RowVersion, Skip
from protocol.checks import SqlValue
from replicator.apply import conflicts, quarantine
from replicator.apply.resolvers import Resolver, TimestampResolver
from replicator.capture import hlc
from replicator.capture.bookkeeping import (
    advance_clock,
    applied_progress,
    record_progress,
    reserve_log_positions,
)
from replicator.capture.rows import encode_row, key_sql, quote_identifier
from replicator.capture.sqlite_errors import is_locked, refusal
from replicator.capture.store import Store
from replicator.capture.tables import (
    OP_SKIP,
    TableInfo,
    inspect_table,
    resume_capture,
    suppress_capture,
)
from replicator.capture.transactions import write_transaction
from replicator.log import KEY_ORIGIN, KEY_SEQ, KEY_TABLE, get_logger

__all__ = [
    "QUARANTINE_LIMIT",
    "Applier",
    "ApplyResult",
    "delete_sql",
    "unless_row_error",
    "upsert_sql",
]

_log = get_logger("applier")
QUARANTINE_LIMIT = 10_000
_STATEMENTS_KEPT = 256  # write statements kept built, by table and shape of row


@dataclass(slots=True)
class ApplyResult:
    accepted: int = 0
    written: int = 0
    duplicates: int = 0
    own: int = 0
    conflicts: int = 0
    near_ties: int = 0
    queued: list[str] = field(default_factory=list)
    quarantined: int = 0
    gaps: dict[Origin, int] = field(default_factory=dict)
    """Per origin, the next sequence this node needs (everything before it is held)."""
    clock_refused: dict[Origin, int] = field(default_factory=dict)
    vector: dict[Origin, int] = field(default_factory=dict)
    held: dict[Origin, int] = field(default_factory=dict)
    """The whole version vector once this batch committed (read in its transaction)."""
    not_replicated: int = 0
    """Changes for tables this node does not replicate, logged as skip markers."""
    malformed: int = 0
    """Changes refused as malformed (quarantined, logged as skip markers)."""

    def add(self, other: ApplyResult) -> None:
        """Fold in the result of the next transaction of the same batch."""
        for name in ("accepted", "written", "duplicates", "own", "conflicts", "near_ties",
                     "quarantined", "not_replicated", "malformed"):  # fmt: skip
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.queued += other.queued
        for origin, wanted in other.gaps.items():
            self.gaps.setdefault(origin, wanted)
        for origin, seq in other.clock_refused.items():
            self.clock_refused.setdefault(origin, seq)
        self.vector.update(other.vector)
        self.held = other.held


@dataclass(slots=True)
class _Meta:
    version: RowVersion
    deleted: bool
    previous: RowVersion | None


@dataclass(slots=True)
class _Winner:
    change: Change
    info: TableInfo
    key: str
    position: int


class Applier:
    """Applies remote batches through its own `Store` (one thread at a time)."""

    def __init__(
        self,
        store: Store,
        resolvers: Mapping[str, Resolver] | None = None,
        default_resolver: Resolver | None = None,
        *,
        max_clock_offset_ms: int = 60_000,
        wall_clock_ms: Callable[[], int] = hlc.wall_clock_ms,
    ) -> None:
        self.store = store
        self.resolvers = dict(resolvers or {})
        self.default_resolver: Resolver = default_resolver or TimestampResolver()
        self.max_clock_offset_ms = max_clock_offset_ms
        self._wall_clock_ms = wall_clock_ms
        self._schema_version = store.schema_version()
        self.quarantine_limit = QUARANTINE_LIMIT
        self.quarantine_dropped = 0
        self._quarantine_room: int | None = None  # room left, counted once per apply
        self._statements: dict[tuple[Any, ...], str] = {}

    def resolver_for(self, table: str) -> Resolver:
        return self.resolvers.get(table, self.default_resolver)

    def apply(
        self, changes: Sequence[Change], skips: Sequence[Skip] = (), *, final: bool = True
    ) -> ApplyResult:
        """Apply one batch (or, with ``final=False``, a leading part of one: skip markers it
        does not reach yet are left for the next part instead of reported as gaps)."""
        store = self.store
        conn = store.conn
        result = ApplyResult()
        self._quarantine_room = None
        with write_transaction(store):
            self._follow_schema_changes()
            suppress_capture(conn)
            self._apply_locked(conn, changes, skips, result, final)
            resume_capture(conn)
            result.held = store.version_vector()
        for origin, wanted in result.gaps.items():
            _log.info("gap in a peer's stream: asking for a resend", **{KEY_ORIGIN: str(origin)},
                      **{KEY_SEQ: wanted})  # fmt: skip
        return result

    def _follow_schema_changes(self) -> None:
        """The application may have added a column since we looked: look again if so."""
        version = self.store.schema_version()
        if version != self._schema_version:
            self.store.tables = {
                name: inspect_table(self.store.conn, name) for name in self.store.settings.tables
            }
            self._schema_version = version

    # -----------------------------------------------------------------------------------------

    def _apply_locked(
        self,
        conn: sqlite3.Connection,
        changes: Sequence[Change],
        skips: Sequence[Skip],
        result: ApplyResult,
        final: bool = True,
    ) -> None:
        own = self.store.clock().origin
        origins = {change.origin for change in changes} | {skip.origin for skip in skips}
        origins.discard(own)
        progress = _load_progress(conn, origins)
        accepted, log_skips = self._admit(changes, skips, own, progress, result, final)
        if not accepted and not log_skips:
            return
        metas = _load_metas(conn, accepted)
        # Log positions come from the clock row's counter, like the triggers' (never reused).
        last = reserve_log_positions(conn, len(accepted) + len(log_skips))
        position = last - len(accepted) - len(log_skips)
        winners: dict[tuple[str, str], _Winner] = {}
        column_sets = {name: info.column_set for name, info in self.store.tables.items()}
        log_rows: list[tuple[Any, ...]] = []
        highest = 0
        for change, info, key in accepted:
            position += 1
            if info is None:  # not replicated here: a marker keeps the sequence whole
                result.not_replicated += 1
                log_rows.append(_skip_row(position, Skip(change.origin, change.seq, change.seq)))
                continue
            problem = _malformed(change, info)
            if problem is not None:
                result.malformed += 1
                self._quarantine(conn, change, key, problem, result)
                log_rows.append(_skip_row(position, Skip(change.origin, change.seq, change.seq)))
                continue
            highest = max(highest, change.version.hlc)
            log_rows.append(_log_row(position, change, key))
            if not _columns_known(change, column_sets[info.name]):
                self._quarantine(conn, change, key, "unknown column", result)
                continue
            if change.resolves is not None:
                conflicts.close_resolved(conn, change.resolves, f"resolved on {change.origin}")
            candidate = _Winner(change, info, key, position)
            if self._decide(conn, candidate, metas, winners, result):
                winners[change.table, key] = candidate
        for skip in log_skips:
            position += 1
            log_rows.append(_skip_row(position, skip))
        conn.executemany(_INSERT_LOG, log_rows)
        failed = self._write_rows(conn, winners, result)
        saved = [w.position for k, w in winners.items() if k not in failed]
        conn.execute(_SAVE_METAS, (json.dumps(saved),))
        record_progress(conn, [(o, seq) for o, seq in progress.items() if o in origins])
        if highest:
            advance_clock(conn, highest)
        result.vector = {o: progress[o] for o in origins if o in progress}

    def _admit(
        self,
        changes: Sequence[Change],
        skips: Sequence[Skip],
        own: Origin,
        progress: dict[Origin, int],
        result: ApplyResult,
        final: bool = True,
    ) -> tuple[list[tuple[Change, TableInfo | None, str]], list[Skip]]:
        """Filter the batch into what applies now, keeping the sender's order.

        The sender's order is its log order, which is causal: a write it made on top of an
        entry it had applied comes after that entry. Deciding in that order means a write is
        never mistaken for a conflict with the version it replaced. Skip markers fill their
        origin's sequence range when the stream reaches them.
        """
        waiting: dict[Origin, list[Skip]] = defaultdict(list)
        for skip in sorted(skips, key=_skip_start):
            waiting[skip.origin].append(skip)
        now_ms = self._wall_clock_ms()
        tables = self.store.tables
        accepted: list[tuple[Change, TableInfo | None, str]] = []
        log_skips: list[Skip] = []
        stopped: set[Origin] = set()
        for change in changes:
            origin = change.origin
            if origin == own:  # our own writes, echoed back by a peer
                result.own += 1
                continue
            if origin in stopped:
                continue
            if waiting:
                have = _take_skips(waiting, origin, progress, log_skips)
            else:  # no skip markers in the batch (the usual case)
                have = progress.setdefault(origin, 0)
            if change.seq <= have:
                result.duplicates += 1
                continue
            if change.seq > have + 1:
                result.gaps[origin] = have + 1
                stopped.add(origin)
                continue
            ahead = hlc.physical_ms(change.version.hlc) - now_ms
            if ahead > self.max_clock_offset_ms:
                result.clock_refused[origin] = change.seq
                stopped.add(origin)
                _log.error(
                    "refusing a change stamped too far in the future: check the clocks",
                    ahead_ms=ahead,
                    max_clock_offset_ms=self.max_clock_offset_ms,
                    **{KEY_ORIGIN: str(origin), KEY_SEQ: change.seq},
                )
                continue
            progress[origin] = change.seq
            accepted.append((change, tables.get(change.table), self.store.key(change.pk)))
        for origin, queue in waiting.items():
            if origin == own or origin in stopped:
                continue
            have = _take_skips(waiting, origin, progress, log_skips)
            if queue and final:  # a skip that starts beyond what we hold
                result.gaps[origin] = have + 1
        result.accepted = len(accepted)
        return accepted, log_skips

    def _decide(
        self,
        conn: sqlite3.Connection,
        candidate: _Winner,
        metas: dict[tuple[str, str], _Meta],
        pending: Mapping[tuple[str, str], _Winner],
        result: ApplyResult,
    ) -> bool:
        """Does the incoming version beat the current one? Detects conflicts on the way."""
        change, key = candidate.change, candidate.key
        resolver = self.resolver_for(change.table)
        incoming = change.version
        current = metas.get((change.table, key))
        if current is None:
            metas[change.table, key] = _Meta(incoming, change.op is Op.DELETE, change.replaced)
            return True
        order = resolver.order_key
        wins = order(incoming) > order(current.version)
        # A conflict: both sides wrote without knowing of the other. An incoming version that is
        # the direct predecessor of ours (it reached us late, by another path) is not one.
        if change.replaced != current.version and current.previous != incoming:
            earlier = pending.get((change.table, key))
            if earlier is not None:  # the current version arrived earlier in this batch
                local_row = earlier.change.row
            else:
                local_row = None if current.deleted else _current_row(conn, candidate)
            self._conflict(conn, change, key, current, local_row, wins, resolver, result)
        if wins:
            metas[change.table, key] = _Meta(incoming, change.op is Op.DELETE, change.replaced)
        return wins

    def _conflict(
        self,
        conn: sqlite3.Connection,
        change: Change,
        key: str,
        current: _Meta,
        local_row: Mapping[str, SqlValue] | None,
        wins: bool,
        resolver: Resolver,
        result: ApplyResult,
    ) -> None:
        result.conflicts += 1
        conflicts.count(conn, change.table, resolver.name, "concurrent")
        if isinstance(resolver, TimestampResolver) and resolver.is_near_tie(
            current.version, change.version
        ):
            result.near_ties += 1
            conflicts.count(conn, change.table, resolver.name, "near_tie")
        if (local_row is None and change.row is None) or local_row == change.row:
            return  # both sides wrote the same outcome: counted, nothing to review
        reason = resolver.review_reason(current.version, change.version)
        if reason is None:
            return
        ident = conflicts.record(
            conn,
            table=change.table,
            key=key,
            strategy=resolver.name,
            reason=reason,
            local=(current.version, encode_row(local_row)),
            remote=(change.version, encode_row(change.row)),
            winner="remote" if wins else "local",
        )
        result.queued.append(ident)
        _log.warning(
            "conflict queued for review",
            conflict=ident,
            reason=reason,
            **{KEY_TABLE: change.table, KEY_ORIGIN: str(change.origin), KEY_SEQ: change.seq},
        )

    def _write_rows(
        self,
        conn: sqlite3.Connection,
        winners: Mapping[tuple[str, str], _Winner],
        result: ApplyResult,
    ) -> set[tuple[str, str]]:
        """Write each key's final winner; returns the keys that failed (quarantined)."""
        groups: dict[tuple[str, Any], list[_Winner]] = defaultdict(list)
        for winner in winners.values():
            change = winner.change
            shape = None if change.row is None else tuple(change.row)
            groups[change.table, shape].append(winner)
        failed: set[tuple[str, str]] = set()
        for (_table, shape), members in groups.items():
            info = members[0].info
            sql = self._write_sql(info, shape)
            params = [_params(member, shape) for member in members]
            try:
                conn.executemany(sql, params)
            except sqlite3.Error as error:
                unless_row_error(conn, error)
                # Find the culprits one by one; rewriting the others is idempotent.
                for member, values in zip(members, params, strict=True):
                    try:
                        conn.execute(sql, values)
                    except sqlite3.Error as row_error:
                        unless_row_error(conn, row_error)
                        failed.add((member.change.table, member.key))
                        reason = f"{type(row_error).__name__}: {row_error}"
                        self._quarantine(conn, member.change, member.key, reason, result)
        result.written = len(winners) - len(failed)
        return failed

    def _write_sql(self, info: TableInfo, shape: tuple[str, ...] | None) -> str:
        """The statement writing rows of this shape (None: deletes), built once per shape."""
        cache_key = (info.name, info.columns, info.primary_key, shape)
        sql = self._statements.get(cache_key)
        if sql is None:
            if len(self._statements) >= _STATEMENTS_KEPT:
                self._statements.clear()  # shapes a peer invents cannot grow it without end
            sql = delete_sql(info) if shape is None else upsert_sql(info, shape)
            self._statements[cache_key] = sql
        return sql

    def _quarantine(
        self,
        conn: sqlite3.Connection,
        change: Change,
        key: str,
        reason: str,
        result: ApplyResult,
    ) -> None:
        result.quarantined += 1
        if self._quarantine_room is None:
            self._quarantine_room = self.quarantine_limit - quarantine.held(conn)
        if self._quarantine_room <= 0:
            self.quarantine_dropped += 1
            if self.quarantine_dropped == 1 or self.quarantine_dropped % 1000 == 0:
                _log.error("quarantine full: change dropped", reason=reason,
                           dropped=self.quarantine_dropped, limit=self.quarantine_limit,
                           **{KEY_TABLE: change.table, KEY_ORIGIN: str(change.origin),
                              KEY_SEQ: change.seq})  # fmt: skip
            return
        self._quarantine_room -= 1
        quarantine.record(conn, change, key, reason)
        _log.error(
            "change quarantined: it cannot be applied here",
            reason=reason,
            **{KEY_TABLE: change.table, KEY_ORIGIN: str(change.origin), KEY_SEQ: change.seq},
        )


def _skip_start(skip: Skip) -> int:
    return skip.first_seq


def _take_skips(
    waiting: dict[Origin, list[Skip]],
    origin: Origin,
    progress: dict[Origin, int],
    log_skips: list[Skip],
) -> int:
    """Apply the origin's skip markers that the stream has reached; returns what we hold."""
    have = progress.get(origin, 0)
    queue = waiting.get(origin)
    while queue and queue[0].first_seq <= have + 1:
        skip = queue.pop(0)
        if skip.last_seq > have:
            have = skip.last_seq
            log_skips.append(skip)
    progress[origin] = have
    return have


def _malformed(change: Change, info: TableInfo) -> str | None:
    """Why a change cannot be a change of this table whatever the row holds (None: it can)."""
    key = info.primary_key
    if len(change.pk) != len(key):
        return f"key has {len(change.pk)} values, {info.name}'s key has {len(key)} columns"
    row = change.row
    if row is None:
        return None  # a delete names its row by key alone
    if not row:
        return "empty row"
    for column, value in zip(key, change.pk, strict=True):
        if column not in row:
            return f"row lacks key column {column!r}"
        stored = row[column]
        if stored != value or type(stored) is not type(value):
            return f"row's {column!r} contradicts its key"
    return None


def unless_row_error(conn: sqlite3.Connection, error: sqlite3.Error) -> None:
    """Re-raise ``error`` unless it concerns the row alone: a disk that refuses writes, a
    busy database, or a transaction SQLite rolled back is the batch's problem, not the row's."""
    if not conn.in_transaction:
        raise error
    if isinstance(error, sqlite3.OperationalError) and (
        refusal(error) is not None or is_locked(error)
    ):
        raise error


def _columns_known(change: Change, columns: frozenset[str]) -> bool:
    row = change.row if change.row is not None else change.old
    return row is None or row.keys() <= columns


def _load_progress(conn: sqlite3.Connection, origins: Iterable[Origin]) -> dict[Origin, int]:
    wanted = set(origins)
    if not wanted:
        return {}
    return {origin: seq for origin, seq in applied_progress(conn).items() if origin in wanted}


def _load_metas(
    conn: sqlite3.Connection,
    accepted: Sequence[tuple[Change, TableInfo | None, str]],
) -> dict[tuple[str, str], _Meta]:
    keys: dict[str, set[str]] = defaultdict(set)
    for change, _info, key in accepted:
        keys[change.table].add(key)
    metas: dict[tuple[str, str], _Meta] = {}
    for table, table_keys in keys.items():
        for (
            key,
            stamp,
            node,
            inc,
            generation,
            deleted,
            p_hlc,
            p_node,
            p_inc,
            p_gen,
        ) in conn.execute(
            "SELECT pk, hlc, node, inc, generation, deleted, prev_hlc, prev_node, prev_inc,"
            " prev_gen FROM _repl_rowmeta"
            " WHERE tbl = ? AND pk IN (SELECT value FROM json_each(?))",
            (table, json.dumps(list(table_keys))),
        ):
            previous = None if p_hlc is None else RowVersion(p_hlc, Origin(p_node, p_inc), p_gen)
            metas[table, key] = _Meta(
                RowVersion(stamp, Origin(node, inc), generation), bool(deleted), previous
            )
    return metas


_INSERT_LOG = (
    "INSERT INTO _repl_log (seq, origin_node, origin_inc, origin_seq, op, tbl, pk, new_row,"
    " old_row, hlc, generation, prev_hlc, prev_node, prev_inc, prev_gen, first_seq, resolves)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# A winner's row version is copied from its log entry in one statement.
_SAVE_METAS = (
    "INSERT INTO _repl_rowmeta (tbl, pk, hlc, node, inc, generation, deleted, prev_hlc,"
    " prev_node, prev_inc, prev_gen, hash, seq)"
    " SELECT tbl, pk, hlc, origin_node, origin_inc, generation, op = 3, prev_hlc, prev_node,"
    " prev_inc, prev_gen, NULL, origin_seq"
    " FROM _repl_log WHERE seq IN (SELECT value FROM json_each(?))"
    " ON CONFLICT (tbl, pk) DO UPDATE SET hlc = excluded.hlc, node = excluded.node,"
    " inc = excluded.inc, generation = excluded.generation, deleted = excluded.deleted,"
    " prev_hlc = excluded.prev_hlc, prev_node = excluded.prev_node,"
    " prev_inc = excluded.prev_inc, prev_gen = excluded.prev_gen, hash = NULL,"
    " seq = excluded.seq"
)


def _log_row(position: int, change: Change, key: str) -> tuple[Any, ...]:
    v, p = change.version, change.replaced
    return (
        position,
        change.origin.node_id,
        change.origin.incarnation,
        change.seq,
        int(change.op),
        change.table,
        key,
        encode_row(change.row),
        encode_row(change.old),
        v.hlc,
        v.generation,
        None if p is None else p.hlc,
        None if p is None else p.origin.node_id,
        None if p is None else p.origin.incarnation,
        None if p is None else p.generation,
        None,
        change.resolves,
    )


def _skip_row(position: int, skip: Skip) -> tuple[Any, ...]:
    origin = skip.origin
    return (position, origin.node_id, origin.incarnation, skip.last_seq, OP_SKIP, None, None,
            None, None, 0, None, None, None, None, None, skip.first_seq, None)  # fmt: skip


def _current_row(conn: sqlite3.Connection, target: _Winner) -> dict[str, SqlValue] | None:
    """The row as stored now, under the key of ``target``."""
    info, key = target.info, target.key
    names = ", ".join(quote_identifier(c) for c in info.columns)
    key_expr = key_sql(None, info.primary_key)
    row = conn.execute(
        f"SELECT {names} FROM {quote_identifier(info.name)} WHERE {key_expr} = ?",
        (key,),
    ).fetchone()
    return None if row is None else dict(zip(info.columns, row, strict=True))


def upsert_sql(info: TableInfo, columns: tuple[str, ...]) -> str:
    names = ", ".join(quote_identifier(c) for c in columns)
    marks = ", ".join("?" for _ in columns)
    keys = ", ".join(quote_identifier(c) for c in info.primary_key)
    others = [c for c in columns if c not in info.primary_key]
    action = (
        "DO UPDATE SET " + ", ".join(f"{quote_identifier(c)} = excluded.{quote_identifier(c)}"
                                     for c in others)
        if others
        else "DO NOTHING"
    )  # fmt: skip
    return (
        f"INSERT INTO {quote_identifier(info.name)} ({names}) VALUES ({marks})"
        f" ON CONFLICT ({keys}) {action}"
    )


def delete_sql(info: TableInfo) -> str:
    where = " AND ".join(f"{quote_identifier(c)} IS ?" for c in info.primary_key)
    return f"DELETE FROM {quote_identifier(info.name)} WHERE {where}"


def _params(winner: _Winner, shape: tuple[str, ...] | None) -> Sequence[SqlValue]:
    change = winner.change
    if shape is None:
        return change.pk
    assert change.row is not None
    return [change.row[column] for column in shape]
