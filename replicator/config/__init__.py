"""The node's configuration: HCL blocks ``state { ... }`` and ``replication { ... }`` read into
frozen dataclasses (`load_config`); the rest of the node never sees raw HCL."""

from replicator.config.file import FOREIGN_BLOCKS, Config, load_config
from replicator.config.reader import parse_duration, parse_size
from replicator.config.replication import (
    FILTER_TYPES,
    MODES,
    STRATEGIES,
    AuthConfig,
    ConflictConfig,
    PeerConfig,
    ReplicationConfig,
    ResyncConfig,
)
from replicator.config.state import BackupConfig, Retention, StateConfig, StateRecoveryConfig

__all__ = [
    "FILTER_TYPES",
    "FOREIGN_BLOCKS",
    "MODES",
    "STRATEGIES",
    "AuthConfig",
    "BackupConfig",
    "Config",
    "ConflictConfig",
    "PeerConfig",
    "ReplicationConfig",
    "ResyncConfig",
    "Retention",
    "StateConfig",
    "StateRecoveryConfig",
    "load_config",
    "parse_duration",
    "parse_size",
]
