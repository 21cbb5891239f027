"""Streaming with one connected peer: what it lacks goes out, what it sends comes in.

Three tasks share the connection. The sender reads this node's log from a position and sends
every entry the peer does not hold yet (its version vector says which), first the backlog, then
each new commit as soon as the detector sees it; at most ``window`` batches wait for their ack,
so a slow peer slows the sender instead of filling memory. The receiver applies the peer's
batches (one transaction each) and acknowledges only after the commit; a gap makes it ask for a
resend instead of skipping. The heartbeat carries wall time (for skew) and the vector, and the
link ends when the peer has been silent longer than the liveness timeout.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
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
    SnapshotEnd,
    SnapshotRequest,
)
from replicator import hlc
from replicator.applier import ApplyResult
from replicator.errors import first_leaf
from replicator.log import KEY_PEER, get_logger
from replicator.membership import ClusterView
from replicator.peer import PeerConnection, PeerDisconnected
from replicator.store import LogRecord

__all__ = ["Link", "LinkSettings", "PauseSwitch", "PeerStatus"]

# Changes messages already received are applied together, up to this many entries.
_MAX_COALESCED = 5000


@dataclass(frozen=True, slots=True)
class LinkSettings:
    batch_size: int = 1000
    window: int = 4
    heartbeat_interval: float = 1.0
    liveness_timeout: float = 10.0


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

    def failed(self, error: str) -> None:
        self.last_error, self.last_error_at = error, time.time()


# (after, limit) -> (entries for the peer, the position read through: entries left out
# because the peer wrote them still move it, so they are never scanned again)
ReadLog = Callable[[int, int], Awaitable[tuple[list[LogRecord], int]]]
Apply = Callable[
    [Sequence[Change], Sequence[Skip]], Awaitable[tuple[ApplyResult, dict[Origin, int]]]
]
WaitLog = Callable[[int], Awaitable[None]]


class Snapshots(Protocol):
    """What a link needs from the node for full resyncs (see `replicator.snapshot`)."""

    def log_floor(self) -> Mapping[Origin, int]:
        """Per origin, the sequence at or below which this node's log holds nothing."""

    async def send(
        self,
        connection: PeerConnection,
        peer: str,
        reason: str,
        repair: Mapping[str, bytes],
    ) -> tuple[int, dict[Origin, int]]:
        """Stream a snapshot (only the differing buckets of ``repair``'s tables, if any);
        returns the log position and vector it corresponds to."""

    async def begin(self, peer: str, message: SnapshotBegin) -> None: ...

    async def chunk(self, peer: str, message: SnapshotChunk) -> None: ...

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
    ) -> None:
        self.connection = connection
        self.peer = hello.node_id
        self.status = status
        self.node_id = node_id
        self.settings = settings
        self._read_log = read_log
        self._apply = apply
        self._wait_for_log = wait_for_log
        self._vector = vector
        self._cluster = cluster
        self._snapshots = snapshots
        self._outgoing = outgoing  # filters and transformations; None: all as is
        self._snapshot_reason: str | None = None
        self._repairs: list[tuple[str, Mapping[str, bytes]]] = []
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
        self._in_flight: deque[tuple[int, int, float]] = deque()
        self._window_open = trio.Event()
        self._window_open.set()
        self._rewind = False
        self._sequence = 0

    async def run(self) -> None:
        """Until the connection ends; raises `PeerDisconnected` with the reason."""
        self.status.state = "connected"
        self.status.last_contact = time.time()
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
        """How long the oldest unacknowledged batch has been waiting for its ack."""
        if not self._in_flight:
            return 0.0
        return time.monotonic() - self._in_flight[0][2]

    # -- sending ---------------------------------------------------------------------------

    async def ask_repair(self, reason: str, buckets: Mapping[str, bytes]) -> None:
        """Ask the peer for the rows of the buckets whose checksums differ from ``buckets``."""
        await self.connection.send(SnapshotRequest(tuple(buckets), reason, dict(buckets)))

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
                continue
            if self._repairs:
                # Requests queued while a repair was sent: the newest buckets of each table
                # say all there is to mend, so they go out as one.
                reason = self._repairs[-1][0]
                buckets: dict[str, bytes] = {}
                for _, asked in self._repairs:
                    buckets.update(asked)
                self._repairs.clear()
                await self._snapshots.send(self.connection, self.peer, reason, buckets)
            records, read_through = await self._read_log(position, self.settings.batch_size)
            if not records:
                if read_through > position:
                    position = self.status.sent_position = read_through
                    if not self._in_flight:  # nothing of it was for the peer
                        self.status.acked_position = max(self.status.acked_position, position)
                await self._wait_for_log(position)
                continue
            position = records[-1].position
            changes, skips = self._lacking(records)
            if changes or skips:
                await self._send_batch(changes, skips, position)
            position = max(position, read_through)
            self.status.sent_position = position

    def _lacking(self, records: list[LogRecord]) -> tuple[list[Change], list[Skip]]:
        """Entries the peer does not hold yet (the reader already left out its own writes)."""
        have = self._have
        changes: list[Change] = []
        skips: list[Skip] = []
        outgoing = self._outgoing
        for record in records:
            entry = record.entry
            origin = entry.origin
            if isinstance(entry, Change):
                if entry.seq > have.get(origin, 0):
                    shared = entry if outgoing is None else outgoing(entry)
                    if shared is not None:
                        changes.append(shared)
                    elif (
                        skips and skips[-1].origin == origin and skips[-1].last_seq + 1 == entry.seq
                    ):
                        skips[-1] = Skip(origin, skips[-1].first_seq, entry.seq)
                    else:  # withheld by a filter: a marker keeps the sequence whole
                        skips.append(Skip(origin, entry.seq, entry.seq))
                    have[origin] = entry.seq
            elif entry.last_seq > have.get(origin, 0):
                skips.append(entry)
                have[origin] = entry.last_seq
        return changes, skips

    async def _send_batch(self, changes: list[Change], skips: list[Skip], position: int) -> None:
        while len(self._in_flight) >= self.settings.window:
            self._window_open = trio.Event()
            await self._window_open.wait()
        self._sequence += 1
        batch = Changes(
            node_id=self.node_id,
            sequence=self._sequence,
            timestamp=hlc.pack(hlc.wall_clock_ms()),
            changes=tuple(changes),
            skips=tuple(skips),
        )
        try:
            await self.connection.send(batch)
        except MessageTooLarge:
            # Rows too large for one frame together: send them in halves.
            middle = max(1, len(changes) // 2)
            if len(changes) <= 1:
                raise
            self._sequence -= 1
            await self._send_batch(changes[:middle], [], position)
            await self._send_batch(changes[middle:], skips, position)
            return
        self._in_flight.append((self._sequence, position, time.monotonic()))
        self.status.changes_sent += len(changes)

    async def _heartbeat_loop(self) -> None:
        while True:
            now, vector = hlc.wall_clock_ms(), self._vector()
            at, checksums = self._snapshots.local_checksums()
            known = self._cluster.snapshot(vector, now)
            heartbeat = Heartbeat(now, vector, checksums, known, at)
            await self.connection.send(heartbeat)
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
            self.status.last_contact = time.time()
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
            self.status.skew_ms = message.wall_time_ms - hlc.wall_clock_ms()
            _merge(self.status.peer_vector, message.version_vector)
            _merge(self._have, message.version_vector)  # it may hold more, from other peers
            self._cluster.merge(message.known)
            if message.table_checksums:
                await self._snapshots.peer_checksums(
                    self.peer, message.checksum_vector, message.table_checksums
                )
        elif isinstance(message, SnapshotRequest):
            self._log.info("peer asked for a snapshot", reason=message.reason,
                           tables=list(message.tables), repair=bool(message.buckets))  # fmt: skip
            if message.buckets:
                self._repairs.append((f"repair asked by {self.peer}: {message.reason}",
                                      message.buckets))  # fmt: skip
            else:
                self.request_snapshot(f"requested by {self.peer}: {message.reason}")
        elif isinstance(message, SnapshotBegin):
            await self._snapshots.begin(self.peer, message)
        elif isinstance(message, SnapshotChunk):
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
        # Batches that arrived together are applied in one transaction and acknowledged by
        # one Ack: under load the fixed cost of a commit is paid once, not per batch.
        changes, skips, sequence = list(batch.changes), list(batch.skips), batch.sequence
        while len(changes) + len(skips) < _MAX_COALESCED and (
            more := self.connection.take_ready(lambda m: isinstance(m, Changes))
        ):
            assert isinstance(more, Changes)
            changes += more.changes
            skips += more.skips
            sequence = more.sequence
        result, vector = await self._apply(changes, skips)
        self.status.changes_received += result.accepted
        await self.connection.send(Ack(vector, sequence))
        if result.gaps or result.clock_refused:
            await self.connection.send(Resend(vector))

    def _on_ack(self, ack: Ack) -> None:
        _merge(self.status.peer_vector, ack.version_vector)
        _merge(self._have, ack.version_vector)
        while self._in_flight and self._in_flight[0][0] <= ack.through_sequence:
            _, position, _ = self._in_flight.popleft()
            self.status.acked_position = max(self.status.acked_position, position)
        if not self._in_flight:  # what was read past the last batch was none of the peer's
            self.status.acked_position = max(self.status.acked_position, self.status.sent_position)
        if len(self._in_flight) < self.settings.window:
            self._window_open.set()


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


def _merge(into: dict[Origin, int], vector: dict[Origin, int] | object) -> None:
    if isinstance(vector, dict):
        for origin, seq in vector.items():
            if seq > into.get(origin, 0):
                into[origin] = seq
