"""Property: whatever changes a key-holding peer makes up, the applier takes the batch whole.

Generated changes (keys of any width, rows with unknown, missing or contradicting columns,
values that break NOT NULL and UNIQUE, tables nobody replicates) cross a real session pair
and go into a real applier on a real SQLite file. The applier never raises, the origin's
sequence always advances to the end of the batch (nothing blocks the stream), each change is
applied, quarantined or turned into a skip marker, and nothing it stored breaks the table.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import Change, Changes, Op, Origin, RowVersion
from protocol.checks import INT64_MAX, INT64_MIN
from replicator.apply.applier import Applier
from replicator.capture.store import Store, StoreSettings
from replicator.harness import SCHEMA
from tests.support.pairs import open_pair

PEER = Origin("peer", 7)
TABLES = {
    "dhcp_leases": ("mac", "ip", "hostname", "scope", "expires", "client_id"),
    "dns_records": ("name", "type", "zone", "value", "ttl", "created_at", "updated_at"),
    "not_replicated": ("k", "v"),
}

# Text an honest sender can encode: msgpack carries UTF-8, which has no lone surrogates (a
# peer that sends invalid UTF-8 fails the frame's decoding, a protocol error tested elsewhere).
encodable = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")

values = st.one_of(
    st.none(),
    st.integers(INT64_MIN, INT64_MAX),
    st.floats(allow_nan=False),
    st.text(encodable, max_size=8),
    st.binary(max_size=8),
    st.sampled_from(["10.0.0.1", "lan", "a"]),  # repeated values hit UNIQUE and keys
)


@st.composite
def changes(draw: Any, seq: int) -> Change:
    table = draw(st.sampled_from(sorted(TABLES)))
    columns = TABLES[table]
    op = draw(st.sampled_from(list(Op)))
    made_up = st.text(encodable, min_size=1, max_size=6)
    names = st.one_of(st.sampled_from(columns), made_up)
    row: dict[str, Any] = draw(st.dictionaries(names, values, max_size=len(columns) + 2))
    if draw(st.booleans()):  # usually a row that has its key, as a capture would
        row.update({column: draw(values) for column in columns})
    pk = tuple(draw(st.lists(values, min_size=1, max_size=3)))
    if draw(st.booleans()) and columns[0] in row:
        pk = (row[columns[0]],)  # a key consistent with the row
    version = RowVersion(draw(st.integers(1, 1 << 50)), PEER, draw(st.integers(1, 5)))
    return Change(
        origin=PEER,
        seq=seq,
        table=table,
        op=op,
        pk=pk,
        row=None if op is Op.DELETE else row,
        old=None if op is Op.INSERT else dict(row),
        version=version,
    )


@st.composite
def batches(draw: Any) -> list[Change]:
    count = draw(st.integers(1, 25))
    return [draw(changes(seq)) for seq in range(1, count + 1)]


def through_a_session(batch: list[Change]) -> Changes:
    sender, receiver = open_pair()
    events = receiver.receive_data(sender.send(Changes("peer", 1, 1, tuple(batch))))
    (message,) = events
    assert isinstance(message, Changes)
    return message


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_any_batch_of_made_up_changes_is_taken_whole_and_never_breaks_a_table(
    batch: list[Change],
) -> None:
    received = through_a_session(batch)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "state.db"
        store = Store.open(
            StoreSettings(str(path), "me", ("dhcp_leases", "dns_records"), schema_sql=SCHEMA)
        )
        try:
            applier = Applier(store)
            result = applier.apply(received.changes)
            assert not result.gaps
            assert store.version_vector()[PEER] == len(batch)  # the stream goes on
            assert result.accepted == len(batch)
            conn = store.conn
            (quarantined,) = conn.execute("SELECT count(*) FROM _repl_quarantine").fetchone()
            assert result.quarantined == quarantined
            assert result.not_replicated == sum(c.table == "not_replicated" for c in batch)
            logged = conn.execute("SELECT DISTINCT tbl FROM _repl_log WHERE op != 0").fetchall()
            assert ("not_replicated",) not in logged  # never stored, never forwarded
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            for ip, expires in conn.execute("SELECT ip, expires FROM dhcp_leases"):
                assert ip is not None
                assert expires is not None  # NOT NULL held for every row written
            again = applier.apply(received.changes)  # a resend changes nothing
            assert again.duplicates == len(batch)
            assert again.quarantined == 0
        finally:
            store.close()
