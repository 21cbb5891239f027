"""A link's log reader moves past entries it leaves out, so they are never scanned again."""

from __future__ import annotations

from pathlib import Path

from replicator.capture.log_reader import LogReader
from tests.sim.test_retention import TIMESTAMP, write
from tests.support.cluster_sim import SimNode


async def test_entries_of_the_peer_itself_still_move_the_read_position(tmp_path: Path) -> None:
    a, b = SimNode(tmp_path, "a", TIMESTAMP), SimNode(tmp_path, "b", TIMESTAMP)
    write(b, *(f"b{i}" for i in range(10)))
    a.pull(b)  # a's log: ten entries of b's own, then one of a's
    write(a, "a1")
    end = a.store.log_position()
    reader = LogReader(a.store.settings, b.origin, a.store.log_position)
    records, read_through = await reader(0, 100)
    assert [r.entry.origin for r in records] == [a.origin]
    assert read_through == end
    write(b, *(f"b{i}" for i in range(10, 20)))
    a.pull(b)
    # Only b's entries since: none to send, yet the position moves to the end of the log.
    records, read_through = await reader(end, 100)
    assert records == []
    assert read_through == a.store.log_position() == end + 10
    # A full batch: read through its last entry only.
    records, read_through = await LogReader(a.store.settings, a.origin, lambda: 0)(0, 4)
    assert len(records) == 4
    assert read_through == records[-1].position
