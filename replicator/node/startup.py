"""What the node checks and sets up before it touches the state file: settings this version
refuses, the schema file, the appliance's tables and the process's descriptor limit."""

from __future__ import annotations

import contextlib
import resource

from replicator.capture.store import Store
from replicator.config import Config
from replicator.errors import ConfigError

__all__ = ["check_persistence", "raise_descriptor_limit", "read_schema", "unbuilt_settings"]


def unbuilt_settings(config: Config) -> list[str]:
    """Settings that ask for a feature this version does not have: the node refuses to start
    with them rather than silently ignore them."""
    r, s = config.replication, config.state
    found = [
        f"{block} (an appliance block, not a replicator setting)" for block in config.foreign_blocks
    ]
    checks = {
        "replication.transformations.compress_data = false": not r.transformations["compress_data"],
        "replication.transformations.encrypt_data = false": not r.transformations["encrypt_data"],
        "replication.transport.tls": bool(r.transport.tls),
        "replication.transport.encryption = false": not r.transport.encryption,
        "replication.auth.key_rotation": r.auth.key_rotation is not None,
        'replication.sync.mode = "full"': r.sync.mode == "full",
        "replication.recovery.incremental.enabled = false": not r.recovery.incremental_enabled,
        "replication.recovery.full_resync.compression = false": (
            not r.recovery.full_resync_compression
        ),
        "replication.conflict_resolution.manual_resolution.require_approval": (
            r.conflict_resolution.require_approval
        ),
        "state.compression": s.compression,
        'state.sync.mode = "full"': s.sync_mode == "full",
        "state.sync.batch_size (replication.sync.batch_size sizes batches)": (
            s.sync_batch_size != 1000
        ),
        "state.sync.sync_timeout": s.sync_timeout != 10.0,
        "replication.conflict_resolution.manual_resolution.approvers": bool(
            r.conflict_resolution.approvers
        ),
        "replication.primary_addr / peer_addr (name peers: peers = [{ id, address }])": any(
            "@" in peer.id for peer in r.peers
        ),
    }
    found += [name for name, present in checks.items() if present]
    return found


def read_schema(path: str | None) -> str | None:
    """``state.schema``: the SQL the node runs to create the applications' tables."""
    if path is None:
        return None
    try:
        with open(path) as schema:
            return schema.read()
    except OSError as error:
        raise ConfigError(f"state.schema: cannot read {path}: {error.strerror}") from None


def check_persistence(config: Config, store: Store) -> None:
    """``state.persistence``: what the appliance keeps must be in the state database."""
    replication = config.replication
    present = {
        name for (name,) in store.conn.execute(
            "SELECT name FROM sqlite_schema WHERE type = 'table'"
        )
    }  # fmt: skip
    for category, wanted in sorted(config.state.persistence.items()):
        tables = replication.categories.get(category, (category,))
        missing = [t for t in tables if t not in present]
        if wanted and missing:
            raise ConfigError(
                f"{config.file}: state.persistence.{category}: no table "
                f"{', '.join(missing)} in {store.settings.path}",
                op="start",
                hint="create it (state.schema) or set it to false",
            )


def raise_descriptor_limit() -> None:
    """Raise the soft limit on open files to the hard one: every peer, handshake and SQLite
    connection costs descriptors, and a flood of connections must not exhaust them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    for target in (wanted, 1 << 16):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(target, wanted), hard))
            return
