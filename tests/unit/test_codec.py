"""Message plaintexts: exact round trips, and hostile bodies refused with a ProtocolError."""

from __future__ import annotations

import re
import struct
from typing import Any

import lz4.block
import msgpack
import pytest

from protocol import (
    PROTOCOL_VERSION,
    Changes,
    Goodbye,
    Hello,
    Message,
    Origin,
    RemoteProtocolError,
    SnapshotRequest,
)
from protocol.codec import FLAG_LZ4, Codec
from protocol.errors import LocalProtocolError
from protocol.messages import Heartbeat, body_checksum, decode_message, encode_message
from tests.support.messages_sample import EVERY_VALUE, change, every_message

CODEC = Codec(max_message_size=1 << 20)
HELLO_TYPE = Hello.TYPE


def plaintext(
    message_type: int, body: bytes, *, flags: int = 0, raw_length: int | None = None
) -> bytes:
    size = len(body) if raw_length is None else raw_length
    return struct.pack(">BBI", message_type, flags, size) + body


def packed(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def decode(data: bytes) -> Message:
    return decode_message(CODEC, data)


@pytest.mark.parametrize("message", every_message(), ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("compress", [True, False])
def test_every_message_round_trips_exactly(message: Message, compress: bool) -> None:
    codec = Codec(compress=compress, compress_threshold=16)
    assert decode_message(codec, encode_message(codec, message)) == message


def test_every_sqlite_value_keeps_its_type() -> None:
    batch = Changes("node1", 1, 1, (change(1),))
    decoded = decode(encode_message(CODEC, batch))
    assert isinstance(decoded, Changes)
    row = decoded.changes[0].row
    assert row is not None
    for column, value in EVERY_VALUE.items():
        assert row[column] == value
        assert type(row[column]) is type(value), column


def test_nan_is_refused_because_sqlite_would_store_it_as_null() -> None:
    batch = Changes("node1", 1, 1, (change(1),))
    nan_change = batch.changes[0]
    row = dict(nan_change.row or {}, real=float("nan"))
    message = Changes("node1", 1, 1, (type(nan_change)(**{**_fields(nan_change), "row": row}),))
    with pytest.raises(RemoteProtocolError, match="NaN"):
        decode(encode_message(CODEC, message))


def _fields(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in obj.__slots__}


def test_small_bodies_are_not_compressed_and_large_ones_are() -> None:
    codec = Codec(compress_threshold=512)
    small = codec.encode(Goodbye.TYPE, ["bye"])
    text = " ".join(f"lease {n} of 10.0.{n % 256}.{n // 256}" for n in range(400))
    large = codec.encode(Goodbye.TYPE, [text])
    assert small[1] == 0
    assert large[1] == FLAG_LZ4
    assert len(large) < len(text) // 2


def test_a_body_compressing_beyond_the_ratio_bound_travels_raw_and_decodes() -> None:
    codec = Codec(compress_threshold=512)
    plaintext = codec.encode(Goodbye.TYPE, ["x" * 100_000])
    assert plaintext[1] == 0  # 100 kB of one letter compresses far beyond the bound
    assert codec.decode(plaintext) == (Goodbye.TYPE, ["x" * 100_000])


def test_encoding_an_integer_beyond_64_bits_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        CODEC.encode(HELLO_TYPE, [1 << 64])


def test_encoding_over_the_cap_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError, match="exceeds"):
        Codec(max_message_size=100).encode(Goodbye.TYPE, ["x" * 200])


VALID_HELLO = packed(["node1", 1, [], 1, b"f", [], {}])
BOMB = lz4.block.compress(b"\x00" * (8 << 20), store_size=False)

HOSTILE_PLAINTEXTS = {
    "empty": b"",
    "short header": b"\x01\x00\x00",
    "unknown message type 0": plaintext(0, VALID_HELLO),
    "unknown message type 200": plaintext(200, VALID_HELLO),
    "unknown flag": plaintext(HELLO_TYPE, VALID_HELLO, flags=0x80),
    "declared size over cap": plaintext(HELLO_TYPE, VALID_HELLO, raw_length=(1 << 20) + 1),
    "declared size 0xFFFFFFFF": plaintext(HELLO_TYPE, VALID_HELLO, raw_length=0xFFFFFFFF),
    "raw length longer than body": plaintext(
        HELLO_TYPE, VALID_HELLO, raw_length=len(VALID_HELLO) + 1
    ),
    "raw length shorter than body": plaintext(
        HELLO_TYPE, VALID_HELLO + b"\xc0", raw_length=len(VALID_HELLO)
    ),
    "lz4 size claimed too large": plaintext(
        HELLO_TYPE,
        lz4.block.compress(VALID_HELLO * 40, store_size=False),
        flags=FLAG_LZ4,
        raw_length=len(VALID_HELLO) * 40 + 1,
    ),
    "lz4 size claimed too small": plaintext(
        HELLO_TYPE,
        lz4.block.compress(VALID_HELLO * 40, store_size=False),
        flags=FLAG_LZ4,
        raw_length=len(VALID_HELLO) * 40 - 1,
    ),
    "lz4 ratio impossible": plaintext(HELLO_TYPE, b"\x00" * 10, flags=FLAG_LZ4, raw_length=100_000),
    "lz4 corrupt body": plaintext(HELLO_TYPE, b"\xff" * 64, flags=FLAG_LZ4, raw_length=1000),
    "lz4 bomb over cap": plaintext(HELLO_TYPE, BOMB, flags=FLAG_LZ4, raw_length=8 << 20),
    "lz4 zero raw length": plaintext(HELLO_TYPE, b"\x00", flags=FLAG_LZ4, raw_length=0),
    "msgpack array32 of 0xFFFFFFFF": plaintext(HELLO_TYPE, b"\xdd\xff\xff\xff\xff"),
    "msgpack map32 of 0xFFFFFFFF": plaintext(HELLO_TYPE, b"\xdf\xff\xff\xff\xff"),
    "msgpack str32 of 0xFFFFFFFF": plaintext(HELLO_TYPE, b"\xdb\xff\xff\xff\xff"),
    "msgpack bin32 of 0xFFFFFFFF": plaintext(HELLO_TYPE, b"\xc6\xff\xff\xff\xff"),
    "msgpack deep nesting": plaintext(HELLO_TYPE, b"\x91" * 5000 + b"\xc0"),
    "msgpack nesting inside a field": plaintext(
        HELLO_TYPE, packed(["node1", 1, [[[[[[[["x"]]]]]]]], 1, b"f", [], {}])
    ),
    "msgpack ext type": plaintext(HELLO_TYPE, b"\x97\xa5node1\x01\x90\x01\xd4\x05\x00\x90\x80"),
    "msgpack timestamp ext": plaintext(HELLO_TYPE, b"\xd6\xff\x00\x00\x00\x01"),
    "msgpack integer map key": plaintext(Heartbeat.TYPE, packed([1, [], {1: b"x"}, [], []])),
    "msgpack bytes map key": plaintext(Heartbeat.TYPE, packed([1, [], {b"t": b"x"}, [], []])),
    "msgpack trailing bytes": plaintext(HELLO_TYPE, VALID_HELLO + b"\xc0"),
    "msgpack truncated": plaintext(HELLO_TYPE, VALID_HELLO[:-1]),
    "msgpack invalid utf-8": plaintext(HELLO_TYPE, b"\x97\xa2\xff\xfe\x01\x90\x01\xa1f\x90\x80"),
    "msgpack reserved byte 0xc1": plaintext(HELLO_TYPE, b"\xc1"),
    "empty body": plaintext(HELLO_TYPE, b""),
}


REASONS = {
    "empty": "has no header",
    "short header": "has no header",
    "unknown message type 0": "unknown message type 0",
    "unknown message type 200": "unknown message type 200",
    "unknown flag": "unknown message flags",
    "declared size over cap": "exceeds the",
    "declared size 0xFFFFFFFF": "exceeds the",
    "raw length longer than body": "header declares",
    "raw length shorter than body": "header declares",
    "lz4 size claimed too large": "header declared",
    "lz4 size claimed too small": "corrupt lz4",
    "lz4 ratio impossible": "may not expand",
    "lz4 corrupt body": "corrupt lz4",
    "lz4 bomb over cap": "exceeds the",
    "lz4 zero raw length": "may not expand",
    "msgpack array32 of 0xFFFFFFFF": "max_array_len",
    "msgpack map32 of 0xFFFFFFFF": "max_map_len",
    "msgpack str32 of 0xFFFFFFFF": "incomplete input",
    "msgpack bin32 of 0xFFFFFFFF": "incomplete input",
    "msgpack deep nesting": "StackError",
    "msgpack nesting inside a field": "expected a string, got list",
    "msgpack ext type": "max_ext_len",
    "msgpack timestamp ext": "max_ext_len",
    "msgpack integer map key": "map key",
    "msgpack bytes map key": "expected a string, got bytes",
    "msgpack trailing bytes": "extra data",
    "msgpack truncated": "incomplete input",
    "msgpack invalid utf-8": "UnicodeDecodeError",
    "msgpack reserved byte 0xc1": "FormatError",
    "empty body": "incomplete input",
    "hello with bool incarnation": "got bool",
    "hello with negative incarnation": "outside",
    "hello with a field missing": "got 6",
    "hello with an extra field": "got 8",
    "hello as a map": "got dict",
    "hello with empty node id": "non-empty",
    "hello with NUL in node id": "no NUL",
    "hello with huge fingerprint": "exceeds 64",
    "hello with duplicate origin": "appears twice",
    "hello with uint64 sequence": "outside",
    "changes with wrong checksum": "checksum",
    "changes with unknown op": "unknown operation",
    "changes delete carrying a row": "DELETE must not carry a new row",
    "changes insert carrying old row": "INSERT must not carry an old row",
    "changes update without row": "UPDATE must carry a new row",
    "changes with sequence 0": "outside",
    "changes with empty primary key": "got 0",
    "changes with list as a value": "got list",
    "changes with bool as a value": "got bool",
    "changes with uint64 value": "does not fit",
    "changes with short version": "got 3",
    "changes of another protocol version": f"version {PROTOCOL_VERSION + 1}",
    "changes body not msgpack": "FormatError",
    "skip with empty range": "is empty",
    "repair naming keys of no table": "SnapshotRequest keys: expected a map",
    "repair naming a key that is not text": "SnapshotRequest keys key: expected a string",
    "repair naming too many keys": "SnapshotRequest keys: expected 0..65536 elements",
}


@pytest.mark.parametrize("name", HOSTILE_PLAINTEXTS)
def test_hostile_plaintext_is_refused(name: str) -> None:
    with pytest.raises(RemoteProtocolError, match=re.escape(REASONS[name])):
        decode(HOSTILE_PLAINTEXTS[name])


def _change_wire(**overrides: Any) -> list[Any]:
    wire = {
        "node": "node1",
        "inc": 1,
        "seq": 1,
        "table": "t",
        "op": 2,
        "pk": [1],
        "row": {"a": 1},
        "old": {"a": 0},
        "version": [5, "node1", 1, 2],
        "replaced": None,
        "resolves": None,
    }
    wire.update(overrides)
    return list(wire.values())


def _changes_plaintext(
    changes: list[Any], skips: list[Any] | None = None, *, checksum: bytes | None = None
) -> bytes:
    body = packed([changes, skips or []])
    return plaintext(
        Changes.TYPE,
        packed([PROTOCOL_VERSION, "node1", 1, 1, checksum or body_checksum(body), body]),
    )


HOSTILE_SHAPES = {
    "hello with bool incarnation": plaintext(
        HELLO_TYPE, packed(["node1", True, [], 1, b"f", [], {}])
    ),
    "hello with negative incarnation": plaintext(
        HELLO_TYPE, packed(["node1", -1, [], 1, b"f", [], {}])
    ),
    "hello with a field missing": plaintext(HELLO_TYPE, packed(["node1", 1, [], 1, b"f", []])),
    "hello with an extra field": plaintext(
        HELLO_TYPE, packed(["node1", 1, [], 1, b"f", [], {}, 0])
    ),
    "hello as a map": plaintext(HELLO_TYPE, packed({"node_id": "node1"})),
    "hello with empty node id": plaintext(HELLO_TYPE, packed(["", 1, [], 1, b"f", [], {}])),
    "hello with NUL in node id": plaintext(HELLO_TYPE, packed(["n\x00", 1, [], 1, b"f", [], {}])),
    "hello with huge fingerprint": plaintext(
        HELLO_TYPE, packed(["n", 1, [], 1, b"f" * 65, [], {}])
    ),
    "hello with duplicate origin": plaintext(
        HELLO_TYPE, packed(["n", 1, [], 1, b"f", [["a", 1, 1], ["a", 1, 2]], {}])
    ),
    "hello with uint64 sequence": plaintext(
        HELLO_TYPE, packed(["n", 1, [], 1, b"f", [["a", 1, 1 << 63]], {}])
    ),
    "changes with wrong checksum": _changes_plaintext([_change_wire()], checksum=b"\x00" * 16),
    "changes with unknown op": _changes_plaintext([_change_wire(op=7)]),
    "changes delete carrying a row": _changes_plaintext([_change_wire(op=3)]),
    "changes insert carrying old row": _changes_plaintext([_change_wire(op=1)]),
    "changes update without row": _changes_plaintext([_change_wire(row=None)]),
    "changes with sequence 0": _changes_plaintext([_change_wire(seq=0)]),
    "changes with empty primary key": _changes_plaintext([_change_wire(pk=[])]),
    "changes with list as a value": _changes_plaintext([_change_wire(row={"a": [1]})]),
    "changes with bool as a value": _changes_plaintext([_change_wire(row={"a": True})]),
    "changes with uint64 value": _changes_plaintext([_change_wire(row={"a": 1 << 63})]),
    "changes with short version": _changes_plaintext([_change_wire(version=[5, "n", 1])]),
    "changes of another protocol version": plaintext(
        Changes.TYPE, packed([PROTOCOL_VERSION + 1, "n", 1, 1, b"", b""])
    ),
    "changes body not msgpack": plaintext(
        Changes.TYPE, packed([PROTOCOL_VERSION, "n", 1, 1, body_checksum(b"\xc1"), b"\xc1"])
    ),
    "skip with empty range": _changes_plaintext([], [["a", 1, 5, 4]]),
    "repair naming keys of no table": plaintext(
        SnapshotRequest.TYPE, packed([["t"], "r", {}, ["'k'"]])
    ),
    "repair naming a key that is not text": plaintext(
        SnapshotRequest.TYPE, packed([["t"], "r", {}, {"t": [7]}])
    ),
    "repair naming too many keys": plaintext(
        SnapshotRequest.TYPE, packed([["t"], "r", {}, {"t": ["'k'"] * 65537}])
    ),
}


@pytest.mark.parametrize("name", HOSTILE_SHAPES)
def test_message_with_wrong_shape_is_refused(name: str) -> None:
    with pytest.raises(RemoteProtocolError, match=re.escape(REASONS[name])):
        decode(HOSTILE_SHAPES[name])


def test_version_vector_keys_are_origins() -> None:
    message = decode(plaintext(HELLO_TYPE, packed(["n", 1, [], 1, b"f", [["a", 2, 9]], {}])))
    assert isinstance(message, Hello)
    assert message.version_vector == {Origin("a", 2): 9}
