"""One connection's state machine: bytes in, events out; messages in, bytes out.

    session = Session.initiator(keyring, "lab")   # or Session.responder(...)
    sock.send(session.data_to_send())            # handshake bytes the session wants sent
    for event in session.receive_data(sock.recv(65536)):   # b"" means the peer closed
        ...                                      # HandshakeComplete, a Message, ConnectionClosed
    sock.send(session.send(Heartbeat(...)))

Every transition is in `_TRANSITIONS`; an input a state has no row for is a protocol error. Any
exception moves the session to `State.ERROR` for good (the one exception is `MessageTooLarge`,
raised before anything changed so the caller can cut the batch smaller): a broken or hostile
peer never half-works, and the I/O layer just closes the socket. Nothing is ever sent to the
peer about why.

Budgets: until the peer's first message arrives (its Hello), frames are capped at
``max_hello_size``, so an unknown peer cannot make us buffer a large frame; after it, at
``max_frame_size``. A message's decoded size is capped so that it always fits one frame even
uncompressed (``max_message_size``), and its decoded elements at ``max_elements``.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass

from protocol import codec as codec_module
from protocol.crypto import (
    HANDSHAKE_MESSAGE_SIZES,
    STREAM_OVERHEAD,
    TAG_FINAL,
    TAG_MESSAGE,
    TAG_REKEY,
    InitiatorHandshake,
    Keyring,
    ResponderHandshake,
    StreamReceiver,
    StreamSender,
)
from protocol.errors import (
    LocalProtocolError,
    MessageTooLarge,
    RemoteProtocolError,
)
from protocol.framing import FrameDecoder, frame_header
from protocol.messages import Goodbye, Message, decode_message, encode_message

__all__ = [
    "ConnectionClosed",
    "Event",
    "HandshakeComplete",
    "MessageTooLarge",
    "Session",
    "SessionSettings",
    "State",
]


class State(enum.Enum):
    AWAIT_MESSAGE1 = "awaiting handshake message 1"
    AWAIT_MESSAGE2 = "awaiting handshake message 2"
    AWAIT_MESSAGE3 = "awaiting handshake message 3"
    OPEN = "open"
    SENT_GOODBYE = "sent goodbye"
    RECEIVED_GOODBYE = "received goodbye"
    CLOSED = "closed"
    ERROR = "error"


class _Input(enum.Enum):
    RECEIVE_HANDSHAKE = "handshake message"
    RECEIVE_MESSAGE = "message"
    RECEIVE_GOODBYE = "goodbye"
    RECEIVE_EOF = "end of stream"
    SEND_MESSAGE = "send a message"
    SEND_GOODBYE = "send goodbye"


_S, _I = State, _Input
_TRANSITIONS: dict[tuple[State, _Input], State] = {
    (_S.AWAIT_MESSAGE1, _I.RECEIVE_HANDSHAKE): _S.AWAIT_MESSAGE3,  # responder
    (_S.AWAIT_MESSAGE2, _I.RECEIVE_HANDSHAKE): _S.OPEN,  # initiator
    (_S.AWAIT_MESSAGE3, _I.RECEIVE_HANDSHAKE): _S.OPEN,  # responder
    (_S.OPEN, _I.RECEIVE_MESSAGE): _S.OPEN,
    (_S.OPEN, _I.SEND_MESSAGE): _S.OPEN,
    (_S.OPEN, _I.RECEIVE_GOODBYE): _S.RECEIVED_GOODBYE,
    (_S.OPEN, _I.SEND_GOODBYE): _S.SENT_GOODBYE,
    # After saying goodbye we still read until the peer says it too (its last acks matter).
    (_S.SENT_GOODBYE, _I.RECEIVE_MESSAGE): _S.SENT_GOODBYE,
    (_S.SENT_GOODBYE, _I.RECEIVE_GOODBYE): _S.CLOSED,
    (_S.RECEIVED_GOODBYE, _I.SEND_MESSAGE): _S.RECEIVED_GOODBYE,
    (_S.RECEIVED_GOODBYE, _I.SEND_GOODBYE): _S.CLOSED,
    (_S.RECEIVED_GOODBYE, _I.RECEIVE_EOF): _S.CLOSED,
    (_S.CLOSED, _I.RECEIVE_EOF): _S.CLOSED,
}
_HANDSHAKE_STATES = {_S.AWAIT_MESSAGE1: 0, _S.AWAIT_MESSAGE2: 1, _S.AWAIT_MESSAGE3: 2}


@dataclass(frozen=True, slots=True)
class HandshakeComplete:
    """The peer proved it holds a key of our keyring; ``key_id`` says which one."""

    key_id: bytes


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer ended the stream cleanly, after both sides said goodbye."""


Event = HandshakeComplete | ConnectionClosed | Message


@dataclass(frozen=True, slots=True)
class SessionSettings:
    max_frame_size: int = 16 << 20
    max_hello_size: int = 1 << 20
    compress: bool = True
    compress_threshold: int = 512
    rekey_after_messages: int = 1 << 16
    rekey_after_seconds: float = 900.0
    max_elements: int = codec_module.DEFAULT_MAX_ELEMENTS

    def __post_init__(self) -> None:
        if self.max_frame_size <= STREAM_OVERHEAD + codec_module.HEADER_SIZE:
            raise ValueError(f"max_frame_size {self.max_frame_size} is too small")
        if not self.max_hello_size > STREAM_OVERHEAD + codec_module.HEADER_SIZE:
            raise ValueError(f"max_hello_size {self.max_hello_size} is too small")
        if self.rekey_after_messages < 1 or self.rekey_after_seconds <= 0:
            raise ValueError("rekey limits must be positive")

    @property
    def max_message_size(self) -> int:
        """The largest message body (before compression): one that fits a frame uncompressed,
        so a message the codec accepts is never too large to send."""
        return self.max_frame_size - STREAM_OVERHEAD - codec_module.HEADER_SIZE


class Session:
    __slots__ = (
        "_clock",
        "_codec",
        "_first_message",
        "_frames",
        "_handshake",
        "_key_id",
        "_last_rekey",
        "_outbox",
        "_receiver",
        "_sender",
        "_sent_since_rekey",
        "_settings",
        "_state",
        "rekeys_received",
        "rekeys_sent",
    )

    def __init__(
        self,
        handshake: InitiatorHandshake | ResponderHandshake,
        state: State,
        settings: SessionSettings,
        clock: Callable[[], float],
    ) -> None:
        self._handshake: InitiatorHandshake | ResponderHandshake | None = handshake
        self._state = state
        self._settings = settings
        self._clock = clock
        self._codec = codec_module.Codec(
            settings.max_message_size,
            settings.compress,
            settings.compress_threshold,
            settings.max_elements,
        )
        self._first_message = True
        size = HANDSHAKE_MESSAGE_SIZES[_HANDSHAKE_STATES[state]]
        self._frames = FrameDecoder(max_frame_size=size, min_frame_size=size)
        self._outbox = bytearray()
        self._sender: StreamSender | None = None
        self._receiver: StreamReceiver | None = None
        self._key_id = b""
        self._sent_since_rekey = 0
        self._last_rekey = 0.0
        self.rekeys_sent = 0
        self.rekeys_received = 0

    @classmethod
    def initiator(
        cls,
        keyring: Keyring,
        cluster_id: str,
        settings: SessionSettings | None = None,
        *,
        use_previous_key: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> Session:
        """The dialling side; its first handshake message is waiting in `data_to_send`."""
        handshake = InitiatorHandshake(keyring, cluster_id, use_previous=use_previous_key)
        session = cls(handshake, State.AWAIT_MESSAGE2, settings or SessionSettings(), clock)
        session._outbox += _frame(handshake.message1())
        return session

    @classmethod
    def responder(
        cls,
        keyring: Keyring,
        cluster_id: str,
        settings: SessionSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> Session:
        handshake = ResponderHandshake(keyring, cluster_id)
        return cls(handshake, State.AWAIT_MESSAGE1, settings or SessionSettings(), clock)

    @property
    def state(self) -> State:
        return self._state

    @property
    def is_open(self) -> bool:
        """True while messages may be sent."""
        return self._state is State.OPEN

    def incomplete_frame(self) -> tuple[int, int]:
        """(size of the frame being received, 0 if not known yet; bytes of it buffered), so
        the I/O layer can tell when a read completes a large frame worth decoding elsewhere."""
        return self._frames.pending_frame_size, self._frames.buffered

    def data_to_send(self) -> bytes:
        """Bytes the protocol itself wants written (handshake replies); empties the outbox."""
        data = bytes(self._outbox)
        self._outbox.clear()
        return data

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the peer (``b""`` at end of stream) and get what they completed."""
        self._refuse_if_failed()
        events: list[Event] = []
        try:
            self._frames.feed(data)
            while (frame := self._frames.next_frame()) is not None:
                event = self._on_frame(frame)
                if event is not None:
                    events.append(event)
            if self._frames.at_eof:
                self._advance(_Input.RECEIVE_EOF, remote=True)
                events.append(ConnectionClosed())
        except BaseException:
            self._fail()
            raise
        return events

    def send(self, message: Message) -> bytes:
        """Seal one message into a frame; ``Goodbye`` ends this direction of the stream.

        `MessageTooLarge` leaves the session as it was; any other error fails it."""
        self._refuse_if_failed()
        try:
            return self._send(message)
        except MessageTooLarge:
            raise
        except BaseException:
            self._fail()
            raise

    def _send(self, message: Message) -> bytes:
        goodbye = isinstance(message, Goodbye)
        action = _Input.SEND_GOODBYE if goodbye else _Input.SEND_MESSAGE
        if (self._state, action) not in _TRANSITIONS:
            raise LocalProtocolError(f"cannot {action.value} while {self._state.value}")
        plaintext = encode_message(self._codec, message)
        length = len(plaintext) + STREAM_OVERHEAD
        if length > self._settings.max_frame_size:  # only a codec with other limits gets here
            raise MessageTooLarge(
                f"{type(message).__name__} of {length} bytes exceeds the "
                f"{self._settings.max_frame_size}-byte frame cap"
            )
        assert self._sender is not None
        header = frame_header(length)
        sealed = self._sender.seal(plaintext, header, self._next_tag(goodbye))
        self._advance(action, remote=False)
        return header + sealed

    # -----------------------------------------------------------------------------------------

    def _on_frame(self, frame: bytes) -> Event | None:
        if self._state in _HANDSHAKE_STATES:
            return self._on_handshake_frame(frame)
        if self._receiver is None:  # no state after the handshake reads frames without keys
            raise RemoteProtocolError(f"unexpected frame while {self._state.value}")
        plaintext, tag = self._receiver.open(frame, frame_header(len(frame)))
        if tag == TAG_REKEY:
            self.rekeys_received += 1
        elif tag not in (TAG_MESSAGE, TAG_FINAL):
            raise RemoteProtocolError(f"unexpected stream tag {tag}")
        message = decode_message(self._codec, plaintext)
        if isinstance(message, Goodbye) != (tag == TAG_FINAL):
            raise RemoteProtocolError("goodbye must be, and only it may be, the final frame")
        goodbye = isinstance(message, Goodbye)
        self._advance(_Input.RECEIVE_GOODBYE if goodbye else _Input.RECEIVE_MESSAGE, remote=True)
        if self._first_message:  # the peer has introduced itself: full-size frames from now
            self._first_message = False
            self._expect_frames(
                STREAM_OVERHEAD + codec_module.HEADER_SIZE, self._settings.max_frame_size
            )
        return message

    def _on_handshake_frame(self, frame: bytes) -> Event | None:
        handshake = self._handshake
        self._advance(_Input.RECEIVE_HANDSHAKE, remote=True)
        if isinstance(handshake, InitiatorHandshake):
            self._outbox += _frame(handshake.read_message2(frame))
        elif isinstance(handshake, ResponderHandshake) and handshake.sender is None:
            self._outbox += _frame(handshake.read_message1(frame))
            self._expect_frames(HANDSHAKE_MESSAGE_SIZES[2], HANDSHAKE_MESSAGE_SIZES[2])
            return None
        elif isinstance(handshake, ResponderHandshake):
            handshake.read_message3(frame)
        assert handshake is not None
        assert handshake.sender is not None
        assert handshake.receiver is not None
        self._sender, self._receiver = handshake.sender, handshake.receiver
        self._key_id = handshake.key_id
        self._handshake = None
        self._last_rekey = self._clock()
        self._expect_frames(
            STREAM_OVERHEAD + codec_module.HEADER_SIZE,
            min(self._settings.max_hello_size, self._settings.max_frame_size),
        )
        return HandshakeComplete(self._key_id)

    def _expect_frames(self, smallest: int, largest: int) -> None:
        self._frames.set_bounds(smallest, largest)

    def _next_tag(self, goodbye: bool) -> int:
        if goodbye:
            return TAG_FINAL
        self._sent_since_rekey += 1
        due = (
            self._sent_since_rekey >= self._settings.rekey_after_messages
            or self._clock() - self._last_rekey >= self._settings.rekey_after_seconds
        )
        if not due:
            return TAG_MESSAGE
        self._sent_since_rekey = 0
        self._last_rekey = self._clock()
        self.rekeys_sent += 1
        return TAG_REKEY

    def _advance(self, action: _Input, *, remote: bool) -> None:
        following = _TRANSITIONS.get((self._state, action))
        if following is None:
            error = RemoteProtocolError if remote else LocalProtocolError
            raise error(f"unexpected {action.value} while {self._state.value}")
        self._state = following

    def _refuse_if_failed(self) -> None:
        if self._state is State.ERROR:
            raise LocalProtocolError("the session already failed; close the connection")

    def _fail(self) -> None:
        self._state = State.ERROR
        self._handshake = None
        self._sender = None
        self._receiver = None
        self._outbox.clear()


def _frame(payload: bytes) -> bytes:
    return frame_header(len(payload)) + payload
