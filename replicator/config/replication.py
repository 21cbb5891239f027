"""The ``replication { ... }`` block: identity, peers, authentication, transport, sync
timing, conflict resolution, filters and resync, and the key files it names."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from croniter import croniter

from replicator.config.reader import (
    Section,
    host_port,
    optional_path,
    parse_duration,
    resolve_path,
)
from replicator.errors import ConfigError

__all__ = [
    "MODES",
    "ROLES",
    "STRATEGIES",
    "AuthConfig",
    "ConflictConfig",
    "PeerConfig",
    "ReplicationConfig",
    "ResyncConfig",
    "read_replication",
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
        current = self.secret_key or read_secret(self.secret_key_file, "secret_key_file")
        if current is None:
            raise ConfigError(
                "replication.auth.secret_key: required to run a node (or secret_key_file)",
                op="config",
                hint="'replicator keygen PATH' writes a strong one",
            )
        previous = self.previous_secret_key or read_secret(
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


def read_replication(section: Section, base: Path) -> ReplicationConfig:
    mode = section.string("mode", "active-active", MODES)
    node_id = section.optional_string("node_id") or socket.gethostname()
    listen_host, listen_port = section.value("listen_addr", host_port, ("127.0.0.1", 9001))
    peers = [_peer(item) for item in section.sections("peers")]
    # The seed's basic form names the primary and the peer directly.
    for key, role in (("primary_addr", "primary"), ("peer_addr", "peer")):
        address = section.value(key, host_port, None)
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
        control_socket=resolve_path(
            base, section.string("control_socket", "/run/replicator/control.sock")
        ),
    )
    section.done()
    return config


def _peer(section: Section) -> PeerConfig:
    peer_id = section.optional_string("id")
    if peer_id is None:
        raise section.error("id", "required: the peer's node_id")
    address = section.value("address", host_port, None)
    if address is None:
        raise section.error("address", "required: host:port the peer listens on")
    peer = PeerConfig(peer_id, *address, section.string("role", "peer", ROLES))
    section.done()
    return peer


def _auth(section: Section, replication: Section, base: Path) -> AuthConfig:
    inline = replication.optional_string("secret_key")  # the seed's basic form
    method = section.string("method", "psk", ("psk",))
    secret = section.optional_string("secret_key") or inline
    secret_file = section.optional_string("secret_key_file")
    if secret and secret_file:
        raise section.error("secret_key_file", "give secret_key or secret_key_file, not both")
    config = AuthConfig(
        method=method,
        secret_key=secret,
        secret_key_file=None if secret_file is None else resolve_path(base, secret_file),
        previous_secret_key=section.optional_string("previous_secret_key"),
        previous_secret_key_file=optional_path(
            base, section.optional_string("previous_secret_key_file")
        ),
        key_rotation=section.value("key_rotation", parse_duration, None),
    )
    section.done()
    return config


def _conflicts(section: Section) -> ConflictConfig:
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


def _filters(section: Section) -> FilterConfig:
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


def _resync(section: Section) -> ResyncConfig:
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


def read_secret(path: str | None, key: str) -> str | None:
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
