"""`Link` bookkeeping, driven through a scripted connection: what is in flight, what the peer
holds, which skip markers are accepted, how batches are cut.

The connection stands in for the socket only; the link's own code runs as in a node.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest
import trio

from protocol import (
    BUCKETS,
    Ack,
    Change,
    Changes,
    Hello,
    Message,
    Op,
    Origin,
    RowVersion,
    Skip,
    SnapshotRequest,
)
from replicator.capture.store import LogRecord
from replicator.sync.faults import Faults
from replicator.sync.link import REPAIR_BY_KEY, Link, LinkSettings, PeerStatus
from replicator.sync.membership import ClusterView
from replicator.sync.peer import PeerDisconnected

ME, PEER, OTHER = Origin("a", 1), Origin("b", 1), Origin("c", 1)


class ScriptedConnection:
    """Records what the link sends; ``on_send`` runs inside a send, before it returns (as a
    reply read by the receiving task while the sender awaits the socket would)."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.on_send: Callable[[Message], None] | None = None
        self.bytes_sent = self.bytes_received = 0

    async def send(self, message: Message, *, large: bool = False) -> None:
        self.sent.append(message)
        if self.on_send is not None:
            self.on_send(message)

    def take_ready(self, wanted: Callable[[Message], bool]) -> Message | None:
        return None


class NoSnapshots:
    def log_floor(self) -> Mapping[Origin, int]:
        return {}

    def local_checksums(self) -> tuple[dict[Origin, int], dict[str, bytes]]:
        return {}, {}


def change(origin: Origin, seq: int, size: int = 10) -> Change:
    row = {"k": f"{origin.node_id}{seq}", "v": "x" * size}
    return Change(origin, seq, "t", Op.INSERT, (row["k"],), row, None, RowVersion(seq, origin, 1))


def make_link(
    vector: dict[Origin, int] | None = None,
    parts: Mapping[str, Any] | None = None,
    capabilities: frozenset[str] = frozenset(),
    **settings: Any,
) -> tuple[Link, ScriptedConnection, dict[str, str], Faults]:
    connection = ScriptedConnection()
    alarms: dict[str, str] = {}
    faults = Faults()
    hello = Hello("b", 1, capabilities, 1, b"", dict(vector or {}))

    async def nothing(*args: Any) -> Any:
        raise AssertionError("not expected in this test")

    link = Link(
        connection,  # type: ignore[arg-type]
        hello,
        PeerStatus("b", "127.0.0.2:1"),
        node_id="a",
        settings=LinkSettings(**settings),
        **{  # type: ignore[arg-type]
            "read_log": nothing,
            "apply": nothing,
            "wait_for_log": nothing,
            "vector": lambda: {ME: 100, OTHER: 7},
            "cluster": ClusterView("a", ["b"]),
            "snapshots": NoSnapshots(),
            "alarms": alarms,
            "faults": faults,
            **(parts or {}),
        },
    )
    return link, connection, alarms, faults


async def test_an_ack_read_before_its_send_returns_still_delivers_the_batch() -> None:
    link, connection, _, _ = make_link()

    def ack_at_once(message: Message) -> None:
        if isinstance(message, Changes):
            link._on_ack(Ack({ME: 3}, message.sequence))

    connection.on_send = ack_at_once
    await link._send_entries([(change(ME, n), n) for n in (1, 2, 3)], large=False)
    assert link.in_flight == 0
    assert link.status.acked_position == 3
    assert link.lag_seconds == 0


async def test_a_batch_the_peer_shows_it_holds_is_delivered_without_its_ack() -> None:
    link, _, _, _ = make_link()
    await link._send_entries([(change(ME, 1), 5), (change(OTHER, 4), 6)], large=False)
    assert link.in_flight == 1
    link._peer_holds({ME: 1})  # not all of it yet
    assert link.in_flight == 1
    link._peer_holds({ME: 1, OTHER: 4})  # a heartbeat: it holds everything the batch carried
    assert link.in_flight == 0
    assert link.status.acked_position == 6
    assert link.lag_seconds == 0


async def test_skip_markers_beyond_what_the_peer_has_shown_are_refused() -> None:
    link, _, alarms, faults = make_link(vector={PEER: 10})
    link._check_skips([Skip(PEER, 5, 10)])  # within its Hello
    link._shown[OTHER] = 20  # shown by an ack or a heartbeat
    link._check_skips([Skip(OTHER, 1, 20)])
    with pytest.raises(PeerDisconnected, match="skip marker"):
        link._check_skips([Skip(OTHER, 21, (1 << 63) - 1)])
    assert faults.as_dict() == {"skip_beyond_holdings": 1}
    assert "forged_skip:b" in alarms


async def test_this_node_shows_what_it_holds_before_markers_beyond_what_it_showed() -> None:
    link, connection, _, _ = make_link()
    await link._send_entries([(Skip(OTHER, 1, 7), 1)], large=False)
    ack, batch = connection.sent
    assert isinstance(ack, Ack)
    assert ack.version_vector[OTHER] >= 7
    assert isinstance(batch, Changes)
    await link._send_entries([(Skip(OTHER, 5, 7), 2)], large=False)
    assert isinstance(connection.sent[-1], Changes)  # shown already: no second Ack


async def test_batches_are_cut_by_bytes_and_elements_within_the_bounds() -> None:
    link, _, _, _ = make_link(max_batch_bytes=10_000, max_batch_elements=10_000)
    records = [LogRecord(n, change(ME, n, size=900), 900) for n in range(1, 51)]
    pieces = link._cut(records)
    assert [record for piece, _ in pieces for record in piece] == records
    assert all(size <= 10_000 for _, size in pieces)
    assert len(pieces) > 1
    big = [LogRecord(1, change(ME, 1, size=50_000), 50_000)]
    assert [len(piece) for piece, _ in link._cut(big)] == [1]  # alone in its batch


async def test_a_peer_reporting_less_of_its_own_writes_than_this_node_holds_raises_an_alarm() -> (
    None
):
    link, _, alarms, _ = make_link(heartbeat_interval=1.0, liveness_timeout=3.0)
    held = {ME: 100, OTHER: 7, PEER: 50}
    link._vector = lambda: dict(held)
    for second in range(5):
        link._watch_own_origin({PEER: 50}, now=second)
    assert "origin_regressed:b" not in alarms
    # Heartbeats held up by a stalled connection arrive together, all old: no alarm.
    for _ in range(6):
        link._watch_own_origin({PEER: 10}, now=5.0)
    link._watch_own_origin({PEER: 50}, now=5.01)
    assert "origin_regressed:b" not in alarms
    # A peer that keeps reporting less, heartbeat after heartbeat, for a liveness timeout.
    for second in range(6, 9):
        link._watch_own_origin({PEER: 10}, now=second)
    assert "origin_regressed:b" not in alarms
    link._watch_own_origin({PEER: 10}, now=9)
    assert "origin_regressed:b" in alarms
    link._watch_own_origin({PEER: 50}, now=10)
    assert "origin_regressed:b" not in alarms


class SnapshotAt(NoSnapshots):
    """Sends a full snapshot taken at log position 40, when this node held ME 30, OTHER 7."""

    async def send(self, *args: Any) -> tuple[int, dict[Origin, int]]:
        return 40, {ME: 30, OTHER: 7}


async def test_a_snapshot_counts_as_acknowledged_once_the_peer_shows_it_holds_it() -> None:
    """A peer brought up to date by a snapshot holds everything: its acknowledged position
    follows the snapshot (it stayed at the last batch, so a checkpoint and lag were wrong)."""
    reached = trio.Event()

    async def read_log(position: int, limit: int) -> tuple[list[LogRecord], int]:
        return [], position

    async def wait_for_log(position: int) -> None:
        reached.set()
        await trio.sleep_forever()

    parts = {"snapshots": SnapshotAt(), "read_log": read_log, "wait_for_log": wait_for_log}
    link, _, _, _ = make_link(parts=parts)
    link.status.acked_position = link.status.sent_position = 9
    link.request_snapshot("scheduled")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(link._send_loop)
        await reached.wait()
        assert link.status.sent_position == 40
        link._peer_holds({ME: 12, PEER: 3})  # a heartbeat from before the merge
        assert link.status.acked_position == 9
        link._peer_holds({ME: 30, OTHER: 7, PEER: 3})  # its ack of the merged snapshot
        assert link.status.acked_position == 40
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("offered", [True, False])
async def test_a_repair_names_rows_only_to_a_peer_that_offers_it(offered: bool) -> None:
    """A peer of an older version would refuse a request naming rows and drop the link: it is
    asked for the differing buckets only."""
    capabilities = frozenset({REPAIR_BY_KEY}) if offered else frozenset()
    link, connection, _, _ = make_link(capabilities=capabilities)
    buckets = {"t": b"\x00" * BUCKETS * 16}
    await link.ask_repair("rows edited", buckets, {"t": ("'k1'",)})
    (request,) = connection.sent
    assert isinstance(request, SnapshotRequest)
    assert request.buckets == buckets
    assert request.keys == ({"t": ("'k1'",)} if offered else {})
