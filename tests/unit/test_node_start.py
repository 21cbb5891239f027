"""What a node checks about its state database before it starts serving."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from replicator.config import load_config
from replicator.errors import ConfigError, SchemaError
from replicator.harness import SCHEMA
from replicator.node import Node


def config_file(tmp_path: Path, state: str = "") -> Path:
    (tmp_path / "schema.sql").write_text(SCHEMA)
    path = tmp_path / "node.hcl"
    path.write_text(
        f"""
state {{
  path   = "state.db"
  schema = "schema.sql"
{state}
}}
replication {{
  node_id = "node1"
  auth = {{ secret_key = "a passphrase of 16+ chars" }}
  data = {{ dhcp_leases = true }}
  control_socket = "control.sock"
}}
"""
    )
    return path


def test_persistence_of_a_table_the_database_lacks_stops_the_start(tmp_path: Path) -> None:
    node = Node(load_config(config_file(tmp_path, "persistence { dns_cache = true }")))
    with pytest.raises(ConfigError, match=r"state.persistence.dns_cache: no table dns_cache"):
        node._prepare()


def test_a_database_that_fails_validation_is_not_served(tmp_path: Path) -> None:
    path = config_file(tmp_path)
    Node(load_config(path))._prepare()  # a good file: starts
    conn = sqlite3.connect(tmp_path / "state.db")
    with conn:  # a log entry beyond what the version vector says this node holds
        conn.execute("INSERT INTO _repl_progress VALUES ('node9', 1, 3)")
        conn.execute(
            "INSERT INTO _repl_log (seq, origin_node, origin_inc, origin_seq, op, hlc)"
            " VALUES (999, 'node9', 1, 7, 1, 1)"
        )
    conn.close()
    no_recovery = config_file(tmp_path, "recovery { auto_recover = false }")
    with pytest.raises(SchemaError, match="failed validation at start: log holds node9#1:7"):
        Node(load_config(no_recovery))._prepare()
    unchecked = config_file(tmp_path, "recovery { validate_on_start = false }")
    Node(load_config(unchecked))._prepare()  # the operator may choose to start anyway
    alone = Node(load_config(config_file(tmp_path)))  # no backup and no peer: left as it is
    with pytest.raises(SchemaError, match="no good backup and no peer to refill it from"):
        alone._prepare()
    assert list(tmp_path.glob("state.db.damaged-*"))  # copied aside before anything else
    with_peer = config_file(tmp_path)
    peer = 'peers = [{ id = "node2", address = "127.0.0.2:9" }]'
    with_peer.write_text(with_peer.read_text().replace('node_id = "node1"',
                                                       f'node_id = "node1"\n  {peer}'))  # fmt: skip
    node = Node(load_config(with_peer))  # no backup: emptied, for a full resync from node2
    store = node._prepare()
    assert node.persistence.recovery is not None
    assert node.persistence.recovery.needs_full_resync
    assert store.conn.execute("SELECT count(*) FROM _repl_log").fetchone() == (0,)
    assert node.last_validation is not None
    assert node.last_validation["ok"]


def test_backup_before_resync_needs_backups(tmp_path: Path) -> None:
    path = config_file(tmp_path)
    path.write_text(
        path.read_text().replace(
            'node_id = "node1"', 'node_id = "node1"\n  backup_before_resync = true'
        )
    )
    with pytest.raises(
        ConfigError, match=r"replication\.backup_before_resync: needs state\.backup"
    ):
        Node(load_config(path))._prepare()
