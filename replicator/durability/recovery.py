"""Integrity of the state database, and recovery when it fails at start.

A file that fails ``PRAGMA integrity_check`` or replicator's own invariants is not served
(replicating it would spread the damage). With ``state.recovery.auto_recover`` the newest
backups that verify are written into it in turn; with none left (or none configured), the file
is emptied down to its schema and a full resync from a peer refills it. Every restored or
emptied file starts a new incarnation, so no origin sequence is ever reused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from protocol import Origin
from replicator.capture.bookkeeping import last_logged, logged_against_progress
from replicator.capture.sqlite_errors import is_locked, refusal
from replicator.capture.store import Store, StoreSettings
from replicator.capture.tables import TRIGGER_PREFIX
from replicator.config import StateRecoveryConfig
from replicator.durability.backup import BackupCorrupt, BackupError, BackupStore
from replicator.errors import ReplicationError, SchemaError
from replicator.log import get_logger

__all__ = [
    "RecoveryReport",
    "StateInUse",
    "StateRefusesWrites",
    "open_state",
    "refuse_if_in_use",
    "restore_backup",
    "validate_state",
]

_log = get_logger("recovery")


class StateRefusesWrites(ReplicationError):
    """The disk under the state database refuses writes (full, I/O errors): the file is not
    damaged, and nothing may be recovered over it."""


class StateInUse(ReplicationError):
    """Another connection (the application's) held the state database's write lock for longer
    than the busy timeout: the file is fine, and must be left alone."""


def validate_state(store: Store) -> dict[str, Any]:
    """``PRAGMA integrity_check`` and replicator's own invariants, as a list of problems."""
    conn = store.conn
    started = time.time()
    integrity = [row[0] for row in conn.execute("PRAGMA integrity_check")]
    problems = [] if integrity == ["ok"] else [f"integrity_check: {line}" for line in integrity]
    triggers = {
        name for (name,) in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'trigger'")
    }
    for table in sorted(store.tables):
        if not any(name.startswith(f"{TRIGGER_PREFIX}") and table in name for name in triggers):
            problems.append(f"table {table}: capture triggers missing")
    clock = store.clock()
    logged_own = last_logged(conn, clock.origin)
    if logged_own is not None and logged_own > clock.local_seq:
        problems.append(
            f"log holds {clock.origin}:{logged_own} beyond the clock's {clock.local_seq}"
        )
    for node, inc, held, logged in logged_against_progress(conn):
        if logged > held:
            problems.append(f"log holds {node}#{inc}:{logged} beyond the vector's {held}")
    return {
        "ok": not problems,
        "integrity_check": "ok" if integrity == ["ok"] else "failed",
        "problems": problems,
        "checked_at": started,
        "seconds": round(time.time() - started, 3),
    }


@dataclass(slots=True)
class RecoveryReport:
    """What recovery at start found and did, for `state status` and the log."""

    problem: str
    started_at: float = field(default_factory=time.time)
    steps: list[dict[str, Any]] = field(default_factory=list)
    outcome: str = "in progress"
    restored_from: str | None = None
    needs_full_resync: bool = False
    kept_copy: str | None = None

    def step(self, what: str, **details: Any) -> None:
        self.steps.append({"at": time.time(), "step": what, **details})
        _log.warning(what, **details)

    def as_dict(self) -> dict[str, Any]:
        return {
            "problem": self.problem,
            "started_at": self.started_at,
            "outcome": self.outcome,
            "restored_from": self.restored_from,
            "needs_full_resync": self.needs_full_resync,
            "kept_copy": self.kept_copy,
            "steps": list(self.steps),
        }


def open_state(
    settings: StoreSettings,
    recovery: StateRecoveryConfig,
    backups: BackupStore | None,
    check: Callable[[Store], None] = lambda store: None,
    *,
    has_peers: bool = True,
) -> tuple[Store, dict[str, Any] | None, RecoveryReport | None]:
    """Open (and prepare) the state database, validated when ``validate_on_start``; recover
    it when that fails and ``auto_recover`` allows. Returns the store, the last validation and
    the recovery report (None when none was needed)."""
    problem, store, validation = _open_and_validate(settings, recovery.validate_on_start)
    if store is not None:
        check(store)
        return store, validation, None
    assert problem is not None
    if not recovery.auto_recover:
        raise SchemaError(
            f"{settings.path} failed validation at start: {problem}",
            op="validate_on_start",
            hint="restore a backup ('replicator backup restore NAME' needs a running node: "
            "set state.recovery.auto_recover = true to restore the newest good one at start)",
        )
    report = RecoveryReport(problem=problem)
    _log.error("state database failed validation at start: recovering", path=settings.path,
               problem=problem)  # fmt: skip
    report.kept_copy = _keep_a_copy(settings.path)
    report.step("damaged file copied aside", copy=report.kept_copy)
    store, validation = _recover(settings, recovery, backups, report, has_peers)
    check(store)
    return store, validation, report


def _open_and_validate(
    settings: StoreSettings, validate: bool
) -> tuple[str | None, Store | None, dict[str, Any] | None]:
    try:
        store = Store.open(settings)
    except sqlite3.DatabaseError as error:  # not a database, malformed schema pages...
        _refuses_writes(settings.path, error)
        refuse_if_in_use(settings.path, error)
        return f"cannot open: {error}", None, None
    if not validate:
        return None, store, None
    try:
        validation = validate_state(store)
    except sqlite3.DatabaseError as error:
        store.close()
        _refuses_writes(settings.path, error)
        refuse_if_in_use(settings.path, error)
        return f"validation stopped: {error}", None, None
    if validation["ok"]:
        _log.info("state database validated", seconds=validation["seconds"])
        return None, store, validation
    store.close()
    return "; ".join(validation["problems"][:5]), None, validation


def _refuses_writes(path: str, error: sqlite3.DatabaseError) -> None:
    """A file that cannot be opened because the disk refuses writes (a WAL index that cannot
    grow, say) is not damaged: copying it aside and restoring over it would only fill the disk
    further or throw its contents away."""
    refused = refusal(error)
    if refused is not None:
        raise StateRefusesWrites(
            f"{path}: the disk refuses writes ({refused}); the file is left untouched",
            op="open",
            hint="free space on its filesystem (or mend the disk), then start the node again",
        ) from error


def refuse_if_in_use(path: str, error: sqlite3.DatabaseError) -> None:
    """A file whose lock the application holds (a long migration, a bulk import) is busy, not
    damaged: taking it for damage would copy it aside and empty it under the application."""
    if is_locked(error):
        raise StateInUse(
            f"{path}: another connection holds its write lock ({error}); the file is left "
            "untouched",
            op="open",
            hint="the application's transaction must end before the node can prepare the file",
        ) from error


def _recover(
    settings: StoreSettings,
    recovery: StateRecoveryConfig,
    backups: BackupStore | None,
    report: RecoveryReport,
    has_peers: bool,
) -> tuple[Store, dict[str, Any]]:
    deadline = time.monotonic() + recovery.recovery_timeout
    if backups is None:
        report.step("no backups configured (state.backup)")
    else:
        attempts = 0
        for info in backups.list():
            if attempts >= recovery.max_recovery_attempts:
                report.step("max_recovery_attempts reached", attempts=attempts)
                break
            if time.monotonic() > deadline:
                report.step("recovery_timeout reached", attempts=attempts)
                break
            attempts += 1
            report.step("restoring backup", backup=info.name, attempt=attempts)
            try:
                _write_backup_into(settings.path, settings, backups, info.name)
                problem, store, validation = _open_and_validate(settings, validate=True)
            except (BackupError, sqlite3.DatabaseError, OSError) as error:
                report.step("backup refused", backup=info.name, error=str(error))
                continue
            if store is None:
                report.step("restored backup fails validation", backup=info.name, error=problem)
                continue
            origin = store.origin
            report.restored_from = info.name
            report.outcome = f"restored from backup {info.name}; catching up from peers"
            report.step("backup restored: catching up from peers", backup=info.name,
                        origin=str(origin))  # fmt: skip
            assert validation is not None
            return store, validation
        else:
            if attempts == 0:
                report.step("no backup to restore")
    if not has_peers:
        report.outcome = "failed: no good backup and no peer to resync from"
        raise SchemaError(
            f"{settings.path} failed validation at start and cannot be recovered: {report.problem}",
            op="recover",
            hint="no good backup and no peer to refill it from: the file is left as it is "
            "(state.recovery.validate_on_start = false starts on it anyway)",
        )
    schema = settings.schema_sql or _salvage_schema(settings.path)
    if schema is None:
        report.outcome = "failed: no good backup and no schema to start again from"
        raise SchemaError(
            f"{settings.path} failed validation at start and cannot be recovered: {report.problem}",
            op="recover",
            hint="set state.schema so an empty file can be refilled from a peer, or restore "
            "a copy by hand",
        )
    report.step("emptying the state database down to its schema: a full resync from a peer "
                "refills it")  # fmt: skip
    _write_empty_into(settings.path, schema)
    store = Store.open(settings)  # a fresh clock row: a new incarnation
    report.needs_full_resync = True
    report.outcome = "emptied to its schema; a full resync from a peer refills it"
    return store, validate_state(store)


def restore_backup(
    backups: BackupStore, name: str, settings: StoreSettings, live: sqlite3.Connection
) -> Origin:
    """Write backup ``name`` into the live database through ``live``, as a new incarnation.

    The backup is verified, decrypted, validated and given its new incarnation in a temporary
    copy first, so the live file is untouched by a bad backup and no write can slip in under
    the old incarnation; the copy then goes in through SQLite's backup API (applications keep
    the file open: renaming another file into place would leave them writing to the old one).
    """
    with backups.opened(name) as copy_path:
        copy = Store.open(dataclasses.replace(settings, path=copy_path), prepare=False)
        try:
            validation = validate_state(copy)
            if not validation["ok"]:
                raise BackupCorrupt(
                    f"backup {name} fails validation: {'; '.join(validation['problems'][:3])}",
                    op="restore",
                )
            origin = copy.start_new_incarnation()
        finally:
            copy.close()
        with contextlib.closing(sqlite3.connect(copy_path)) as source:
            source.backup(live)
    return origin


def _write_backup_into(path: str, settings: StoreSettings, backups: BackupStore, name: str) -> None:
    _into_live(path, lambda live: restore_backup(backups, name, settings, live))


def _write_empty_into(path: str, schema: str) -> None:
    with contextlib.closing(sqlite3.connect(":memory:")) as empty:
        empty.executescript(schema)
        _into_live(path, empty.backup)


def _into_live(path: str, write: Callable[[sqlite3.Connection], object]) -> None:
    """``write`` into the live file through a connection to it; a file too broken for SQLite
    to write into is cleared first."""
    try:
        with contextlib.closing(sqlite3.connect(path)) as conn:
            write(conn)
    except sqlite3.DatabaseError:
        _clear(path)
        with contextlib.closing(sqlite3.connect(path)) as conn:
            write(conn)


def _keep_a_copy(path: str) -> str:
    """The damaged file (and its WAL) copied aside before anything is written into it: what
    recovery replaces stays available to whoever investigates."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    copy = f"{path}.damaged-{stamp}"
    for suffix in ("", "-wal"):
        with contextlib.suppress(FileNotFoundError):
            shutil.copyfile(path + suffix, copy + suffix)
    return copy


def _clear(path: str) -> None:
    """Last resort for a file SQLite cannot even lock: start from zero bytes."""
    _log.warning("state database unreadable by SQLite: truncating it", path=path)
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + suffix)
    with open(path, "r+b") as file:
        file.truncate(0)


def _salvage_schema(path: str) -> str | None:
    """The application's own schema, read from the damaged file when state.schema is unset."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            rows = conn.execute(
                "SELECT sql FROM sqlite_schema WHERE sql IS NOT NULL"
                " AND name NOT LIKE 'sqlite%' AND substr(name, 1, 6) != '_repl_'"
                " ORDER BY CASE type WHEN 'table' THEN 0 WHEN 'index' THEN 1 ELSE 2 END"
            ).fetchall()  # replicator's own tables and capture triggers are all _repl_*
    except sqlite3.DatabaseError:
        return None
    if not rows:
        return None
    return ";\n".join(sql for (sql,) in rows) + ";"
