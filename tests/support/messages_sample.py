"""One instance of every message type, with every SQLite value type in its rows."""

from __future__ import annotations

from protocol import (
    WITHHELD,
    Ack,
    Change,
    Changes,
    ColumnVersions,
    Goodbye,
    Heartbeat,
    Hello,
    Message,
    Op,
    Origin,
    Resend,
    RowVersion,
    Skip,
    SnapshotBegin,
    SnapshotChunk,
    SnapshotColumns,
    SnapshotEnd,
    SnapshotRequest,
    SnapshotRow,
    SnapshotTable,
)

NODE1 = Origin("node1", 1)
NODE2 = Origin("node2", 3)
VECTOR = {NODE1: 42, NODE2: 7}
EVERY_VALUE = {
    "zero": 0,
    "int64_max": (1 << 63) - 1,
    "int64_min": -(1 << 63),
    "real": 2.5,
    "negative_zero": -0.0,
    "infinity": float("inf"),
    "text": "lease for ünïcode 💡 host",
    "empty_text": "",
    "text_with_nul": "a\x00b",
    "blob": bytes(range(256)),
    "empty_blob": b"",
    "null": None,
}


def change(seq: int, op: Op = Op.UPDATE) -> Change:
    version = RowVersion((1 << 47) + seq, NODE1, seq + 1)
    return Change(
        origin=NODE1,
        seq=seq,
        table="dhcp_leases",
        op=op,
        pk=("02:00:00:00:00:%02x" % (seq % 256), seq),
        row=None if op is Op.DELETE else dict(EVERY_VALUE, seq=seq),
        old=None if op is Op.INSERT else {"zero": 1, "blob": b"old"},
        version=version,
        replaced=None if op is Op.INSERT else RowVersion((1 << 47) - 1, NODE2, seq),
        resolves="c0ffee" if op is Op.UPDATE else None,
    )


def every_message() -> list[Message]:
    return [
        Hello(
            "node1",
            1,
            frozenset({"lz4", "snapshot"}),
            3,
            b"\x01" * 32,
            VECTOR,
            {"tables": "t(a,b)"},
        ),
        Changes(
            node_id="node1",
            sequence=9,
            timestamp=(1 << 47) + 5,
            changes=(change(1, Op.INSERT), change(2, Op.UPDATE), change(3, Op.DELETE)),
            skips=(Skip(NODE2, 4, 6),),
        ),
        Changes(node_id="node1", sequence=10, timestamp=1, changes=()),
        Ack(VECTOR, 9),
        Heartbeat(
            1_700_000_000_123,
            VECTOR,
            {"dhcp_leases": b"\xab" * 16},
            {"node3": (5, {NODE1: 40})},
            {NODE1: 38},
        ),
        SnapshotBegin(
            5,
            VECTOR,
            (SnapshotTable("dhcp_leases", ("mac", "ip", "expires"), ("mac",), 2),),
            {"dhcp_leases": b"\x81" * 32},
        ),
        SnapshotBegin(
            6,
            VECTOR,
            (SnapshotTable("dhcp_leases", ("mac", "ip", "expires"), ("mac",), 1),),
            {},
            {"dhcp_leases": ("'02:00:00:00:00:07'",)},
        ),
        SnapshotChunk(
            5,
            "dhcp_leases",
            0,
            (
                SnapshotRow(("02:00:00:00:00:01",), dict(EVERY_VALUE), RowVersion(9, NODE1, 1), 7),
                SnapshotRow(("02:00:00:00:00:02",), None, RowVersion(10, NODE2, 4)),
                # Named but withheld: edited behind replication's back at the sender.
                SnapshotRow(("02:00:00:00:00:03",), None, RowVersion(11, NODE1, 1), WITHHELD),
            ),
        ),
        SnapshotColumns(
            5,
            "dhcp_leases",
            1,
            (NODE1, NODE2),
            (tuple(EVERY_VALUE), tuple(EVERY_VALUE.values())),
            ColumnVersions(
                tuple(range(9, 9 + len(EVERY_VALUE))),
                tuple(n % 2 for n in range(len(EVERY_VALUE))),
                (1,) * len(EVERY_VALUE),
                (7,) * len(EVERY_VALUE),
            ),
            (b"\x01" * 16, None) * (len(EVERY_VALUE) // 2) + (None,) * (len(EVERY_VALUE) % 2),
            (("02:00:00:00:00:02", "02:00:00:00:00:03"),),
            ColumnVersions((10, 11), (1, 0), (4, 1), (0, WITHHELD)),
        ),
        SnapshotEnd(5, {"dhcp_leases": b"\x00" * 32}, 2),
        Resend(VECTOR),
        SnapshotRequest(("dhcp_leases",), "operator asked for a full resync"),
        SnapshotRequest(("dhcp_leases",), "repair", {"dhcp_leases": b"\x01" * 256 * 16}),
        SnapshotRequest(
            ("dhcp_leases",),
            "rows edited behind replication's back",
            {"dhcp_leases": b"\x01" * 256 * 16},
            {"dhcp_leases": ("'02:00:00:00:00:07'", "'02:00:00:00:00:08'")},
        ),
        Goodbye("shutting down"),
    ]
