"""The demo's cluster: three nodes on this machine and their applications, set up, started,
stopped, and checked for agreement."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from replicator.demo.application import application_command
from replicator.demo.children import Children
from replicator.demo.interrupts import Interrupts
from replicator.demo.nodes import TABLES, DemoNode
from replicator.errors import ReplicationError
from replicator.harness import APPLIANCE_TABLES, loopback_hosts

__all__ = ["NODES", "DemoCluster", "DemoError", "vector"]

NODES = 3
EXAMPLE_SCHEMA = Path(__file__).resolve().parent.parent / "conf" / "schema.sql"
SOCKET_PATH_MAX = 100  # AF_UNIX paths are limited to 104-108 bytes


class DemoError(ReplicationError):
    """The demo cannot go on (a node did not start, a step timed out): said, then cleaned up."""


def vector(raw: Any) -> dict[str, int]:
    """A version vector from a status report, without its empty origins."""
    if not isinstance(raw, dict):
        return {}
    return {str(origin): int(seq) for origin, seq in raw.items() if seq}


class DemoCluster:
    """``root`` holds the cluster key, the schema and one directory per node."""

    def __init__(self, root: Path, interrupts: Interrupts) -> None:
        self.root = root
        self.children = Children(interrupts)
        self.key_file = root / "cluster.key"
        self.schema = root / "schema.sql"
        self.nodes = [
            DemoNode(n, host, root, self.key_file, self.schema, self.children)
            for n, host in enumerate(loopback_hosts(NODES), start=1)
        ]

    def setup(self) -> None:
        descriptor = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as key:
            key.write(secrets.token_urlsafe(32) + "\n")
        if EXAMPLE_SCHEMA.is_file():
            shutil.copyfile(EXAMPLE_SCHEMA, self.schema)
        else:
            self.schema.write_text(APPLIANCE_TABLES)
        for node in self.nodes:
            if len(str(node.control_socket)) > SOCKET_PATH_MAX:
                raise DemoError(
                    f"{node.control_socket} is too long for a Unix socket: use --dir SHORTER"
                )
        for node in self.nodes:
            node.write_config([peer for peer in self.nodes if peer is not node])

    def start_node(self, node: DemoNode) -> None:
        node.start_with_config(node.config_path)

    def start_writer(self, node: DemoNode, rate: float) -> None:
        node.writer = self.children.start(
            application_command(node.db_path, node.number, rate, node.writer_state),
            node.directory / "app.log",
            own_group=True,
        )

    def stop_writers(self, nodes: Sequence[DemoNode]) -> None:
        self.children.stop([n.writer for n in nodes if n.writer is not None])

    def check_alive(self, node: DemoNode) -> None:
        if node.process is not None and node.process.poll() is not None:
            tail = "\n".join("    " + line for line in node.log_tail(8).splitlines())
            raise DemoError(f"{node.node_id} exited with status {node.process.returncode}:\n{tail}")

    def statuses(self) -> list[dict[str, Any] | None]:
        return [node.try_status() for node in self.nodes]

    def mesh_connected(self) -> bool:
        for node in self.nodes:
            self.check_alive(node)
        statuses = self.statuses()
        return all(
            s is not None and all(p["state"] == "connected" for p in s["peers"]) for s in statuses
        )

    def vector_of(self, node: DemoNode) -> dict[str, int]:
        status = node.try_status()
        return {} if status is None else vector(status["version_vector"])

    def checksums_agree(self) -> bool:
        """Same version vector everywhere, and each node's latest checksums taken at exactly
        that vector and identical."""
        views = []
        for status in self.statuses():
            if status is None:
                return False
            at = vector(status["version_vector"])
            divergence = status["divergence"]
            if vector(divergence.get("vector")) != at or not divergence.get("tables"):
                return False
            tables = {t: v["checksum"] for t, v in divergence["tables"].items()}
            views.append((at, tables))
        return all(view == views[0] for view in views)

    def files_agree(self) -> bool:
        digests = [{t: n.table_digest(t) for t in TABLES} for n in self.nodes]
        return all(d == digests[0] for d in digests)
