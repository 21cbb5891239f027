"""One configuration file: its ``state`` and ``replication`` blocks, and the appliance blocks
(``dhcp``, ``dns``, ``rule_learning``) it may hold beside them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import hcl2

from replicator.config.reader import Section, unquote
from replicator.config.replication import ReplicationConfig, read_replication
from replicator.config.state import StateConfig, read_state
from replicator.errors import ConfigError

__all__ = ["FOREIGN_BLOCKS", "Config", "load_config"]


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
        raw = unquote(hcl2.loads(text))
    except Exception as error:  # lark raises many kinds; all mean a syntax error
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"{file}: HCL syntax error: {first_line}", op="config") from None
    root = Section(str(file), "", raw)
    base = file.parent
    config = Config(
        file=str(file),
        state=read_state(_single_block(root, "state"), base),
        replication=read_replication(_single_block(root, "replication"), base),
        foreign_blocks=tuple(name for name in FOREIGN_BLOCKS if root.has(name) and root.raw(name)),
    )
    root.done()
    return config


def _single_block(root: Section, name: str) -> Section:
    raw = root.raw(name)
    if raw is None:
        return Section(root.file, name, {})
    if not isinstance(raw, list) or len(raw) != 1 or not isinstance(raw[0], dict):
        raise ConfigError(f"{root.file}: {name}: expected exactly one {name} block", op="config")
    return Section(root.file, name, raw[0])
