"""Two connections between the same pair of nodes: exactly one survives, the same one on both
sides (the one dialled by the node with the smaller id), and the other is told why.

The far side is played by the test, so both connections exist at once every time: a real node
process on one end, a hand-driven peer (real sockets, real handshake, real Hello) on the other.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from replicator.harness import NodeProcess
from tests.support.key_holder import KeyHolder, next_goodbye


@pytest.fixture
def procs() -> Iterator[list[NodeProcess]]:
    started: list[NodeProcess] = []
    yield started
    for node in started:
        node.stop()


async def test_second_connection_from_the_larger_id_is_refused(
    tmp_path: Path, procs: list[NodeProcess]
) -> None:
    node, fake = NodeProcess(tmp_path, "a", "127.0.0.1"), NodeProcess(tmp_path, "b", "127.0.0.2")
    procs.append(node)
    peer = KeyHolder(fake, node)
    node.start([fake])
    try:
        preferred = await peer.accept_one()  # a dialled b: the one both sides keep
        crossed = await peer.dial()  # b dialled a as well
        assert await next_goodbye(crossed) == "duplicate connection"
        assert await next_goodbye(preferred, within=1.0) is None
        status = await trio.to_thread.run_sync(node.status)
        states = [p["state"] for p in status["peers"]]
    finally:
        await peer.close()
    assert states == ["connected"]
    assert node.logged("peer connected", peer="b", dialled_by="a")
    assert not node.logged("peer connected", peer="b", dialled_by="b")


async def test_connection_from_the_smaller_id_replaces_the_other(
    tmp_path: Path, procs: list[NodeProcess]
) -> None:
    node, fake = NodeProcess(tmp_path, "b", "127.0.0.2"), NodeProcess(tmp_path, "a", "127.0.0.1")
    procs.append(node)
    peer = KeyHolder(fake, node)
    node.start([fake])
    try:
        first = await peer.accept_one()  # b dialled a: not the preferred direction
        preferred = await peer.dial()  # a dialled b: b must switch to this one
        assert await next_goodbye(first) == "replaced by the preferred connection"
        assert await next_goodbye(preferred, within=1.0) is None
        await trio.sleep(0.3)  # the replaced link's tasks have ended and said why
        # Closing the replaced link is no disconnect (operators watch for those).
        closed = node.logged("peer link closed", peer="a", reason="replaced by a newer connection")
        disconnected = node.logged("peer disconnected", peer="a")
    finally:
        await peer.close()
    assert node.logged("peer connected", peer="a", dialled_by="a")
    assert closed
    assert not disconnected
