"""A peer holding the cluster key sends what no honest node would: the node stays up, keeps
serving its other peer, refuses the input and says so (an alarm or a counter in status).

The cluster: node1 (the node under attack, a real process), node2 (its honest peer, a real
process) and node3, which node1 has configured but which is played by `KeyHolder`. Every
test ends by checking that node1 still replicates both ways with node2.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

from protocol import (
    Change,
    Changes,
    Heartbeat,
    Op,
    Origin,
    RowVersion,
    Skip,
    SnapshotBegin,
    SnapshotChunk,
    SnapshotRow,
    SnapshotTable,
)
from protocol.checks import INT64_MAX
from replicator.apply.applier import QUARANTINE_LIMIT
from replicator.capture import hlc
from replicator.harness import NodeProcess, wait_until
from tests.support.key_holder import KeyHolder, origin_of, reset, seal_raw, until_closed

FAKE = Origin("node3", 1)
LEASE_COLUMNS = ("mac", "ip", "hostname", "scope", "expires", "client_id")


@dataclass
class Cluster:
    node1: NodeProcess
    node2: NodeProcess
    fake: KeyHolder

    async def status(self) -> dict[str, Any]:
        return await trio.to_thread.run_sync(self.node1.status)

    async def eventually(self, condition: Callable[[], bool], what: str) -> None:
        await trio.to_thread.run_sync(lambda: wait_until(condition, 20, what))

    async def still_serving(self, tag: str) -> None:
        """node1 is alive and replicates with node2 both ways."""
        node1, node2 = self.node1, self.node2
        assert node1.process is not None
        assert node1.process.poll() is None, "node1 died"

        def write(node: NodeProcess, mac: str) -> None:
            with node.app() as app:
                app.execute(
                    "INSERT INTO dhcp_leases (mac, ip, expires) VALUES (?, ?, 1)", (mac, mac)
                )

        def has(node: NodeProcess, mac: str) -> bool:
            with node.app() as app:
                found = app.execute("SELECT 1 FROM dhcp_leases WHERE mac = ?", (mac,)).fetchone()
                return found is not None

        await trio.to_thread.run_sync(write, node1, f"{tag}-from-1")
        await self.eventually(lambda: has(node2, f"{tag}-from-1"), "node1 -> node2")
        await trio.to_thread.run_sync(write, node2, f"{tag}-from-2")
        await self.eventually(lambda: has(node1, f"{tag}-from-2"), "node2 -> node1")
        assert not node2.logged("peer disconnected", peer="node1"), "node1 stalled its links"

    def faults(self, status: dict[str, Any], reason: str) -> int:
        return int(status.get("peer_faults", {}).get(reason, 0))


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    node1 = NodeProcess(tmp_path, "node1", "127.0.0.1")
    node2 = NodeProcess(tmp_path, "node2", "127.0.0.2")
    node3 = NodeProcess(tmp_path, "node3", "127.0.0.3")
    node1.start([node2, node3])
    node2.start([node1])
    fake = KeyHolder(node3, node1)
    try:
        await trio.to_thread.run_sync(
            lambda: wait_until(
                lambda: any(p["state"] == "connected" for p in node1.status()["peers"]),
                what="node1 and node2 to connect",
            )
        )
        yield Cluster(node1, node2, fake)
    finally:
        await fake.close()
        node1.stop()
        node2.stop()


def lease_change(seq: int, key: str, *, origin: Origin = FAKE, **row: Any) -> Change:
    values = {"mac": key, "ip": f"ip-{key}", "hostname": None, "scope": "lan", "expires": 1,
              "client_id": None}  # fmt: skip
    values.update(row)
    return Change(
        origin=origin,
        seq=seq,
        table="dhcp_leases",
        op=Op.INSERT,
        pk=(key,),
        row=values,
        old=None,
        version=RowVersion(hlc.pack(hlc.wall_clock_ms()), origin, 1),
    )


def batch(sequence: int, changes: tuple[Change, ...] = (), skips: tuple[Skip, ...] = ()) -> Changes:
    return Changes("node3", sequence, hlc.pack(hlc.wall_clock_ms()), changes, skips)


def plaintext(
    message_type: int, body: bytes, *, flags: int = 0, raw_length: int | None = None
) -> bytes:
    size = len(body) if raw_length is None else raw_length
    return struct.pack(">BBI", message_type, flags, size) + body


def quarantined(node: NodeProcess) -> int:
    with node.app() as app:
        return int(app.execute("SELECT count(*) FROM _repl_quarantine").fetchone()[0])


# ---------------------------------------------------------------------------------------------
# Budgets before and after Hello


def disconnected_for(cluster: Cluster, reason: str) -> bool:
    """node1 dropped the fake node3's link for ``reason`` (or refused it at Hello, when the
    message arrived in the same read as the fake's Hello)."""
    node1 = cluster.node1
    lines = node1.logged("peer disconnected", peer="node3") + node1.logged("peer refused")
    return any(reason in line.get("reason", "") for line in lines)


def refused_before_hello(cluster: Cluster, reason: str) -> bool:
    """node1 refused a connection for ``reason``: during the handshake or at Hello, as the
    bytes happen to arrive."""
    node1 = cluster.node1
    lines = node1.logged("peer refused") + node1.logged("incoming connection refused")
    return any(reason in line.get("reason", "") for line in lines)


async def test_a_large_frame_before_hello_is_refused_at_its_length(cluster: Cluster) -> None:
    connection = await cluster.fake.dial(greet=False)
    header = struct.pack(">I", 8 << 20)  # 8 MiB, well under the frame cap, over the Hello cap
    await connection.stream.send_all(header + b"\x00" * 1024)
    await until_closed(connection)

    await cluster.eventually(
        lambda: refused_before_hello(cluster, "exceeds the cap of 1048576"),
        "the refusal naming the Hello cap",
    )
    await cluster.still_serving("big-hello")


async def test_a_compression_bomb_before_hello_is_refused(cluster: Cluster) -> None:
    connection = await cluster.fake.dial(greet=False)
    import lz4.block

    bomb = lz4.block.compress(b"\x90" * (8 << 20), store_size=False)  # ~33 kB claiming 8 MiB
    await seal_raw(connection, plaintext(1, bomb, flags=1, raw_length=8 << 20))
    await until_closed(connection)
    await cluster.eventually(
        lambda: refused_before_hello(cluster, "may not expand"), "the refusal naming the ratio"
    )
    await cluster.still_serving("lz4-bomb")


async def test_a_message_decoding_to_millions_of_elements_is_refused(cluster: Cluster) -> None:
    connection = await cluster.fake.dial()
    inner = b"\xdc" + (1000).to_bytes(2, "big") + b"\x90" * 1000
    body = b"\xdc" + (3000).to_bytes(2, "big") + inner * 3000  # 3 MB of empty arrays
    await seal_raw(connection, plaintext(Changes.TYPE, body))
    await until_closed(connection)
    await cluster.eventually(
        lambda: disconnected_for(cluster, "more elements"),
        "the disconnect naming the element budget",
    )
    await cluster.still_serving("elements")


async def test_a_map_with_a_repeated_key_is_refused(cluster: Cluster) -> None:
    connection = await cluster.fake.dial()
    vector: list[Any] = []
    checksums = b"\x82\xa1t" + msgpack.packb(b"x") + b"\xa1t" + msgpack.packb(b"y")
    body = b"\x95" + msgpack.packb(1) + msgpack.packb(vector) + checksums + b"\x90\x90"
    await seal_raw(connection, plaintext(Heartbeat.TYPE, body))
    await until_closed(connection)
    await cluster.eventually(
        lambda: disconnected_for(cluster, "repeats a key"), "the disconnect naming the repeated key"
    )
    await cluster.still_serving("dup-key")


# ---------------------------------------------------------------------------------------------
# The cluster view


async def test_gossip_of_thousands_of_made_up_nodes_is_bounded(cluster: Cluster) -> None:
    connection = await cluster.fake.dial()
    now = hlc.wall_clock_ms()
    known = {f"ghost{n}": (now, {Origin(f"ghost{n}", 1): n}) for n in range(4000)}
    await connection.send(Heartbeat(now, {}, {}, known))
    await connection.send(Heartbeat(now, {}, {}, {"node2": (now + 3_600_000, {})}))  # future
    await trio.sleep(1.5)  # node1 gossips its own view meanwhile: it must stay readable
    status = await cluster.status()
    assert cluster.faults(status, "cluster_view") >= 4000 - 64 + 1
    await cluster.still_serving("ghosts")
    heartbeats = [m for m in await _drain(connection) if isinstance(m, Heartbeat)]
    assert heartbeats, "node1 kept sending heartbeats"
    assert len(heartbeats[-1].known) <= 64 + 3  # its peers, itself and the bounded rest


async def _drain(connection: Any, seconds: float = 1.0) -> list[Any]:
    received = []
    with trio.move_on_after(seconds):
        while True:
            received.append(await connection.receive())
    return received


# ---------------------------------------------------------------------------------------------
# Skip markers


async def test_a_forged_skip_marker_is_refused_and_the_origin_keeps_flowing(
    cluster: Cluster,
) -> None:
    node2 = origin_of(await trio.to_thread.run_sync(cluster.node2.status))
    connection = await cluster.fake.dial()
    await connection.send(batch(1, skips=(Skip(node2, 1, INT64_MAX),)))
    await until_closed(connection)
    status = await cluster.status()
    assert cluster.faults(status, "skip_beyond_holdings") == 1
    assert any("skip marker" in alarm for alarm in status["alarms"])
    assert status["version_vector"].get(str(node2), 0) < INT64_MAX
    await cluster.still_serving("forged-skip")


# ---------------------------------------------------------------------------------------------
# Changes that cannot be applied


async def test_changes_for_tables_not_replicated_become_skip_markers(cluster: Cluster) -> None:
    connection = await cluster.fake.dial()
    junk = Change(FAKE, 1, "secrets", Op.INSERT, ("k",), {"k": "k", "v": "x" * 100}, None,
                  RowVersion(hlc.pack(hlc.wall_clock_ms()), FAKE, 1))  # fmt: skip
    await connection.send(batch(1, (junk, lease_change(2, "after-junk"))))
    await cluster.eventually(lambda: cluster.node2.count("dhcp_leases") >= 1, "the lease")
    status = await cluster.status()
    assert cluster.faults(status, "not_replicated_table") == 1
    assert quarantined(cluster.node1) == 0
    for node in (cluster.node1, cluster.node2):
        with node.app() as app:
            stored = app.execute("SELECT count(*) FROM _repl_log WHERE tbl = 'secrets'")
            assert stored.fetchone()[0] == 0, f"{node.node_id} stored the junk"
    await cluster.still_serving("not-replicated")


async def test_malformed_changes_are_quarantined_never_applied_nor_forwarded(
    cluster: Cluster,
) -> None:
    connection = await cluster.fake.dial()
    wide = lease_change(1, "wide")
    wide = Change(**{**{f: getattr(wide, f) for f in wide.__slots__}, "pk": ("wide", "extra")})
    empty = lease_change(2, "empty")
    empty = Change(**{**{f: getattr(empty, f) for f in empty.__slots__}, "row": {}})
    liar = lease_change(3, "liar", mac="someone-else")
    no_ip = lease_change(4, "no-ip", ip=None)  # NOT NULL: SQLite refuses this one row
    good = lease_change(5, "good")
    await connection.send(batch(1, (wide, empty, liar, no_ip, good)))
    await cluster.eventually(lambda: "good" in str(cluster.node2.rows("dhcp_leases")), "good")
    status = await cluster.status()
    assert cluster.faults(status, "malformed_change") == 3
    assert quarantined(cluster.node1) == 4
    assert status["version_vector"][str(FAKE)] == 5
    assert any("quarantined" in alarm for alarm in status["alarms"])
    with cluster.node2.app() as app:
        forwarded = app.execute(
            "SELECT origin_seq FROM _repl_log WHERE origin_node = 'node3' AND op != 0"
        ).fetchall()
    assert sorted(seq for (seq,) in forwarded) == [4, 5]  # well formed: they may apply elsewhere
    await cluster.still_serving("malformed")


async def test_the_quarantine_is_bounded(cluster: Cluster) -> None:
    connection = await cluster.fake.dial()
    over = QUARANTINE_LIMIT + 50
    seq = 0
    while seq < over:
        changes = []
        for _ in range(min(2000, over - seq)):
            seq += 1
            change = lease_change(seq, f"q{seq}")
            changes.append(Change(**{**{f: getattr(change, f) for f in change.__slots__},
                                     "row": {}}))  # fmt: skip
        await connection.send(batch(seq, tuple(changes)))
    await cluster.eventually(
        lambda: cluster.node1.status()["version_vector"].get(str(FAKE)) == over, "every change"
    )
    status = await cluster.status()
    assert quarantined(cluster.node1) == QUARANTINE_LIMIT
    assert status["quarantine"]["dropped"] == 50
    assert any("quarantine is full" in alarm for alarm in status["alarms"])
    await cluster.still_serving("quarantine")


# ---------------------------------------------------------------------------------------------
# Snapshots


def _declared(rows: int, size: int) -> SnapshotTable:
    return SnapshotTable("dhcp_leases", LEASE_COLUMNS, ("mac",), rows, size)


def _rows(first: int, count: int) -> tuple[SnapshotRow, ...]:
    stamp = hlc.pack(hlc.wall_clock_ms())
    rows = []
    for n in range(first, first + count):
        mac = f"s{n:05d}"
        values = {"mac": mac, "ip": mac, "hostname": None, "scope": "lan", "expires": 1,
                  "client_id": None}  # fmt: skip
        rows.append(SnapshotRow((mac,), values, RowVersion(stamp, FAKE, 1), 1))
    return tuple(rows)


def staged(node: NodeProcess) -> int:
    with node.app() as app:
        return int(app.execute("SELECT count(*) FROM _repl_snapshot_stage").fetchone()[0])


async def test_snapshot_chunks_beyond_what_was_declared_are_refused(cluster: Cluster) -> None:
    connection = await cluster.fake.dial()
    await connection.send(SnapshotBegin(7, {FAKE: 1}, (_declared(10, 1 << 20),)))
    await connection.send(SnapshotChunk(7, "dhcp_leases", 0, _rows(0, 10)))
    await connection.send(SnapshotChunk(7, "dhcp_leases", 1, _rows(10, 10)))  # beyond
    await until_closed(connection)
    status = await cluster.status()
    assert any("more of 'dhcp_leases' than it declared" in a for a in status["alarms"])
    await cluster.eventually(lambda: staged(cluster.node1) == 0, "staging to be cleared")
    assert cluster.node1.count("dhcp_leases") == 0 or "s00000" not in str(
        cluster.node1.rows("dhcp_leases")
    )
    await cluster.still_serving("snapshot-budget")


async def test_snapshot_bytes_beyond_what_was_declared_are_refused(cluster: Cluster) -> None:
    connection = await cluster.fake.dial()
    await connection.send(SnapshotBegin(8, {FAKE: 1}, (_declared(1000, 2000),)))
    await connection.send(SnapshotChunk(8, "dhcp_leases", 0, _rows(0, 100)))
    await until_closed(connection)
    status = await cluster.status()
    assert any("than it declared" in alarm for alarm in status["alarms"])
    assert staged(cluster.node1) == 0
    await cluster.still_serving("snapshot-bytes")


async def test_an_abandoned_snapshot_leaves_nothing_staged(cluster: Cluster) -> None:
    connection = await cluster.fake.dial()
    await connection.send(SnapshotBegin(9, {FAKE: 1}, (_declared(1000, 1 << 24),)))
    await connection.send(SnapshotChunk(9, "dhcp_leases", 0, _rows(0, 100)))
    await cluster.eventually(lambda: staged(cluster.node1) == 1, "the chunk to be staged")
    await connection.abort()
    await cluster.eventually(lambda: staged(cluster.node1) == 0, "staging to be cleared")
    await cluster.still_serving("abandoned")


# ---------------------------------------------------------------------------------------------
# Identity


async def test_a_dialled_peer_must_answer_as_the_node_it_was_dialled_as(cluster: Cluster) -> None:
    connection = await cluster.fake.accept_one(hello=cluster.fake.hello(node_id="node2"))
    await until_closed(connection)
    await cluster.eventually(
        lambda: any("says it is 'node2'" in line.get("reason", "")
                    for line in cluster.node1.logged("peer refused")),
        "the refusal",
    )  # fmt: skip
    await cluster.still_serving("impostor-dialled")


async def test_a_newcomer_claiming_a_live_peers_id_is_refused(cluster: Cluster) -> None:
    await trio.sleep(2.5)  # node2's link has settled and heartbeats flow
    impostor = await cluster.fake.dial(hello=cluster.fake.hello(node_id="node2"))
    await until_closed(impostor)
    await cluster.eventually(
        lambda: bool(cluster.node1.logged("connection refused: this peer's link is alive")),
        "the refusal",
    )
    assert not cluster.node1.logged("peer disconnected", peer="node2")
    assert cluster.faults(await cluster.status(), "identity") >= 1
    await cluster.still_serving("impostor")


# ---------------------------------------------------------------------------------------------
# Frozen, stalled and broken peers while connecting


async def test_a_peer_frozen_at_dial_costs_a_log_line(cluster: Cluster) -> None:
    """node3's address accepts TCP and never answers (a frozen or overloaded host)."""
    listeners = await trio.open_tcp_listeners(cluster.fake.me.port, host=cluster.fake.me.host)
    accepted: list[trio.SocketStream] = []
    try:
        async with trio.open_nursery() as nursery:

            async def hold() -> None:
                while True:
                    accepted.append(await listeners[0].accept())

            nursery.start_soon(hold)

            def timed_out() -> bool:  # (the log says it once; repeats are throttled)
                peers = {peer["id"]: peer for peer in cluster.node1.status()["peers"]}
                return "handshake not completed" in str(peers["node3"]["last_error"])

            await cluster.eventually(timed_out, "node1 to give up on the frozen peer")
            assert cluster.node1.logged("cannot reach peer", peer="node3")
            await cluster.still_serving("frozen-at-dial")
            nursery.cancel_scope.cancel()
    finally:
        for stream in accepted:
            await stream.aclose()
        await listeners[0].aclose()


async def test_a_peer_silent_after_the_handshake_at_dial_costs_a_log_line(
    cluster: Cluster,
) -> None:
    connection = await cluster.fake.accept_one(greet=False)  # handshake done, no Hello
    await until_closed(connection, within=15)
    await cluster.eventually(
        lambda: any("no Hello within" in line.get("reason", "")
                    for line in cluster.node1.logged("peer refused", peer="node3")),
        "the Hello deadline",
    )  # fmt: skip
    await cluster.still_serving("silent-at-dial")


async def test_peers_that_stall_or_reset_while_connecting_cost_a_log_line_each(
    cluster: Cluster,
) -> None:
    node1 = cluster.node1
    # Frozen at accept: connects, never says a word.
    frozen = await trio.open_tcp_stream(node1.host, node1.port)
    # Silent after the handshake.
    silent = await cluster.fake.dial(greet=False)
    # Half a Hello frame, then a reset.
    resetting = await cluster.fake.dial(greet=False)
    frame = resetting.session.send(cluster.fake.hello())
    await resetting.stream.send_all(frame[: len(frame) // 2])
    await trio.sleep(0.2)
    reset(resetting)
    # Half a frame, then nothing.
    stalled = await cluster.fake.dial(greet=False)
    frame = stalled.session.send(cluster.fake.hello())
    await stalled.stream.send_all(frame[: len(frame) // 2])

    def counted() -> bool:  # one log line per kind and source; the rest are counted
        faults = cluster.node1.status()["peer_faults"]
        return faults.get("hello", 0) >= 3 and faults.get("handshake", 0) >= 1

    await cluster.eventually(counted, "the frozen, the stalled and the reset connections")
    lines = node1.logged("peer refused") + node1.logged("incoming connection refused")
    reasons = " ".join(str(line.get("reason")) for line in lines)
    assert "handshake not completed" in reasons
    assert "connection lost" in reasons or "no Hello within" in reasons
    await frozen.aclose()
    await silent.abort()
    await stalled.abort()
    await cluster.still_serving("stalls")
