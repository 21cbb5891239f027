"""The application's SQLite state database, as replication sees it.

`Store.open` prepares the file once at start: pragmas, the `_repl_*` schema (migrated forward),
the clock row that names this node and its incarnation, and the capture triggers of every
replicated table. Then each worker thread opens its own `Store` on the prepared file
(``prepare=False``): a connection belongs to one thread at a time, and every call here is a
short transaction, so the application's own writers never wait long.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from protocol import Change, Op, Origin, RowVersion, Skip
from replicator.capture import hlc
from replicator.capture.bookkeeping import (
    ClockState,
    applied_progress,
    raise_progress,
    read_clock,
)
from replicator.capture.migrations import migrate
from replicator.capture.rows import decode_row, key_sql, pk_key, quote_identifier
from replicator.capture.sealing import SEALED_END_SQL, seal_pending, unsealed
from replicator.capture.sqlite_errors import is_locked
from replicator.capture.tables import (
    OP_SKIP,
    SIZE_LIMIT_TRIGGER,
    TRIGGER_PREFIX,
    TableInfo,
    inspect_table,
    size_limit_statement,
    trigger_statements,
)
from replicator.capture.transactions import write_transaction
from replicator.errors import SchemaError
from replicator.log import KEY_TABLE, get_logger

__all__ = ["ClockState", "LogRecord", "Store", "StoreSettings", "connect", "create_private"]

_log = get_logger("store")
LOCK_RETRY = 0.0005
"""Seconds between a write transaction's tries for the lock (see `Store.begin_immediate`)."""
SEAL_CHUNK = 20_000
"""Log positions stamped per write transaction by `Store.seal`."""
_ALLOWED_PRAGMAS = frozenset(
    {"journal_mode", "synchronous", "cache_size", "temp_store", "mmap_size", "wal_autocheckpoint"}
)


@dataclass(frozen=True, slots=True)
class StoreSettings:
    path: str
    node_id: str
    tables: tuple[str, ...]
    pragmas: Mapping[str, str | int] = field(
        default_factory=lambda: {"journal_mode": "WAL", "synchronous": "NORMAL"}
    )
    busy_timeout_ms: int = 5000
    schema_sql: str | None = None


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One `_repl_log` entry: a change or a skip marker, at its local log position. ``size``
    is the stored size of its rows: about what they take in a message (senders cut batches
    by it)."""

    position: int
    entry: Change | Skip
    size: int = 0


def create_private(path: str) -> None:
    """Create the database file mode 0640 before SQLite does: its ``-wal`` and ``-shm`` take
    the file's mode, and the state is nobody else's to read. An existing file is left as the
    application made it."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o640)
    except OSError:  # it exists (or cannot be made: SQLite says why when it opens it)
        return
    try:
        os.fchmod(fd, 0o640)  # whatever the umask
    finally:
        os.close(fd)


def connect(settings: StoreSettings) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), pragmas applied."""
    create_private(settings.path)
    try:
        conn = sqlite3.connect(settings.path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(settings.busy_timeout_ms)}")
        # Stamping and merges stage batches of bounded size in TEMP tables: in memory they
        # cost a third less than in a temporary file (state.pragmas may say otherwise).
        conn.execute("PRAGMA temp_store = MEMORY")
    except sqlite3.Error as error:
        raise SchemaError(
            f"cannot open the state database {settings.path}: {error}",
            op="connect",
            hint="check state.path and that its directory exists and is writable",
        ) from None
    for name, value in settings.pragmas.items():
        if name not in _ALLOWED_PRAGMAS:
            raise SchemaError(f"unsupported database setting {name!r}", op="connect")
        conn.execute(f"PRAGMA {name} = {_pragma_value(value)}")
    return conn


def _pragma_value(value: str | int) -> str:
    if isinstance(value, int):
        return str(value)
    if not value.replace("_", "").isalnum():
        raise SchemaError(f"invalid database setting value {value!r}", op="connect")
    return value


class Store:
    """One connection to the state database; use it from one thread at a time."""

    def __init__(
        self, conn: sqlite3.Connection, settings: StoreSettings, tables: dict[str, TableInfo]
    ) -> None:
        self.conn = conn
        self.settings = settings
        self.tables = tables
        self.origin = self.clock().origin
        # Told how long each write transaction held the lock (the node's pacer listens).
        self.hold_observer: Callable[[float], None] | None = None
        # Told when another connection committed between two write transactions of this one
        # (the pacer rests longer while the application writes).
        self.others_observer: Callable[[], None] | None = None
        self.last_hold = 0.0  # seconds the last write transaction held the lock
        self._began = 0.0
        self._seen_version: int | None = None

    @classmethod
    def open(cls, settings: StoreSettings, *, prepare: bool = True) -> Store:
        conn = connect(settings)
        try:
            if prepare:
                migrate(conn)
                _apply_application_schema(conn, settings)
                _init_clock(conn, settings.node_id)
                tables, _ = install_triggers(conn, settings.tables)
                _warn_about_auto_keys(tables.values())
            else:
                tables = {name: inspect_table(conn, name) for name in settings.tables}
            store = cls(conn, settings, tables)
            if prepare:
                store.seal()  # what the application wrote while the node was down
            return store
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        self.conn.close()

    # -- transactions ----------------------------------------------------------------------

    def begin_immediate(self) -> None:
        """BEGIN IMMEDIATE, waiting for the lock up to the connection's busy timeout by trying
        again every `LOCK_RETRY` seconds. SQLite's own busy handler sleeps longer and longer
        (up to 100 ms a try), so against an application committing thousands of times a
        second the node's short transactions (stamping, applying) would find the lock taken
        at each try and fall ever further behind; the node's own writes are bounded by the
        application's (stamping) or spaced by the pacer (applying), so trying often takes
        nothing from the application."""
        (timeout_ms,) = self.conn.execute("PRAGMA busy_timeout").fetchone()
        if not timeout_ms:  # on the event loop: fail at once if taken
            self.conn.execute("BEGIN IMMEDIATE")
        else:
            self._begin_trying(int(timeout_ms) / 1000)
        self._began = time.perf_counter()
        if self.others_observer is not None:
            # data_version moves only for other connections' commits.
            version = self.data_version()
            if self._seen_version is not None and version != self._seen_version:
                self.others_observer()
            self._seen_version = version

    def _begin_trying(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self.conn.execute("PRAGMA busy_timeout = 0")
        try:
            while True:
                try:
                    self.conn.execute("BEGIN IMMEDIATE")
                    return
                except sqlite3.OperationalError as error:
                    if not is_locked(error) or time.monotonic() >= deadline:
                        raise
                time.sleep(LOCK_RETRY)
        finally:
            with contextlib.suppress(sqlite3.Error):  # never hide why BEGIN failed
                self.conn.execute(f"PRAGMA busy_timeout = {round(timeout * 1000)}")

    def commit(self) -> None:
        self.conn.execute("COMMIT")
        self._held()

    def rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")
            self._held()

    def _held(self) -> None:
        if self._began:
            self.last_hold = time.perf_counter() - self._began
            if self.hold_observer is not None:
                self.hold_observer(self.last_hold)
        self._began = 0.0

    # -- reading ---------------------------------------------------------------------------

    def clock(self) -> ClockState:
        return read_clock(self.conn)

    def version_vector(self) -> dict[Origin, int]:
        """What this node holds: applied progress per origin, plus its own captures."""
        vector = applied_progress(self.conn)
        clock = self.clock()
        if clock.local_seq:
            vector[clock.origin] = clock.local_seq
        return vector

    def data_version(self) -> int:
        """Changes whenever another connection commits (cheap to poll)."""
        return int(self.conn.execute("PRAGMA data_version").fetchone()[0])

    def schema_version(self) -> int:
        return int(self.conn.execute("PRAGMA schema_version").fetchone()[0])

    def log_position(self) -> int:
        """The last stamped position: senders read through it, never past."""
        row = self.conn.execute(f"SELECT {SEALED_END_SQL}").fetchone()
        return int(row[0] or 0)

    def unsealed(self) -> tuple[int, int]:
        """(last stamped position, last logged position)."""
        return unsealed(self.conn)

    def seal(self, through: int | None = None) -> int:
        """Stamp what the triggers logged since the last call (up to ``through``); returns
        how many entries. Short write transactions of at most `SEAL_CHUNK` positions each
        (none when nothing waits), so a huge application transaction does not make the node
        hold the write lock long."""
        sealed, end = unsealed(self.conn)
        if through is not None:
            end = min(end, through)
        count = 0
        while sealed < end:
            with write_transaction(self):
                count += seal_pending(self.conn, min(end, sealed + SEAL_CHUNK))
            sealed = self.log_position()
        return count

    def read_log(
        self,
        after: int,
        limit: int,
        *,
        skip_origin: Origin | None = None,
        through: int | None = None,
    ) -> list[LogRecord]:
        """Entries after a position (up to ``through``, by default the last stamped one);
        ``skip_origin``'s are left out before any decoding (a peer never needs its own
        writes back)."""
        columns = (
            "SELECT seq, origin_node, origin_inc, origin_seq, op, tbl, pk, new_row, old_row,"
            " hlc, generation, prev_hlc, prev_node, prev_inc, prev_gen, first_seq, resolves"
            " FROM _repl_log WHERE seq > ? AND seq <= ?"
        )
        end = self.log_position() if through is None else through
        if skip_origin is None:
            rows = self.conn.execute(f"{columns} ORDER BY seq LIMIT ?", (after, end, limit))
        else:
            rows = self.conn.execute(
                f"{columns} AND NOT (origin_node = ? AND origin_inc = ?) ORDER BY seq LIMIT ?",
                (after, end, skip_origin.node_id, skip_origin.incarnation, limit),
            )
        origins: dict[tuple[str, int], Origin] = {}  # one object per origin in a batch
        return [self._record(row, origins) for row in rows.fetchall()]

    def _record(self, row: Sequence[Any], origins: dict[tuple[str, int], Origin]) -> LogRecord:
        (position, node, inc, origin_seq, op, table, key, new_row, old_row, stamp, generation,
         prev_hlc, prev_node, prev_inc, prev_gen, first_seq, resolves) = row  # fmt: skip
        origin = _interned(origins, node, inc)
        if op == OP_SKIP:
            return LogRecord(position, Skip(origin, first_seq, origin_seq))
        new = decode_row(new_row)
        old = decode_row(old_row)
        size = _stored_size(new_row) + _stored_size(old_row)
        info = self.tables.get(table)
        source = new if new is not None else old
        if info is not None and source is not None:
            pk = tuple(source[column] for column in info.primary_key)
        else:  # a table not replicated here: peers that replicate it know its key columns
            pk = (key,)
        return LogRecord(
            position,
            Change(
                origin=origin,
                seq=origin_seq,
                table=table,
                op=Op(op),
                pk=pk,
                row=new,
                old=old,
                version=RowVersion(stamp, origin, generation),
                replaced=None
                if prev_hlc is None
                else RowVersion(prev_hlc, _interned(origins, prev_node, prev_inc), prev_gen),
                resolves=resolves,
            ),
            size,
        )

    def log_floor(self) -> dict[Origin, int]:
        return {
            Origin(node, inc): seq
            for node, inc, seq in self.conn.execute(
                "SELECT origin_node, origin_inc, seq FROM _repl_log_floor"
            )
        }

    def row_version(self, table: str, pk: Sequence[Any]) -> tuple[RowVersion, bool] | None:
        """The current version of a row and whether it is deleted (None: never seen)."""
        row = self.conn.execute(
            "SELECT hlc, node, inc, generation, deleted FROM _repl_rowmeta"
            " WHERE tbl = ? AND pk = ?",
            (table, self.key(pk)),
        ).fetchone()
        if row is None:
            return None
        stamp, node, inc, generation, deleted = row
        return RowVersion(stamp, Origin(node, inc), generation), bool(deleted)

    def key(self, pk: Sequence[Any]) -> str:
        return pk_key(pk, self.quote_real)

    def quote_real(self, value: float) -> str:
        return str(self.conn.execute("SELECT quote(?)", (value,)).fetchone()[0])

    # -- node state ------------------------------------------------------------------------

    def set_read_only(self, read_only: bool, *, promoted: bool = False) -> None:
        """Replica mode: triggers refuse local writes. Promotion is recorded and survives."""
        self.conn.execute(
            "UPDATE _repl_clock SET read_only = ?, promoted = promoted OR ? WHERE id = 1",
            (int(read_only), int(promoted)),
        )

    def start_new_incarnation(self) -> Origin:
        """A new origin for this node (after a restore or a recovery): sequences restart at 1
        under an incarnation no peer has seen, so none is ever reused."""
        with write_transaction(self):
            seal_pending(self.conn)  # the old incarnation's captures keep its sequences
            clock = self.clock()
            incarnation = max(clock.origin.incarnation + 1, hlc.wall_clock_ms())
            self.conn.execute(
                "UPDATE _repl_clock SET incarnation = ?, local_seq = 0 WHERE id = 1",
                (incarnation,),
            )
            # The old incarnation becomes an origin like any other: what this file still
            # holds of it counts as received, and peers can send back the rest of its past.
            if clock.local_seq:
                raise_progress(self.conn, clock.origin, clock.local_seq)
        self.origin = Origin(clock.origin.node_id, incarnation)
        return self.origin

    def refresh_triggers(self, recapture_after: int | None = None) -> tuple[list[str], int]:
        """Regenerate triggers after the application altered a replicated table.

        Writes that landed between the ALTER and now were captured by the old triggers,
        without the new columns. Each such row is captured again, whole, by a no-op UPDATE
        through the new triggers (in the same transaction, so no write slips between).
        Returns the tables whose triggers changed, and the schema version they match (read
        inside the transaction, so an ALTER committed right after it is noticed next time).
        """
        with write_transaction(self):
            self.tables, changed = install_triggers(
                self.conn, self.settings.tables, in_transaction=True
            )
            if recapture_after is not None:
                for name in changed:
                    self._recapture(self.tables[name], recapture_after)
            version = self.schema_version()
        return changed, version

    def _recapture(self, info: TableInfo, after: int) -> None:
        keys = [
            key
            for (key, new_row) in self.conn.execute(
                "SELECT pk, new_row FROM _repl_log WHERE seq > ? AND tbl = ? AND op IN (1, 2)",
                (after, info.name),
            )
            if set(decode_row(new_row) or ()) != set(info.columns)
        ]
        if not keys:
            return
        target = quote_identifier(info.name)
        column = quote_identifier(info.columns[0])
        key_expr = key_sql(None, info.primary_key)
        self.conn.executemany(
            f"UPDATE {target} SET {column} = {column} WHERE {key_expr} = ?",
            [(key,) for key in dict.fromkeys(keys)],
        )
        _log.info("recaptured rows written during a schema change", table=info.name, rows=len(keys))


def _interned(origins: dict[tuple[str, int], Origin], node: str, inc: int) -> Origin:
    origin = origins.get((node, inc))
    if origin is None:
        origin = origins[node, inc] = Origin(node, inc)
    return origin


def _stored_size(stored: str | bytes | None) -> int:
    if stored is None:
        return 0
    if isinstance(stored, str) and not stored.isascii():
        return len(stored.encode())
    return len(stored)


def _apply_application_schema(conn: sqlite3.Connection, settings: StoreSettings) -> None:
    if settings.schema_sql is None:
        return
    present = {name for (name,) in conn.execute("SELECT name FROM sqlite_schema")}
    if all(table in present for table in settings.tables):
        return
    conn.executescript(settings.schema_sql)


def _init_clock(conn: sqlite3.Connection, node_id: str) -> None:
    with write_transaction(conn):
        row = conn.execute("SELECT node_id FROM _repl_clock WHERE id = 1").fetchone()
        if row is None:
            now = hlc.wall_clock_ms()
            # A fresh database is a new incarnation: a node whose file was re-created must
            # not reuse the origin sequences its earlier life already sent.
            conn.execute(
                "INSERT INTO _repl_clock (id, node_id, incarnation, hlc, local_seq)"
                " VALUES (1, ?, ?, ?, 0)",
                (node_id, now, hlc.pack(now)),
            )
        elif row[0] != node_id:
            raise SchemaError(
                f"the state database belongs to node {row[0]!r}, not {node_id!r}",
                op="open",
                hint="check replication.node_id and state.path",
            )


def _warn_about_auto_keys(tables: Iterable[TableInfo]) -> None:
    for info in tables:
        if info.auto_integer_key:
            _log.warning(
                "table key is an auto-assigned integer: two nodes inserting at once will "
                "collide on it; prefer keys unique across nodes (natural keys, UUIDs)",
                **{KEY_TABLE: info.name},
            )


def install_triggers(
    conn: sqlite3.Connection, names: Iterable[str], *, in_transaction: bool = False
) -> tuple[dict[str, TableInfo], list[str]]:
    """Make the capture triggers match the configured tables as they are now.

    Returns the tables and the names of those whose triggers had to be (re)created.
    """
    # Inside the caller's transaction (`Store.refresh_triggers`), or in one of its own.
    with contextlib.nullcontext() if in_transaction else write_transaction(conn):
        tables = {name: inspect_table(conn, name) for name in names}
        existing = {
            name: sql
            for name, sql in conn.execute(
                "SELECT name, sql FROM sqlite_schema WHERE type = 'trigger'"
            )
            if name.startswith(TRIGGER_PREFIX)
        }
        wanted = {name: trigger_statements(info) for name, info in tables.items()}
        every = {
            trigger: sql for statements in wanted.values() for trigger, sql in statements.items()
        }
        every[SIZE_LIMIT_TRIGGER] = size_limit_statement()
        for trigger, sql in existing.items():
            if every.get(trigger) != sql:
                conn.execute(f"DROP TRIGGER {quote_identifier(trigger)}")
        changed = []
        for table, statements in wanted.items():
            stale = [sql for trigger, sql in statements.items() if existing.get(trigger) != sql]
            for sql in stale:
                conn.execute(sql)
            if stale:
                changed.append(table)
        if existing.get(SIZE_LIMIT_TRIGGER) != every[SIZE_LIMIT_TRIGGER]:
            conn.execute(every[SIZE_LIMIT_TRIGGER])
    return tables, changed
