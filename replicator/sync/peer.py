"""One peer connection: the trio shell around a `protocol.Session`.

The session is a pure state machine; this module owns the socket. A connection is usable only
once the handshake finished inside its deadline, so a peer that is slow, silent or hostile during
the handshake costs one task for at most ``handshake_timeout`` and never blocks anyone else.
Every trio stream error and every protocol error becomes `PeerDisconnected`, logged by the
caller with the peer's node id; nothing about the reason is ever sent to the peer.

Reading is done by one task at a time (`receive`); sends are serialised by a lock, so a
heartbeat and a batch never interleave their bytes. A read that completes a large frame is
decrypted and decoded in a worker thread, so a peer's 16 MiB batch never stalls the event loop
(and every other peer's heartbeats) while it is parsed; a second lock keeps the session to one
thread at a time, and is never held across network I/O.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from protocol import (
    ConnectionClosed,
    Goodbye,
    HandshakeComplete,
    Keyring,
    Message,
    MessageTooLarge,
    ProtocolError,
    Session,
    SessionSettings,
)
from replicator.errors import ReplicationError

__all__ = ["PeerClosed", "PeerConnection", "PeerDisconnected", "PeerSettings"]

_READ_SIZE = 1 << 16
# Frames at least this large are decoded (and messages this large encoded) in a worker thread.
OFF_LOOP_BYTES = 1 << 18


class PeerDisconnected(ReplicationError):
    """The connection is over: closed, broken, timed out, or refused at the protocol level."""


class PeerClosed(PeerDisconnected):
    """The peer ended the connection in order (end of stream, or a goodbye)."""


@dataclass(frozen=True, slots=True)
class PeerSettings:
    cluster_id: str
    keyring: Keyring
    session: SessionSettings = field(default_factory=SessionSettings)
    handshake_timeout: float = 5.0


class _LoopClock:
    """The session's clock, read on the event loop: a session working in a worker thread
    sees the time of the call that sent it there (trio's clock works on the loop only)."""

    def __init__(self, source: Callable[[], float]) -> None:
        self._source = source
        self.now = source()

    def tick(self) -> None:
        self.now = self._source()

    def read(self) -> float:
        return self.now


class PeerConnection:
    def __init__(
        self,
        stream: trio.abc.Stream,
        session: Session,
        label: str,
        clock: _LoopClock | None = None,
    ) -> None:
        self.stream = stream
        self.session = session
        self._clock = clock
        self.label = label
        self.key_id = b""
        self.bytes_sent = 0
        self.bytes_received = 0
        self._events: deque[Message] = deque()
        self._send_lock = trio.Lock()
        self._session_lock = trio.Lock()
        self._closed = False
        self._peer_closed = False

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    async def dial(
        cls,
        host: str,
        port: int,
        settings: PeerSettings,
        *,
        use_previous_key: bool = False,
        clock: Callable[[], float] = trio.current_time,
        connect: Callable[[str, int], Awaitable[trio.abc.Stream]] = trio.open_tcp_stream,
    ) -> PeerConnection:
        """Connect (through ``connect``: TCP unless a test says otherwise) and complete the
        handshake as initiator, within the handshake deadline."""
        label = f"{host}:{port}"
        try:
            with trio.fail_after(settings.handshake_timeout):
                stream = await connect(host, port)
        except (OSError, trio.TooSlowError) as error:
            raise PeerDisconnected(f"cannot connect: {_describe(error)}", op="dial") from None
        loop_clock = _LoopClock(clock)
        session = Session.initiator(
            settings.keyring,
            settings.cluster_id,
            settings.session,
            use_previous_key=use_previous_key,
            clock=loop_clock.read,
        )
        connection = cls(stream, session, label, loop_clock)
        await connection._handshake_within(settings.handshake_timeout)
        return connection

    @classmethod
    async def accept(
        cls,
        stream: trio.abc.Stream,
        settings: PeerSettings,
        label: str,
        *,
        clock: Callable[[], float] = trio.current_time,
    ) -> PeerConnection:
        """Complete the handshake as responder on an accepted stream."""
        connection = cls.responder(stream, settings, label, clock=clock)
        await connection.handshake(settings.handshake_timeout)
        return connection

    @classmethod
    def responder(
        cls,
        stream: trio.abc.Stream,
        settings: PeerSettings,
        label: str,
        *,
        clock: Callable[[], float] = trio.current_time,
    ) -> PeerConnection:
        """The responder's side of an accepted stream, before its handshake (`handshake`):
        the caller can watch it (``bytes_received``) while it runs."""
        loop_clock = _LoopClock(clock)
        session = Session.responder(
            settings.keyring, settings.cluster_id, settings.session, clock=loop_clock.read
        )
        return cls(stream, session, label, loop_clock)

    async def handshake(self, seconds: float) -> None:
        """Complete the handshake within ``seconds``, or raise `PeerDisconnected`."""
        await self._handshake_within(seconds)

    async def _handshake_within(self, seconds: float) -> None:
        try:
            with trio.fail_after(seconds):
                await self._flush_protocol_output()
                while not self.session.is_open:
                    for event in await self._read_events():
                        if isinstance(event, HandshakeComplete):
                            self.key_id = event.key_id
                        elif isinstance(event, Message):  # data right behind the handshake
                            self._events.append(event)
                    await self._flush_protocol_output()
        except trio.TooSlowError:
            await self.abort()
            raise PeerDisconnected(
                f"handshake not completed within {seconds:g}s", op="handshake", peer=self.label
            ) from None
        except PeerDisconnected:
            await self.abort()
            raise

    # -- traffic ---------------------------------------------------------------------------

    async def send(self, message: Message, *, large: bool = False) -> None:
        """Seal and write one message. ``large``: encode it in a worker thread. Raises
        `MessageTooLarge` (the connection stays usable) for a message over the cap."""
        async with self._send_lock:
            async with self._session_lock:
                self._tick()
                try:
                    if large:
                        data = await trio.to_thread.run_sync(self.session.send, message)
                    else:
                        data = self.session.send(message)
                except MessageTooLarge:
                    raise
                except ProtocolError as error:
                    raise PeerDisconnected(str(error), op="send", peer=self.label) from None
            await self._write(data)

    async def receive(self) -> Message:
        """The next message from the peer; `PeerDisconnected` when the stream ends."""
        while not self._events:
            if self._peer_closed:
                raise PeerClosed("peer closed the connection", op="receive", peer=self.label)
            for event in await self._read_events():
                if isinstance(event, ConnectionClosed):
                    self._peer_closed = True
                elif not isinstance(event, HandshakeComplete):
                    self._events.append(event)
        return self._events.popleft()

    def take_ready(self, wanted: Callable[[Message], bool]) -> Message | None:
        """The next message already received and decoded, if ``wanted`` takes it; no I/O."""
        if self._events and wanted(self._events[0]):
            return self._events.popleft()
        return None

    async def close(self, reason: str = "closing") -> None:
        """Say goodbye (if still possible) and close the stream."""
        if self._closed:
            return
        if self.session.is_open:
            with trio.move_on_after(1), contextlib.suppress(PeerDisconnected):
                await self.send(Goodbye(reason))
        await self.abort()

    async def abort(self) -> None:
        self._closed = True
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self.stream)

    # -- plumbing --------------------------------------------------------------------------

    async def _read_events(self) -> list[Message | HandshakeComplete | ConnectionClosed]:
        try:
            data = await self.stream.receive_some(_READ_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
            raise PeerDisconnected(f"connection lost: {_describe(error)}", op="receive",
                                   peer=self.label) from None  # fmt: skip
        self.bytes_received += len(data)
        async with self._session_lock:
            self._tick()
            size, buffered = self.session.incomplete_frame()
            try:
                if size >= OFF_LOOP_BYTES and buffered + len(data) >= size:
                    return await trio.to_thread.run_sync(self.session.receive_data, bytes(data))
                return self.session.receive_data(bytes(data))
            except ProtocolError as error:
                raise PeerDisconnected(str(error), op="receive", peer=self.label) from None

    def _tick(self) -> None:
        if self._clock is not None:
            self._clock.tick()

    async def _flush_protocol_output(self) -> None:
        data = self.session.data_to_send()
        if data:
            await self._write(data)

    async def _write(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
            raise PeerDisconnected(f"connection lost: {_describe(error)}", op="send",
                                   peer=self.label) from None  # fmt: skip
        self.bytes_sent += len(data)


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__
