"""The ``state { ... }`` block: the state database file, its pragmas, backups, recovery at
start and what the appliance keeps (``persistence``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from replicator.config.reader import (
    Section,
    as_map,
    choice,
    parse_duration,
    parse_size,
    resolve_path,
    whole_number,
)

__all__ = [
    "DEFAULT_STATE_PATH",
    "BackupConfig",
    "DatabaseConfig",
    "Retention",
    "StateConfig",
    "StateRecoveryConfig",
    "read_state",
]


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    journal_mode: str = "WAL"
    synchronous: str = "NORMAL"
    cache_size: int | None = None
    temp_store: str | None = None
    mmap_size: int | None = None
    busy_timeout: float = 5.0

    def pragmas(self) -> dict[str, str | int]:
        pragmas: dict[str, str | int] = {
            "journal_mode": self.journal_mode,
            "synchronous": self.synchronous,
        }
        if self.cache_size is not None:
            pragmas["cache_size"] = self.cache_size
        if self.temp_store is not None:
            pragmas["temp_store"] = self.temp_store
        if self.mmap_size is not None:
            pragmas["mmap_size"] = self.mmap_size
        return pragmas


@dataclass(frozen=True, slots=True)
class Retention:
    """Keep backups by calendar buckets, or everything younger than ``max_age`` seconds."""

    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    max_age: float | None = None


@dataclass(frozen=True, slots=True)
class BackupConfig:
    enabled: bool = False
    directory: str = ""
    interval: float = 3600.0
    retention: Retention = field(default_factory=lambda: Retention(max_age=7 * 86400.0))
    compression: bool = True
    compression_level: int = 0
    encryption: bool = False
    encryption_key: str | None = None


@dataclass(frozen=True, slots=True)
class StateRecoveryConfig:
    auto_recover: bool = True
    validate_on_start: bool = True
    max_recovery_attempts: int = 3
    recovery_timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class StateConfig:
    path: str
    schema: str | None = None
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    backup: BackupConfig = field(default_factory=BackupConfig)
    recovery: StateRecoveryConfig = field(default_factory=StateRecoveryConfig)
    persistence: Mapping[str, bool] = field(default_factory=dict)
    auto_save: bool = True
    save_interval: float = 300.0
    compression: bool = False
    sync_mode: str = "incremental"
    sync_batch_size: int = 1000
    sync_timeout: float = 10.0


DEFAULT_STATE_PATH = "/var/lib/replicator/state.db"


def read_state(section: Section, base: Path) -> StateConfig:
    path = section.optional_string("path") or DEFAULT_STATE_PATH
    schema = section.optional_string("schema")
    db = section.section("database")
    database = DatabaseConfig(
        journal_mode=db.string(
            "journal_mode", "WAL", ("WAL", "DELETE", "TRUNCATE", "PERSIST", "MEMORY")
        ),
        synchronous=db.string("synchronous", "NORMAL", ("OFF", "NORMAL", "FULL", "EXTRA")),
        cache_size=db.value("cache_size", whole_number, None),
        temp_store=db.value("temp_store", choice(("default", "file", "memory")), None),
        mmap_size=db.value("mmap_size", parse_size, None),
        busy_timeout=db.duration("busy_timeout", 5.0),
    )
    db.done()
    persistence = section.section("persistence")
    flags = {key: persistence.boolean(key, False) for key in persistence.names()}
    persistence.done()
    recovery = section.section("recovery")
    state_recovery = StateRecoveryConfig(
        auto_recover=recovery.boolean("auto_recover", True),
        validate_on_start=recovery.boolean("validate_on_start", True),
        max_recovery_attempts=recovery.integer("max_recovery_attempts", 3, 1, 100),
        recovery_timeout=recovery.duration("recovery_timeout", 30.0),
    )
    recovery.done()
    sync = section.section("sync")
    config = StateConfig(
        path=resolve_path(base, path),
        schema=None if schema is None else resolve_path(base, schema),
        database=database,
        backup=_backup(section.section("backup"), base),
        recovery=state_recovery,
        persistence=flags,
        auto_save=section.boolean("auto_save", True),
        save_interval=section.duration("save_interval", 300.0),
        compression=section.boolean("compression", False),
        sync_mode=sync.string("mode", "incremental", ("full", "incremental")),
        sync_batch_size=sync.integer("batch_size", 1000, 1, 1_000_000),
        sync_timeout=sync.duration("sync_timeout", 10.0),
    )
    sync.done()
    section.done()
    return config


def _backup(section: Section, base: Path) -> BackupConfig:
    retention_raw = section.raw("retention")
    if retention_raw is None:
        retention = Retention(max_age=7 * 86400.0)
    elif isinstance(retention_raw, str):
        try:
            retention = Retention(max_age=parse_duration(retention_raw))
        except ValueError as error:
            raise section.error("retention", str(error)) from None
    else:
        buckets = Section(section.file, f"{section.path}.retention", as_map(retention_raw))
        retention = Retention(
            hourly=buckets.integer("hourly", 0, 0, 10_000),
            daily=buckets.integer("daily", 0, 0, 10_000),
            weekly=buckets.integer("weekly", 0, 0, 10_000),
            monthly=buckets.integer("monthly", 0, 0, 10_000),
        )
        buckets.done()
    enabled = section.boolean("enabled", False)
    directory = section.optional_string("directory")
    if enabled and directory is None:
        raise section.error("directory", "required when backups are enabled")
    encryption = section.boolean("encryption", False)
    key = section.optional_string("encryption_key")
    if encryption and key is None:
        raise section.error("encryption_key", "required when encryption = true (a key file)")
    config = BackupConfig(
        enabled=enabled,
        directory="" if directory is None else resolve_path(base, directory),
        interval=section.duration("interval", 3600.0),
        retention=retention,
        compression=section.boolean("compression", True),
        compression_level=section.integer("compression_level", 0, 0, 16),
        encryption=encryption,
        encryption_key=None if key is None else resolve_path(base, key),
    )
    section.done()
    return config
