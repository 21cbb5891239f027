"""One of the demo's nodes: a harness node with the demo's config, plus its application and
what the live view reads from its file and its control socket."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from replicator.apply import conflicts
from replicator.capture.bookkeeping import read_clock
from replicator.capture.transactions import write_transaction
from replicator.demo.children import Children
from replicator.errors import ReplicationError
from replicator.harness import NodeConfig, NodeProcess
from replicator.ops.client import ControlClient

__all__ = ["TABLES", "DemoNode"]

TABLES = {"dhcp_leases": "mac", "dns_records": "name, type, zone"}  # table: ORDER BY (its key)


class DemoNode(NodeProcess):
    """``root/nodeN``, reached at ``host``; its process is one of the demo's ``children``."""

    def __init__(
        self, number: int, host: str, root: Path, key_file: Path, schema: Path, children: Children
    ) -> None:
        # The schema is shared, one file in root; the node's directory holds what is its own.
        super().__init__(root, f"node{number}", host, schema=None)
        self.number = number
        self.key_file = key_file
        self.schema_file = schema
        self.children = children
        self.writer: subprocess.Popen[bytes] | None = None

    def config(self, peers: Sequence[NodeProcess]) -> NodeConfig:
        return NodeConfig(
            comment=f"Written by `replicator demo`: {self.node_id} of a three-node full mesh on"
            " this machine.",
            node_id=self.node_id,
            listen_addr=f"{self.host}:{self.port}",
            peers=[(peer.node_id, f"{peer.host}:{peer.port}") for peer in peers],
            cluster_id="demo",
            auth={"secret_key_file": str(self.key_file)},
            state_path="state.db",
            schema=str(self.schema_file),
            sync={
                "interval": "200ms",
                "batch_size": 500,
                "max_lag": "10s",
                "heartbeat_interval": "200ms",
                "liveness_timeout": "2s",
            },
            data="dhcp_leases = true, dns_records = true",
            strategy="timestamp",
            recovery={"checksum_interval": "1s"},
        )

    def spawn(self, args: list[str]) -> subprocess.Popen[bytes]:
        return self.children.start(args, self.log_path, own_group=False)

    @property
    def writer_state(self) -> Path:
        return self.directory / "app.json"

    # -- through the control socket, as the CLI reads it ---------------------------------------

    def client(self) -> ControlClient:
        return ControlClient(str(self.control_socket), timeout=3.0)

    def try_status(self) -> dict[str, Any] | None:
        """The node's status, or None while it is down or not answering yet."""
        if not self.running:
            return None
        try:
            reply = self.client().get("/api/replication/status")
        except ReplicationError:
            return None
        return reply if isinstance(reply, dict) else None

    # -- from the files ---------------------------------------------------------------------------

    def look(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """A read-only look at the node's file, as any reporting tool would take."""
        return self.read(sql, args, read_only=True, timeout=5)

    def counts(self) -> dict[str, int] | None:
        try:
            return {t: int(self.look(f"SELECT count(*) FROM {t}")[0][0]) for t in TABLES}
        except sqlite3.Error:
            return None

    def conflicts(self) -> int | None:
        """Concurrent updates this node has resolved so far (its conflict counters)."""
        try:
            conn = sqlite3.connect(f"{self.db_path.as_uri()}?mode=ro", uri=True, timeout=5)
            try:
                counted = conflicts.summary(conn)["by_table"]
            finally:
                conn.close()
        except sqlite3.Error:
            return None
        return sum(
            int(kinds.get("concurrent", 0))
            for strategies in counted.values()
            for kinds in strategies.values()
        )

    def writes(self) -> int:
        try:
            return int(json.loads(self.writer_state.read_text())["writes"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def table_digest(self, table: str) -> tuple[int, str]:
        """Row count and a hash of every row in key order: equal files give equal digests."""
        digest = hashlib.sha256()
        rows = self.look(f"SELECT * FROM {table} ORDER BY {TABLES[table]}")
        for row in rows:
            digest.update(repr(row).encode())
        return len(rows), digest.hexdigest()[:16]

    def app_write(self, sql: str, args: Sequence[Any]) -> int:
        """One application transaction; returns the hybrid-clock stamp the write got."""
        conn = sqlite3.connect(self.db_path, isolation_level=None, timeout=10)
        try:
            with write_transaction(conn):
                conn.execute(sql, args)
                stamp = read_clock(conn).hlc  # the trigger's stamp, in the same transaction
        finally:
            conn.close()
        return stamp

    def lease(self, mac: str) -> str | None:
        try:
            rows = self.look("SELECT hostname FROM dhcp_leases WHERE mac = ?", (mac,))
        except sqlite3.Error:
            return None
        return str(rows[0][0]) if rows else None
