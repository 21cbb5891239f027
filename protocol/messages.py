"""The replication messages: small frozen dataclasses and their exact wire shapes.

Each message is a msgpack array of positional fields (compact and fast to check); its type
byte lives in the codec's plaintext header. ``to_wire`` builds the array, ``from_wire`` checks
an array a peer sent, field by field, and raises `RemoteProtocolError` on anything unexpected.
Every message has a fixed arity, so a peer speaking another shape fails loudly.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from protocol.checks import (
    INT64_MAX,
    INT64_MIN,
    MAX_TEXT_LENGTH,
    SqlValue,
    want_bytes,
    want_int,
    want_list,
    want_name,
    want_row,
    want_sql_value,
    want_str,
)
from protocol.codec import Codec, pack, unpack_strict
from protocol.crypto import PROTOCOL_VERSION
from protocol.errors import RemoteProtocolError

__all__ = [
    "BUCKETS",
    "MAX_REPAIR_KEYS",
    "MESSAGE_TYPES",
    "Ack",
    "Change",
    "Changes",
    "ColumnVersions",
    "Goodbye",
    "Heartbeat",
    "Hello",
    "Message",
    "Op",
    "Origin",
    "Resend",
    "RowVersion",
    "Skip",
    "SnapshotBegin",
    "SnapshotChunk",
    "SnapshotColumns",
    "SnapshotEnd",
    "SnapshotRequest",
    "SnapshotRow",
    "SnapshotTable",
    "VersionVector",
    "decode_message",
    "encode_message",
]

MAX_FINGERPRINT = 64
MAX_CHECKSUM = 64
BUCKETS = 256
"""Repairs split each table's keys into this many buckets, by a hash of the key."""
BUCKET_CHECKSUM = 16
MAX_ORIGINS = 4096
MAX_TABLES = 4096
MAX_CAPABILITIES = 64
CHECKSUM_SIZE = 16
MAX_COLUMNS = 32767
MAX_KEY_COLUMNS = 64
MAX_CHUNK_ORIGINS = 4096
ROW_HASH_SIZE = 16
MAX_REPAIR_KEYS = 65536
"""Keys a repair may name per table (more differing rows: whole buckets are sent instead)."""


@dataclass(frozen=True, slots=True, order=True)
class Origin:
    """Who wrote a change: a node id plus the incarnation of that node's state."""

    node_id: str
    incarnation: int

    def __str__(self) -> str:
        return f"{self.node_id}#{self.incarnation}"


VersionVector = Mapping[Origin, int]
"""Per origin, the highest contiguous origin sequence a node holds."""


class Op(enum.IntEnum):
    INSERT = 1
    UPDATE = 2
    DELETE = 3


@dataclass(frozen=True, slots=True, order=True)
class RowVersion:
    """A row's version: (hlc, origin, generation); strategies order these (design section 4)."""

    hlc: int
    origin: Origin
    generation: int


@dataclass(frozen=True, slots=True)
class Change:
    """One captured row change as its origin logged it."""

    origin: Origin
    seq: int
    table: str
    op: Op
    pk: tuple[SqlValue, ...]
    row: Mapping[str, SqlValue] | None
    old: Mapping[str, SqlValue] | None
    version: RowVersion
    replaced: RowVersion | None = None
    resolves: str | None = None
    """The id of the conflict this write resolves (an operator's decision), if any."""


@dataclass(frozen=True, slots=True)
class Skip:
    """Origin sequences first..last that a filter withheld: they leave no gap downstream."""

    origin: Origin
    first_seq: int
    last_seq: int


@dataclass(frozen=True, slots=True)
class SnapshotTable:
    """A table a snapshot carries. ``row_count`` and ``max_bytes`` bound what the receiver
    holds for it until the snapshot ends: at most that many rows, and rows of at most that
    many bytes in all (msgpack-encoded as a chunk carries them)."""

    name: str
    columns: tuple[str, ...]
    primary_key: tuple[str, ...]
    row_count: int
    max_bytes: int = 0


WITHHELD = -1  # SnapshotRow.seq of a row named but not offered


@dataclass(frozen=True, slots=True)
class SnapshotRow:
    """A row with its version; ``values`` is None for a tombstone (a deleted row's version).
    ``seq`` is the origin sequence that wrote the version (0: not known), or `WITHHELD`: the
    sender holds the row but found it edited behind replication's back, so it names the row
    (its key and version) without offering its content."""

    pk: tuple[SqlValue, ...]
    values: Mapping[str, SqlValue] | None
    version: RowVersion
    seq: int = 0


# ---------------------------------------------------------------------------------------------
# Field codecs shared by several messages


def _origin_from_wire(node_id: Any, incarnation: Any, what: str) -> Origin:
    return Origin(
        want_name(node_id, f"{what} node id"), want_int(incarnation, f"{what} incarnation")
    )


class _Origins:
    """Decodes origins once per batch: a batch names few origins, thousands of times."""

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        self._seen: dict[tuple[Any, Any, type], Origin] = {}

    def get(self, node_id: Any, incarnation: Any, what: str) -> Origin:
        # The type is part of the key so that True or 1.0 never pass for a checked 1.
        key = (node_id, incarnation, type(incarnation))
        try:
            return self._seen[key]
        except (KeyError, TypeError):  # TypeError: an unhashable value, refused just below
            origin = _origin_from_wire(node_id, incarnation, what)
            self._seen[key] = origin
            return origin


def _vector_to_wire(vector: VersionVector) -> list[list[Any]]:
    return [[origin.node_id, origin.incarnation, seq] for origin, seq in vector.items()]


def _vector_from_wire(value: Any, what: str) -> dict[Origin, int]:
    entries = want_list(value, what, max_len=MAX_ORIGINS)
    vector: dict[Origin, int] = {}
    for entry in entries:
        node_id, incarnation, seq = want_list(entry, f"{what} entry", min_len=3, max_len=3)
        origin = _origin_from_wire(node_id, incarnation, what)
        if origin in vector:
            raise RemoteProtocolError(f"{what}: origin {origin} appears twice")
        vector[origin] = want_int(seq, f"{what} sequence")
    return vector


def _version_to_wire(version: RowVersion) -> list[Any]:
    return [version.hlc, version.origin.node_id, version.origin.incarnation, version.generation]


def _version_from_wire(value: Any, what: str, origins: _Origins | None = None) -> RowVersion:
    hlc, node_id, incarnation, generation = want_list(value, what, min_len=4, max_len=4)
    return RowVersion(
        want_int(hlc, f"{what} hlc"),
        (origins or _Origins()).get(node_id, incarnation, what),
        want_int(generation, f"{what} generation"),
    )


def _pk_from_wire(value: Any, what: str) -> tuple[SqlValue, ...]:
    parts = want_list(value, what, min_len=1, max_len=64)
    return tuple(want_sql_value(part, what) for part in parts)


def _names_from_wire(value: Any, what: str, *, min_len: int = 0) -> tuple[str, ...]:
    return tuple(
        want_name(name, what) for name in want_list(value, what, min_len=min_len, max_len=32767)
    )


def _checksums_from_wire(value: Any, what: str, max_len: int = MAX_CHECKSUM) -> dict[str, bytes]:
    if type(value) is not dict or len(value) > MAX_TABLES:
        raise RemoteProtocolError(f"{what}: expected a map of at most {MAX_TABLES} tables")
    return {
        want_name(table, f"{what} table"): want_bytes(digest, what, max_len=max_len)
        for table, digest in value.items()
    }


def _fields(value: Any, cls: type, count: int, optional: int = 0) -> list[Any]:
    """The message's fields; the last ``optional`` may be absent (None then): senders that
    predate them leave them out."""
    fields = want_list(value, cls.__name__, min_len=count - optional, max_len=count)
    return fields + [None] * (count - len(fields))


def _keys_from_wire(value: Any, what: str) -> dict[str, tuple[str, ...]]:
    """Per table, stored keys a repair names (absent: none)."""
    if value is None:
        return {}
    if type(value) is not dict or len(value) > MAX_TABLES:
        raise RemoteProtocolError(f"{what}: expected a map of at most {MAX_TABLES} tables")
    return {
        want_name(table, f"{what} table"): tuple(
            want_str(key, f"{what} key", max_len=MAX_TEXT_LENGTH)
            for key in want_list(keys, what, max_len=MAX_REPAIR_KEYS)
        )
        for table, keys in value.items()
    }


# ---------------------------------------------------------------------------------------------
# Messages


@dataclass(frozen=True, slots=True)
class Hello:
    """First message each way: names the node and says what it already holds."""

    TYPE: ClassVar[int] = 1
    node_id: str
    incarnation: int
    capabilities: frozenset[str]
    schema_version: int
    settings_fingerprint: bytes
    version_vector: VersionVector
    settings: Mapping[str, str] = field(default_factory=dict)
    """The settings behind the fingerprint, by name, so a mismatch can be named."""

    def to_wire(self) -> list[Any]:
        return [
            self.node_id,
            self.incarnation,
            sorted(self.capabilities),
            self.schema_version,
            self.settings_fingerprint,
            _vector_to_wire(self.version_vector),
            dict(self.settings),
        ]

    @classmethod
    def from_wire(cls, value: Any) -> Self:
        node_id, incarnation, capabilities, schema, fingerprint, vector, settings = _fields(
            value, cls, 7
        )
        names = want_list(capabilities, "Hello capabilities", max_len=MAX_CAPABILITIES)
        if type(settings) is not dict or len(settings) > MAX_CAPABILITIES:
            raise RemoteProtocolError("Hello settings: expected a map of at most 64 entries")
        return cls(
            node_id=want_name(node_id, "Hello node id"),
            incarnation=want_int(incarnation, "Hello incarnation"),
            capabilities=frozenset(want_name(name, "Hello capability") for name in names),
            schema_version=want_int(schema, "Hello schema version"),
            settings_fingerprint=want_bytes(
                fingerprint, "Hello settings fingerprint", max_len=MAX_FINGERPRINT
            ),
            version_vector=_vector_from_wire(vector, "Hello version vector"),
            settings={
                want_name(key, "Hello setting name"): want_str(item, "Hello setting", max_len=65536)
                for key, item in settings.items()
            },
        )


@dataclass(frozen=True, slots=True)
class Changes:
    """A batch of changes; ``sequence`` numbers the sender's batches on this connection.

    On the wire the body (changes and skips) is a nested msgpack blob with a BLAKE2b checksum in
    the header, so a batch that was corrupted before sealing (or by a bug on either side) is
    refused instead of applied.
    """

    TYPE: ClassVar[int] = 2
    node_id: str
    sequence: int
    timestamp: int
    changes: tuple[Change, ...]
    skips: tuple[Skip, ...] = ()
    protocol_version: int = field(default=PROTOCOL_VERSION)

    def to_wire(self) -> list[Any]:
        body = pack(
            [
                [_change_to_wire(change) for change in self.changes],
                [
                    [s.origin.node_id, s.origin.incarnation, s.first_seq, s.last_seq]
                    for s in self.skips
                ],
            ]
        )
        return [
            self.protocol_version,
            self.node_id,
            self.sequence,
            self.timestamp,
            body_checksum(body),
            body,
        ]

    @classmethod
    def from_wire(cls, value: Any) -> Self:
        version, node_id, sequence, timestamp, checksum, body = _fields(value, cls, 6)
        version = want_int(version, "Changes protocol version")
        if version != PROTOCOL_VERSION:
            raise RemoteProtocolError(f"Changes protocol version {version} is not supported")
        body = want_bytes(body, "Changes body", max_len=INT64_MAX)
        if want_bytes(checksum, "Changes checksum", max_len=CHECKSUM_SIZE) != body_checksum(body):
            raise RemoteProtocolError("Changes body does not match its checksum")
        # The body is bounded by the message it came in, which the codec already capped.
        changes, skips = want_list(unpack_strict(body), "Changes body", min_len=2, max_len=2)
        origins = _Origins()
        return cls(
            node_id=want_name(node_id, "Changes node id"),
            sequence=want_int(sequence, "Changes sequence"),
            timestamp=want_int(timestamp, "Changes timestamp"),
            changes=tuple(
                _change_from_wire(item, origins) for item in want_list(changes, "changes")
            ),
            skips=tuple(_skip_from_wire(item) for item in want_list(skips, "skips")),
            protocol_version=version,
        )


def body_checksum(body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=CHECKSUM_SIZE).digest()


def _change_to_wire(change: Change) -> list[Any]:
    return [
        change.origin.node_id,
        change.origin.incarnation,
        change.seq,
        change.table,
        int(change.op),
        list(change.pk),
        _row_to_wire(change.row),
        _row_to_wire(change.old),
        _version_to_wire(change.version),
        None if change.replaced is None else _version_to_wire(change.replaced),
        change.resolves,
    ]


def _row_to_wire(row: Mapping[str, SqlValue] | None) -> dict[str, SqlValue] | None:
    return row if row is None or type(row) is dict else dict(row)


_OPS = {int(op): op for op in Op}


def _change_from_wire(value: Any, origins: _Origins) -> Change:
    (node_id, incarnation, seq, table, op, pk, row, old, version, replaced, resolves) = want_list(
        value, "change", min_len=11, max_len=11
    )
    if type(op) is not int or op not in _OPS:
        raise RemoteProtocolError(f"change: unknown operation {op!r}")
    kind = _OPS[op]
    new_row = None if row is None else want_row(row, "change row")
    old_row = None if old is None else want_row(old, "change old row")
    if (new_row is None) != (kind is Op.DELETE):
        raise RemoteProtocolError(f"change: {kind.name} {_must(kind is not Op.DELETE)} a new row")
    if (old_row is None) != (kind is Op.INSERT):
        raise RemoteProtocolError(f"change: {kind.name} {_must(kind is not Op.INSERT)} an old row")
    return Change(
        origin=origins.get(node_id, incarnation, "change origin"),
        seq=want_int(seq, "change sequence", low=1),
        table=want_name(table, "change table"),
        op=kind,
        pk=_pk_from_wire(pk, "change primary key"),
        row=new_row,
        old=old_row,
        version=_version_from_wire(version, "change version", origins),
        replaced=None
        if replaced is None
        else _version_from_wire(replaced, "change replaced", origins),
        resolves=None if resolves is None else want_name(resolves, "change resolves"),
    )


def _must(carries: bool) -> str:
    return "must carry" if carries else "must not carry"


def _skip_from_wire(value: Any) -> Skip:
    node_id, incarnation, first, last = want_list(value, "skip", min_len=4, max_len=4)
    skip = Skip(
        _origin_from_wire(node_id, incarnation, "skip origin"),
        want_int(first, "skip first sequence", low=1),
        want_int(last, "skip last sequence", low=1),
    )
    if skip.first_seq > skip.last_seq:
        raise RemoteProtocolError(f"skip: range {skip.first_seq}..{skip.last_seq} is empty")
    return skip


@dataclass(frozen=True, slots=True)
class Ack:
    """What the sender has committed: per origin, and the last batch sequence it covers."""

    TYPE: ClassVar[int] = 3
    version_vector: VersionVector
    through_sequence: int

    def to_wire(self) -> list[Any]:
        return [_vector_to_wire(self.version_vector), self.through_sequence]

    @classmethod
    def from_wire(cls, value: Any) -> Self:
        vector, through = _fields(value, cls, 2)
        return cls(
            _vector_from_wire(vector, "Ack version vector"),
            want_int(through, "Ack sequence"),
        )


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Liveness, clock skew (wall time in ms), progress and table checksums.

    ``known`` is every node the sender knows of, with that node's vector and the wall time
    the node reported it (the sender's own entry is fresh; the rest are relayed), so the
    cluster-wide minimum reaches nodes that never talk directly, as in a chain. A configured
    peer the sender never heard from is listed with an empty vector: it holds nothing yet.
    """

    TYPE: ClassVar[int] = 4
    wall_time_ms: int
    version_vector: VersionVector
    table_checksums: Mapping[str, bytes]
    known: Mapping[str, tuple[int, VersionVector]] = field(default_factory=dict)
    checksum_vector: VersionVector = field(default_factory=dict)
    """The version vector the table checksums were computed at (not the current one)."""

    def to_wire(self) -> list[Any]:
        return [
            self.wall_time_ms,
            _vector_to_wire(self.version_vector),
            dict(self.table_checksums),
            [[node, at, _vector_to_wire(vector)] for node, (at, vector) in self.known.items()],
            _vector_to_wire(self.checksum_vector),
        ]

    @classmethod
    def from_wire(cls, value: Any) -> Self:
        wall, vector, checksums, known, checksum_vector = _fields(value, cls, 5)
        nodes: dict[str, tuple[int, VersionVector]] = {}
        for entry in want_list(known, "Heartbeat known nodes", max_len=MAX_ORIGINS):
            node, at, node_vector = want_list(entry, "Heartbeat node", min_len=3, max_len=3)
            nodes[want_name(node, "Heartbeat node id")] = (
                want_int(at, "Heartbeat node time"),
                _vector_from_wire(node_vector, "Heartbeat node vector"),
            )
        return cls(
            want_int(wall, "Heartbeat wall time"),
            _vector_from_wire(vector, "Heartbeat version vector"),
            _checksums_from_wire(checksums, "Heartbeat checksums"),
            nodes,
            _vector_from_wire(checksum_vector, "Heartbeat checksum vector"),
        )


@dataclass(frozen=True, slots=True)
class Goodbye:
    """The last message each way; sealed with the stream's final tag."""

    TYPE: ClassVar[int] = 5
    reason: str

    def to_wire(self) -> list[Any]:
        return [self.reason]

    @classmethod
    def from_wire(cls, value: Any) -> Self:
        (reason,) = _fields(value, cls, 1)
        return cls(want_str(reason, "Goodbye reason"))


@dataclass(frozen=True, slots=True)
class SnapshotBegin:
    TYPE: ClassVar[int] = 6
    snapshot_id: int
    version_vector: VersionVector
    tables: tuple[SnapshotTable, ...]
    ranges: Mapping[str, bytes] = field(default_factory=dict)
    """A repair: per table, a bitmap of the key buckets carried (absent: the whole table). A
    snapshot with ranges mends rows and leaves the receiver's version vector alone."""
    keys: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """A repair of named rows: per table, the stored keys carried (the rows the asker named;
    its other rows are not in question). Like ranges, it mends and leaves the vector alone."""

    def to_wire(self) -> list[Any]:
        wire = [
            self.snapshot_id,
            _vector_to_wire(self.version_vector),
            [
                [t.name, list(t.columns), list(t.primary_key), t.row_count, t.max_bytes]
                for t in self.tables
            ],
            dict(self.ranges),
        ]
        if self.keys:
            wire.append({table: list(keys) for table, keys in self.keys.items()})
        return wire

    @classmethod
    def from_wire(cls, value: Any) -> Self:
        snapshot_id, vector, tables, ranges, keys = _fields(value, cls, 5, optional=1)
        parsed = []
        for entry in want_list(tables, "SnapshotBegin tables", max_len=MAX_TABLES):
            name, columns, primary_key, row_count, max_bytes = want_list(
                entry, "SnapshotBegin table", min_len=5, max_len=5
            )
            parsed.append(
                SnapshotTable(
                    want_name(name, "SnapshotBegin table name"),
                    _names_from_wire(columns, "SnapshotBegin column", min_len=1),
                    _names_from_wire(primary_key, "SnapshotBegin key column", min_len=1),
                    want_int(row_count, "SnapshotBegin row count"),
                    want_int(max_bytes, "SnapshotBegin table bytes"),
                )
            )
        return cls(
            want_int(snapshot_id, "SnapshotBegin id"),
            _vector_from_wire(vector, "SnapshotBegin version vector"),
            tuple(parsed),
            _checksums_from_wire(ranges, "SnapshotBegin ranges", max_len=BUCKETS // 8),
            _keys_from_wire(keys, "SnapshotBegin keys"),
        )


@dataclass(frozen=True, slots=True)
class SnapshotChunk:
    TYPE: ClassVar[int] = 7
    snapshot_id: int
    table: str
    index: int
    rows: tuple[SnapshotRow, ...]

    def to_wire(self) -> list[Any]:
        return [
            self.snapshot_id,
            self.table,
            self.index,
            [
                [list(r.pk), _row_to_wire(r.values), _version_to_wire(r.version), r.seq]
                for r in self.rows
            ],
        ]

    @classmethod
    def from_wire(cls, value: Any) -> Self:
        snapshot_id, table, index, rows = _fields(value, cls, 4)
        parsed = []
        origins = _Origins()
        for entry in want_list(rows, "SnapshotChunk rows"):
            pk, values, version, seq = want_list(entry, "SnapshotChunk row", min_len=4, max_len=4)
            parsed.append(
                SnapshotRow(
                    _pk_from_wire(pk, "SnapshotChunk primary key"),
                    None if values is None else want_row(values, "SnapshotChunk row"),
                    _version_from_wire(version, "SnapshotChunk version", origins),
                    want_int(seq, "SnapshotChunk row sequence", low=WITHHELD),
                )
            )
        return cls(
            want_int(snapshot_id, "SnapshotChunk id"),
            want_name(table, "SnapshotChunk table"),
            want_int(index, "SnapshotChunk index"),
            tuple(parsed),
        )


Column = tuple[SqlValue, ...]


@dataclass(frozen=True, slots=True)
class ColumnVersions:
    """The versions of a chunk's rows, one column per field (see `SnapshotColumns`)."""

    hlcs: tuple[int, ...]
    origins: tuple[int, ...]
    """Indexes into the chunk's ``origins``."""
    generations: tuple[int, ...]
    seqs: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.hlcs)

    def to_wire(self) -> list[Any]:
        return [self.hlcs, self.origins, self.generations, self.seqs]

    @classmethod
    def from_wire(cls, value: Any, what: str, origins: int, *, low_seq: int) -> Self:
        hlcs, indexes, generations, seqs = want_list(value, what, min_len=4, max_len=4)
        rows = len(want_list(hlcs, f"{what} hlcs"))
        return cls(
            _int_column(hlcs, f"{what} hlcs", rows),
            _int_column(indexes, f"{what} origins", rows, high=origins - 1),
            _int_column(generations, f"{what} generations", rows),
            _int_column(seqs, f"{what} sequences", rows, low=low_seq),
        )


@dataclass(frozen=True, slots=True)
class SnapshotColumns:
    """A chunk of a snapshot in columns: what `SnapshotChunk` carries, without an object or
    a map per row, so both ends handle it with a few calls per column.

    ``columns`` holds the live rows' values, one tuple per column of the table in the order
    `SnapshotBegin` declared them; ``live`` their versions and ``hashes`` the content hash
    each version wrote (None: not known). ``keys`` holds, one tuple per key column in the
    declared key order, the rows sent by key alone: tombstones (``keyed.seqs`` >= 0) and rows
    named but withheld (`WITHHELD`); ``keyed`` their versions. Versions name their origin by
    an index into ``origins``. The sender puts withheld rows before live rows and tombstones
    after them (see `replicator.sync.snapshot`)."""

    TYPE: ClassVar[int] = 11
    snapshot_id: int
    table: str
    index: int
    origins: tuple[Origin, ...]
    columns: tuple[Column, ...]
    live: ColumnVersions
    hashes: tuple[bytes | None, ...]
    keys: tuple[Column, ...]
    keyed: ColumnVersions

    @property
    def row_count(self) -> int:
        return len(self.live) + len(self.keyed)

    def to_wire(self) -> list[Any]:
        return [
            self.snapshot_id,
            self.table,
            self.index,
            [[origin.node_id, origin.incarnation] for origin in self.origins],
            self.columns,
            self.live.to_wire(),
            self.hashes,
            self.keys,
            self.keyed.to_wire(),
        ]

    @classmethod
    def from_wire(cls, value: Any) -> Self:
        snapshot_id, table, index, origins, columns, live, hashes, keys, keyed = _fields(
            value, cls, 9
        )
        what = "SnapshotColumns"
        parsed_origins = []
        for entry in want_list(origins, f"{what} origins", min_len=1, max_len=MAX_CHUNK_ORIGINS):
            node_id, incarnation = want_list(entry, f"{what} origin", min_len=2, max_len=2)
            parsed_origins.append(_origin_from_wire(node_id, incarnation, f"{what} origin"))
        if len(set(parsed_origins)) != len(parsed_origins):
            raise RemoteProtocolError(f"{what} origins: an origin appears twice")
        count = len(parsed_origins)
        live_versions = ColumnVersions.from_wire(live, f"{what} live", count, low_seq=0)
        keyed_versions = ColumnVersions.from_wire(keyed, f"{what} keyed", count, low_seq=WITHHELD)
        rows, named = len(live_versions), len(keyed_versions)
        if rows + named == 0:
            raise RemoteProtocolError(f"{what}: a chunk carries at least one row")
        return cls(
            want_int(snapshot_id, f"{what} id"),
            want_name(table, f"{what} table"),
            want_int(index, f"{what} index"),
            tuple(parsed_origins),
            _value_columns(columns, f"{what} columns", rows, max_len=MAX_COLUMNS),
            live_versions,
            _hash_column(hashes, f"{what} hashes", rows),
            _value_columns(keys, f"{what} keys", named, max_len=MAX_KEY_COLUMNS),
            keyed_versions,
        )


def _int_column(
    value: Any, what: str, rows: int, *, low: int = 0, high: int = INT64_MAX
) -> tuple[int, ...]:
    """A column of integers in low..high (booleans refused), checked per column, not per
    value: these are the hot path of a snapshot."""
    column = want_list(value, what, min_len=rows, max_len=rows)
    if not column:
        return ()
    if set(map(type, column)) != {int}:
        raise RemoteProtocolError(f"{what}: expected integers only")
    if min(column) < low or max(column) > high:
        raise RemoteProtocolError(f"{what}: a value is outside {low}..{high}")
    return tuple(column)


_VALUE_TYPES = frozenset({int, float, str, bytes, type(None)})


def _value_columns(value: Any, what: str, rows: int, *, max_len: int) -> tuple[Column, ...]:
    """Columns of SQLite values, each ``rows`` long (an empty chunk part has no columns)."""
    columns = want_list(value, what, min_len=0 if rows == 0 else 1, max_len=max_len)
    checked = []
    for column in columns:
        values = want_list(column, f"{what} column", min_len=rows, max_len=rows)
        kinds = set(map(type, values))
        if not kinds <= _VALUE_TYPES:
            raise RemoteProtocolError(
                f"{what}: expected SQLite values (integer, real, text, blob or null)"
            )
        if int in kinds:
            integers = values if len(kinds) == 1 else [v for v in values if type(v) is int]
            if min(integers) < INT64_MIN or max(integers) > INT64_MAX:
                raise RemoteProtocolError(f"{what}: an integer does not fit SQLite's 64 bits")
        if float in kinds and any(map(math.isnan, (v for v in values if type(v) is float))):
            raise RemoteProtocolError(f"{what}: NaN is not an SQLite value")
        checked.append(tuple(values))
    return tuple(checked)


def _hash_column(value: Any, what: str, rows: int) -> tuple[bytes | None, ...]:
    column = want_list(value, what, min_len=rows, max_len=rows)
    if not set(map(type, column)) <= {bytes, type(None)}:
        raise RemoteProtocolError(f"{what}: expected binary data or nil")
    if {len(digest) for digest in column if digest is not None} - {ROW_HASH_SIZE}:
        raise RemoteProtocolError(f"{what}: a content hash is not {ROW_HASH_SIZE} bytes")
    return tuple(column)


@dataclass(frozen=True, slots=True)
class SnapshotEnd:
    TYPE: ClassVar[int] = 8
    snapshot_id: int
    table_checksums: Mapping[str, bytes]
    row_count: int

    def to_wire(self) -> list[Any]:
        return [self.snapshot_id, dict(self.table_checksums), self.row_count]

    @classmethod
    def from_wire(cls, value: Any) -> Self:
        snapshot_id, checksums, row_count = _fields(value, cls, 3)
        return cls(
            want_int(snapshot_id, "SnapshotEnd id"),
            _checksums_from_wire(checksums, "SnapshotEnd checksums"),
            want_int(row_count, "SnapshotEnd row count"),
        )


@dataclass(frozen=True, slots=True)
class Resend:
    """Asks the peer to stream again everything after this vector (a gap was seen)."""

    TYPE: ClassVar[int] = 9
    version_vector: VersionVector

    def to_wire(self) -> list[Any]:
        return [_vector_to_wire(self.version_vector)]

    @classmethod
    def from_wire(cls, value: Any) -> Self:
        (vector,) = _fields(value, cls, 1)
        return cls(_vector_from_wire(vector, "Resend version vector"))


@dataclass(frozen=True, slots=True)
class SnapshotRequest:
    """Asks the peer for a full snapshot of these tables (all replicated tables when empty)."""

    TYPE: ClassVar[int] = 10
    tables: tuple[str, ...]
    reason: str
    buckets: Mapping[str, bytes] = field(default_factory=dict)
    """A repair: per table, the asker's checksum of each key bucket (BUCKETS x 16 bytes);
    the peer sends only the rows of buckets whose checksum differs from its own."""
    keys: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """A repair of rows the asker knows are wrong (edited behind replication's back): per
    table, their stored keys; the peer sends exactly those rows (or their tombstones)."""

    def to_wire(self) -> list[Any]:
        wire = [list(self.tables), self.reason, dict(self.buckets)]
        if self.keys:
            wire.append({table: list(keys) for table, keys in self.keys.items()})
        return wire

    @classmethod
    def from_wire(cls, value: Any) -> Self:
        tables, reason, buckets, keys = _fields(value, cls, 4, optional=1)
        parsed = _checksums_from_wire(
            buckets, "SnapshotRequest buckets", max_len=BUCKETS * BUCKET_CHECKSUM
        )
        if any(len(digests) != BUCKETS * BUCKET_CHECKSUM for digests in parsed.values()):
            raise RemoteProtocolError("SnapshotRequest buckets: wrong size")
        return cls(
            _names_from_wire(tables, "SnapshotRequest table"),
            want_str(reason, "SnapshotRequest reason"),
            parsed,
            _keys_from_wire(keys, "SnapshotRequest keys"),
        )


Message = (
    Hello
    | Changes
    | Ack
    | Heartbeat
    | Goodbye
    | SnapshotBegin
    | SnapshotChunk
    | SnapshotEnd
    | Resend
    | SnapshotRequest
    | SnapshotColumns
)

MESSAGE_TYPES: Mapping[int, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        Changes,
        Ack,
        Heartbeat,
        Goodbye,
        SnapshotBegin,
        SnapshotChunk,
        SnapshotEnd,
        Resend,
        SnapshotRequest,
        SnapshotColumns,
    )
}


def encode_message(codec: Codec, message: Message) -> bytes:
    return codec.encode(message.TYPE, message.to_wire())


def decode_message(codec: Codec, plaintext: bytes) -> Message:
    message_type, value = codec.decode(plaintext)
    cls = MESSAGE_TYPES.get(message_type)
    if cls is None:
        raise RemoteProtocolError(f"unknown message type {message_type}")
    return cls.from_wire(value)
