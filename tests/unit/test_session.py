"""The session state machine: two endpoints over an in-memory link, honest and hostile.

Rules for this module: each test builds its own pair (sessions are single-use); a hostile peer
is simulated by altering the bytes an honest session produced, or, for frames no honest session
would produce, by sealing with that session's own stream cipher.
"""

from __future__ import annotations

import pytest

from protocol import (
    ConnectionClosed,
    Goodbye,
    Heartbeat,
    LocalProtocolError,
    MessageTooLarge,
    ProtocolError,
    RemoteProtocolError,
    Session,
    SessionSettings,
    State,
)
from protocol.codec import Codec
from protocol.crypto import STREAM_OVERHEAD, TAG_FINAL, TAG_MESSAGE, TAG_PUSH
from protocol.framing import frame_header
from protocol.messages import Message, encode_message
from tests.support.messages_sample import VECTOR, every_message
from tests.support.pairs import CLUSTER, feed_then_close, open_pair, random_keyring


def heartbeat(n: int = 0) -> Heartbeat:
    return Heartbeat(1_700_000_000_000 + n, VECTOR, {})


def sealed_by(session: Session, message: Message, tag: int) -> bytes:
    """A frame sealed with ``session``'s own cipher but a tag an honest sender would not use."""
    plaintext = encode_message(Codec(), message)
    header = frame_header(len(plaintext) + STREAM_OVERHEAD)
    sender = session._sender  # a peer misusing its own stream cipher
    assert sender is not None
    return header + sender.seal(plaintext, header, tag)


@pytest.mark.parametrize("direction", ["initiator to responder", "responder to initiator"])
def test_every_message_type_crosses_the_link_intact(direction: str) -> None:
    initiator, responder = open_pair()
    sender, receiver = (
        (initiator, responder) if direction.startswith("initiator") else (responder, initiator)
    )
    messages = every_message()
    received = []
    for message in messages:
        received += receiver.receive_data(sender.send(message))
    assert received == messages
    assert receiver.state is State.RECEIVED_GOODBYE  # Goodbye is the last sample


def test_first_data_can_follow_the_last_handshake_message_in_one_write() -> None:
    keyring = random_keyring()
    initiator = Session.initiator(keyring, CLUSTER)
    responder = Session.responder(keyring, CLUSTER)
    responder.receive_data(initiator.data_to_send())
    initiator.receive_data(responder.data_to_send())
    events = responder.receive_data(initiator.data_to_send() + initiator.send(heartbeat()))
    assert [type(event).__name__ for event in events] == ["HandshakeComplete", "Heartbeat"]


def test_stream_fed_one_byte_at_a_time_decodes_the_same() -> None:
    keyring = random_keyring()
    initiator = Session.initiator(keyring, CLUSTER)
    responder = Session.responder(keyring, CLUSTER)
    stream = initiator.data_to_send()
    for byte in stream:
        responder.receive_data(bytes([byte]))
    initiator.receive_data(responder.data_to_send())
    stream = initiator.data_to_send() + b"".join(initiator.send(m) for m in every_message())
    events = []
    for byte in stream:
        events += responder.receive_data(bytes([byte]))
    assert events[1:] == every_message()


def test_orderly_close_ends_with_connection_closed() -> None:
    initiator, responder = open_pair()
    responder.receive_data(initiator.send(Goodbye("restart")))
    assert initiator.state is State.SENT_GOODBYE
    # The initiator keeps reading after its goodbye: late messages from the peer still count.
    assert initiator.receive_data(responder.send(heartbeat())) == [heartbeat()]
    assert initiator.receive_data(responder.send(Goodbye("ok"))) == [Goodbye("ok")]
    assert initiator.state is State.CLOSED
    assert initiator.receive_data(b"") == [ConnectionClosed()]
    assert responder.receive_data(b"") == [ConnectionClosed()]


def test_end_of_stream_without_goodbye_is_truncation() -> None:
    initiator, responder = open_pair()
    responder.receive_data(initiator.send(heartbeat()))
    with pytest.raises(RemoteProtocolError, match="end of stream"):
        responder.receive_data(b"")
    assert responder.state is State.ERROR


def test_end_of_stream_during_the_handshake_is_an_error() -> None:
    initiator = Session.initiator(random_keyring(), CLUSTER)
    with pytest.raises(RemoteProtocolError, match="end of stream"):
        initiator.receive_data(b"")


def test_nothing_may_be_sent_before_the_handshake() -> None:
    initiator = Session.initiator(random_keyring(), CLUSTER)
    with pytest.raises(LocalProtocolError, match="cannot send a message"):
        initiator.send(heartbeat())


def test_nothing_may_be_sent_after_goodbye() -> None:
    initiator, _ = open_pair()
    initiator.send(Goodbye("bye"))
    with pytest.raises(LocalProtocolError):
        initiator.send(heartbeat())


def test_errors_are_sticky() -> None:
    initiator, responder = open_pair()
    frame = bytearray(initiator.send(heartbeat()))
    frame[-1] ^= 1
    with pytest.raises(RemoteProtocolError):
        responder.receive_data(bytes(frame))
    good = initiator.send(heartbeat(1))
    with pytest.raises(ProtocolError, match="already failed"):
        responder.receive_data(good)
    with pytest.raises(ProtocolError, match="already failed"):
        responder.send(heartbeat())


def test_a_message_that_cannot_be_encoded_fails_the_session_for_good() -> None:
    initiator, _ = open_pair()
    with pytest.raises(LocalProtocolError):
        initiator.send(Heartbeat(1, {}, {"table": object()}))  # type: ignore[dict-item]
    assert initiator.state is State.ERROR
    with pytest.raises(ProtocolError, match="already failed"):
        initiator.send(heartbeat())
    assert initiator.data_to_send() == b""


def test_every_flipped_bit_of_a_data_frame_is_refused() -> None:
    keyring = random_keyring()
    frame_bits = 8 * len(open_pair(keyring)[0].send(heartbeat()))
    for bit in range(frame_bits):
        initiator, responder = open_pair(keyring)
        frame = bytearray(initiator.send(heartbeat()))
        frame[bit // 8] ^= 1 << (bit % 8)
        # A lengthened prefix waits for bytes that never come: end of stream exposes it.
        with pytest.raises(RemoteProtocolError):
            feed_then_close(responder, bytes(frame))


def test_duplicated_frame_is_refused() -> None:
    initiator, responder = open_pair()
    frame = initiator.send(heartbeat())
    responder.receive_data(frame)
    with pytest.raises(RemoteProtocolError, match="failed authentication"):
        responder.receive_data(frame)


def test_reordered_frames_are_refused() -> None:
    initiator, responder = open_pair()
    first, second = initiator.send(heartbeat(1)), initiator.send(heartbeat(2))
    with pytest.raises(RemoteProtocolError, match="failed authentication"):
        responder.receive_data(second + first)


def test_dropped_frame_is_detected_at_the_next_one() -> None:
    initiator, responder = open_pair()
    initiator.send(heartbeat(1))  # lost on the way
    with pytest.raises(RemoteProtocolError, match="failed authentication"):
        responder.receive_data(initiator.send(heartbeat(2)))


def test_frame_cut_short_by_end_of_stream_is_refused() -> None:
    initiator, responder = open_pair()
    frame = initiator.send(heartbeat())
    responder.receive_data(frame[:-5])
    with pytest.raises(RemoteProtocolError, match="stream ended"):
        responder.receive_data(b"")


def test_frames_from_another_session_are_refused() -> None:
    keyring = random_keyring()
    initiator, _ = open_pair(keyring)
    _, other_responder = open_pair(keyring)
    with pytest.raises(RemoteProtocolError, match="failed authentication"):
        other_responder.receive_data(initiator.send(heartbeat()))


@pytest.mark.parametrize("length", [0, 1, STREAM_OVERHEAD, STREAM_OVERHEAD + 5])
def test_data_frame_too_small_to_hold_a_message_is_refused(length: int) -> None:
    _, responder = open_pair()
    with pytest.raises(RemoteProtocolError, match="below the minimum"):
        responder.receive_data(frame_header(length) + bytes(length))


@pytest.mark.parametrize("length", [(1 << 16) + 1, 0xFFFFFFFF])
def test_data_frame_over_the_cap_is_refused_from_its_header(length: int) -> None:
    _, responder = open_pair(settings=SessionSettings(max_frame_size=1 << 16))
    with pytest.raises(RemoteProtocolError, match="exceeds the cap"):
        responder.receive_data(frame_header(length))


def test_handshake_frames_are_held_to_their_exact_size() -> None:
    responder = Session.responder(random_keyring(), CLUSTER)
    with pytest.raises(RemoteProtocolError, match="exceeds the cap of 41"):
        responder.receive_data(frame_header(16 << 20))


def test_goodbye_without_the_final_tag_is_refused() -> None:
    initiator, responder = open_pair()
    with pytest.raises(RemoteProtocolError, match="final frame"):
        responder.receive_data(sealed_by(initiator, Goodbye("x"), TAG_MESSAGE))


def test_final_tag_on_an_ordinary_message_is_refused() -> None:
    initiator, responder = open_pair()
    with pytest.raises(RemoteProtocolError, match="final frame"):
        responder.receive_data(sealed_by(initiator, heartbeat(), TAG_FINAL))


def test_unexpected_stream_tag_is_refused() -> None:
    initiator, responder = open_pair()
    with pytest.raises(RemoteProtocolError, match="stream tag"):
        responder.receive_data(sealed_by(initiator, heartbeat(), TAG_PUSH))


def test_data_after_the_peers_goodbye_is_refused() -> None:
    initiator, responder = open_pair()
    responder.receive_data(initiator.send(Goodbye("bye")))
    with pytest.raises(RemoteProtocolError):
        responder.receive_data(sealed_by(initiator, heartbeat(), TAG_MESSAGE))


def test_keys_ratchet_after_the_message_count() -> None:
    initiator, responder = open_pair(settings=SessionSettings(rekey_after_messages=10))
    received = []
    for n in range(35):
        received += responder.receive_data(initiator.send(heartbeat(n)))
    assert received == [heartbeat(n) for n in range(35)]
    assert initiator.rekeys_sent == 3
    assert responder.rekeys_received == 3


def test_keys_ratchet_after_their_age() -> None:
    now = [1000.0]
    keyring = random_keyring()
    settings = SessionSettings(rekey_after_seconds=60)
    initiator = Session.initiator(keyring, CLUSTER, settings, clock=lambda: now[0])
    responder = Session.responder(keyring, CLUSTER, settings, clock=lambda: now[0])
    responder.receive_data(initiator.data_to_send())
    initiator.receive_data(responder.data_to_send())
    responder.receive_data(initiator.data_to_send())
    responder.receive_data(initiator.send(heartbeat(1)))
    assert initiator.rekeys_sent == 0
    now[0] += 61
    assert responder.receive_data(initiator.send(heartbeat(2))) == [heartbeat(2)]
    assert initiator.rekeys_sent == 1
    assert responder.rekeys_received == 1
    assert responder.receive_data(initiator.send(heartbeat(3))) == [heartbeat(3)]
    assert initiator.rekeys_sent == 1


def test_frame_sealed_before_a_rekey_cannot_be_replayed_after_it() -> None:
    initiator, responder = open_pair(settings=SessionSettings(rekey_after_messages=2))
    first = initiator.send(heartbeat(1))
    responder.receive_data(first)
    responder.receive_data(initiator.send(heartbeat(2)))  # carries the rekey tag
    with pytest.raises(RemoteProtocolError, match="failed authentication"):
        responder.receive_data(first)


def test_message_too_large_for_a_frame_leaves_the_session_usable() -> None:
    initiator, responder = open_pair(settings=SessionSettings(max_frame_size=4096))
    with pytest.raises(MessageTooLarge):
        initiator.send(Heartbeat(1, {}, _tables(500)))
    assert initiator.is_open
    assert responder.receive_data(initiator.send(heartbeat())) == [heartbeat()]


def _tables(count: int) -> dict[str, bytes]:
    return {f"table_{n}": bytes([n % 256]) * 32 for n in range(count)}


def test_compression_can_be_turned_off() -> None:
    settings = SessionSettings(compress=False)
    big = Heartbeat(1, VECTOR, _tables(200))
    plain_i, plain_r = open_pair(settings=settings)
    packed_i, packed_r = open_pair()
    plain, packed = plain_i.send(big), packed_i.send(big)
    assert len(packed) < len(plain)
    assert plain_r.receive_data(plain) == [big]
    assert packed_r.receive_data(packed) == [big]
