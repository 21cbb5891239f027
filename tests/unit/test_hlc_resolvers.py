"""The hybrid logical clock and the conflict strategies' orders."""

from __future__ import annotations

import itertools
import sys
import types
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import Origin, RowVersion
from replicator.apply import conflicts
from replicator.apply.resolvers import (
    ManualResolver,
    PriorityResolver,
    Resolver,
    TimestampResolver,
    load_plugin,
    make_resolver,
)
from replicator.capture import hlc
from replicator.capture.store import Store, StoreSettings
from replicator.errors import ClockOffsetError, ConfigError

HOUR_MS = 3_600_000


@given(st.lists(st.integers(min_value=0, max_value=1 << 44), min_size=1, max_size=50))
def test_tick_is_monotonic_whatever_the_wall_clock_does(wall_readings: list[int]) -> None:
    stamp = 0
    for now in wall_readings:
        following = hlc.tick(stamp, now)
        assert following > stamp
        assert hlc.physical_ms(following) >= now or following == stamp + 1
        stamp = following


def test_tick_after_the_wall_clock_steps_back_an_hour_stays_ahead() -> None:
    now = 1_800_000_000_000
    before = hlc.tick(0, now)
    after = hlc.tick(before, now - HOUR_MS)
    assert after == before + 1


def test_receive_advances_past_a_remote_stamp() -> None:
    now = 1_800_000_000_000
    remote = hlc.pack(now + 5_000, 7)
    state = hlc.receive(hlc.pack(now), remote, now, max_offset_ms=60_000)
    assert hlc.tick(state, now) > remote


def test_receive_refuses_a_stamp_too_far_ahead() -> None:
    now = 1_800_000_000_000
    with pytest.raises(ClockOffsetError, match="ahead of this node's clock"):
        hlc.receive(0, hlc.pack(now + 61_000), now, max_offset_ms=60_000)


def version(stamp: int, node: str, generation: int = 1, inc: int = 1) -> RowVersion:
    return RowVersion(stamp, Origin(node, inc), generation)


VERSIONS = st.builds(
    version,
    st.integers(min_value=0, max_value=1 << 40),
    st.sampled_from(["node1", "node2", "node3"]),
    st.integers(min_value=1, max_value=5),
    st.integers(min_value=1, max_value=3),
)
RESOLVERS: list[Resolver] = [
    TimestampResolver(),
    PriorityResolver({"node1": 100, "node2": 50}),
    ManualResolver(),
]


@pytest.mark.parametrize("resolver", RESOLVERS, ids=lambda r: r.name)
# An origin never stamps two versions with the same hlc (its clock only moves forward), so
# real versions are unique by (hlc, origin).
@given(versions=st.lists(VERSIONS, min_size=2, max_size=6, unique_by=lambda v: (v.hlc, v.origin)))
def test_every_strategy_is_a_total_order(resolver: Resolver, versions: list[RowVersion]) -> None:
    keys = [resolver.order_key(v) for v in versions]
    assert len(set(keys)) == len(keys)  # distinct versions never tie
    winners = {max(order, key=resolver.order_key) for order in itertools.permutations(versions)}
    assert len(winners) == 1  # the maximum does not depend on arrival order


def test_priority_prefers_the_higher_node_among_concurrent_writes() -> None:
    resolver = PriorityResolver({"node1": 100, "node2": 50})
    older_high = version(1_000, "node1", generation=2)
    newer_low = version(2_000, "node2", generation=2)
    assert resolver.order_key(older_high) > resolver.order_key(newer_low)


def test_priority_lets_a_causal_successor_win_even_from_a_low_priority_node() -> None:
    resolver = PriorityResolver({"node1": 100, "node2": 50})
    original = version(1_000, "node1", generation=1)
    successor = version(2_000, "node2", generation=2)
    assert resolver.order_key(successor) > resolver.order_key(original)


def test_near_tie_is_measured_in_physical_milliseconds() -> None:
    resolver = TimestampResolver(clock_skew_tolerance_ms=100, near_tie="manual")
    a = version(hlc.pack(10_000), "node1")
    assert resolver.is_near_tie(a, version(hlc.pack(10_100), "node2"))
    assert not resolver.is_near_tie(a, version(hlc.pack(10_101), "node2"))
    assert resolver.review_reason(a, version(hlc.pack(10_050), "node2")) == "near_tie"
    assert TimestampResolver().review_reason(a, version(hlc.pack(10_050), "node2")) is None


class _ReverseOrder:
    """A plugin: lowest hlc wins (a total order, so still convergent)."""

    name = "reverse"

    def __init__(self, bias: int = 0) -> None:
        self.bias = bias

    def order_key(self, v: RowVersion) -> tuple[int, str, int]:
        return (-v.hlc + self.bias, v.origin.node_id, v.origin.incarnation)

    def review_reason(self, local: RowVersion, remote: RowVersion) -> str | None:
        return None


@pytest.fixture
def plugin_module() -> types.ModuleType:
    module = types.ModuleType("replicator_test_plugins")
    module.ReverseOrder = _ReverseOrder  # type: ignore[attr-defined]
    module.NotAResolver = object  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    return module


def test_plugin_is_loaded_from_a_dotted_path(plugin_module: types.ModuleType) -> None:
    resolver = make_resolver("replicator_test_plugins.ReverseOrder", plugin_options={"bias": 1})
    assert resolver.name == "reverse"
    assert resolver.order_key(version(5, "a")) > resolver.order_key(version(6, "a"))
    assert load_plugin("replicator_test_plugins:ReverseOrder").name == "reverse"


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("no_such_module_xyz.Resolver", "cannot import module"),
        ("replicator_test_plugins.Missing", "has no 'Missing'"),
        ("replicator_test_plugins.NotAResolver", "does not provide"),
        ("justaname", "unknown conflict strategy"),
    ],
)
def test_bad_plugin_path_is_a_clear_error(
    plugin_module: types.ModuleType, path: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        make_resolver(path)


def test_conflict_id_is_the_same_whichever_side_is_local() -> None:
    a, b = version(1, "node1"), version(2, "node2")
    assert conflicts.conflict_id("t", "'k'", a, b) == conflicts.conflict_id("t", "'k'", b, a)
    assert conflicts.conflict_id("t", "'k'", a, b) != conflicts.conflict_id("t", "'j'", a, b)


def test_open_conflicts_time_out_keeping_the_provisional_winner(tmp_path: Path) -> None:
    store = Store.open(
        StoreSettings(
            str(tmp_path / "s.db"), "n1", ("t",), schema_sql="CREATE TABLE t (k TEXT PRIMARY KEY)"
        )
    )
    ident = conflicts.record(
        store.conn,
        table="t",
        key="'k'",
        strategy="manual",
        reason="manual",
        local=(version(1, "n1"), None),
        remote=(version(2, "n2"), None),
        winner="remote",
    )
    assert conflicts.expire(store.conn, timeout_ms=HOUR_MS) == 0
    store.conn.execute("UPDATE _repl_conflicts SET detected_at = detected_at - ?", (2 * HOUR_MS,))
    assert conflicts.expire(store.conn, timeout_ms=HOUR_MS) == 1
    conflict = conflicts.get(store.conn, ident)
    assert conflict is not None
    assert conflict.status == "timed_out"
