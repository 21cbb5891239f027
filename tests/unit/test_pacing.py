"""The pacer shares SQLite's one write lock with the application: short pieces with long rests
while the application writes, longer pieces while it does not, and a rest longer than the
busy handler's longest sleep after every stretch of holding, so a writer that starts then
still gets in."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from replicator.capture.pacing import WritePacer
from replicator.capture.store import Store, StoreSettings


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pacer(clock: FakeClock) -> WritePacer:
    return WritePacer(
        target=0.005, rest=0.5, quiet=2.0, quiet_target=0.02, quiet_rest=0.05,
        quiet_run=0.5, long_rest=0.12, clock=clock,
    )  # fmt: skip


def rest_after(p: WritePacer, clock: FakeClock, hold: float) -> float:
    """Wait for the turn, hold the lock ``hold`` seconds; how long the pacer then keeps the
    node off it."""
    clock.now = max(clock.now, p._free_at) + hold
    p.held(hold)
    return round(p._free_at - clock.now, 6)


def test_while_the_application_is_quiet_pieces_are_long_and_rests_short() -> None:
    clock = FakeClock()
    p = pacer(clock)
    for _ in range(60):
        p.applied(1000, 0.02)  # 20 us per entry, learnt
    assert not p.contended()
    assert p.piece_size() == pytest.approx(1000, abs=2)  # 20 ms worth
    assert rest_after(p, clock, 0.02) == 0.001


def test_holding_the_lock_most_of_the_time_ends_in_a_rest_longer_than_a_busy_handler_sleep() -> (
    None
):
    clock = FakeClock()
    p = pacer(clock)
    rests = [rest_after(p, clock, 0.1) for _ in range(14)]
    long = [n for n, rest in enumerate(rests) if rest == 0.12]
    assert long, rests
    assert long[0] in (5, 6)  # after 0.6-0.7 s of holding, 95% of the time
    assert set(rests) == {0.005, 0.12}
    assert len(long) == 2


def test_replicating_with_gaps_of_its_own_the_node_never_rests_long() -> None:
    """Steady replication holds the lock half the time: the application finds it free at
    half its tries, and no batch waits behind a long rest."""
    clock = FakeClock()
    p = pacer(clock)
    for _ in range(200):
        assert rest_after(p, clock, 0.01) == 0.0005
        clock.now += 0.01


def test_once_the_application_commits_pieces_are_short_and_rests_long() -> None:
    clock = FakeClock()
    p = pacer(clock)
    for _ in range(60):
        p.applied(1000, 0.02)
    for _ in range(3):
        rest_after(p, clock, 0.1)  # part of a quiet run
    p.others_wrote()
    assert p.contended()
    assert p.piece_size() == pytest.approx(250, abs=1)  # 5 ms worth
    assert rest_after(p, clock, 0.005) == 0.0025
    clock.now += 2.5  # nothing more from the application
    assert not p.contended()
    # The quiet run starts over: no long rest is due before another half second of holding.
    rests = [rest_after(p, clock, 0.1) for _ in range(7)]
    assert rests[:5] == [0.005] * 5
    assert 0.12 in rests


@pytest.mark.parametrize("others_write", [False, True])
def test_a_store_tells_when_another_connection_committed_between_its_transactions(
    tmp_path: Path, others_write: bool
) -> None:
    path = tmp_path / "s.db"
    schema = "CREATE TABLE t (k PRIMARY KEY)"
    store = Store.open(StoreSettings(str(path), "n1", ("t",), schema_sql=schema))
    seen: list[int] = []
    store.others_observer = lambda: seen.append(1)
    app = sqlite3.connect(path, isolation_level=None)
    for n in range(3):
        store.begin_immediate()
        store.conn.execute("INSERT INTO _repl_applying (marker) VALUES (1)")
        store.conn.execute("DELETE FROM _repl_applying")
        store.commit()
        if others_write:
            app.execute("INSERT INTO t VALUES (?)", (n,))
    store.begin_immediate()
    store.commit()
    assert len(seen) == (3 if others_write else 0)  # its own commits never count
