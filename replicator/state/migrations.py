"""Versioned migrations for the application's own tables (not replicator's `_repl_*`).

    migrations = Migrations([
        Migration(1, "leases", up="CREATE TABLE leases (mac TEXT PRIMARY KEY, ip TEXT)",
                  down="DROP TABLE leases"),
        Migration(2, "lease hostnames", up="ALTER TABLE leases ADD COLUMN hostname TEXT",
                  down="ALTER TABLE leases DROP COLUMN hostname"),
    ])
    migrations.upgrade(conn)          # or upgrade(conn, to=1); downgrade(conn, to=0)

Each step runs in its own IMMEDIATE transaction with its record in ``app_migrations``, so a
step that fails leaves the database at the step before it, and two processes migrating at
once apply each step once. A database recorded at a version newer than the highest known here
is refused: code must not guess at a schema written by its future.

Schema changes are not replicated: every node's application runs the same migrations on its
own file (keep ``app_migrations`` out of ``replication.data``). Nodes compare the columns of
replicated tables when they connect, so a pair runs its links again once both have migrated;
a running node follows an ``ALTER TABLE`` of a replicated table by itself. Rows a step writes
into a replicated table are captured like any write, so make such steps idempotent.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from replicator.capture.migrations import split_statements
from replicator.capture.rows import quote_identifier
from replicator.errors import ReplicationError

__all__ = ["Migration", "MigrationError", "Migrations", "Step"]

Step = str | Callable[[sqlite3.Connection], None]
"""SQL statements (several, separated by ``;``), or a function given the connection inside
the step's transaction (it must not commit)."""


class MigrationError(ReplicationError):
    """The migrations cannot run: a newer database, an unknown target, a step without
    ``down``, or a step that failed (rolled back)."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    up: Step
    down: Step | None = None


class Migrations:
    """An ordered set of migrations, recorded in ``table`` of the database they run on."""

    def __init__(self, migrations: Iterable[Migration], *, table: str = "app_migrations") -> None:
        self.steps = sorted(migrations, key=lambda m: m.version)
        versions = [m.version for m in self.steps]
        if any(v < 1 for v in versions) or len(set(versions)) != len(versions):
            raise ValueError(f"migration versions must be distinct and from 1: {versions}")
        self.table = table
        self._table_sql = quote_identifier(table)

    @property
    def latest(self) -> int:
        return self.steps[-1].version if self.steps else 0

    def current(self, conn: sqlite3.Connection) -> int:
        """The version the database is at (0: none applied)."""
        exists = conn.execute(
            "SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?", (self.table,)
        ).fetchone()
        if exists is None:
            return 0
        (version,) = conn.execute(
            f"SELECT COALESCE(MAX(version), 0) FROM {self._table_sql}"
        ).fetchone()
        return int(version)

    def upgrade(self, conn: sqlite3.Connection, to: int | None = None) -> list[int]:
        """Apply the steps above the current version, up to ``to`` (default: all), in order.
        Returns the versions applied."""
        target = self.latest if to is None else to
        current = self._checked(conn)
        if target not in {0, *(m.version for m in self.steps)}:
            raise MigrationError(f"no migration {target} (known: up to {self.latest})")
        if target < current:
            raise MigrationError(
                f"the database is at {current}, above {target}: use downgrade to go back"
            )
        return [
            migration.version
            for migration in self.steps
            if current < migration.version <= target
            and self._step(conn, migration, migration.up, forward=True)
        ]

    def downgrade(self, conn: sqlite3.Connection, to: int) -> list[int]:
        """Undo the steps above ``to``, newest first. Returns the versions undone."""
        current = self._checked(conn)
        if to < 0 or to > current:
            raise MigrationError(f"cannot downgrade from {current} to {to}")
        undone = [m for m in reversed(self.steps) if to < m.version <= current]
        missing = [m.version for m in undone if m.down is None]
        if missing:
            raise MigrationError(f"migrations {missing} have no down step: nothing undone")
        return [
            migration.version
            for migration in undone
            if migration.down is not None
            and self._step(conn, migration, migration.down, forward=False)
        ]

    def _checked(self, conn: sqlite3.Connection) -> int:
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {self._table_sql} ("
            " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)"
        )
        current = self.current(conn)
        if current > self.latest:
            raise MigrationError(
                f"the database is at migration {current}, newer than the newest known here "
                f"({self.latest}): refusing to touch it; upgrade the application"
            )
        return current

    def _step(self, conn: sqlite3.Connection, migration: Migration, step: Step, *,
              forward: bool) -> bool:  # fmt: skip
        """One step and its record in one transaction; False if another process did it."""
        # Not `capture.transactions.write_transaction`: a failing COMMIT is the step's failure
        # (wrapped in MigrationError below) while a failing BEGIN is not, and the helper puts
        # both on the same side of the wrapping.
        conn.execute("BEGIN IMMEDIATE")
        try:
            now = self.current(conn)
            if (now >= migration.version) if forward else (now < migration.version):
                conn.execute("COMMIT")
                return False
            if callable(step):
                step(conn)
            else:
                for statement in split_statements(step):
                    conn.execute(statement)
            if not conn.in_transaction:
                raise MigrationError(f"migration {migration.version} committed on its own")
            if forward:
                conn.execute(
                    f"INSERT INTO {self._table_sql} (version, name, applied_at) VALUES (?, ?, ?)",
                    (migration.version, migration.name, int(time.time())),
                )
            else:
                conn.execute(
                    f"DELETE FROM {self._table_sql} WHERE version = ?", (migration.version,)
                )
            conn.execute("COMMIT")
        except BaseException as error:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(error, MigrationError) or not isinstance(error, Exception):
                raise
            direction = "up" if forward else "down"
            raise MigrationError(
                f"migration {migration.version} ({migration.name}) failed going {direction}, "
                f"rolled back: {error}"
            ) from error
        return True
