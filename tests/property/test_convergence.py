"""Design section 4's promises, checked on in-process clusters of real SQLite files.

Every strategy is a total order on row versions and a node keeps the greater version, so:
any delivery order (with duplicates, gaps and redeliveries) leaves identical tables on every
node, the kept version is the order's maximum of everything written, a write made on top of
another beats it everywhere, a conflict has the same id on every node that detects it, and a
resolution on any node closes it everywhere. Section 5: chains forward other origins' entries,
and an entry reaching a node by two paths applies once.

Hypothesis generates programs: application writes through plain `sqlite3` connections
(autocommit, explicit transactions, rolled-back transactions) interleaved with deliveries of a
peer's whole log, a slice of it, or any picked records in any order (duplicates, gaps).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from protocol import Change, Origin, RowVersion
from replicator.apply import conflicts
from replicator.apply.resolvers import ManualResolver, PriorityResolver, Resolver, TimestampResolver
from tests.support.cluster_sim import (
    COLUMNS,
    PRIMARY_KEYS,
    TABLES,
    Recorded,
    SimNode,
    deliver,
    deliver_checked,
    sync_until_quiescent,
    typed,
)

NAMES = ("n1", "n2", "n3", "n4")
STRATEGIES = ("timestamp", "priority", "manual", "near_tie")
"""``near_tie``: timestamp whose near-ties (here: every conflict) are queued for review."""
QUEUEING = ("manual", "near_tie")
LEASE_KEYS: tuple[tuple[Any, ...], ...] = (("aa",), ("b'c",), ("ünï",), ("",), ("a\x00b",))
KV_KEYS: tuple[tuple[Any, ...], ...] = ((1, "x"), (1, "y"), (2, "x"), (-3, ""))
KEYS = {"leases": LEASE_KEYS, "kv": KV_KEYS}

BIG = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SMALL = settings(BIG, max_examples=25)

# -- programs --------------------------------------------------------------------------------

_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=4)
_integers = st.integers(-(2**63), 2**63 - 1)
_reals = st.floats(allow_nan=False)  # SQLite stores no NaN (it becomes NULL)
_blobs = st.binary(max_size=4)
SQL_VALUES = st.one_of(st.none(), _integers, _reals, _text, _blobs)


def _typed(natural: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the column's own type, sometimes anything (SQLite's affinity decides)."""
    return st.one_of(natural, natural, SQL_VALUES)


LEASE_VALUES = st.tuples(
    _typed(_text), _typed(_integers), _typed(_reals), _typed(_blobs), SQL_VALUES
)
KINDS = ("insert", "replace", "upsert", "update", "delete", "rekey", "update_all", "delete_all")
_key = st.integers(0, 3)
OPS = st.one_of(
    st.tuples(st.just("leases"), st.sampled_from(KINDS), _key, _key, LEASE_VALUES),
    st.tuples(st.just("kv"), st.sampled_from(KINDS), _key, _key, st.tuples(SQL_VALUES)),
)
Step = tuple[Any, ...]


def steps(
    nodes: int,
    links: Sequence[tuple[int, int]] | None = None,
    *,
    whole_logs: bool = False,
    resolutions: bool = False,
) -> tuple[st.SearchStrategy[Step], st.SearchStrategy[Step]]:
    """Write steps ("write", node, mode, ops) and exchange steps: ("deliver", source, target,
    how, params) along ``links`` (default: every pair), or ("resolve", node, pick, use)."""
    node = st.integers(0, nodes - 1)
    if links is None:
        pair = st.tuples(node, st.integers(1, nodes - 1)).map(lambda p: (p[0], sum(p) % nodes))
    else:
        pair = st.sampled_from(list(links))
    how: st.SearchStrategy[tuple[str, tuple[int, ...]]] = st.just(("all", ()))
    if not whole_logs:
        how = st.one_of(
            how,
            st.tuples(st.just("slice"), st.tuples(st.integers(0, 40), st.integers(0, 40))),
            st.tuples(
                st.just("pick"), st.lists(st.integers(0, 60), min_size=1, max_size=10).map(tuple)
            ),
            st.tuples(st.just("drop"), st.tuples(st.integers(0, 60))),
        )
    exchange = st.builds(lambda p, h: ("deliver", *p, *h), pair, how)
    if resolutions:
        use = st.sampled_from(("local", "remote"))
        resolve = st.tuples(st.just("resolve"), node, st.integers(0, 5), use)
        exchange = st.one_of(exchange, exchange, resolve)
    mode = st.sampled_from(("auto", "auto", "txn", "rollback"))
    ops = st.lists(OPS, min_size=1, max_size=3).map(tuple)
    return st.tuples(st.just("write"), node, mode, ops), exchange


def programs(nodes: int, *, writes: bool = True, **options: Any) -> st.SearchStrategy[list[Step]]:
    """Rounds of writes on several nodes (concurrent: nothing delivered between them) followed
    by a few exchanges; without ``writes``, exchanges only (a delivery schedule)."""
    write, exchange = steps(nodes, **options)
    if not writes:
        return st.lists(exchange, min_size=1, max_size=12)
    rounds = st.tuples(
        st.lists(write, min_size=1, max_size=4), st.lists(exchange, min_size=0, max_size=4)
    )
    return st.lists(rounds, min_size=1, max_size=6).map(
        lambda found: [step for ws, xs in found for step in (*ws, *xs)]
    )


# -- running them ----------------------------------------------------------------------------


def make_resolver(strategy: str, priorities: Sequence[int] = (3, 2, 1, 0)) -> Resolver:
    if strategy == "timestamp":
        return TimestampResolver()
    if strategy == "priority":
        return PriorityResolver(dict(zip(NAMES, priorities, strict=False)))
    if strategy == "manual":
        return ManualResolver()
    if strategy == "near_tie":
        return TimestampResolver(clock_skew_tolerance_ms=3_600_000, near_tie="manual")
    raise ValueError(strategy)


@contextmanager
def cluster(size: int, resolver: Resolver) -> Iterator[list[SimNode]]:
    """Fresh nodes in a fresh directory (hypothesis runs the test body many times)."""
    with tempfile.TemporaryDirectory() as directory:
        nodes = [SimNode(directory, NAMES[i], resolver) for i in range(size)]
        try:
            yield nodes
        finally:
            for node in nodes:
                node.close()


def _where(table: str) -> str:
    return " AND ".join(f"{c} = ?" for c in PRIMARY_KEYS[table])


def run_op(node: SimNode, op: tuple[Any, ...]) -> None:
    table, kind, key, key2, values = op
    pk, columns = PRIMARY_KEYS[table], COLUMNS[table]
    others = columns[len(pk) :]
    names, marks = ", ".join(columns), ", ".join("?" for _ in columns)
    key_values = KEYS[table][key]
    if kind in ("insert", "replace", "upsert"):
        verb = "INSERT OR REPLACE" if kind == "replace" else "INSERT"
        sql = f"{verb} INTO {table} ({names}) VALUES ({marks})"
        if kind == "upsert":
            sets = ", ".join(f"{c} = excluded.{c}" for c in others)
            sql += f" ON CONFLICT ({', '.join(pk)}) DO UPDATE SET {sets}"
        node.execute(sql, (*key_values, *values))
    elif kind == "update":
        sets = ", ".join(f"{c} = ?" for c in others)
        node.execute(f"UPDATE {table} SET {sets} WHERE {_where(table)}", (*values, *key_values))
    elif kind == "delete":
        node.execute(f"DELETE FROM {table} WHERE {_where(table)}", key_values)
    elif kind == "rekey":  # captured as a delete of the old key and an insert of the new one
        sets = ", ".join(f"{c} = ?" for c in pk)
        node.execute(
            f"UPDATE {table} SET {sets} WHERE {_where(table)}", (*KEYS[table][key2], *key_values)
        )
    elif kind == "update_all":  # one statement, many rows
        node.execute(f"UPDATE {table} SET {others[0]} = ?", (values[0],))
    else:  # delete_all: no truncate shortcut may skip the capture triggers
        node.execute(f"DELETE FROM {table}")


def run_write(node: SimNode, mode: str, ops: Sequence[tuple[Any, ...]]) -> None:
    if mode == "auto":
        for op in ops:
            run_op(node, op)
        return
    before = node.state()
    node.app.execute("BEGIN")
    for op in ops:
        run_op(node, op)
    node.app.execute("COMMIT" if mode == "txn" else "ROLLBACK")
    if mode == "rollback":
        assert node.state() == before, "a rolled-back transaction left a trace"


def pick_records(node: SimNode, how: str, params: Sequence[int]) -> list[Any]:
    log = node.log()
    if how == "all":
        return log
    if how == "slice":
        start, stop = params
        return log[start % (len(log) + 1) : stop % (len(log) + 1)]
    if how == "drop":  # one message lost
        return [r for i, r in enumerate(log) if i != params[0] % len(log)]
    return [log[i % len(log)] for i in params] if log else []


def resolve_one(node: SimNode, pick: int, use: str) -> tuple[str, Recorded] | None:
    """Resolve one of the node's open conflicts, as an operator would."""
    open_ids = node.open_conflicts()
    if not open_ids:
        return None
    ident = open_ids[pick % len(open_ids)]
    recorded = node.conflicts()[ident]
    resolved = conflicts.resolve(node.app, ident, PRIMARY_KEYS[recorded.table], use=use)
    assert resolved.status == "resolved"
    return ident, recorded


def run(nodes: Sequence[SimNode], program: Sequence[Step]) -> None:
    for step in program:
        if step[0] == "write":
            _, index, mode, ops = step
            run_write(nodes[index], mode, ops)
        elif step[0] == "deliver":
            _, source, target, how, params = step
            deliver_checked(nodes[target], pick_records(nodes[source], how, params))
        else:
            _, index, pick, use = step
            resolve_one(nodes[index], pick, use)


NodeFactory = Callable[..., list[SimNode]]


@pytest.fixture
def make_nodes(tmp_path: Path) -> Iterator[NodeFactory]:
    """``make_nodes(resolver, count=3)``: nodes n1.. in tmp_path, closed after the test."""
    made: list[SimNode] = []

    def factory(resolver: Resolver, count: int = 3) -> list[SimNode]:
        nodes = [SimNode(tmp_path, NAMES[len(made) + i], resolver) for i in range(count)]
        made.extend(nodes)
        return nodes

    yield factory
    for node in made:
        node.close()


# -- what must hold --------------------------------------------------------------------------


def key_of(node: SimNode, change: Change) -> tuple[str, str]:
    return change.table, node.store.key(change.pk)


def all_changes(nodes: Sequence[SimNode]) -> dict[tuple[Origin, int], Change]:
    """Every change any node holds; a forwarded entry must equal its origin's, field for field."""
    found: dict[tuple[Origin, int], Change] = {}
    for node in nodes:
        for change in node.changes():
            seen = found.setdefault((change.origin, change.seq), change)
            assert seen == change, f"{node} holds a different {change.origin}:{change.seq}"
            assert typed(seen.row) == typed(change.row)
    return found


def assert_converged(nodes: Sequence[SimNode], resolver: Resolver) -> None:
    """Identical tables and versions everywhere, and each key holds the order's maximum of every
    version ever written to it (so the winner is the strategy's, not just an agreement)."""
    first = nodes[0]
    changes = all_changes(nodes)
    for node in nodes[1:]:
        assert node.vector() == first.vector()
        for table in TABLES:
            assert node.rows(table) == first.rows(table), f"{node} differs from {first}: {table}"
        assert node.rowmeta() == first.rowmeta()
    origins: dict[Origin, list[int]] = {}
    for origin, seq in changes:
        origins.setdefault(origin, []).append(seq)
    assert first.vector() == {o: len(s) for o, s in origins.items()}
    for origin, seqs in origins.items():
        assert sorted(seqs) == list(range(1, len(seqs) + 1)), origin
    winners: dict[tuple[str, str], Change] = {}
    for change in changes.values():
        where = key_of(first, change)
        best = winners.get(where)
        if best is None or resolver.order_key(change.version) > resolver.order_key(best.version):
            winners[where] = change
    for node in nodes:
        for (table, key), winner in winners.items():
            assert node.version_of(table, key) == winner.version, (node, table, key)
            assert typed(node.row(table, key)) == typed(winner.row), (node, table, key)
        live = sum(len(node.rows(table)) for table in TABLES)
        assert live == sum(w.row is not None for w in winners.values())


def assert_causal_successors_win(nodes: Sequence[SimNode], resolver: Resolver) -> None:
    """A local write ranks above every version of its row its node held when it was made."""
    for node in nodes:
        held: dict[tuple[str, str], list[RowVersion]] = {}
        for change in node.changes():
            key = key_of(node, change)
            if change.origin == node.origin:
                for earlier in held.get(key, []):
                    assert resolver.order_key(change.version) > resolver.order_key(earlier)
            held.setdefault(key, []).append(change.version)


def assert_conflict_records_agree(nodes: Sequence[SimNode], resolver: Resolver) -> None:
    """A conflict id names one (table, key, pair of versions) on every node that holds it, each
    stored row is the row its version wrote, and the provisional winner is the order's."""
    rows = {c.version: c.row for c in all_changes(nodes).values()}
    by_id: dict[str, set[tuple[str, str, frozenset[RowVersion]]]] = {}
    for node in nodes:
        for ident, c in node.conflicts().items():
            assert c.local != c.remote
            assert ident == conflicts.conflict_id(c.table, c.key, c.local, c.remote)
            assert typed(c.local_row) == typed(rows[c.local]), (node, ident, "local row")
            assert typed(c.remote_row) == typed(rows[c.remote]), (node, ident, "remote row")
            remote_wins = resolver.order_key(c.remote) > resolver.order_key(c.local)
            assert c.winner == ("remote" if remote_wins else "local")
            by_id.setdefault(ident, set()).add((c.table, c.key, frozenset((c.local, c.remote))))
    for ident, seen in by_id.items():
        assert len(seen) == 1, (ident, seen)


def pasts(nodes: Sequence[SimNode]) -> dict[RowVersion, set[RowVersion]]:
    """Per local write, the versions its node held before making it (what it knew)."""
    known: dict[RowVersion, set[RowVersion]] = {}
    for node in nodes:
        held: set[RowVersion] = set()
        for change in node.changes():
            if change.origin == node.origin:
                known[change.version] = set(held)
            held.add(change.version)
    return known


# -- 1. convergence under every strategy -----------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
@BIG
@given(program=programs(3), priorities=st.permutations([1, 2, 3]))
def test_three_nodes_converge_under_any_delivery_order(
    strategy: str, program: list[Step], priorities: list[int]
) -> None:
    """Writes interleaved with partial, duplicated, reordered and gapped deliveries: once
    everything is delivered, every node holds the order's maximum of every row's versions."""
    resolver = make_resolver(strategy, priorities)
    with cluster(3, resolver) as nodes:
        run(nodes, program)
        sync_until_quiescent(nodes)
        assert_converged(nodes, resolver)
        assert_causal_successors_win(nodes, resolver)
        if strategy in QUEUEING:
            assert_conflict_records_agree(nodes, resolver)


@SMALL
@given(
    strategy=st.sampled_from(STRATEGIES),
    program=programs(4),
    priorities=st.permutations([1, 2, 3, 4]),
)
def test_four_nodes_converge_under_any_delivery_order(
    strategy: str, program: list[Step], priorities: list[int]
) -> None:
    """The same with four nodes: more paths for an entry, more concurrent writers per row."""
    resolver = make_resolver(strategy, priorities)
    with cluster(4, resolver) as nodes:
        run(nodes, program)
        sync_until_quiescent(nodes)
        assert_converged(nodes, resolver)
        assert_causal_successors_win(nodes, resolver)
        if strategy in QUEUEING:
            assert_conflict_records_agree(nodes, resolver)


# -- 2. the same writes, two delivery schedules ----------------------------------------------


@SMALL
@given(
    strategy=st.sampled_from(STRATEGIES),
    history=programs(3),
    schedules=st.tuples(*[programs(3, writes=False)] * 2),
)
def test_same_writes_under_two_delivery_schedules_give_identical_tables(
    strategy: str, history: list[Step], schedules: tuple[list[Step], list[Step]]
) -> None:
    """Copy a cluster with undelivered concurrent writes, deliver differently in each copy:
    both end with the same rows and versions (the outcome is a function of the writes)."""
    resolver = make_resolver(strategy)
    with cluster(3, resolver) as nodes, tempfile.TemporaryDirectory() as other:
        run(nodes, history)
        copies = [node.clone(other, resolver) for node in nodes]
        try:
            for group, schedule in zip((nodes, copies), schedules, strict=True):
                run(group, schedule)
                sync_until_quiescent(group)
                assert_converged(group, resolver)
            assert_converged([*nodes, *copies], resolver)
        finally:
            for copy in copies:
                copy.close()


def test_redelivering_a_whole_log_changes_nothing(make_nodes: NodeFactory) -> None:
    """Idempotence: applying what a node already holds again is a no-op, counted as duplicates."""
    n1, n2 = make_nodes(TimestampResolver(), 2)
    n1.execute("INSERT INTO leases VALUES ('aa', '10.0.0.1', 7, 1.5, x'00ff', NULL)")
    n1.execute("INSERT INTO kv VALUES (1, 'x', 2.5)")
    n1.execute("UPDATE leases SET expires = 8")
    assert deliver_checked(n2, n1.log()).accepted == 3
    state = n2.state()
    again = deliver_checked(n2, n1.log() * 2)
    assert (again.accepted, again.duplicates, again.written) == (0, 6, 0)
    assert n2.state() == state


def test_gap_is_reported_and_held_until_redelivered(make_nodes: NodeFactory) -> None:
    """Per-origin contiguity: an entry after a missing one is not applied but asked for again."""
    n1, n2 = make_nodes(TimestampResolver(), 2)
    for ip in ("a", "b", "c"):
        n1.execute("INSERT OR REPLACE INTO leases (mac, ip) VALUES ('aa', ?)", (ip,))
    log = n1.log()
    result = deliver_checked(n2, [log[0], log[2]])
    assert result.gaps == {n1.origin: 2}
    assert n2.row("leases", "'aa'") == {**dict.fromkeys(COLUMNS["leases"]), "mac": "aa", "ip": "a"}
    assert deliver_checked(n2, [log[2]]).gaps == {n1.origin: 2}
    result = deliver_checked(n2, log)
    assert (result.gaps, result.accepted, result.duplicates) == ({}, 2, 1)
    assert n2.row("leases", "'aa'") == n1.row("leases", "'aa'")
    assert n2.rowmeta() == n1.rowmeta()


# -- 3 and 4. conflict ids and resolutions ---------------------------------------------------


def _concurrent_update(nodes: Sequence[SimNode]) -> tuple[RowVersion, RowVersion]:
    """n1 creates a row everyone sees; n1 and n2 then update it concurrently; n3 receives n1's
    update, then n2's; n1 and n2 exchange theirs. All three detect the conflict."""
    n1, n2, n3 = nodes
    n1.execute("INSERT INTO leases VALUES ('aa', '10.0.0.1', 100, 0.5, x'01', NULL)")
    sync_until_quiescent(nodes)
    n1.execute("UPDATE leases SET ip = '10.0.0.2', data = x'02' WHERE mac = 'aa'")
    n2.execute("UPDATE leases SET ip = '10.0.0.3', score = 2.5 WHERE mac = 'aa'")
    v1, v2 = n1.version_of("leases", "'aa'"), n2.version_of("leases", "'aa'")
    assert v1 is not None
    assert v2 is not None
    for source, target, detected in ((n1, n3, 0), (n2, n3, 1), (n2, n1, 1), (n1, n2, 1)):
        assert deliver_checked(target, source.log()).conflicts == detected
    return v1, v2


@pytest.mark.parametrize("strategy", QUEUEING)
def test_conflict_has_the_same_id_on_every_node_that_detects_it(
    make_nodes: NodeFactory, strategy: str
) -> None:
    resolver = make_resolver(strategy)
    nodes = make_nodes(resolver)
    v1, v2 = _concurrent_update(nodes)
    ident = conflicts.conflict_id("leases", "'aa'", v1, v2)
    for node in nodes:
        held = node.conflicts()
        assert list(held) == [ident], node
        recorded = held[ident]
        assert (recorded.table, recorded.key, recorded.status) == ("leases", "'aa'", "open")
        assert {recorded.local, recorded.remote} == {v1, v2}
        assert node.conflict_counts()["leases", resolver.name, "concurrent"] == 1
    assert nodes[2].conflicts()[ident].local == v1  # n3 held n1's update when n2's came
    assert_conflict_records_agree(nodes, resolver)


@pytest.mark.parametrize(("resolver_node", "use"), [(2, "remote"), (2, "local"), (0, "local")])
def test_resolution_on_any_node_closes_the_conflict_everywhere(
    make_nodes: NodeFactory, resolver_node: int, use: str
) -> None:
    """The resolution is a new write above both versions; it reaches n2 only through n1 (a
    forwarded entry), and closes the conflict on every node that had it."""
    resolver = ManualResolver()
    nodes = make_nodes(resolver)
    v1, v2 = _concurrent_update(nodes)
    [ident] = nodes[resolver_node].open_conflicts()
    recorded = nodes[resolver_node].conflicts()[ident]
    chosen = recorded.local_row if use == "local" else recorded.remote_row
    conflicts.resolve(nodes[resolver_node].app, ident, ("mac",), use=use)
    n1, n2, n3 = nodes
    links = [(n3, n1), (n1, n3), (n1, n2)] if resolver_node == 2 else [(n1, n3), (n1, n2)]
    sync_until_quiescent(nodes, links)
    resolution = nodes[resolver_node].version_of("leases", "'aa'")
    assert resolution is not None
    assert resolution.origin == nodes[resolver_node].origin
    assert resolution.generation == max(v1.generation, v2.generation) + 1
    for node in nodes:
        assert node.conflicts()[ident].status == "resolved", node
        assert node.open_conflicts() == [], node
        assert typed(node.row("leases", "'aa'")) == typed(chosen), node
        assert node.version_of("leases", "'aa'") == resolution
    assert_converged(nodes, resolver)


@SMALL
@given(program=programs(3), choices=st.lists(st.tuples(st.integers(0, 2), st.booleans())))
def test_resolving_every_conflict_closes_each_everywhere(
    program: list[Step], choices: list[tuple[int, bool]]
) -> None:
    """Random histories under `manual`: resolve open conflicts one by one on a node that holds
    them; after each resolution propagates, it is closed on every node holding that id and
    every node holds the chosen row."""
    resolver = ManualResolver()
    with cluster(3, resolver) as nodes:
        run(nodes, program)
        sync_until_quiescent(nodes)
        assert_conflict_records_agree(nodes, resolver)
        done: set[str] = set()
        for turn in range(30):
            pending = sorted(
                {
                    i
                    for n in nodes
                    for i, c in n.conflicts().items()
                    if c.status == "open" and i not in done
                }
            )
            if not pending:
                break
            ident = pending[0]
            pick, local = choices[turn] if turn < len(choices) else (0, True)
            holders = [n for n in nodes if ident in n.open_conflicts()]
            node = holders[pick % len(holders)]
            recorded = node.conflicts()[ident]
            use = "local" if local else "remote"
            conflicts.resolve(node.app, ident, PRIMARY_KEYS[recorded.table], use=use)
            done.add(ident)
            sync_until_quiescent(nodes)
            chosen = recorded.local_row if local else recorded.remote_row
            for n in nodes:
                if ident in n.conflicts():
                    assert n.conflicts()[ident].status == "resolved", (n, ident)
                assert typed(n.row(recorded.table, recorded.key)) == typed(chosen)
        assert_converged(nodes, resolver)
        assert_conflict_records_agree(nodes, resolver)


def test_concurrent_deletes_leave_nothing_open_once_resolved(make_nodes: NodeFactory) -> None:
    """Both sides deleted the row. Whatever the queue holds for it, resolving it on one node
    must close it everywhere (a resolution that writes nothing would replicate nothing)."""
    n1, n2 = make_nodes(ManualResolver(), 2)
    n1.execute("INSERT INTO leases (mac, ip) VALUES ('aa', '10.0.0.1')")
    deliver(n1, n2)
    n1.execute("DELETE FROM leases WHERE mac = 'aa'")
    n2.execute("DELETE FROM leases WHERE mac = 'aa'")
    sync_until_quiescent([n1, n2])
    assert n1.conflict_counts()["leases", "manual", "concurrent"] == 1
    for ident in n1.open_conflicts():
        conflicts.resolve(n1.app, ident, ("mac",), use="local")
    sync_until_quiescent([n1, n2])
    assert n1.open_conflicts() == []
    assert n2.open_conflicts() == []
    assert n1.row("leases", "'aa'") is None
    assert n2.row("leases", "'aa'") is None


# -- detection: only concurrent writes conflict ----------------------------------------------

# n3 holds n1's and n2's concurrent updates of "aa" and writes on top of both; n1, which holds
# only its own update, then receives n3's whole log in one batch. n3's write was made with
# knowledge of n1's update, so it must not be reported as conflicting with it.
_CAUSAL_BATCH = [
    ("write", 2, "auto", (("kv", "insert", 0, 0, (1,)),)),
    ("write", 0, "auto", (("leases", "insert", 0, 0, ("a", 1, 1.0, b"", None)),)),
    ("deliver", 0, 1, "all", ()),
    ("deliver", 0, 2, "all", ()),
    ("write", 0, "auto", (("leases", "update", 0, 0, ("b", 2, 2.0, b"", None)),)),
    ("write", 1, "auto", (("leases", "update", 0, 0, ("c", 3, 3.0, b"", None)),)),
    ("deliver", 0, 2, "all", ()),
    ("deliver", 1, 2, "all", ()),
    ("write", 2, "auto", (("leases", "update", 0, 0, ("d", 4, 4.0, b"", None)),)),
    ("deliver", 2, 0, "all", ()),
]


@SMALL
@given(program=programs(3, whole_logs=True, resolutions=True))
@example(program=_CAUSAL_BATCH)
def test_whole_log_deliveries_only_report_concurrent_writes_as_conflicts(
    program: list[Step],
) -> None:
    """With whole-log deliveries every node's log is causally closed, so the design's rule
    (the version an incoming change replaced is not the current one) flags exactly the writes
    made without knowledge of each other."""
    resolver = ManualResolver()
    with cluster(3, resolver) as nodes:
        run(nodes, program)
        known = pasts(nodes)
        for node in nodes:
            for ident, c in node.conflicts().items():
                assert c.local not in known.get(c.remote, set()), (node, ident)
                assert c.remote not in known.get(c.local, set()), (node, ident)


def test_resolution_forwarded_with_the_conflict_leaves_nothing_open(
    make_nodes: NodeFactory,
) -> None:
    """n3 resolves n1/n2's conflict; n1 (which never saw n2's write) gets n3's whole log, in
    which n2's write precedes the resolution, as one batch."""
    n1, n2, n3 = make_nodes(ManualResolver())
    n3.execute("INSERT INTO kv VALUES (1, 'x', 1)")  # n3's origin comes first in its log
    n1.execute("INSERT INTO leases (mac, ip) VALUES ('aa', 'A')")
    deliver(n1, n2)
    deliver(n1, n3)
    n1.execute("UPDATE leases SET ip = 'B' WHERE mac = 'aa'")
    n2.execute("UPDATE leases SET ip = 'C' WHERE mac = 'aa'")
    deliver(n1, n3)
    deliver(n2, n3)
    [ident] = n3.open_conflicts()
    conflicts.resolve(n3.app, ident, ("mac",), use="remote")
    deliver(n3, n1)
    assert n1.open_conflicts() == []
    assert n1.conflicts()[ident].status == "resolved"


# -- keys ------------------------------------------------------------------------------------


def test_text_keys_differing_after_a_nul_byte_replicate_as_distinct_rows(
    make_nodes: NodeFactory,
) -> None:
    n1, n2 = make_nodes(TimestampResolver(), 2)
    n1.execute("INSERT INTO leases (mac, ip) VALUES (?, 'first')", ("a\x00b",))
    n1.execute("INSERT INTO leases (mac, ip) VALUES (?, 'second')", ("a\x00c",))
    sync_until_quiescent([n1, n2])
    assert n2.rows("leases") == n1.rows("leases")


@pytest.mark.parametrize("value", [0.6062658957824409, 8.950756128712129, 4.5896841507128895e-299])
def test_reals_replicate_bit_for_bit(make_nodes: NodeFactory, value: float) -> None:
    n1, n2 = make_nodes(TimestampResolver(), 2)
    n1.execute("INSERT INTO leases (mac, score) VALUES ('aa', ?)", (value,))
    sync_until_quiescent([n1, n2])
    assert n1.row("leases", "'aa'") == n2.row("leases", "'aa'")


# -- 5. causality ----------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("op", ["update", "delete"])
def test_write_made_on_top_of_another_wins_on_every_node(
    make_nodes: NodeFactory, strategy: str, op: str
) -> None:
    """n2 (lower priority than n1) receives n1's row, then changes it. n1's clock runs 30 s
    ahead (within max_clock_offset): HLC, not wall time, still ranks n2's write above. Every
    node keeps n2's write, whichever copy arrives first."""
    resolver = make_resolver(strategy, priorities=(10, 1, 5))
    n1, n2, n3 = make_nodes(resolver)
    n1.app.execute("UPDATE _repl_clock SET hlc = hlc + (30000 << 16)")
    n1.execute("INSERT INTO leases VALUES ('aa', '10.0.0.1', 1, 1.0, x'01', NULL)")
    deliver_checked(n2, n1.log())
    if op == "update":
        n2.execute("UPDATE leases SET ip = '10.0.0.2', expires = 2 WHERE mac = 'aa'")
    else:
        n2.execute("DELETE FROM leases WHERE mac = 'aa'")
    successor = n2.version_of("leases", "'aa'")
    assert successor is not None
    wanted = n2.row("leases", "'aa'")
    deliver_checked(n3, n2.log())  # the successor first, with its predecessor forwarded...
    deliver_checked(n3, n1.log())  # ...then the predecessor again, straight from n1
    deliver_checked(n1, n2.log())
    for node in (n1, n2, n3):
        assert node.version_of("leases", "'aa'") == successor, node
        assert typed(node.row("leases", "'aa'")) == typed(wanted), node
        assert node.conflicts() == {}, node
        assert node.conflict_counts() == {}, node
    assert_converged([n1, n2, n3], resolver)
    assert_causal_successors_win([n1, n2, n3], resolver)


# -- 6. chains and meshes --------------------------------------------------------------------

CHAIN = [(0, 1), (1, 0), (1, 2), (2, 1)]


@SMALL
@given(
    strategy=st.sampled_from(STRATEGIES),
    program=programs(3, links=CHAIN),
    priorities=st.permutations([1, 2, 3]),
)
def test_chain_ends_converge_through_forwarded_entries(
    strategy: str, program: list[Step], priorities: list[int]
) -> None:
    """A - B - C: A and C never exchange a byte, yet converge on each other's writes, which
    reach them only as entries B applied and forwarded."""
    resolver = make_resolver(strategy, priorities)
    with cluster(3, resolver) as nodes:
        a, b, c = nodes
        run(nodes, program)
        sync_until_quiescent(nodes, [(a, b), (b, a), (b, c), (c, b)])
        assert_converged(nodes, resolver)
        assert_causal_successors_win(nodes, resolver)
        for end, other in ((a, c), (c, a)):
            written = [ch for ch in other.changes() if ch.origin == other.origin]
            assert [ch for ch in end.changes() if ch.origin == other.origin] == written


def test_change_reaching_a_node_by_two_paths_applies_once(make_nodes: NodeFactory) -> None:
    """Mesh: n3 gets n1's writes from n1 and again from n2. The second copy is a duplicate:
    counted, not logged again, no conflict, versions and rows untouched."""
    resolver = TimestampResolver()
    n1, n2, n3 = make_nodes(resolver)
    n1.execute("INSERT INTO leases VALUES ('aa', '10.0.0.1', 1, 1.0, x'01', NULL)")
    n1.execute("INSERT INTO kv VALUES (1, 'x', 'v')")
    n1.execute("UPDATE leases SET score = 2.5")
    deliver_checked(n2, n1.log())
    n2.execute("INSERT INTO kv VALUES (2, 'x', 'w')")
    assert deliver_checked(n3, n1.log()).accepted == 3
    keys = [("leases", "'aa'"), ("kv", "1,'x'")]
    versions = [n3.version_of(*key) for key in keys]
    rows = [n3.row(*key) for key in keys]
    result = deliver_checked(n3, n2.log())
    assert (result.accepted, result.duplicates, result.conflicts) == (1, 3, 0)
    assert [n3.version_of(*key) for key in keys] == versions
    assert [n3.row(*key) for key in keys] == rows
    assert n3.logged_seqs(n1.origin) == [1, 2, 3]
    assert n3.conflict_counts() == {}
    sync_until_quiescent([n1, n2, n3])
    assert_converged([n1, n2, n3], resolver)
