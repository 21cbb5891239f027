"""Real `Node`s in one trio process over in-memory streams (the network seam a simulation
drives): real SQLite files, real crypto, no socket between the nodes."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import trio

from replicator.config import load_config
from replicator.harness import NodeProcess
from replicator.node import Node, NodeOptions
from tests.support.memory_network import MemoryNetwork


def count(path: Path) -> int:
    conn = sqlite3.connect(path, timeout=10)
    try:
        return int(conn.execute("SELECT count(*) FROM dhcp_leases").fetchone()[0])
    finally:
        conn.close()


async def test_two_nodes_over_memory_streams_replicate_a_row(tmp_path: Path) -> None:
    # NodeProcess only writes each node's config here: nothing is started as a process, and
    # nothing listens on the TCP addresses the configs name.
    one = NodeProcess(tmp_path, "node1", "127.0.0.1")
    two = NodeProcess(tmp_path, "node2", "127.0.0.2")
    options = NodeOptions(network=MemoryNetwork())
    nodes = [
        Node(load_config(str(one.write_config([two]))), options),
        Node(load_config(str(two.write_config([one]))), options),
    ]
    async with trio.open_nursery() as nursery:
        for node in nodes:
            await nursery.start(node.run)
        app = sqlite3.connect(one.db_path, isolation_level=None, timeout=10)
        app.execute("INSERT INTO dhcp_leases (mac, ip, expires) VALUES ('m', '10.0.0.1', 1)")
        app.close()
        with trio.fail_after(20):
            # Polled: the row lands in another file, nothing here could signal it.
            while await trio.to_thread.run_sync(count, two.db_path) == 0:  # noqa: ASYNC110
                await trio.sleep(0.05)
        assert sorted(nodes[0].links) == ["node2"]
        for node in (one, two):  # the link ran over memory: no node listens on TCP
            with pytest.raises(OSError, match="all attempts to connect"):
                await trio.open_tcp_stream(node.host, node.port)
        nursery.cancel_scope.cancel()
