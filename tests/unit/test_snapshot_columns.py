"""SnapshotColumns from the wire: every column checked as strictly as a row map would be, and
nothing a peer sends makes the decoder hold more than the codec's budgets allow."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from protocol import WITHHELD, ColumnVersions, Origin, RemoteProtocolError, SnapshotColumns
from protocol.codec import Codec
from protocol.messages import decode_message, encode_message

CODEC = Codec(max_message_size=1 << 20)


def wire(**changes: Any) -> list[Any]:
    """A valid chunk of two live rows and one tombstone, in its wire shape, with changes."""
    fields: dict[str, Any] = {
        "id": 3,
        "table": "leases",
        "index": 0,
        "origins": [["node1", 1]],
        "columns": [["m1", "m2"], [1, None], [2.5, b"\x00"]],
        "live": [[10, 11], [0, 0], [1, 2], [5, 6]],
        "hashes": [b"\x01" * 16, None],
        "keys": [["m3"]],
        "keyed": [[12], [0], [3], [7]],
    }
    fields.update(changes)
    return list(fields.values())


def decoded(value: list[Any]) -> SnapshotColumns:
    body = msgpack.packb(value, use_bin_type=True)
    plaintext = bytes([SnapshotColumns.TYPE, 0]) + len(body).to_bytes(4, "big") + body
    message = decode_message(CODEC, plaintext)
    assert isinstance(message, SnapshotColumns)
    return message


def test_a_chunk_in_columns_decodes_with_its_rows_counted() -> None:
    chunk = decoded(wire())
    assert chunk.origins == (Origin("node1", 1),)
    assert chunk.columns == (("m1", "m2"), (1, None), (2.5, b"\x00"))
    assert chunk.row_count == 3
    assert decode_message(CODEC, encode_message(CODEC, chunk)) == chunk


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"columns": [["m1", "m2"], [True, None], [1, 2]]}, "SQLite values"),
        ({"columns": [["m1", "m2"], [[1], None], [1, 2]]}, "SQLite values"),
        ({"columns": [["m1", "m2"], [{"a": 1}, None], [1, 2]]}, "SQLite values"),
        ({"columns": [["m1", "m2"], [float("nan"), 1], [1, 2]]}, "NaN"),
        ({"columns": [["m1", "m2"], [1 << 63, 1], [1, 2]]}, "64 bits"),
        ({"columns": [["m1", "m2"], [1], [1, 2]]}, "elements"),
        ({"live": [[10, True], [0, 0], [1, 2], [5, 6]]}, "integers only"),
        ({"live": [[10, -1], [0, 0], [1, 2], [5, 6]]}, "outside"),
        ({"live": [[10, 11], [0, 1], [1, 2], [5, 6]]}, "outside"),  # no origin 1
        ({"live": [[10, 11], [0, 0], [1, 2], [WITHHELD, 6]]}, "outside"),  # live: never withheld
        ({"live": [[10, 11], [0, 0], [1], [5, 6]]}, "elements"),
        ({"hashes": [b"\x01" * 15, None]}, "16 bytes"),
        ({"hashes": [b"", None]}, "16 bytes"),
        ({"hashes": ["x" * 16, None]}, "binary"),
        ({"keyed": [[12], [0], [3], [-2]]}, "outside"),
        ({"origins": [["node1", 1], ["node1", 1]]}, "twice"),
        ({"origins": []}, "elements"),
        ({"table": ""}, "non-empty"),
    ],
)
def test_a_malformed_column_is_refused(changes: dict[str, Any], problem: str) -> None:
    with pytest.raises(RemoteProtocolError, match=problem):
        decoded(wire(**changes))


def test_a_chunk_without_rows_is_refused() -> None:
    empty = [[], [], [], []]
    with pytest.raises(RemoteProtocolError, match="at least one row"):
        decoded(wire(columns=[], live=empty, hashes=[], keys=[], keyed=empty))


def test_a_chunk_wider_than_the_element_budget_is_refused() -> None:
    codec = Codec(max_message_size=1 << 22, max_elements=10_000)
    rows = 20_000
    chunk = SnapshotColumns(
        1, "leases", 0, (Origin("node1", 1),), (tuple(range(rows)),),
        ColumnVersions((1,) * rows, (0,) * rows, (1,) * rows, (1,) * rows),
        (None,) * rows, (), ColumnVersions((), (), (), ()),
    )  # fmt: skip
    with pytest.raises(RemoteProtocolError, match=r"max_array_len|elements"):
        decode_message(codec, encode_message(codec, chunk))
