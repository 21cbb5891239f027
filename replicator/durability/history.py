"""``config_history``: the configurations each node started with, in the state database.

Rows are keyed by node id and config hash, so when the ``configuration`` category replicates
every node's history lands everywhere without collisions. Secrets (the fields a config keeps
out of its repr) are redacted before hashing and storing, so neither reveals them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
import time
from collections.abc import Mapping
from typing import Any

from replicator import __version__
from replicator.config import Config
from replicator.log import get_logger

__all__ = ["TABLE", "describe_config", "record_config"]

TABLE = "config_history"
REDACTED = "[redacted]"
_log = get_logger("history")


def describe_config(config: Config) -> tuple[str, str]:
    """The config as canonical JSON with secrets redacted, and its SHA-256."""
    data = json.dumps(_plain(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(data.encode()).hexdigest(), data


def record_config(conn: sqlite3.Connection, config: Config, node_id: str) -> bool:
    """Record the config this node starts with, unless it is already its newest row.
    Returns whether a row was written."""
    columns = {row[1] for row in conn.execute(f"PRAGMA table_info({TABLE})")}
    if not columns:
        return False
    if "node_id" not in columns:
        _log.warning("config_history has no node_id column: not recorded (rows of different "
                     "nodes would collide)", table=TABLE)  # fmt: skip
        return False
    config_hash, data = describe_config(config)
    newest = conn.execute(
        f"SELECT config_hash FROM {TABLE} WHERE node_id = ? ORDER BY applied_at DESC LIMIT 1",
        (node_id,),
    ).fetchone()
    if newest is not None and newest[0] == config_hash:
        return False
    description = f"started by replicator {__version__} from {config.file}"
    with conn:
        conn.execute(
            f"INSERT INTO {TABLE} (node_id, config_hash, config_data, applied_at, description)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (node_id, config_hash) DO UPDATE"
            " SET applied_at = excluded.applied_at, description = excluded.description",
            (node_id, config_hash, data, int(time.time()), description),
        )
    _log.info("configuration recorded in config_history", config_hash=config_hash[:12])
    return True


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: REDACTED
            if not f.repr and getattr(value, f.name)
            else _plain(getattr(value, f.name))
            for f in dataclasses.fields(value)
        }
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_plain(item) for item in value]
        return sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)
