"""Streaming with one connected peer: what it lacks goes out, what it sends comes in.

Three tasks share the connection. The sender reads this node's log from a position and sends
every entry the peer does not hold yet (its version vector says which), first the backlog, then
each new commit as soon as the detector sees it; at most ``window`` batches wait for their ack,
so a slow peer slows the sender instead of filling memory. Batches are cut by count, by
estimated bytes and by decoded elements, so every batch fits the receiver's message cap. The
receiver applies the peer's batches and acknowledges only after the commit; a gap makes it ask
for a resend instead of skipping. The heartbeat carries wall time (for skew) and the vector,
and the link ends when the peer has been silent longer than the liveness timeout.

What the peer holds is learnt from everything it says about itself: its Hello, its acks, its
heartbeats, and the changes it sends. A batch in flight counts as delivered once the peer shows
it holds what the batch carried, even if its ack went missing, so lag never shows for a peer
that has everything. A skip marker from the peer is accepted only within what the peer has
shown it holds (a forged marker up to the end of time would silence an origin for good), and
this node shows a peer what it holds before sending it markers beyond what it showed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import trio

from protocol import (
    Ack,
    Change,
    Changes,
    Goodbye,
    Heartbeat,
    Hello,
    Message,
    MessageTooLarge,
    Origin,
    Resend,
    Skip,
    SnapshotBegin,
    SnapshotChunk,
    SnapshotColumns,
    SnapshotEnd,
    SnapshotRequest,
)
from protocol.codec import DEFAULT_MAX_ELEMENTS
from replicator.apply.applier import ApplyResult
from replicator.capture import hlc
from replicator.capture.store import LogRecord
from replicator.clock import Clock, SystemClock
from replicator.errors import first_leaf
from replicator.log import KEY_PEER, get_logger
from replicator.sync.faults import Faults
from replicator.sync.membership import ClusterView
from replicator.sync.peer import OFF_LOOP_BYTES, PeerConnection, PeerDisconnected

__all__ = ["REPAIR_BY_KEY", "Link", "LinkSettings", "PauseSwitch", "PeerStatus"]

REPAIR_BY_KEY = "repair-by-key"
"""The Hello capability of a node that takes repair requests naming rows (their keys)."""

# Changes messages already received are applied together, up to this many entries.
_MAX_COALESCED = 5000
# Heartbeats in a row in which a peer reports less of its own writes than this node held at
# the heartbeat before: then it lost data, or someone forged markers for its origin.
_REGRESSION_HEARTBEATS = 3
# A change's message overhead beyond its rows (origin, versions, framing), estimated.
_CHANGE_OVERHEAD_BYTES = 160
_CHANGE_ELEMENTS = 24


@dataclass(frozen=True, slots=True)
class LinkSettings:
    batch_size: int = 1000
    window: int = 4
    heartbeat_interval: float = 1.0
    liveness_timeout: float = 10.0
    max_batch_bytes: int = 12 << 20
    """Estimated encoded size a batch is cut at (below the session's message cap)."""
    max_batch_elements: int = DEFAULT_MAX_ELEMENTS // 2
    """Decoded msgpack elements a batch is cut at (below the receiver's element budget)."""


@dataclass(slots=True)
class PeerStatus:
    """What this node knows about one peer, for status and metrics."""

    node_id: str
    address: str
    state: str = "disconnected"
    last_contact: float | None = None
    peer_vector: dict[Origin, int] = field(default_factory=dict)
    incarnation: int | None = None  # the peer's, as its last Hello said
    sent_position: int = 0
    acked_position: int = 0
    skew_ms: int | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    changes_sent: int = 0
    changes_received: int = 0
    last_error: str | None = None
    last_error_at: float | None = None

    def failed(self, error: str, at: float) -> None:
        self.last_error, self.last_error_at = error, at


@dataclass(slots=True)
class _InFlight:
    """A batch sent and not yet known to be held by the peer."""

    sequence: int
    position: int
    sent_at: float
    carries: dict[Origin, int]  # per origin, the highest sequence in the batch


# (after, limit) -> (entries for the peer, the position read through: entries left out
# because the peer wrote them still move it, so they are never scanned again)
ReadLog = Callable[[int, int], Awaitable[tuple[list[LogRecord], int]]]
Apply = Callable[
    [Sequence[Change], Sequence[Skip]], Awaitable[tuple[ApplyResult, dict[Origin, int]]]
]
WaitLog = Callable[[int], Awaitable[None]]
_Entry = tuple[Change | Skip, int]  # an entry for the peer and the log position it came from


class Snapshots(Protocol):
    """What a link needs from the node for full resyncs (see `replicator.sync.snapshot`)."""

    def log_floor(self) -> Mapping[Origin, int]:
        """Per origin, the sequence at or below which this node's log holds nothing."""

    async def send(
        self,
        connection: PeerConnection,
        peer: str,
        reason: str,
        repair: Mapping[str, bytes],
        keys: Mapping[str, tuple[str, ...]] | None = None,
    ) -> tuple[int, dict[Origin, int]]:
        """Stream a snapshot (only the differing buckets of ``repair``'s tables, if any, and
        only the rows ``keys`` names of its tables); returns the log position and vector it
        corresponds to."""

    async def begin(self, peer: str, message: SnapshotBegin) -> None: ...

    async def chunk(self, peer: str, message: SnapshotColumns | SnapshotChunk) -> None: ...

    async def end(self, peer: str, message: SnapshotEnd) -> dict[Origin, int]:
        """Verify and merge; returns the vector this node holds now."""

    def wanted(self, peer: str, missing: list[str]) -> bool:
        """The peer lacks entries below the log floor: snapshot it (True) or give up."""

    def local_checksums(self) -> tuple[dict[Origin, int], dict[str, bytes]]:
        """This node's latest table checksums and the vector they were computed at."""

    async def peer_checksums(
        self, peer: str, vector: Mapping[Origin, int], checksums: Mapping[str, bytes]
    ) -> None:
        """A peer's checksums arrived: compare, and ask for a repair if they differ."""


class Link:
    def __init__(
        self,
        connection: PeerConnection,
        hello: Hello,
        status: PeerStatus,
        *,
        node_id: str,
        settings: LinkSettings,
        read_log: ReadLog,
        apply: Apply,
        wait_for_log: WaitLog,
        vector: Callable[[], dict[Origin, int]],
        cluster: ClusterView,
        snapshots: Snapshots,
        pause: PauseSwitch | None = None,
        outgoing: Callable[[Change], Change | None] | None = None,
        alarms: MutableMapping[str, str] | None = None,
        faults: Faults | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.connection = connection
        self._clock: Clock = clock or SystemClock()
        self.peer = hello.node_id
        self.status = status
        # Closed by this node for a newer connection of the same peer (not a disconnect).
        self.replaced = False
        # A peer that does not offer it would refuse a repair request naming rows.
        self._repair_by_key = REPAIR_BY_KEY in hello.capabilities
        self.node_id = node_id
        self.settings = settings
        self._read_log = read_log
        self._apply = apply
        self._wait_for_log = wait_for_log
        self._vector = vector
        self._cluster = cluster
        self._snapshots = snapshots
        self._outgoing = outgoing  # filters and transformations; None: all as is
        self._alarms: MutableMapping[str, str] = {} if alarms is None else alarms
        self._faults = faults or Faults()
        self._snapshot_reason: str | None = None
        self._repairs: list[tuple[str, Mapping[str, bytes], Mapping[str, tuple[str, ...]]]] = []
        self._pause = pause or PauseSwitch()
        self._owe_resend = False
        self._log = get_logger("link", **{KEY_PEER: hello.node_id})
        # Resume where the peer's acknowledgements left off, unless it now holds less than it
        # acknowledged, or runs as a new incarnation (restored from a backup, recreated): then
        # scan the log from the start (what it holds is skipped).
        regressed = status.incarnation not in (None, hello.incarnation) or any(
            hello.version_vector.get(origin, 0) < seq for origin, seq in status.peer_vector.items()
        )
        status.incarnation = hello.incarnation
        self._start_position = 0 if regressed else status.acked_position
        if regressed:
            status.acked_position = 0
        status.peer_vector = dict(hello.version_vector)
        # What the peer holds or has been sent (ahead of its acks): the sender's filter.
        self._have = dict(hello.version_vector)
        # What the peer has shown it holds (Hello, acks, heartbeats, the changes it sent):
        # the bound on the skip markers accepted from it.
        self._shown = dict(hello.version_vector)
        # What this node has shown the peer it holds (its acks, heartbeats, changes).
        self._shown_to_peer: dict[Origin, int] = {}
        self._acked_through = 0  # the last batch sequence of the peer's this node acked
        self._own_origin = Origin(hello.node_id, hello.incarnation)
        # What this node held of the peer's own origin at its last heartbeats (oldest first).
        self._held_at_heartbeats: deque[int] = deque([0, 0], maxlen=2)
        self._regressions = 0
        self._regressed_since: float | None = None
        self._in_flight: deque[_InFlight] = deque()
        # A full snapshot sent and not yet shown held by the peer: (log position, its vector).
        self._snapshot_unconfirmed: tuple[int, dict[Origin, int]] | None = None
        self._window_open = trio.Event()
        self._window_open.set()
        self._rewind = False
        self._sequence = 0
        self.started_at = self._clock.monotonic()

    async def run(self) -> None:
        """Until the connection ends; raises `PeerDisconnected` with the reason."""
        self.status.state = "connected"
        self.status.last_contact = self._clock.time()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send_loop)
                nursery.start_soon(self._heartbeat_loop)
                await self._receive_loop()
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # One task saw the connection end; the others were cancelled by it.
            matched, _ = group.split(PeerDisconnected)
            if matched is None:
                raise
            raise first_leaf(matched) from None
        finally:
            self.status.bytes_in = self.connection.bytes_received
            self.status.bytes_out = self.connection.bytes_sent

    async def close(self, reason: str) -> None:
        await self.connection.close(reason)

    async def resumed(self) -> None:
        """After a pause: ask the peer again for what was dropped meanwhile."""
        if self._owe_resend:
            self._owe_resend = False
            await self.connection.send(Resend(self._vector()))

    @property
    def in_flight(self) -> int:
        """Batches sent and not acknowledged yet."""
        return len(self._in_flight)

    @property
    def lag_seconds(self) -> float:
        """How long the oldest batch the peer is not known to hold has been waiting."""
        if not self._in_flight:
            return 0.0
        return self._clock.monotonic() - self._in_flight[0].sent_at

    def heard_within(self, seconds: float) -> bool:
        """The peer said something (a heartbeat at least) in the last ``seconds``."""
        last = self.status.last_contact
        return last is not None and self._clock.time() - last <= seconds

    # -- sending ---------------------------------------------------------------------------

    async def ask_repair(
        self,
        reason: str,
        buckets: Mapping[str, bytes],
        keys: Mapping[str, tuple[str, ...]] | None = None,
    ) -> None:
        """Ask the peer for the rows of the buckets whose checksums differ from ``buckets``
        (or, for the tables in ``keys``, for exactly those rows, if the peer can)."""
        named = dict(keys or {}) if self._repair_by_key else {}
        await self.connection.send(SnapshotRequest(tuple(buckets), reason, dict(buckets), named))

    async def pull(self, *, full: bool, reason: str) -> None:
        """Ask the peer for its whole state (a snapshot) or to stream its log again."""
        if full:
            await self.connection.send(SnapshotRequest((), reason))
        else:
            await self.connection.send(Resend(self._vector()))

    def request_snapshot(self, reason: str) -> None:
        """Send the peer a full snapshot before anything else from the log."""
        if self._snapshot_reason is None:
            self._snapshot_reason = reason

    def _below_floor(self) -> list[str]:
        return [
            f"{origin} <= {seq}"
            for origin, seq in self._snapshots.log_floor().items()
            if self._have.get(origin, 0) < seq
        ]

    async def _send_loop(self) -> None:
        position = self._start_position
        while True:
            await self._pause.wait_until_running()
            if self._rewind:
                position, self._rewind = 0, False
            missing = self._below_floor()
            if missing and self._snapshot_reason is None:
                if not self._snapshots.wanted(self.peer, missing):
                    raise PeerDisconnected(
                        "peer lacks entries below the log floor", op="send", peer=self.peer
                    )
                self.request_snapshot("peer lacks entries below this node's log floor")
            if self._snapshot_reason is not None:
                reason, self._snapshot_reason = self._snapshot_reason, None
                position, vector = await self._snapshots.send(
                    self.connection, self.peer, reason, {}
                )
                _merge(self._have, vector)
                self.status.sent_position = max(self.status.sent_position, position)
                self._snapshot_unconfirmed = (position, vector)
                continue
            if self._repairs:
                # Requests queued while a repair was sent: the newest buckets of each table
                # say all there is to mend, so they go out as one.
                reason = self._repairs[-1][0]
                buckets: dict[str, bytes] = {}
                keys: dict[str, tuple[str, ...]] = {}
                for _, asked, named in self._repairs:
                    buckets.update(asked)
                    for table in asked:  # the newest ask of a table says what it lacks
                        keys.pop(table, None)
                    keys.update(named)
                self._repairs.clear()
                await self._snapshots.send(self.connection, self.peer, reason, buckets, keys)
            records, read_through = await self._read_log(position, self.settings.batch_size)
            if not records:
                if read_through > position:
                    position = self.status.sent_position = read_through
                    if not self._in_flight and self._snapshot_unconfirmed is None:
                        # Nothing of it was for the peer.
                        self.status.acked_position = max(self.status.acked_position, position)
                await self._wait_for_log(position)
                continue
            for piece, size in self._cut(records):
                entries = self._lacking(piece)
                if entries:
                    await self._send_entries(entries, large=size >= OFF_LOOP_BYTES)
                self.status.sent_position = piece[-1].position
            position = max(records[-1].position, read_through)
            self.status.sent_position = position

    def _cut(self, records: list[LogRecord]) -> list[tuple[list[LogRecord], int]]:
        """Consecutive pieces of ``records`` with their estimated size, each within the
        batch's byte and element bounds (a record larger than a batch is a piece alone)."""
        pieces: list[tuple[list[LogRecord], int]] = []
        piece: list[LogRecord] = []
        size = elements = 0
        max_bytes, max_elements = self.settings.max_batch_bytes, self.settings.max_batch_elements
        for record in records:
            cost = record.size + _CHANGE_OVERHEAD_BYTES
            count = _elements(record.entry)
            if piece and (size + cost > max_bytes or elements + count > max_elements):
                pieces.append((piece, size))
                piece, size, elements = [], 0, 0
            piece.append(record)
            size += cost
            elements += count
        pieces.append((piece, size))
        return pieces

    def _lacking(self, records: list[LogRecord]) -> list[_Entry]:
        """Entries the peer does not hold yet, in log order (the reader already left out
        its own writes); changes a filter withholds become skip markers."""
        have = self._have
        entries: list[_Entry] = []
        outgoing = self._outgoing
        for record in records:
            entry = record.entry
            origin = entry.origin
            if isinstance(entry, Change):
                if entry.seq > have.get(origin, 0):
                    shared = entry if outgoing is None else outgoing(entry)
                    if shared is not None:
                        entries.append((shared, record.position))
                    else:
                        _append_skip(entries, Skip(origin, entry.seq, entry.seq), record.position)
                    have[origin] = entry.seq
            elif entry.last_seq > have.get(origin, 0):
                _append_skip(entries, entry, record.position)
                have[origin] = entry.last_seq
        return entries

    async def _send_entries(self, entries: list[_Entry], *, large: bool) -> None:
        """Send entries as one batch, or as several if the batch is over the message cap
        after all (the size estimate was low); a single change over the cap is withheld
        as a skip marker with an alarm, so it never halts the stream. ``large``: encode
        off the event loop."""
        changes = [entry for entry, _ in entries if isinstance(entry, Change)]
        skips = [entry for entry, _ in entries if isinstance(entry, Skip)]
        try:
            await self._send_batch(changes, skips, entries[-1][1], large=large)
            return
        except MessageTooLarge as error:
            if len(entries) > 1:
                middle = len(entries) // 2
                await self._send_entries(entries[:middle], large=True)
                await self._send_entries(entries[middle:], large=True)
                return
            change = changes[0]
            reason = str(error)
        self._faults.count("oversize_change")
        self._alarms[f"oversize_change:{change.table}"] = (
            f"a change to {change.table} ({change.origin} #{change.seq}) is too large for one "
            f"message and was not replicated: {reason}"
        )
        self._log.error("change too large to replicate: withheld", table=change.table,
                        origin=str(change.origin), seq=change.seq, reason=reason)  # fmt: skip
        skip = Skip(change.origin, change.seq, change.seq)
        await self._send_batch([], [skip], entries[-1][1], large=False)

    async def _send_batch(
        self, changes: list[Change], skips: list[Skip], position: int, *, large: bool
    ) -> None:
        while len(self._in_flight) >= self.settings.window:
            self._window_open = trio.Event()
            await self._window_open.wait()
        await self._show_holdings(skips)
        self._sequence += 1
        batch = Changes(
            node_id=self.node_id,
            sequence=self._sequence,
            timestamp=hlc.pack(self._clock.wall_ms()),
            changes=tuple(changes),
            skips=tuple(skips),
        )
        carries: dict[Origin, int] = {}
        for change in changes:
            carries[change.origin] = max(carries.get(change.origin, 0), change.seq)
        for skip in skips:
            carries[skip.origin] = max(carries.get(skip.origin, 0), skip.last_seq)
        # In flight before the send: the peer's ack may be read before the send returns.
        flight = _InFlight(self._sequence, position, self._clock.monotonic(), carries)
        self._in_flight.append(flight)
        try:
            await self.connection.send(batch, large=large)
        except MessageTooLarge:
            self._in_flight.remove(flight)
            self._sequence -= 1
            raise
        _merge(self._shown_to_peer, carries)
        self.status.changes_sent += len(changes)

    async def _show_holdings(self, skips: list[Skip]) -> None:
        """Before skip markers beyond what the peer has seen this node hold, say what it
        holds (an Ack of nothing new): the peer accepts markers only within that."""
        beyond = {
            skip.origin: skip.last_seq
            for skip in skips
            if skip.last_seq > self._shown_to_peer.get(skip.origin, 0)
        }
        if not beyond:
            return
        vector = self._vector()
        _merge(vector, beyond)  # read from this node's committed log: it holds them
        await self.connection.send(Ack(vector, self._acked_through))
        _merge(self._shown_to_peer, vector)

    async def _heartbeat_loop(self) -> None:
        while True:
            now, vector = self._clock.wall_ms(), self._vector()
            # The cached vector may be older than what was just sent: never report less.
            _merge(vector, self._shown_to_peer)
            at, checksums = self._snapshots.local_checksums()
            known = self._cluster.snapshot(vector, now)
            heartbeat = Heartbeat(now, vector, checksums, known, at)
            await self.connection.send(heartbeat)
            _merge(self._shown_to_peer, vector)
            await trio.sleep(self.settings.heartbeat_interval)

    # -- receiving -------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        while True:
            with trio.move_on_after(self.settings.liveness_timeout) as silence:
                message = await self.connection.receive()
            if silence.cancelled_caught:
                raise PeerDisconnected(
                    f"peer silent for {self.settings.liveness_timeout:g}s",
                    op="receive",
                    peer=self.peer,
                )
            self.status.last_contact = self._clock.time()
            self.status.bytes_in = self.connection.bytes_received
            self.status.bytes_out = self.connection.bytes_sent
            if isinstance(message, Goodbye):
                self._log.info("peer said goodbye", reason=message.reason)
                return
            await self._dispatch(message)

    async def _dispatch(self, message: Message) -> None:
        if isinstance(message, Changes):
            await self._on_changes(message)
        elif isinstance(message, Ack):
            self._on_ack(message)
        elif isinstance(message, Heartbeat):
            await self._on_heartbeat(message)
        elif isinstance(message, SnapshotRequest):
            self._log.info("peer asked for a snapshot", reason=message.reason,
                           tables=list(message.tables), repair=bool(message.buckets))  # fmt: skip
            if message.buckets:
                self._repairs.append((f"repair asked by {self.peer}: {message.reason}",
                                      message.buckets, message.keys))  # fmt: skip
            else:
                self.request_snapshot(f"requested by {self.peer}: {message.reason}")
        elif isinstance(message, SnapshotBegin):
            await self._snapshots.begin(self.peer, message)
        elif isinstance(message, SnapshotColumns | SnapshotChunk):
            await self._snapshots.chunk(self.peer, message)
        elif isinstance(message, SnapshotEnd):
            vector = await self._snapshots.end(self.peer, message)
            await self.connection.send(Ack(vector, 0))
        elif isinstance(message, Resend):
            # Whatever is in flight will not be acknowledged: start again from its vector.
            self.status.peer_vector = dict(message.version_vector)
            self._have = dict(message.version_vector)
            self._in_flight.clear()
            self._window_open.set()
            self._rewind = True
        else:
            raise PeerDisconnected(
                f"unexpected {type(message).__name__} on an open link", op="receive", peer=self.peer
            )

    async def _on_changes(self, batch: Changes) -> None:
        if self._pause.paused:
            self._owe_resend = True  # dropped unapplied; asked for again on resume
            return
        # Batches that arrived together are applied together and acknowledged by one Ack:
        # under load the fixed cost of a commit is paid once, not per batch.
        changes, skips, sequence = list(batch.changes), list(batch.skips), batch.sequence
        while len(changes) + len(skips) < _MAX_COALESCED and (
            more := self.connection.take_ready(lambda m: isinstance(m, Changes))
        ):
            assert isinstance(more, Changes)
            changes += more.changes
            skips += more.skips
            sequence = more.sequence
        for change in changes:  # a change the peer sends is one it holds
            if change.seq > self._shown.get(change.origin, 0):
                self._shown[change.origin] = change.seq
        self._check_skips(skips)
        result, vector = await self._apply(changes, skips)
        self.status.changes_received += result.accepted
        self._acked_through = sequence
        await self.connection.send(Ack(vector, sequence))
        _merge(self._shown_to_peer, vector)
        if result.gaps or result.clock_refused:
            await self.connection.send(Resend(vector))

    def _check_skips(self, skips: Sequence[Skip]) -> None:
        """Refuse skip markers beyond what the peer has shown it holds: applied, one up to
        the end of time would make every later change of its origin look like a duplicate."""
        for skip in skips:
            shown = self._shown.get(skip.origin, 0)
            if skip.last_seq > shown:
                self._faults.count("skip_beyond_holdings")
                message = (
                    f"{self.peer} sent a skip marker for {skip.origin} up to {skip.last_seq}, "
                    f"beyond the {shown} it has shown it holds: refused, link dropped"
                )
                self._alarms[f"forged_skip:{self.peer}"] = message
                self._log.error("skip marker beyond what the peer holds: refused",
                                origin=str(skip.origin), last_seq=skip.last_seq,
                                shown=shown)  # fmt: skip
                raise PeerDisconnected(message, op="receive", peer=self.peer)

    def _on_ack(self, ack: Ack) -> None:
        while self._in_flight and self._in_flight[0].sequence <= ack.through_sequence:
            self.status.acked_position = max(
                self.status.acked_position, self._in_flight.popleft().position
            )
        self._peer_holds(ack.version_vector)

    async def _on_heartbeat(self, message: Heartbeat) -> None:
        self.status.skew_ms = message.wall_time_ms - self._clock.wall_ms()
        self._peer_holds(message.version_vector)
        self._watch_own_origin(message.version_vector, self._clock.monotonic())
        refused = self._cluster.merge(message.known, self._clock.wall_ms())
        if refused:
            self._faults.count("cluster_view", refused)
        if message.table_checksums:
            await self._snapshots.peer_checksums(
                self.peer, message.checksum_vector, message.table_checksums
            )

    def _peer_holds(self, vector: Mapping[Origin, int]) -> None:
        """The peer says it holds ``vector``: batches it covers are delivered, ack or not."""
        _merge(self.status.peer_vector, vector)
        _merge(self._have, vector)  # it may hold more, from other peers
        _merge(self._shown, vector)
        held = self.status.peer_vector
        while self._in_flight and all(
            held.get(origin, 0) >= seq for origin, seq in self._in_flight[0].carries.items()
        ):
            self.status.acked_position = max(
                self.status.acked_position, self._in_flight.popleft().position
            )
        if self._snapshot_unconfirmed is not None:
            position, sent = self._snapshot_unconfirmed
            # The peer's own writes are its own to count; the rest it must hold as sent.
            if all(held.get(o, 0) >= seq for o, seq in sent.items() if o != self._own_origin):
                self._snapshot_unconfirmed = None
                self.status.acked_position = max(self.status.acked_position, position)
        if not self._in_flight and self._snapshot_unconfirmed is None:
            # What was read past the last batch was none of the peer's.
            self.status.acked_position = max(self.status.acked_position, self.status.sent_position)
        if len(self._in_flight) < self.settings.window:
            self._window_open.set()

    def _watch_own_origin(self, vector: Mapping[Origin, int], now: float) -> None:
        """Alarm when the peer keeps reporting less of its own writes than this node held two
        heartbeats earlier, for 3 heartbeats and a liveness timeout in a row. A peer's report
        covers what it sent before it, and what reached this node through others a little
        later: two heartbeats leave room for both. Heartbeats held up by a stalled connection
        arrive together once it recovers, all of them old: the time in a row lets them pass."""
        reported = vector.get(self._own_origin, 0)
        held = self._held_at_heartbeats[0]
        name = f"origin_regressed:{self.peer}"
        if reported >= held:
            self._regressions, self._regressed_since = 0, None
            self._alarms.pop(name, None)
        else:
            self._regressions += 1
            if self._regressed_since is None:
                self._regressed_since = now
            lasting = now - self._regressed_since >= self.settings.liveness_timeout
            if self._regressions >= _REGRESSION_HEARTBEATS and lasting:
                if name not in self._alarms:
                    self._log.error("peer reports less of its own writes than this node holds",
                                    reported=reported, held=held)  # fmt: skip
                self._alarms[name] = (
                    f"{self.peer} reports holding {reported} of its own changes "
                    f"({self._own_origin}) but this node holds {held}: it lost data without a "
                    "new incarnation, or skip markers for its origin were forged"
                )
        self._held_at_heartbeats.append(self._vector().get(self._own_origin, 0))


class PauseSwitch:
    """Pausing stops sending and applying on every link; connections and heartbeats stay up."""

    def __init__(self) -> None:
        self.paused = False
        self._running = trio.Event()
        self._running.set()

    def pause(self) -> None:
        if not self.paused:
            self.paused = True
            self._running = trio.Event()

    def resume(self) -> None:
        self.paused = False
        self._running.set()

    async def wait_until_running(self) -> None:
        await self._running.wait()


def _append_skip(entries: list[_Entry], skip: Skip, position: int) -> None:
    """Add a skip marker, joined to the previous entry if that is its origin's marker just
    before it (withheld changes in a row travel as one range)."""
    if entries:
        last, _ = entries[-1]
        if (
            isinstance(last, Skip)
            and last.origin == skip.origin
            and last.last_seq + 1 == skip.first_seq
        ):
            entries[-1] = (Skip(skip.origin, last.first_seq, skip.last_seq), position)
            return
    entries.append((skip, position))


def _elements(entry: Change | Skip) -> int:
    """The msgpack elements an entry decodes to on the receiving side (an upper estimate)."""
    if isinstance(entry, Skip):
        return 5
    return (
        _CHANGE_ELEMENTS
        + len(entry.pk)
        + 2 * (len(entry.row) if entry.row is not None else 0)
        + 2 * (len(entry.old) if entry.old is not None else 0)
    )


def _merge(into: dict[Origin, int], vector: Mapping[Origin, int]) -> None:
    for origin, seq in vector.items():
        if seq > into.get(origin, 0):
            into[origin] = seq
