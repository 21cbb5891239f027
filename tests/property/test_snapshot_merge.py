"""The snapshot merge in SQL decides exactly what the row-by-row merge decides.

Each example builds a sender and a receiver that share some rows, then lets both write on
their own (the sender's writes never reach the receiver; the receiver's stay unshipped),
delete, forget tombstones, and edit rows behind replication's back. The receiver is cloned
twice; one clone merges the sender's snapshot in SQL, the other row by row, with chunks and
merge pieces made tiny so that sweeps cross their boundaries. Rows (with their types), row
versions and content hashes, the vector and the log must come out identical.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator.apply.resolvers import PriorityResolver, Resolver, TimestampResolver
from replicator.sync import divergence, retention, snapshot_merge, snapshot_source
from replicator.sync.snapshot_merge import SnapshotMerge
from replicator.sync.snapshot_source import SnapshotSource
from tests.support.cluster_sim import SimNode, sync_until_quiescent

KEYS = 12
VALUES = st.one_of(
    st.none(), st.integers(-(1 << 63), (1 << 63) - 1), st.text(max_size=4), st.binary(max_size=3)
)
OPS = st.lists(
    st.tuples(
        st.sampled_from(["sender", "receiver"]),
        st.sampled_from(["upsert", "delete", "kv", "kv-delete", "behind"]),
        st.integers(0, KEYS - 1),
        VALUES,
    ),
    max_size=25,
)
RESOLVERS: list[Resolver] = [TimestampResolver(), PriorityResolver({"a": 1, "b": 2})]


@contextlib.contextmanager
def tiny_chunks() -> Iterator[None]:
    with (
        mock.patch.object(snapshot_source, "CHUNK_ROWS", 3),
        mock.patch.object(snapshot_merge, "SET_MERGE_ROWS", 2),
        mock.patch.object(snapshot_merge, "MERGE_ROWS", 2),
        mock.patch.object(snapshot_merge, "CHUNK_ROWS", 2),
    ):
        yield


def apply(node: SimNode, kind: str, key: int, value: Any) -> None:
    mac = f"k{key:02d}"
    if kind == "upsert":
        node.execute(
            "INSERT INTO leases (mac, ip, extra) VALUES (?, ?, ?) ON CONFLICT (mac) DO UPDATE"
            " SET ip = excluded.ip, extra = excluded.extra",
            (mac, f"10.0.0.{key}", value),
        )
    elif kind == "delete":
        node.execute("DELETE FROM leases WHERE mac = ?", (mac,))
    elif kind == "kv":
        node.execute("INSERT OR REPLACE INTO kv (a, b, v) VALUES (?, 'x', ?)", (key, value))
    elif kind == "kv-delete":
        node.execute("DELETE FROM kv WHERE a = ?", (key,))
    else:  # an edit with capture bypassed, as if the triggers had been dropped
        with node.app:
            node.app.execute("BEGIN")
            node.app.execute("INSERT INTO _repl_applying (marker) VALUES (1)")
            node.app.execute("UPDATE leases SET extra = ? WHERE mac = ?", (value, mac))
            node.app.execute("DELETE FROM _repl_applying")


def mark_edited(node: SimNode) -> None:
    """Record content hashes, then mark what was edited behind replication's back."""
    position = 0
    while (end := divergence.fill_hashes(node.store.conn, position)[0]) != position:
        position = end
    conn = node.store.conn
    conn.execute("BEGIN")
    try:
        found = divergence.compute(conn, node.store.tables, node.vector(), node.origin)
    finally:
        conn.execute("COMMIT")
    for name, check in found.tables.items():
        with conn:
            divergence.mark_tampered(conn, name, check.tampered + check.missing)


def merged(sender: SimNode, receiver: SimNode, *, row_by_row: bool) -> tuple[Any, ...]:
    source = SnapshotSource(sender.store.settings, sender.store.tables, 1)
    try:
        merge = SnapshotMerge(receiver.applier, source.open(), sender.name, row_by_row=row_by_row)
        for chunk in source.chunks():
            merge.chunk(chunk)
        merge.finish(source.end())
    finally:
        source.close()
    meta = receiver.store.conn.execute(
        "SELECT tbl, pk, hlc, node, inc, generation, deleted, hash, seq FROM _repl_rowmeta"
        " ORDER BY tbl, pk"
    ).fetchall()
    return (
        receiver.rows("leases"),
        receiver.rows("kv"),
        meta,
        receiver.vector(),
        receiver.store.log_position(),
        receiver.store.clock().hlc,
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shared=st.integers(0, KEYS),
    ops=OPS,
    forget=st.booleans(),
    edited=st.booleans(),
    resolver=st.sampled_from(RESOLVERS),
)
def test_the_merge_in_sql_keeps_the_same_winners_as_the_row_by_row_merge(
    shared: int, ops: list[tuple[str, str, int, Any]], forget: bool, edited: bool,
    resolver: Resolver,
) -> None:  # fmt: skip
    with tempfile.TemporaryDirectory() as directory, tiny_chunks():
        root = Path(directory)
        (root / "sql").mkdir()
        (root / "rows").mkdir()
        sender, receiver = SimNode(root, "a", resolver), SimNode(root, "b", resolver)
        clones: list[SimNode] = []
        try:
            for key in range(shared):
                apply(sender, "upsert", key, key)
                apply(sender, "kv", key, key)
            sync_until_quiescent([sender, receiver])
            for side, kind, key, value in ops:
                apply(sender if side == "sender" else receiver, kind, key, value)
            if forget:  # the sender forgets its tombstones: their rows go by the sweep
                retention.collect_tombstones(sender.store.conn, 1 << 62, None, ["leases", "kv"])
            if edited:
                mark_edited(sender)
                mark_edited(receiver)
            clones = [receiver.clone(root / place, resolver) for place in ("sql", "rows")]
            in_sql = merged(sender, clones[0], row_by_row=False)
            row_by_row = merged(sender, clones[1], row_by_row=True)
            assert in_sql == row_by_row
        finally:
            for node in (sender, receiver, *clones):
                node.close()
