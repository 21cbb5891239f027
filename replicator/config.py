"""The node's configuration: HCL blocks ``state { ... }`` and ``replication { ... }``.

Every key is read through a `_Section`, which knows the file and the dotted path, so an error
always names both (``node1.hcl: replication.sync.interval: "1x" is not a duration``), and any
key left unread at the end of a block is refused as unknown: a typo never silently falls back
to a default. Values are parsed once into frozen dataclasses; the rest of the node never sees
raw HCL. python-hcl2 keeps the quotes of strings and of quoted map keys (``"node1" = 100``);
they are removed here.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import hcl2
from croniter import croniter

from replicator.errors import ConfigError

__all__ = [
    "MODES",
    "STRATEGIES",
    "AuthConfig",
    "BackupConfig",
    "Config",
    "ConflictConfig",
    "PeerConfig",
    "ReplicationConfig",
    "StateConfig",
    "load_config",
    "parse_duration",
    "parse_size",
]

MODES = ("primary", "replica", "active-active", "multi-master", "chain")
ROLES = ("peer", "primary", "replica")
STRATEGIES = ("timestamp", "priority", "manual")
DEFAULT_CATEGORIES: Mapping[str, tuple[str, ...]] = {
    "learning_state": ("learning_flows", "learning_suggestions"),
    "configuration": ("config_history",),
    "metrics": ("metrics_history",),
    "metrics_history": ("metrics_history",),
}
_T = TypeVar("_T")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_duration(text: str) -> float:
    """Seconds in "100ms", "1s", "10m", "1h", "7d" or "2w"."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration (use e.g. 100ms, 30s, 10m, 1h, 7d)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_size(text: str | int) -> int:
    """Bytes in 4096, "256MB", "1GiB"."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size (use e.g. 4096, 64KB, 256MB, 1GiB)")
    return int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "b").lower()])


def _unquote(value: Any) -> Any:
    """Strip the quotes python-hcl2 keeps on strings, recursively."""
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return json.loads(value)
        except ValueError:
            return value[1:-1]
    if isinstance(value, list):
        return [_unquote(item) for item in value]
    if isinstance(value, dict):
        # python-hcl2 annotates blocks with keys such as __is_block__ and __comments__.
        return {
            _unquote(key): _unquote(item)
            for key, item in value.items()
            if not (key.startswith("__") and key.endswith("__"))
        }
    return value


class _Section:
    """One block or map being read: typed getters, and an error for every unread key."""

    def __init__(self, file: str, path: str, data: Mapping[str, Any]) -> None:
        self.file = file
        self.path = path
        self._data = dict(data)
        self._read: set[str] = set()

    def error(self, key: str | None, message: str) -> ConfigError:
        where = f"{self.path}.{key}" if key else self.path
        return ConfigError(f"{self.file}: {where}: {message}", op="config")

    def has(self, key: str) -> bool:
        return key in self._data

    def names(self) -> list[str]:
        return list(self._data)

    def _get(self, key: str) -> Any:
        self._read.add(key)
        return self._data.get(key)

    def value(self, key: str, parse: Callable[[Any], _T], default: _T) -> _T:
        raw = self._get(key)
        if raw is None:
            return default
        try:
            return parse(raw)
        except (TypeError, ValueError) as error:
            raise self.error(key, str(error)) from None

    def string(self, key: str, default: str = "", choices: tuple[str, ...] = ()) -> str:
        def parse(raw: Any) -> str:
            if not isinstance(raw, str):
                raise TypeError(f"expected a string, got {raw!r}")
            if choices and raw not in choices:
                raise ValueError(f"{raw!r} is not one of {', '.join(choices)}")
            return raw

        return self.value(key, parse, default)

    def optional_string(self, key: str) -> str | None:
        raw = self._get(key)
        if raw is None:
            return None
        if not isinstance(raw, str) or not raw:
            raise self.error(key, f"expected a non-empty string, got {raw!r}")
        return raw

    def boolean(self, key: str, default: bool) -> bool:
        def parse(raw: Any) -> bool:
            if not isinstance(raw, bool):
                raise TypeError(f"expected true or false, got {raw!r}")
            return raw

        return self.value(key, parse, default)

    def integer(self, key: str, default: int, low: int = 0, high: int = 1 << 62) -> int:
        def parse(raw: Any) -> int:
            if isinstance(raw, bool) or not isinstance(raw, int):
                raise TypeError(f"expected a whole number, got {raw!r}")
            if not low <= raw <= high:
                raise ValueError(f"{raw} is outside {low}..{high}")
            return raw

        return self.value(key, parse, default)

    def duration(self, key: str, default: float) -> float:
        def parse(raw: Any) -> float:
            if not isinstance(raw, str):
                raise TypeError(f'expected a duration such as "10s", got {raw!r}')
            return parse_duration(raw)

        return self.value(key, parse, default)

    def size(self, key: str, default: int) -> int:
        def parse(raw: Any) -> int:
            if isinstance(raw, bool) or not isinstance(raw, str | int):
                raise TypeError(f'expected a size such as "256MB", got {raw!r}')
            return parse_size(raw)

        return self.value(key, parse, default)

    def strings(self, key: str) -> tuple[str, ...]:
        def parse(raw: Any) -> tuple[str, ...]:
            if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
                raise TypeError(f"expected a list of strings, got {raw!r}")
            return tuple(raw)

        return self.value(key, parse, ())

    def section(self, key: str) -> _Section:
        """A nested block (``key { ... }``) or map (``key = { ... }``); empty when absent."""
        raw = self._get(key)
        if raw is None:
            return _Section(self.file, f"{self.path}.{key}", {})
        if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], dict):
            raw = raw[0]  # a block
        if not isinstance(raw, dict):
            raise self.error(key, f"expected a block or a map, got {raw!r}")
        return _Section(self.file, f"{self.path}.{key}", raw)

    def sections(self, key: str) -> list[_Section]:
        raw = self._get(key)
        if raw is None:
            return []
        if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
            raise self.error(key, f"expected a list of maps, got {raw!r}")
        return [_Section(self.file, f"{self.path}.{key}[{n}]", item) for n, item in enumerate(raw)]

    def done(self) -> None:
        unknown = [key for key in self._data if key not in self._read]
        if unknown:
            raise self.error(unknown[0], "unknown setting")


# ---------------------------------------------------------------------------------------------
# state { ... }


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


def _state(section: _Section, base: Path) -> StateConfig:
    path = section.optional_string("path") or DEFAULT_STATE_PATH
    schema = section.optional_string("schema")
    db = section.section("database")
    database = DatabaseConfig(
        journal_mode=db.string(
            "journal_mode", "WAL", ("WAL", "DELETE", "TRUNCATE", "PERSIST", "MEMORY")
        ),
        synchronous=db.string("synchronous", "NORMAL", ("OFF", "NORMAL", "FULL", "EXTRA")),
        cache_size=db.value("cache_size", _int, None),
        temp_store=db.value("temp_store", _choice(("default", "file", "memory")), None),
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
        path=_resolve(base, path),
        schema=None if schema is None else _resolve(base, schema),
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


def _backup(section: _Section, base: Path) -> BackupConfig:
    retention_raw = section._get("retention")
    if retention_raw is None:
        retention = Retention(max_age=7 * 86400.0)
    elif isinstance(retention_raw, str):
        try:
            retention = Retention(max_age=parse_duration(retention_raw))
        except ValueError as error:
            raise section.error("retention", str(error)) from None
    else:
        buckets = _Section(section.file, f"{section.path}.retention", _as_map(retention_raw))
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
        directory="" if directory is None else _resolve(base, directory),
        interval=section.duration("interval", 3600.0),
        retention=retention,
        compression=section.boolean("compression", True),
        compression_level=section.integer("compression_level", 0, 0, 16),
        encryption=encryption,
        encryption_key=None if key is None else _resolve(base, key),
    )
    section.done()
    return config


# ---------------------------------------------------------------------------------------------
# replication { ... }


@dataclass(frozen=True, slots=True)
class PeerConfig:
    id: str
    host: str
    port: int
    role: str = "peer"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class AuthConfig:
    method: str = "psk"
    secret_key: str | None = field(default=None, repr=False)
    secret_key_file: str | None = None
    previous_secret_key: str | None = field(default=None, repr=False)
    previous_secret_key_file: str | None = None
    key_rotation: float | None = None

    def passphrases(self) -> tuple[str, str | None]:
        """The current and previous passphrase, read from the config or the key files."""
        current = self.secret_key or _read_secret(self.secret_key_file, "secret_key_file")
        if current is None:
            raise ConfigError(
                "replication.auth.secret_key: required to run a node (or secret_key_file)",
                op="config",
                hint="'replicator keygen PATH' writes a strong one",
            )
        previous = self.previous_secret_key or _read_secret(
            self.previous_secret_key_file, "previous_secret_key_file"
        )
        return current, previous


@dataclass(frozen=True, slots=True)
class TransportConfig:
    protocol: str = "tcp"
    compression: bool = True
    encryption: bool = True
    tls: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SyncConfig:
    mode: str = "incremental"
    interval: float = 1.0
    batch_size: int = 1000
    max_lag: float = 10.0
    truncate_interval: float = 30.0
    log_retention: float = 7 * 86400.0
    heartbeat_interval: float = 1.0
    liveness_timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class ConflictConfig:
    strategy: str = "timestamp"
    priorities: Mapping[str, int] = field(default_factory=dict)
    timestamp_resolution: str = "millisecond"
    clock_skew_tolerance: float = 0.1
    max_clock_offset: float = 60.0
    near_tie: str = "count"
    tables: Mapping[str, str] = field(default_factory=dict)
    manual_timeout: float = 3600.0
    require_approval: bool = False
    approvers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CustomFilter:
    type: str
    condition: str


# Columns dropped by ``exclude_sensitive`` unless ``sensitive_columns`` names others:
# "table.column" glob patterns.
DEFAULT_SENSITIVE = ("*.*password*", "*.*secret*", "*.*token*", "*.*private*")
# Custom filter types the seed documents use, and the tables each covers (a category or a
# table name works too).
FILTER_TYPES: Mapping[str, tuple[str, ...]] = {
    "dhcp": ("dhcp_leases",),
    "dns": ("dns_records", "dns_cache"),
    "learning": ("learning_flows", "learning_suggestions"),
}
TRANSFORMATIONS = ("anonymize_ips", "compress_data", "encrypt_data")


@dataclass(frozen=True, slots=True)
class FilterConfig:
    zones: tuple[str, ...] = ()
    zone_column: str = "zone"
    exclude_sensitive: bool = False
    sensitive_columns: tuple[str, ...] = DEFAULT_SENSITIVE
    custom_filters: tuple[CustomFilter, ...] = ()

    @property
    def active(self) -> bool:
        return bool(self.zones or self.exclude_sensitive or self.custom_filters)


@dataclass(frozen=True, slots=True)
class ResyncConfig:
    auto_resync: bool = True
    # A peer further behind than this gets a snapshot instead of the log. The default is
    # higher than the seed's example (1000): replaying a short outage is cheaper than copying
    # every table.
    resync_threshold: int = 100_000
    resync_interval: float = 3600.0
    full_resync_schedule: str | None = None
    full_resync_compression: bool = True
    checksum_verification: bool = True
    incremental_enabled: bool = True
    checkpoint_interval: float = 600.0
    max_checkpoints: int = 100
    divergence_check: bool = True
    checksum_interval: float = 60.0


@dataclass(frozen=True, slots=True)
class ReplicationConfig:
    mode: str
    node_id: str
    cluster_id: str
    listen_host: str
    listen_port: int
    peers: tuple[PeerConfig, ...]
    auth: AuthConfig
    transport: TransportConfig
    sync: SyncConfig
    data: Mapping[str, bool]
    categories: Mapping[str, tuple[str, ...]]
    conflict_resolution: ConflictConfig
    filters: FilterConfig
    transformations: Mapping[str, bool]
    recovery: ResyncConfig
    backup_before_resync: bool
    backup_retention: float | None
    control_socket: str

    def replicated_tables(self) -> tuple[str, ...]:
        """The tables named by ``data``, categories expanded, in a stable order."""
        tables: dict[str, None] = {}
        for name, enabled in self.data.items():
            if enabled:
                for table in self.categories.get(name, (name,)):
                    tables[table] = None
        return tuple(tables)


def _replication(section: _Section, base: Path) -> ReplicationConfig:
    mode = section.string("mode", "active-active", MODES)
    node_id = section.optional_string("node_id") or socket.gethostname()
    listen_host, listen_port = section.value("listen_addr", _address, ("127.0.0.1", 9001))
    peers = [_peer(item) for item in section.sections("peers")]
    # The seed's basic form names the primary and the peer directly.
    for key, role in (("primary_addr", "primary"), ("peer_addr", "peer")):
        address = section.value(key, _address, None)
        if address is not None:
            peers.append(PeerConfig(f"{role}@{address[0]}:{address[1]}", *address, role))
    ids = [peer.id for peer in peers]
    if len(set(ids)) != len(ids) or node_id in ids:
        raise section.error("peers", "peer ids must be unique and differ from node_id")
    auth = _auth(section.section("auth"), section, base)
    transport = section.section("transport")
    tls = transport.section("tls")
    tls_settings = {key: tls.string(key) for key in tls.names()}
    tls.done()
    transport_config = TransportConfig(
        protocol=transport.string("protocol", "tcp", ("tcp",)),
        compression=transport.boolean("compression", True),
        encryption=transport.boolean("encryption", True),
        tls=tls_settings,
    )
    transport.done()
    sync = section.section("sync")
    sync_config = SyncConfig(
        mode=sync.string("mode", "incremental", ("incremental", "full")),
        interval=sync.duration("interval", 1.0),
        batch_size=sync.integer("batch_size", 1000, 1, 100_000),
        max_lag=sync.duration("max_lag", 10.0),
        truncate_interval=sync.duration("truncate_interval", 30.0),
        log_retention=sync.duration("log_retention", 7 * 86400.0),
        heartbeat_interval=sync.duration("heartbeat_interval", 1.0),
        liveness_timeout=sync.duration("liveness_timeout", 10.0),
    )
    if sync_config.liveness_timeout <= sync_config.heartbeat_interval:
        raise sync.error("liveness_timeout", "must be longer than heartbeat_interval")
    sync.done()
    data = section.section("data")
    flags = {key: data.boolean(key, False) for key in data.names()}
    data.done()
    categories = dict(DEFAULT_CATEGORIES)
    extra = section.section("categories")
    for key in extra.names():
        categories[key] = extra.strings(key)
    extra.done()
    transformations = section.section("transformations")
    # compress_data and encrypt_data are what the transport always does; anonymize_ips is opt-in.
    transform_flags = {
        key: transformations.boolean(key, key != "anonymize_ips") for key in TRANSFORMATIONS
    }
    transformations.done()
    config = ReplicationConfig(
        mode=mode,
        node_id=node_id,
        cluster_id=section.string("cluster_id", "replicator") or "replicator",
        listen_host=listen_host,
        listen_port=listen_port,
        peers=tuple(peers),
        auth=auth,
        transport=transport_config,
        sync=sync_config,
        data=flags,
        categories=categories,
        conflict_resolution=_conflicts(section.section("conflict_resolution")),
        filters=_filters(section.section("filters")),
        transformations=transform_flags,
        recovery=_resync(section.section("recovery")),
        backup_before_resync=section.boolean("backup_before_resync", False),
        backup_retention=section.value("backup_retention", parse_duration, None),
        control_socket=_resolve(
            base, section.string("control_socket", "/run/replicator/control.sock")
        ),
    )
    section.done()
    return config


def _peer(section: _Section) -> PeerConfig:
    peer_id = section.optional_string("id")
    if peer_id is None:
        raise section.error("id", "required: the peer's node_id")
    address = section.value("address", _address, None)
    if address is None:
        raise section.error("address", "required: host:port the peer listens on")
    peer = PeerConfig(peer_id, *address, section.string("role", "peer", ROLES))
    section.done()
    return peer


def _auth(section: _Section, replication: _Section, base: Path) -> AuthConfig:
    inline = replication.optional_string("secret_key")  # the seed's basic form
    method = section.string("method", "psk", ("psk",))
    secret = section.optional_string("secret_key") or inline
    secret_file = section.optional_string("secret_key_file")
    if secret and secret_file:
        raise section.error("secret_key_file", "give secret_key or secret_key_file, not both")
    config = AuthConfig(
        method=method,
        secret_key=secret,
        secret_key_file=None if secret_file is None else _resolve(base, secret_file),
        previous_secret_key=section.optional_string("previous_secret_key"),
        previous_secret_key_file=_optional_path(
            base, section.optional_string("previous_secret_key_file")
        ),
        key_rotation=section.value("key_rotation", parse_duration, None),
    )
    section.done()
    return config


def _conflicts(section: _Section) -> ConflictConfig:
    priorities_section = section.section("priorities")
    priorities = {
        node: priorities_section.integer(node, 0, -(1 << 31), 1 << 31)
        for node in priorities_section.names()
    }
    priorities_section.done()
    tables_section = section.section("tables")
    tables = {table: tables_section.string(table) for table in tables_section.names()}
    tables_section.done()
    manual = section.section("manual_resolution")
    config = ConflictConfig(
        strategy=section.string("strategy", "timestamp"),
        priorities=priorities,
        timestamp_resolution=section.string(
            "timestamp_resolution", "millisecond", ("millisecond",)
        ),
        clock_skew_tolerance=section.duration("clock_skew_tolerance", 0.1),
        max_clock_offset=section.duration("max_clock_offset", 60.0),
        near_tie=section.string("near_tie", "count", ("count", "manual")),
        tables=tables,
        manual_timeout=manual.duration("timeout", 3600.0),
        require_approval=manual.boolean("require_approval", False),
        approvers=manual.strings("approvers"),
    )
    manual.done()
    for where, strategy in (("strategy", config.strategy), *tables.items()):
        if strategy not in STRATEGIES and "." not in strategy and ":" not in strategy:
            raise section.error(
                where if where == "strategy" else f"tables.{where}",
                f"{strategy!r} is not one of {', '.join(STRATEGIES)} or a plugin's dotted path",
            )
    section.done()
    return config


def _filters(section: _Section) -> FilterConfig:
    custom = []
    for item in section.sections("custom_filters"):
        kind = item.optional_string("type")
        condition = item.optional_string("condition")
        if kind is None or condition is None:
            raise item.error(None, "a custom filter needs a type and a condition")
        item.done()
        custom.append(CustomFilter(kind, condition))
    config = FilterConfig(
        zones=section.strings("zones"),
        zone_column=section.string("zone_column", "zone"),
        exclude_sensitive=section.boolean("exclude_sensitive", False),
        sensitive_columns=section.strings("sensitive_columns") or DEFAULT_SENSITIVE,
        custom_filters=tuple(custom),
    )
    section.done()
    return config


def _resync(section: _Section) -> ResyncConfig:
    full = section.section("full_resync")
    incremental = section.section("incremental")
    config = ResyncConfig(
        auto_resync=section.boolean("auto_resync", True),
        resync_threshold=section.integer("resync_threshold", 100_000, 1),
        resync_interval=section.duration("resync_interval", 3600.0),
        full_resync_schedule=full.optional_string("schedule"),
        full_resync_compression=full.boolean("compression", True),
        checksum_verification=full.boolean("checksum_verification", True),
        incremental_enabled=incremental.boolean("enabled", True),
        checkpoint_interval=incremental.duration("checkpoint_interval", 600.0),
        max_checkpoints=incremental.integer("max_checkpoints", 100, 1),
        divergence_check=section.boolean("divergence_check", True),
        checksum_interval=section.duration("checksum_interval", 60.0),
    )
    schedule = config.full_resync_schedule
    if schedule is not None and not croniter.is_valid(schedule):
        raise full.error("schedule", f"not a cron expression: {schedule!r}")
    full.done()
    incremental.done()
    section.done()
    return config


# ---------------------------------------------------------------------------------------------
# The file


@dataclass(frozen=True, slots=True)
class Config:
    file: str
    state: StateConfig
    replication: ReplicationConfig
    foreign_blocks: tuple[str, ...] = ()
    """Blocks of the appliance's own configuration that replicator accepts but does not act on
    (``dhcp``, ``dns``, ``rule_learning``): a node refuses to start with them, naming them."""


# Blocks of the appliance configuration the seed documents show next to ours.
FOREIGN_BLOCKS = ("dhcp", "dns", "rule_learning")


def load_config(path: str | Path) -> Config:
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as error:
        raise ConfigError(f"{file}: cannot read: {error.strerror}", op="config") from None
    try:
        raw = _unquote(hcl2.loads(text))
    except Exception as error:  # lark raises many kinds; all mean a syntax error
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"{file}: HCL syntax error: {first_line}", op="config") from None
    root = _Section(str(file), "", raw)
    base = file.parent
    config = Config(
        file=str(file),
        state=_state(_single_block(root, "state"), base),
        replication=_replication(_single_block(root, "replication"), base),
        foreign_blocks=tuple(name for name in FOREIGN_BLOCKS if root.has(name) and root._get(name)),
    )
    root.done()
    return config


def _single_block(root: _Section, name: str) -> _Section:
    raw = root._get(name)
    if raw is None:
        return _Section(root.file, name, {})
    if not isinstance(raw, list) or len(raw) != 1 or not isinstance(raw[0], dict):
        raise ConfigError(f"{root.file}: {name}: expected exactly one {name} block", op="config")
    return _Section(root.file, name, raw[0])


def _address(raw: Any) -> tuple[str, int]:
    if not isinstance(raw, str) or ":" not in raw:
        raise ValueError(f"{raw!r} is not host:port")
    host, _, port_text = raw.rpartition(":")
    host = host.strip("[]")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{raw!r} is not host:port (port 1-65535)")
    return host, int(port_text)


def _int(raw: Any) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise TypeError(f"expected a whole number, got {raw!r}")
    return raw


def _choice(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(raw: Any) -> str:
        if raw not in choices:
            raise ValueError(f"{raw!r} is not one of {', '.join(choices)}")
        return str(raw)

    return parse


def _as_map(raw: Any) -> dict[str, Any]:
    if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], dict):
        raw = raw[0]
    if not isinstance(raw, dict):
        raise TypeError(f"expected a map, got {raw!r}")
    return raw


def _resolve(base: Path, path: str) -> str:
    """Relative paths in a config file are relative to that file."""
    return str((base / path).resolve()) if not Path(path).is_absolute() else path


def _optional_path(base: Path, path: str | None) -> str | None:
    return None if path is None else _resolve(base, path)


def _read_secret(path: str | None, key: str) -> str | None:
    """A key file's passphrase. A file group or others may read is refused: the key it holds
    lets anyone who reads it join the cluster."""
    if path is None:
        return None
    where = f"replication.auth.{key}"
    try:
        with open(path, "rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise ConfigError(f"{where}: {path} is not a regular file", op="config")
            if mode & 0o077:
                raise ConfigError(
                    f"{where}: key file {path} is open to group or others "
                    f"(mode {stat.S_IMODE(mode):04o})",
                    op="config",
                    hint=f"chmod 600 {path}",
                )
            raw = file.read()
    except OSError as error:
        raise ConfigError(f"{where}: cannot read key file {path}: {error.strerror}",
                          op="config") from None  # fmt: skip
    try:
        return raw.decode().strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: key file {path} is not text", op="config") from None
