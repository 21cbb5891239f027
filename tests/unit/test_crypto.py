"""Keys and the handshake: who gets in, and that everyone else fails closed and silently."""

from __future__ import annotations

import os

import nacl.pwhash
import pytest

from protocol import Keyring, RemoteProtocolError, Session, State, key_id, stretch_passphrase
from protocol.crypto import HANDSHAKE_MESSAGE_SIZES, PROTOCOL_VERSION, derive_salt
from protocol.framing import frame_header
from tests.support.pairs import CLUSTER, pump, random_keyring

FAST = {
    "opslimit": nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE,
    "memlimit": nacl.pwhash.argon2id.MEMLIMIT_INTERACTIVE,
}
# X25519 points of small order (and non-canonical encodings of them): a DH with any of them
# gives a predictable shared secret, so the handshake must refuse them.
LOW_ORDER_POINTS = [
    bytes(32),
    bytes([1]) + bytes(31),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    bytes.fromhex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    bytes.fromhex("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    bytes.fromhex("eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
]


def frame(payload: bytes) -> bytes:
    return frame_header(len(payload)) + payload


def test_stretched_key_is_raw_32_bytes_and_the_same_on_every_node() -> None:
    first = stretch_passphrase("correct horse battery staple", "lab", **FAST)
    second = stretch_passphrase("correct horse battery staple", "lab", **FAST)
    assert first == second
    assert len(first) == 32  # raw bytes, not a 64-character hex string
    assert not all(chr(b) in "0123456789abcdef" for b in first)


def test_stretched_key_depends_on_passphrase_and_cluster() -> None:
    base = stretch_passphrase("correct horse battery staple", "lab", **FAST)
    assert stretch_passphrase("correct horse battery stapler", "lab", **FAST) != base
    assert stretch_passphrase("correct horse battery staple", "prod", **FAST) != base
    assert derive_salt("lab") != derive_salt("prod")


def test_stretching_uses_moderate_argon2id_limits_by_default() -> None:
    defaults = stretch_passphrase.__kwdefaults__
    assert defaults["opslimit"] == nacl.pwhash.argon2id.OPSLIMIT_MODERATE
    assert defaults["memlimit"] == nacl.pwhash.argon2id.MEMLIMIT_MODERATE


@pytest.mark.parametrize("passphrase", ["", "short", "fifteen chars!!"])
def test_short_passphrase_is_refused(passphrase: str) -> None:
    with pytest.raises(ValueError, match="at least 16 characters"):
        stretch_passphrase(passphrase, "lab", **FAST)


def test_key_id_is_short_and_distinct_per_key() -> None:
    first, second = os.urandom(32), os.urandom(32)
    assert len(key_id(first)) == 8
    assert key_id(first) != key_id(second)
    assert key_id(first) == key_id(first)


def test_keyring_repr_shows_ids_never_keys() -> None:
    secret = os.urandom(32)
    text = repr(Keyring(secret))
    assert secret.hex() not in text
    assert key_id(secret).hex() in text


def test_keyring_refuses_keys_of_the_wrong_size() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        Keyring(b"x" * 31)


def test_handshake_completes_and_reports_the_key_used() -> None:
    keyring = random_keyring()
    initiator = Session.initiator(keyring, CLUSTER)
    responder = Session.responder(keyring, CLUSTER)
    assert pump(initiator, responder) == []
    assert responder.state is State.AWAIT_MESSAGE3
    (done,) = pump(responder, initiator)
    assert initiator.is_open
    (also_done,) = pump(initiator, responder)
    assert responder.is_open
    assert done == also_done
    assert getattr(done, "key_id", None) == key_id(keyring.current)


def test_handshake_messages_have_their_fixed_sizes() -> None:
    keyring = random_keyring()
    initiator = Session.initiator(keyring, CLUSTER)
    responder = Session.responder(keyring, CLUSTER)
    sizes = []
    for source, target in ((initiator, responder), (responder, initiator), (initiator, responder)):
        data = source.data_to_send()
        sizes.append(len(data) - 4)
        target.receive_data(data)
    assert tuple(sizes) == HANDSHAKE_MESSAGE_SIZES


def test_rotation_responder_accepts_current_and_previous_keys() -> None:
    old, new = os.urandom(32), os.urandom(32)
    rotated = Keyring(current=new, previous=old)
    for dialler_keyring in (Keyring(old), Keyring(new)):
        initiator = Session.initiator(dialler_keyring, CLUSTER)
        responder = Session.responder(rotated, CLUSTER)
        pump(initiator, responder)
        pump(responder, initiator)
        pump(initiator, responder)
        assert responder.is_open


def test_rotated_dialler_can_still_reach_a_node_holding_only_the_old_key() -> None:
    old, new = os.urandom(32), os.urandom(32)
    initiator = Session.initiator(Keyring(new, old), CLUSTER, use_previous_key=True)
    responder = Session.responder(Keyring(old), CLUSTER)
    pump(initiator, responder)
    pump(responder, initiator)
    pump(initiator, responder)
    assert responder.is_open


def test_responder_refuses_a_key_it_does_not_hold_without_replying() -> None:
    initiator = Session.initiator(random_keyring(), CLUSTER)
    responder = Session.responder(random_keyring(), CLUSTER)
    with pytest.raises(RemoteProtocolError, match="not in this node's keyring"):
        pump(initiator, responder)
    assert responder.state is State.ERROR
    assert responder.data_to_send() == b""  # nothing to tell a prober


def test_wrong_psk_with_the_same_key_id_fails_authentication() -> None:
    """A responder whose keyring maps the id to another key (forged id) fails at the AEAD."""
    real, forged = os.urandom(32), os.urandom(32)
    initiator = Session.initiator(Keyring(forged), CLUSTER)
    message1 = bytearray(initiator.data_to_send())
    message1[5:13] = key_id(real)  # claim the responder's key id
    responder = Session.responder(Keyring(real), CLUSTER)
    responder.receive_data(bytes(message1))
    with pytest.raises(RemoteProtocolError, match="handshake authentication failed"):
        pump(responder, initiator)
    assert initiator.state is State.ERROR


def test_wrong_cluster_id_fails_like_a_wrong_key() -> None:
    keyring = random_keyring()
    initiator = Session.initiator(keyring, "cluster-a")
    responder = Session.responder(keyring, "cluster-b")
    pump(initiator, responder)
    with pytest.raises(RemoteProtocolError, match="handshake authentication failed"):
        pump(responder, initiator)


def test_unsupported_protocol_version_is_refused() -> None:
    keyring = random_keyring()
    message1 = bytearray(Session.initiator(keyring, CLUSTER).data_to_send())
    message1[4] = PROTOCOL_VERSION + 1
    with pytest.raises(RemoteProtocolError, match="protocol version"):
        Session.responder(keyring, CLUSTER).receive_data(bytes(message1))


@pytest.mark.parametrize("point", LOW_ORDER_POINTS, ids=lambda p: p.hex()[:8])
def test_responder_refuses_low_order_initiator_key(point: bytes) -> None:
    keyring = random_keyring()
    message1 = bytes([PROTOCOL_VERSION]) + key_id(keyring.current) + point
    responder = Session.responder(keyring, CLUSTER)
    with pytest.raises(RemoteProtocolError, match="ephemeral key"):
        responder.receive_data(frame(message1))
    assert responder.data_to_send() == b""


@pytest.mark.parametrize("point", LOW_ORDER_POINTS, ids=lambda p: p.hex()[:8])
def test_initiator_refuses_low_order_responder_key(point: bytes) -> None:
    initiator = Session.initiator(random_keyring(), CLUSTER)
    initiator.data_to_send()
    message2 = point + bytes(HANDSHAKE_MESSAGE_SIZES[1] - 32)
    with pytest.raises(RemoteProtocolError, match="ephemeral key"):
        initiator.receive_data(frame(message2))


def test_replayed_first_message_gets_nowhere() -> None:
    """A recorded dialler's first message and confirmation, replayed to a fresh responder."""
    keyring = random_keyring()
    initiator = Session.initiator(keyring, CLUSTER)
    responder = Session.responder(keyring, CLUSTER)
    message1 = initiator.data_to_send()
    responder.receive_data(message1)
    initiator.receive_data(responder.data_to_send())
    message3 = initiator.data_to_send()

    victim = Session.responder(keyring, CLUSTER)
    victim.receive_data(message1)  # it answers with a fresh ephemeral...
    with pytest.raises(RemoteProtocolError, match="handshake authentication failed"):
        victim.receive_data(message3)  # ...so the old confirmation no longer fits
    assert not victim.is_open


def test_handshake_message_replayed_into_an_open_session_is_refused() -> None:
    keyring = random_keyring()
    initiator = Session.initiator(keyring, CLUSTER)
    responder = Session.responder(keyring, CLUSTER)
    message1 = initiator.data_to_send()
    responder.receive_data(message1)
    pump(responder, initiator)
    pump(initiator, responder)
    with pytest.raises(RemoteProtocolError):
        responder.receive_data(message1)
    assert responder.state is State.ERROR


def test_replayed_second_message_fails_for_a_new_dialler() -> None:
    keyring = random_keyring()
    first = Session.initiator(keyring, CLUSTER)
    responder = Session.responder(keyring, CLUSTER)
    pump(first, responder)
    message2 = responder.data_to_send()
    second = Session.initiator(keyring, CLUSTER)
    with pytest.raises(RemoteProtocolError, match="handshake authentication failed"):
        second.receive_data(message2)


@pytest.mark.parametrize("message", [0, 1, 2])
def test_any_flipped_bit_in_the_handshake_fails_it(message: int) -> None:
    size = HANDSHAKE_MESSAGE_SIZES[message]
    for bit in range((4 + size) * 8):
        keyring = random_keyring()
        initiator = Session.initiator(keyring, CLUSTER)
        responder = Session.responder(keyring, CLUSTER)
        order = [(initiator, responder), (responder, initiator), (initiator, responder)]
        refused = False
        try:
            for index, (source, target) in enumerate(order):
                data = bytearray(source.data_to_send())
                if index == message:
                    data[bit // 8] ^= 1 << (bit % 8)
                target.receive_data(bytes(data))
        except RemoteProtocolError:
            refused = True
        assert not (initiator.is_open and responder.is_open), bit
        assert refused, bit  # every handshake frame has a fixed length: a flip there is refused too
